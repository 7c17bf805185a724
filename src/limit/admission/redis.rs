//! Admission through Redis (`[limits] backend = "redis"`): the same layers as Redis buckets,
//! decided in one script call per request (one call per layer on a Redis Cluster; on one
//! node the calls made together are batched into one, see `backend`), and the
//! [`Fallback`] policy while Redis cannot be reached.
//!
//! # The local fallback's share, and why the fleet stays within the bound
//!
//! `on_backend_error = "local"` decides with this `Admission`'s local buckets, which hold
//! the configured quotas, but a fallback admission takes **N tokens** from each layer (N =
//! [`RedisBackend::fleet_share`], clamped to the layer's burst): each replica gets `rate / N`
//! and `burst / N`. Two more rules keep the fleet from spending a local and a shared token
//! for the same time window:
//!
//! - **Mirror**: while Redis decides, every token a shared bucket gives this replica is also
//!   taken (N at a time, when available) from the matching local bucket. A replica that was
//!   spending its share of the shared limits therefore falls back with an empty local
//!   bucket, not a full one: without this each flap would hand the fleet a fresh `burst`.
//! - **Charge**: every token the fallback admits is recorded per shared bucket and charged
//!   to it (`charge.lua`) as soon as Redis answers again, so the shared buckets resume from
//!   what the fleet really spent.
//!
//! Over a run of length t the shared buckets admit at most `burst + rate × t` tokens,
//! charges included; what escapes them is what the fallback admitted and has not charged
//! yet (at most one down window's `rate × window` plus each replica's unmirrored local
//! burst / N), plus what a charge cannot push past empty (a bucket holds no debt), which
//! is at most one `burst` per recovery, and only when the fleet's load was uneven while up. `tests/redis_flap.rs` measures the flapping and killed cases.
//!
//! # Redis Cluster
//!
//! A script call may touch only one slot, and the layers' keys lie in different slots, so
//! a request makes one call per layer: the global and route calls together (concurrently,
//! pipelined on their masters' connections), then — only when both admitted — the key
//! layer's call. First refusal wins as on one node: a route refusal leaves the global token
//! taken (as API Gateway does); a global refusal gives back the route token taken
//! concurrently (`charge.lua` with −1, before the refusal is answered), so the route bucket
//! never counts a request that the layer above it refused. That costs two round trips instead of one, and keeps the key
//! layer's call (and anything it counts) after every bucket above it admitted.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::Clock;

use super::{Admission, Admitted, Rejected};
use crate::backend::{BucketRef, CounterRef, Fallback, Gcra, LayerKind, RedisBackend, DENY_WAIT};
use crate::limit::{Decision, Quota, Scope};
use crate::usage::UsageState;

/// Shared buckets with uncharged fallback tokens that one replica remembers; tokens for
/// further buckets are not charged (and counted in
/// `sluicegate_limit_backend_uncharged_total`), so key spraying while Redis is down cannot
/// grow this without bound.
const MAX_CHARGED_BUCKETS: usize = 65_536;

/// The admission layers as Redis buckets: key names (for the key layers, the prefix to which
/// the client key is appended) and GCRA parameters, computed once.
pub(super) struct RedisLayers {
    backend: RedisBackend,
    global: Option<RedisLayer>,
    routes: Vec<Option<RedisLayer>>,
    plans: Vec<RedisLayer>,
    default: RedisLayer,
    /// Tokens the local fallback admitted, to charge to the shared buckets.
    ledger: Arc<Mutex<Ledger>>,
}

struct RedisLayer {
    key: String,
    gcra: Gcra,
}

impl RedisLayer {
    /// The Redis key of client `key`'s bucket in this key layer.
    fn key_bucket(&self, key: &str) -> String {
        RedisBackend::client_key(&self.key, key)
    }
}

/// Uncharged fallback tokens per shared bucket, and whether a task is charging them.
#[derive(Default)]
struct Ledger {
    pending: HashMap<String, (Gcra, i64)>,
    charging: bool,
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
            ledger: Arc::default(),
        }
    }

    /// Records `tokens` taken locally from the shared bucket `key` and makes sure a task
    /// charges them once Redis answers.
    fn record(&self, charges: impl IntoIterator<Item = (String, Gcra)>) {
        let mut ledger = self.ledger.lock().expect("ledger lock never poisoned");
        for (key, gcra) in charges {
            let len = ledger.pending.len();
            match ledger.pending.get_mut(&key) {
                Some((_, tokens)) => *tokens += 1,
                None if len < MAX_CHARGED_BUCKETS => {
                    ledger.pending.insert(key, (gcra, 1));
                }
                None => metrics::counter!("sluicegate_limit_backend_uncharged_total").increment(1),
            }
        }
        if ledger.charging || ledger.pending.is_empty() {
            return;
        }
        // Outside a runtime (a synchronous caller) nothing could run the task: the tokens
        // stay recorded for the next fallback decision made inside one.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            ledger.charging = true;
            runtime.spawn(charge_when_up(
                self.backend.clone(),
                Arc::clone(&self.ledger),
            ));
        }
    }
}

