//! Assembling the routes: one [`Invoker`] (and so one gate) per function, one
//! [`Batcher`] per route, one dead-letter sink per route that names one. Used by `serve`
//! and by `dlq redrive`, so replays pass the same limits as live traffic.

use std::collections::HashMap;
use std::sync::Arc;

use crate::coalesce::{BatchSpec, Batcher};
use crate::config::Config;
use crate::dlq::DeadLetterSink;
use crate::invoke::{Gate, GateConfig, Invoker};

/// One route, ready to take records.
pub struct RouteHandle {
    pub name: String,
    pub batcher: Batcher,
    pub invoker: Arc<Invoker>,
}

/// Every route of a config, in config order.
pub struct Pipeline {
    pub routes: Vec<RouteHandle>,
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
        gate.max_concurrency = gate.max_concurrency.min(r.invoke.max_concurrency as usize);
        gate.rate = gate.rate.min(r.invoke.rate);
        gate.burst = gate.burst.min(r.invoke.burst);
        gate.adaptive |= r.invoke.adaptive;
    }
    gate
}

impl Pipeline {
    /// Builds and starts every route. `dead_letters = false` leaves the sinks closed
    /// (redrive reports failures itself instead of writing them back).
    pub async fn build(
        config: &Config,
        client: &aws_sdk_lambda::Client,
        dead_letters: bool,
    ) -> std::io::Result<Pipeline> {
        let mut invokers: HashMap<&str, Arc<Invoker>> = HashMap::new();
        let mut routes = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            let invoker = invokers
                .entry(route.function.as_str())
                .or_insert_with(|| {
                    let gate = Gate::new(gate_config(config, &route.function));
                    Arc::new(Invoker::new(client.clone(), route.function.clone(), gate))
                })
                .clone();
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
        Ok(Pipeline { routes })
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
