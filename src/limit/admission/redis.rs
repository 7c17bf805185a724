//! Admission through Redis (`[limits] backend = "redis"`): the same layers as Redis buckets,
//! decided in one script call per request, and the [`Fallback`] policy while Redis cannot
//! be reached.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::Clock;

use super::{Admission, Admitted, Rejected};
use crate::backend::{BucketRef, CounterRef, Fallback, Gcra, LayerKind, RedisBackend, DENY_WAIT};
use crate::limit::{Decision, Quota, Scope};
use crate::usage::UsageState;

/// The admission layers as Redis buckets: key names (for the key layers, the prefix to which
/// the client key is appended) and GCRA parameters, computed once.
pub(super) struct RedisLayers {
    backend: RedisBackend,
    global: Option<RedisLayer>,
    routes: Vec<Option<RedisLayer>>,
    plans: Vec<RedisLayer>,
    default: RedisLayer,
}

struct RedisLayer {
    key: String,
    gcra: Gcra,
}

impl RedisLayers {
    fn new(
        backend: RedisBackend,
        global: Option<Quota>,
        routes: &[(String, Option<Quota>)],
        plans: &[(String, Quota)],
        default: Quota,
    ) -> RedisLayers {
        let layer = |kind, quota: Quota, name: &str| RedisLayer {
            key: backend.layer_key(kind, quota, name),
            gcra: Gcra::of(quota),
        };
        RedisLayers {
            global: global.map(|q| layer(LayerKind::Global, q, "")),
            routes: routes
                .iter()
                .map(|(name, quota)| quota.map(|q| layer(LayerKind::Route, q, name)))
                .collect(),
            // Keys of every plan with the same quota share one namespace: a key is in at
            // most one plan, and the same bucket whatever the plan's name.
            plans: plans
                .iter()
                .map(|(_, q)| layer(LayerKind::Key, *q, ""))
                .collect(),
            default: layer(LayerKind::Key, default, ""),
            backend,
        }
    }
}

/// The answer of [`Admission::admit`]: ready at once from the local engine, or after one
/// round trip to Redis. A future either way; the Tower layer looks inside to keep the local
/// path free of allocation.
pub enum Admit {
    /// Decided locally (or without Redis): `Some` until polled.
    Ready(Option<Result<Admitted, Rejected>>),
    /// Waiting for Redis; never longer than `limits.redis_timeout`.
    Pending(Pin<Box<dyn Future<Output = Result<Admitted, Rejected>> + Send>>),
}

impl Future for Admit {
    type Output = Result<Admitted, Rejected>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Admit::Ready(decision) => {
                Poll::Ready(decision.take().expect("Admit polled after it completed"))
            }
            Admit::Pending(future) => future.as_mut().poll(cx),
        }
    }
}

impl std::fmt::Debug for Admit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Admit::Ready(decision) => f.debug_tuple("Ready").field(decision).finish(),
            Admit::Pending(_) => f.write_str("Pending"),
        }
    }
}

impl<C: Clock> Admission<C> {
    /// The same layers, shared with every other replica through Redis (`backend = "redis"`),
    /// or decided locally again with `None`.
    ///
    /// With a backend, [`admit`](Self::admit) decides in Redis, in one round trip, and applies
    /// the backend's [`Fallback`] policy while Redis cannot be reached — with this
    /// `Admission`'s local buckets for [`Fallback::Local`]. [`check`](Self::check) stays local.
    pub fn with_backend(mut self, backend: Option<RedisBackend>) -> Self {
        self.shared = backend.map(|backend| {
            RedisLayers::new(
                backend,
                self.global.as_ref().map(|b| b.quota()),
                &self.route_quotas(),
                &self.plan_quotas(),
                self.default.quota(),
            )
        });
        self
    }
}