/// Charges sent at once after an outage: enough to pipeline, few enough that admission
/// calls queued behind them on the same connection keep their deadline.
const CHARGES_AT_ONCE: usize = 64;

/// Charges the ledger's tokens to the shared buckets once Redis answers, [`CHARGES_AT_ONCE`]
/// at a time; what could not be sent because Redis went down again is kept for the next
/// time it is up ([`PROBE_EVERY`] later). Ends when the ledger is empty.
async fn charge_when_up(backend: RedisBackend, ledger: Arc<Mutex<Ledger>>) {
    loop {
        backend.until_up().await;
        let pending: Vec<_> =
            std::mem::take(&mut ledger.lock().expect("ledger lock never poisoned").pending)
                .into_iter()
                .collect();
        let mut failed = Vec::new();
        for chunk in pending.chunks(CHARGES_AT_ONCE) {
            let mut calls = tokio::task::JoinSet::new();
            for (key, (gcra, tokens)) in chunk.iter().cloned() {
                let backend = backend.clone();
                calls.spawn(async move {
                    match backend.charge(&key, gcra, tokens).await {
                        Ok(()) => None,
                        // Not sent: Redis is down again.
                        Err(crate::backend::Unavailable) => Some((key, gcra, tokens)),
                    }
                });
            }
            while let Some(done) = calls.join_next().await {
                if let Ok(Some(charge)) = done {
                    failed.push(charge);
                }
            }
        }
        {
            let mut ledger = ledger.lock().expect("ledger lock never poisoned");
            for (key, gcra, tokens) in failed {
                ledger.pending.entry(key).or_insert((gcra, 0)).1 += tokens;
            }
            if ledger.pending.is_empty() {
                ledger.charging = false;
                return;
            }
        }
        tokio::time::sleep(crate::backend::PROBE_EVERY).await;
    }
}

