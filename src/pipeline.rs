//! Assembling the routes: one [`Invoker`] (and so one gate) per function, one
//! [`Batcher`] per route, one dead-letter sink per route that names one. Used by `serve`
//! and by `dlq redrive`, so replays pass the same limits as live traffic.
//!
//! On reload the previous invokers are handed back in: a function that is still targeted
//! keeps its invoker and gate, reconfigured in place to the new limits, so batchers still
//! draining on the old config and the new ones share one set of permits — Lambda never
//! sees more than `max_concurrency` because of a reload.
//!
//! With `[limits] backend = "redis"` the pipeline also connects the [`RedisBackend`]
//! ([`limit_backend`]): each function's gate takes its invoke-rate token from Redis, and the
//! server hands the same backend (one connection, one health state) to admission.

use std::collections::HashMap;
use std::sync::Arc;

use crate::backend::{Fallback, RedisBackend, RedisOptions};
use crate::coalesce::{BatchSpec, Batcher};
use crate::config::{BackendErrorPolicy, Config, LimitBackend, LimitsConfig};
use crate::dlq::DeadLetterSink;
use crate::invoke::{Gate, GateConfig, Invoker, LambdaClient};

/// One route, ready to take records.
pub struct RouteHandle {
    /// The route's name (`routes[].name`).
    pub name: String,
    /// The route's queue and batch worker: where its records are submitted.
    pub batcher: Batcher,
    /// The route's function's invoker, shared by every route that targets that function.
    pub invoker: Arc<Invoker>,
}

/// Every route of a config, in config order.
pub struct Pipeline {
    /// One handle per `[[routes]]` entry, in the config's order.
    pub routes: Vec<RouteHandle>,
    /// The shared-limits backend, with `[limits] backend = "redis"`; admission uses it too.
    pub limit_backend: Option<RedisBackend>,
}

/// The Redis options `[limits]` asks for; `None` for `backend = "local"`.
pub fn redis_options(limits: &LimitsConfig) -> Option<RedisOptions> {
    (limits.backend == LimitBackend::Redis).then(|| RedisOptions {
        timeout: limits.redis_timeout,
        fallback: match limits.on_backend_error {
            BackendErrorPolicy::Local => Fallback::Local,
            BackendErrorPolicy::Allow => Fallback::Allow,
            BackendErrorPolicy::Deny => Fallback::Deny,
        },
        cluster: limits.redis_cluster.clone(),
        expected_replicas: limits.expected_replicas,
        down_after: limits.redis_down_after,
        up_after: limits.redis_up_after,
        ..RedisOptions::new(limits.redis_url.clone())
    })
}

/// Connects the backend `[limits]` asks for: `None` for `local`. With `previous` (a reload)
/// whose options are the same, that backend — its connection and health state — is kept.
///
/// An unreachable Redis does not fail this (the backend starts down and the
/// `on_backend_error` policy applies until Redis answers; connecting waits for it at most a
/// second); only an unusable `redis_url` does.
pub async fn limit_backend(
    limits: &LimitsConfig,
    previous: Option<&RedisBackend>,
) -> std::io::Result<Option<RedisBackend>> {
    let Some(options) = redis_options(limits) else {
        return Ok(None);
    };
    if let Some(previous) = previous.filter(|p| *p.options() == options) {
        return Ok(Some(previous.clone()));
    }
    RedisBackend::connect(options).await.map(Some).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{}: {e}",
                if limits.redis_cluster.is_empty() {
                    "limits.redis_url"
                } else {
                    "limits.redis_cluster"
                }
            ),
        )
    })
}

/// The gate of a function shared by several routes: the tightest of their invoke limits.
fn gate_config(config: &Config, function: &str) -> GateConfig {
    let routes = config.routes.iter().filter(|r| r.function == function);
    let mut gate = GateConfig {
        max_concurrency: usize::MAX,
        rate: f64::INFINITY,
        burst: u32::MAX,
        adaptive: false,
    };
    for r in routes {
        gate.max_concurrency = gate
            .max_concurrency
            .min(r.invoke.max_concurrency.get() as usize);
        gate.rate = gate.rate.min(r.invoke.rate);
        gate.burst = gate.burst.min(r.invoke.burst.get());
        gate.adaptive |= r.invoke.adaptive;
    }
    gate
}