impl<C> Admission<C>
where
    C: Clock + Send + Sync + 'static,
{
    /// Admits or refuses one request on route number `route` for client `key`, with the
    /// configured backend.
    ///
    /// Locally this is [`check`](Self::check), ready at once. With a Redis backend it is one
    /// script call for all layers (same order, same semantics), or — when Redis is down,
    /// fails or misses its deadline — the [`Fallback`] policy's answer.
    pub fn admit(self: &Arc<Self>, route: usize, key: &str) -> Admit {
        match &self.shared {
            None => Admit::Ready(Some(self.check(route, key))),
            Some(shared) if !shared.backend.is_up() => {
                Admit::Ready(Some(self.fallback(shared, route, key)))
            }
            Some(_) => Admit::Pending(Box::pin(Arc::clone(self).check_shared(
                route,
                key.to_owned(),
                None,
            ))),
        }
    }

    /// The Redis path of [`admit`](Self::admit); `now` replaces Redis' clock in tests.
    pub(crate) async fn check_shared(
        self: Arc<Self>,
        route: usize,
        key: String,
        now: Option<Duration>,
    ) -> Result<Admitted, Rejected> {
        let shared = self
            .shared
            .as_ref()
            .expect("check_shared is only called with a Redis backend");
        let plan = self.plan_of.get(key.as_str()).copied();
        let (layer, quota) = match plan {
            Some(index) => (&shared.plans[index], self.plans[index].1.quota()),
            None => (&shared.default, self.default.quota()),
        };
        let key_bucket = RedisBackend::client_key(&layer.key, &key);
        // The key's usage counter, in the same call: its period from this replica's clock.
        let usage = self.usage_quota(plan).map(|usage| {
            let wall = self.wall.now();
            let window = usage.window(wall);
            let state = move |used| UsageState {
                quota: usage,
                used,
                period_secs: window.secs(),
                reset: window.until_end(wall),
            };
            (usage, window, state)
        });
        let counter_key = usage
            .as_ref()
            .map(|(usage, window, _)| shared.backend.usage_key(&key, usage, *window));
        // At most three buckets, in the order the local engine checks them.
        let mut buckets = Vec::with_capacity(3);
        let mut scopes = Vec::with_capacity(3);
        if let (Some(layer), Some(bucket)) = (&shared.global, &self.global) {
            buckets.push(BucketRef {
                key: &layer.key,
                gcra: layer.gcra,
            });
            scopes.push((Scope::Global, bucket.quota()));
        }
        if let Some((Some(layer), Some(bucket))) = shared
            .routes
            .get(route)
            .zip(self.routes.get(route))
            .map(|(s, r)| (s.as_ref(), r.bucket.as_ref()))
        {
            buckets.push(BucketRef {
                key: &layer.key,
                gcra: layer.gcra,
            });
            scopes.push((Scope::Route, bucket.quota()));
        }
        buckets.push(BucketRef {
            key: &key_bucket,
            gcra: layer.gcra,
        });
        scopes.push((Scope::Key, quota));
        let counter =
            usage
                .as_ref()
                .zip(counter_key.as_deref())
                .map(|((usage, window, _), key)| CounterRef {
                    key,
                    limit: usage.limit,
                    expire_at: Duration::from_secs(window.end),
                });
        match shared.backend.eval_counted(&buckets, counter, now).await {
            Ok(verdict) => {
                // Keep the local counters in step with the shared count, for the fallback.
                let counted = usage
                    .as_ref()
                    .zip(verdict.used)
                    .map(|((u, w, state), used)| {
                        self.usage.observe(&key, *w, u.limit, used, plan.is_some());
                        state(used)
                    });
                if verdict.bucket == buckets.len() {
                    let state =
                        counted.expect("only a call with a counter refuses past its buckets");
                    return Err(Rejected {
                        scope: Scope::Quota,
                        quota,
                        wait: state.reset,
                        usage: Some(state),
                    });
                }
                let (scope, quota) = scopes[verdict.bucket];
                match verdict.decision {
                    Decision::Allowed { remaining, reset } => {
                        if counted.is_some_and(|s| s.used == s.quota.limit) {
                            self.exhausted(plan);
                        }
                        Ok(Admitted {
                            quota,
                            remaining,
                            reset,
                            usage: counted,
                        })
                    }
                    Decision::Limited { wait } => Err(Rejected {
                        scope,
                        quota,
                        wait,
                        usage: None,
                    }),
                }
            }
            Err(_unavailable) => self.fallback(shared, route, &key),
        }
    }
}