/// The answer of [`Admission::admit`]: ready at once from the local engine, or after one
/// round trip to Redis. A future either way; the Tower layer looks inside to keep the local
/// path free of allocation.
pub enum Admit {
    /// Decided locally (or without Redis): `Some` until polled.
    Ready(Option<Result<Admitted, Rejected>>),
    /// Waiting for Redis; never longer than `limits.redis_timeout` on one node, and twice
    /// that on a Redis Cluster (the key layer's call follows the global and route calls).
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
        let key_bucket = layer.key_bucket(&key);
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
        let verdict = if shared.backend.is_cluster() {
            per_slot(&shared.backend, &buckets, counter, now).await
        } else {
            shared.backend.eval_batched(&buckets, counter, now).await
        };
        match verdict {
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
                    // Every bucket gave its shared token before the counter refused.
                    self.mirror(&scopes, route, &key, shared.backend.fleet_share());
                    return Err(Rejected {
                        scope: Scope::Quota,
                        quota,
                        wait: state.reset,
                        usage: Some(state),
                    });
                }
                let (scope, quota) = scopes[verdict.bucket];
                // The layers that gave a shared token: all when admitted, those above the
                // refusing one otherwise.
                let took = match verdict.decision {
                    Decision::Allowed { .. } => verdict.bucket + 1,
                    Decision::Limited { .. } => verdict.bucket,
                };
                self.mirror(&scopes[..took], route, &key, shared.backend.fleet_share());
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

/// One script call per layer (a Redis Cluster: each layer's key in its own slot), with the
/// ordering the module docs describe. The answer is `eval`'s for the same buckets.
async fn per_slot(
    backend: &RedisBackend,
    buckets: &[BucketRef<'_>],
    counter: Option<CounterRef<'_>>,
    now: Option<Duration>,
) -> Result<crate::backend::Verdict, crate::backend::Unavailable> {
    use crate::backend::Verdict;
    let (upper, key) = buckets.split_at(buckets.len() - 1);
    match upper {
        [] => {}
        [only] => {
            let verdict = backend.eval(std::slice::from_ref(only), now).await?;
            if !verdict.decision.is_allowed() {
                return Ok(Verdict {
                    bucket: 0,
                    ..verdict
                });
            }
        }
        [global, route] => {
            let (g, r) = tokio::join!(
                backend.eval(std::slice::from_ref(global), now),
                backend.eval(std::slice::from_ref(route), now),
            );
            let (g, r) = (g?, r);
            if !g.decision.is_allowed() {
                if let Ok(r) = r {
                    if r.decision.is_allowed() {
                        // The route gave a token for a request the global layer refused.
                        // Given back before answering (one more round trip, on the refused
                        // path only), so a flood of refusals spawns nothing; if it fails the
                        // token stays spent: conservative.
                        let _ = backend.charge(route.key, route.gcra, -1).await;
                    }
                }
                return Ok(Verdict { bucket: 0, ..g });
            }
            let r = r?;
            if !r.decision.is_allowed() {
                return Ok(Verdict { bucket: 1, ..r });
            }
        }
        _ => unreachable!("at most three layers: global, route, key"),
    }
    // The key's usage counter shares its bucket's hash tag, so it is counted in the same
    // call, after every layer admitted.
    let verdict = backend.eval_counted(key, counter, now).await?;
    // The key call's index is within its own slice: 0 for its bucket, 1 (past it) for a
    // usage-quota refusal.
    Ok(Verdict {
        bucket: upper.len() + verdict.bucket,
        ..verdict
    })
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
            Fallback::Local => self.local_share(shared, route, key),
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

    /// The local fallback: the layered check at this replica's share (N tokens a request),
    /// recording one token per layer that admitted, for the shared buckets.
    fn local_share(
        &self,
        shared: &RedisLayers,
        route: usize,
        key: &str,
    ) -> Result<Admitted, Rejected> {
        let cost = shared.backend.fleet_share();
        let mut charges = Vec::with_capacity(3);
        let decision = (|| {
            if let (Some(bucket), Some(layer)) = (&self.global, &shared.global) {
                super::refuse(Scope::Global, bucket.quota(), bucket.check_n(cost))?;
                charges.push((layer.key.clone(), layer.gcra));
            }
            if let Some((Some(bucket), Some(layer))) = self
                .routes
                .get(route)
                .zip(shared.routes.get(route))
                .map(|(r, s)| (r.bucket.as_ref(), s.as_ref()))
            {
                super::refuse(Scope::Route, bucket.quota(), bucket.check_n(cost))?;
                charges.push((layer.key.clone(), layer.gcra));
            }
            let plan = self.plan_of.get(key).copied();
            let (local, layer) = match plan {
                Some(index) => (&self.plans[index].1, &shared.plans[index]),
                None => (&self.default, &shared.default),
            };
            let checked = local.check_hash_n(self.hasher.hash_one(key), cost);
            match checked.decision {
                Decision::Allowed { remaining, reset } => {
                    charges.push((layer.key_bucket(key), layer.gcra));
                    // The local usage counters follow Redis' count while it answers, so
                    // they take over from it here.
                    Ok(Admitted {
                        quota: local.quota(),
                        remaining,
                        reset,
                        usage: self.count_usage(key, plan, local.quota())?,
                    })
                }
                Decision::Limited { wait } => Err(Rejected {
                    scope: Scope::Key,
                    quota: local.quota(),
                    wait,
                    usage: None,
                }),
            }
        })();
        if !charges.is_empty() {
            shared.record(charges);
        }
        decision
    }

    /// Takes `cost` tokens, where available, from the local buckets of the layers in
    /// `scopes` (those that just gave a shared token): see "Mirror" in the module docs.
    fn mirror(&self, scopes: &[(Scope, Quota)], route: usize, key: &str, cost: u32) {
        for (scope, _) in scopes {
            match scope {
                Scope::Global => {
                    if let Some(bucket) = &self.global {
                        bucket.check_n(cost);
                    }
                }
                Scope::Route => {
                    if let Some(bucket) = self.routes.get(route).and_then(|r| r.bucket.as_ref()) {
                        bucket.check_n(cost);
                    }
                }
                _ => {
                    let local = match self.plan_of.get(key) {
                        Some(&index) => &self.plans[index].1,
                        None => &self.default,
                    };
                    local.check_hash_n(self.hasher.hash_one(key), cost);
                }
            }
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

    /// Whether fallback tokens are still waiting to be charged to the shared buckets.
    #[cfg(test)]
    pub(crate) fn charges_pending(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| {
            let ledger = s.ledger.lock().expect("ledger lock never poisoned");
            ledger.charging || !ledger.pending.is_empty()
        })
    }

    /// The Redis backend, with `backend = "redis"`.
    pub fn backend(&self) -> Option<&RedisBackend> {
        self.shared.as_ref().map(|s| &s.backend)
    }
}