impl Pipeline {
    /// Builds and starts every route, connecting the `[limits]` backend first. `dead_letters
    /// = false` leaves the sinks closed (redrive reports failures itself instead of writing
    /// them back).
    pub async fn build(
        config: &Config,
        client: &LambdaClient,
        dead_letters: bool,
    ) -> std::io::Result<Pipeline> {
        let backend = limit_backend(&config.limits, None).await?;
        Pipeline::build_with(config, client, dead_letters, backend, &[]).await
    }

    /// [`build`](Self::build) with an already connected backend (`None`: local buckets).
    /// A function with an invoker in `previous` (the running pipeline, on reload) keeps
    /// it, its gate reconfigured to `config`'s limits and backend.
    pub async fn build_with(
        config: &Config,
        client: &LambdaClient,
        dead_letters: bool,
        limit_backend: Option<RedisBackend>,
        previous: &[Arc<Invoker>],
    ) -> std::io::Result<Pipeline> {
        let mut invokers: HashMap<&str, Arc<Invoker>> = HashMap::new();
        // Gates kept from the running app change only once the whole build has succeeded:
        // a refused reload must leave the running limits exactly as they were.
        let mut reconfigure: Vec<(Arc<Invoker>, GateConfig)> = Vec::new();
        let mut routes = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            let invoker = match invokers.get(route.function.as_str()) {
                Some(invoker) => Arc::clone(invoker),
                None => {
                    let gate_config = gate_config(config, &route.function);
                    let invoker = match previous.iter().find(|i| i.function() == route.function) {
                        Some(kept) => {
                            reconfigure.push((Arc::clone(kept), gate_config));
                            Arc::clone(kept)
                        }
                        None => {
                            let gate = match &limit_backend {
                                Some(backend) => {
                                    Gate::shared(gate_config, backend.clone(), &route.function)
                                }
                                None => Gate::new(gate_config),
                            };
                            Arc::new(Invoker::new(client, route.function.clone(), gate)?)
                        }
                    };
                    invokers.insert(route.function.as_str(), Arc::clone(&invoker));
                    invoker
                }
            };
            let dlq = match (&route.dlq, dead_letters) {
                (Some(dlq), true) => Some(
                    DeadLetterSink::open(dlq, &config.lambda)
                        .await
                        .map_err(|e| {
                            std::io::Error::new(
                                e.kind(),
                                format!(
                                    "route {}: cannot open its dead-letter sink: {e}",
                                    route.name
                                ),
                            )
                        })?,
                ),
                _ => None,
            };
            routes.push(RouteHandle {
                name: route.name.clone(),
                batcher: Batcher::spawn(BatchSpec::from_route(route), Arc::clone(&invoker), dlq),
                invoker,
            });
        }
        for (kept, gate_config) in reconfigure {
            kept.gate().reconfigure(gate_config);
            kept.gate()
                .set_backend(limit_backend.clone(), kept.function());
        }
        Ok(Pipeline {
            routes,
            limit_backend,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_sharing_a_function_share_the_tightest_limits() {
        let config = Config::from_toml(
            r#"
[[routes]]
name = "a"
function = "f"
invoke = { rate = 8.0, burst = 15, max_concurrency = 5 }
[[routes]]
name = "b"
function = "f"
invoke = { rate = 20.0, burst = 4, max_concurrency = 9, adaptive = true }
[[routes]]
name = "c"
function = "g"
"#,
        )
        .unwrap();
        assert_eq!(
            gate_config(&config, "f"),
            GateConfig {
                max_concurrency: 5,
                rate: 8.0,
                burst: 4,
                adaptive: true
            }
        );
        assert_eq!(
            gate_config(&config, "g"),
            GateConfig {
                max_concurrency: 10,
                rate: 10.0,
                burst: 10,
                adaptive: false
            }
        );
    }
}