impl<C: Clock> Admission<C> {
    /// `key`'s usage quota and its count in the current period: Redis' count with the
    /// Redis backend (this process's when Redis does not answer), else this process's.
    /// `None` for a key without a usage quota. Creates no state.
    pub async fn usage_now(&self, key: &str) -> Option<UsageState> {
        let mut state = self.usage_of(key)?;
        if let Some(shared) = self.shared.as_ref().filter(|s| s.backend.is_up()) {
            let window = state.quota.window(self.wall.now());
            let counter = shared.backend.usage_key(key, &state.quota, window);
            if let Ok(used) = shared.backend.usage(&counter).await {
                state.used = used;
            }
        }
        Some(state)
    }

    /// Sets `key`'s count in the current period to `used` (API Gateway's `UpdateUsage`;
    /// `0` is `ResetUsage`), here and, with the Redis backend, in Redis. `Ok(None)` for a key
    /// without a usage quota; `Err` when Redis did not take it (the local count is set).
    pub async fn set_usage(
        &self,
        key: &str,
        used: u64,
    ) -> Result<Option<UsageState>, crate::backend::Unavailable> {
        let plan = self.plan_of.get(key).copied();
        let Some(quota) = self.usage_quota(plan) else {
            return Ok(None);
        };
        let now = self.wall.now();
        let window = quota.window(now);
        self.usage.set(key, window, quota.limit, used);
        if let Some(shared) = &self.shared {
            let counter = shared.backend.usage_key(key, &quota, window);
            shared
                .backend
                .set_usage(&counter, used, Duration::from_secs(window.end))
                .await?;
        }
        Ok(Some(UsageState {
            quota,
            used,
            period_secs: window.secs(),
            reset: window.until_end(now),
        }))
    }

    /// The decision while Redis cannot be reached, by the backend's policy.
    fn fallback(
        &self,
        shared: &RedisLayers,
        route: usize,
        key: &str,
    ) -> Result<Admitted, Rejected> {
        let policy = shared.backend.fallback();
        metrics::counter!("sluicegate_limit_backend_fallbacks_total", "policy" => policy.as_str())
            .increment(1);
        match policy {
            Fallback::Local => self.check(route, key),
            Fallback::Allow => {
                // No bucket was consulted: report the key layer as full.
                let quota = self.key_quota(key);
                Ok(Admitted {
                    quota,
                    remaining: quota.burst,
                    reset: Duration::ZERO,
                    usage: None,
                })
            }
            Fallback::Deny => Err(Rejected {
                scope: Scope::Global,
                quota: self
                    .global
                    .as_ref()
                    .map_or_else(|| self.key_quota(key), |b| b.quota()),
                wait: DENY_WAIT,
                usage: None,
            }),
        }
    }

    fn key_quota(&self, key: &str) -> Quota {
        match self.plan_of.get(key) {
            Some(&index) => self.plans[index].1.quota(),
            None => self.default.quota(),
        }
    }

    fn route_quotas(&self) -> Vec<(String, Option<Quota>)> {
        self.routes
            .iter()
            .map(|r| (r.name.clone(), r.bucket.as_ref().map(|b| b.quota())))
            .collect()
    }

    fn plan_quotas(&self) -> Vec<(String, Quota)> {
        self.plans
            .iter()
            .map(|(name, layer)| (name.clone(), layer.quota()))
            .collect()
    }

    /// The Redis backend, with `backend = "redis"`.
    pub fn backend(&self) -> Option<&RedisBackend> {
        self.shared.as_ref().map(|s| &s.backend)
    }
}
