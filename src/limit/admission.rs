//! The layered admission decision: global → route → key, locally or through Redis.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::Clock;

use super::bucket::Bucket;
use super::clock::DefaultClock;
use super::engine::KeyBudget;
use super::keyed::KeyedBuckets;
use super::{Decision, Quota, Scope};
use crate::backend::{BucketRef, Fallback, Gcra, RedisBackend, DENY_WAIT};

/// A usage plan: API keys that each get a bucket with this quota.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The plan's name in the config (`[[plans]] name`).
    pub name: String,
    /// The bucket each of the plan's keys gets.
    pub quota: Quota,
    /// The API keys on this plan.
    pub keys: Vec<String>,
}

/// Usage plans from the config, and the `default` quota for keys without one.
#[derive(Clone, Debug, PartialEq)]
pub struct Plans {
    default: Quota,
    plans: Vec<Plan>,
}

impl Plans {
    /// `plans` is `(plan name, quota, API keys)` in config order. The config loader rejects a
    /// key listed in two plans; should one slip through, the first plan listing it wins.
    pub fn new(default: Quota, plans: Vec<(String, Quota, Vec<String>)>) -> Self {
        let plans = plans
            .into_iter()
            .map(|(name, quota, keys)| Plan { name, quota, keys })
            .collect();
        Plans { default, plans }
    }

    /// The quota of keys without a plan (and of the overflow bucket).
    pub fn default_quota(&self) -> Quota {
        self.default
    }

    /// The plans, in config order.
    pub fn plans(&self) -> &[Plan] {
        &self.plans
    }
}

/// An admitted request: its key layer's state, for the `RateLimit` header.
///
/// The admission middleware inserts it into the request's extensions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Admitted {
    /// The key layer's quota (the key's plan, or `default`).
    pub quota: Quota,
    /// Whole tokens left in the key's bucket.
    pub remaining: u32,
    /// Time until the key's bucket is full again.
    pub reset: Duration,
}

/// A refused request: the refusing layer, its quota and the exact wait for its next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rejected {
    /// The layer that refused.
    pub scope: Scope,
    /// That layer's quota (for `RateLimit-Policy`).
    pub quota: Quota,
    /// Exact and never early; [`CLOSED_WAIT`](super::CLOSED_WAIT) for a closed layer. The
    /// server rounds it up to whole seconds (at least 1) for `Retry-After`.
    pub wait: Duration,
}

struct Route<C: Clock> {
    name: String,
    bucket: Option<Arc<Bucket<C>>>,
}

/// All admission layers of one proxy: shared by every request (behind an `Arc`), lock-free
/// for the unkeyed layers and shard-locked for keyed ones.
///
/// Layers are held by `Arc` so that [`reconfigured`](Self::reconfigured) can hand a layer
/// whose quota did not change to the new `Admission` as it is: both then draw from the same
/// bucket, so requests still in flight on the old one and new requests on the new one are
/// counted together, and no token is lost or minted by a reload.
pub struct Admission<C: Clock = DefaultClock> {
    global: Option<Arc<Bucket<C>>>,
    routes: Vec<Route<C>>,
    /// Exact API key → index into `plans`. Keyed by the full string, not its hash, so a
    /// hash collision can never grant a plan.
    plan_of: HashMap<Box<str>, usize, ahash::RandomState>,
    plans: Vec<(String, Arc<KeyedBuckets<C>>)>,
    /// Keys without a plan; owns the overflow bucket.
    default: Arc<KeyedBuckets<C>>,
    budget: Arc<KeyBudget>,
    /// Hashes client keys for every keyed layer; seeded randomly per process, and handed on
    /// by `reconfigured` because carried-over layers are keyed by these hashes.
    hasher: ahash::RandomState,
    overflowed: AtomicU64,
    clock: C,
    /// With `backend = "redis"`: the same layers as Redis buckets. The local layers above
    /// are then the fallback (`on_backend_error = "local"`).
    shared: Option<Shared>,
}

/// The admission layers as Redis buckets: key names (for the key layers, the prefix to which
/// the client key is appended) and GCRA parameters, computed once.
struct Shared {
    backend: RedisBackend,
    global: Option<SharedLayer>,
    routes: Vec<Option<SharedLayer>>,
    plans: Vec<SharedLayer>,
    default: SharedLayer,
}

struct SharedLayer {
    key: String,
    gcra: Gcra,
}

impl Shared {
    fn new(
        backend: RedisBackend,
        global: Option<Quota>,
        routes: &[(String, Option<Quota>)],
        plans: &[(String, Quota)],
        default: Quota,
    ) -> Shared {
        let layer = |kind, quota: Quota, name: &str| SharedLayer {
            key: backend.layer_key(kind, quota, name),
            gcra: Gcra::of(quota),
        };
        Shared {
            global: global.map(|q| layer('g', q, "")),
            routes: routes
                .iter()
                .map(|(name, quota)| quota.map(|q| layer('r', q, name)))
                .collect(),
            // Keys of every plan with the same quota share one namespace: a key is in at
            // most one plan, and the same bucket whatever the plan's name.
            plans: plans.iter().map(|(_, q)| layer('k', *q, "")).collect(),
            default: layer('k', default, ""),
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

impl<C: Clock + Clone> Admission<C> {
    /// Builds every layer with full buckets, decided locally.
    ///
    /// - `global`: the account/stage layer; `None` for none.
    /// - `routes`: `(route name, route layer)`, indexed by position in [`check`](Self::check).
    /// - `plans`: plan keys and the `default` quota for every other key.
    /// - `max_keys`: bound on tracked keys across all keyed layers (see the module docs for
    ///   what happens at the bound).
    pub fn new(
        global: Option<Quota>,
        routes: Vec<(String, Option<Quota>)>,
        plans: Plans,
        max_keys: usize,
        clock: C,
    ) -> Self {
        let budget = Arc::new(KeyBudget::new(max_keys));
        Admission::build(
            global,
            routes,
            plans,
            budget,
            ahash::RandomState::new(),
            clock,
            |_| None,
        )
    }

    /// The same layers, shared with every other replica through Redis (`backend = "redis"`),
    /// or decided locally again with `None`.
    ///
    /// With a backend, [`admit`](Self::admit) decides in Redis, in one round trip, and applies
    /// the backend's [`Fallback`] policy while Redis cannot be reached — with this
    /// `Admission`'s local buckets for [`Fallback::Local`]. [`check`](Self::check) stays local.
    pub fn with_backend(mut self, backend: Option<RedisBackend>) -> Self {
        self.shared = backend.map(|backend| {
            Shared::new(
                backend,
                self.global.as_ref().map(|b| b.quota()),
                &self.route_quotas(),
                &self.plan_quotas(),
                self.default.quota(),
            )
        });
        self
    }

    /// The admission for a new configuration (a live reload), carrying over what did not
    /// change.
    ///
    /// A layer whose quota is unchanged — the global layer, a route (matched by name), a plan
    /// (matched by name), the `default` key layer — is the **same** bucket in the result, with
    /// its current tokens and tracked keys; layers that are new or whose quota changed start
    /// full. The key budget is shared too, with `max_keys` as its new bound (a lower bound
    /// stops new keys until reclaim frees room; it evicts none), and the slots of dropped
    /// layers come back when the old `Admission` is dropped. Plan membership is rebuilt from
    /// `plans`. A Redis backend is kept; its buckets are named after their quotas, so there
    /// too unchanged layers keep their state and changed ones start full.
    ///
    /// `self` stays usable: requests still in flight on it draw from the carried-over
    /// buckets, so swapping the two loses or mints no token.
    pub fn reconfigured(
        &self,
        global: Option<Quota>,
        routes: Vec<(String, Option<Quota>)>,
        plans: Plans,
        max_keys: usize,
    ) -> Admission<C> {
        self.budget.set_max(max_keys);
        let same = |old: &Quota, new: &Quota| old == new;
        let result = Admission::build(
            global,
            routes,
            plans,
            Arc::clone(&self.budget),
            self.hasher.clone(),
            self.clock.clone(),
            |layer| match layer {
                Layer::Global(quota) => self
                    .global
                    .as_ref()
                    .filter(|b| same(&b.quota(), quota))
                    .map(|b| Reused::Bucket(Arc::clone(b))),
                Layer::Route(name, quota) => self
                    .routes
                    .iter()
                    .find(|r| r.name == name)
                    .and_then(|r| r.bucket.as_ref())
                    .filter(|b| same(&b.quota(), quota))
                    .map(|b| Reused::Bucket(Arc::clone(b))),
                Layer::Plan(name, quota) => self
                    .plans
                    .iter()
                    .find(|(n, _)| n == name)
                    .filter(|(_, layer)| same(&layer.quota(), quota))
                    .map(|(_, layer)| Reused::Keyed(Arc::clone(layer))),
                Layer::Default(quota) => Some(&self.default)
                    .filter(|layer| same(&layer.quota(), quota))
                    .map(|layer| Reused::Keyed(Arc::clone(layer))),
            },
        );
        result
            .overflowed
            .store(self.overflowed.load(Ordering::Relaxed), Ordering::Relaxed);
        result.with_backend(self.backend().cloned())
    }

    /// Builds the layers, taking from `reuse` those it offers.
    fn build(
        global: Option<Quota>,
        routes: Vec<(String, Option<Quota>)>,
        plans: Plans,
        budget: Arc<KeyBudget>,
        hasher: ahash::RandomState,
        clock: C,
        reuse: impl Fn(Layer<'_>) -> Option<Reused<C>>,
    ) -> Self {
        let bucket = |layer: Layer<'_>, quota: Quota| match reuse(layer) {
            Some(Reused::Bucket(bucket)) => bucket,
            _ => Arc::new(Bucket::new(quota, clock.clone())),
        };
        let keyed = |layer: Layer<'_>, quota: Quota, capped: bool| match reuse(layer) {
            Some(Reused::Keyed(keyed)) => keyed,
            _ => Arc::new(KeyedBuckets::with_budget(
                quota,
                clock.clone(),
                Arc::clone(&budget),
                capped,
            )),
        };
        let mut plan_of = HashMap::with_hasher(ahash::RandomState::new());
        let mut plan_layers = Vec::with_capacity(plans.plans.len());
        for (index, plan) in plans.plans.into_iter().enumerate() {
            for key in plan.keys {
                plan_of.entry(key.into_boxed_str()).or_insert(index);
            }
            let layer = keyed(Layer::Plan(&plan.name, &plan.quota), plan.quota, false);
            plan_layers.push((plan.name, layer));
        }
        let routes = routes
            .into_iter()
            .map(|(name, quota)| Route {
                bucket: quota.map(|q| bucket(Layer::Route(&name, &q), q)),
                name,
            })
            .collect();
        Admission {
            global: global.map(|q| bucket(Layer::Global(&q), q)),
            routes,
            plan_of,
            plans: plan_layers,
            default: keyed(Layer::Default(&plans.default), plans.default, true),
            budget,
            hasher,
            overflowed: AtomicU64::new(0),
            clock,
            shared: None,
        }
    }
}

/// A layer [`Admission::build`] is about to create, for `reconfigured` to match.
enum Layer<'a> {
    Global(&'a Quota),
    Route(&'a str, &'a Quota),
    Plan(&'a str, &'a Quota),
    Default(&'a Quota),
}

/// A layer carried over by `reconfigured`.
enum Reused<C: Clock> {
    Bucket(Arc<Bucket<C>>),
    Keyed(Arc<KeyedBuckets<C>>),
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
        let (layer, quota) = match self.plan_of.get(key.as_str()) {
            Some(&index) => (&shared.plans[index], self.plans[index].1.quota()),
            None => (&shared.default, self.default.quota()),
        };
        let key_bucket = format!("{}{key}", layer.key);
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
        match shared.backend.eval(&buckets, now).await {
            Ok(verdict) => {
                let (scope, quota) = scopes[verdict.bucket];
                match verdict.decision {
                    Decision::Allowed { remaining, reset } => Ok(Admitted {
                        quota,
                        remaining,
                        reset,
                    }),
                    Decision::Limited { wait } => Err(Rejected { scope, quota, wait }),
                }
            }
            Err(_unavailable) => self.fallback(shared, route, &key),
        }
    }
}

impl<C: Clock> Admission<C> {
    /// The decision while Redis cannot be reached, by the backend's policy.
    fn fallback(&self, shared: &Shared, route: usize, key: &str) -> Result<Admitted, Rejected> {
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
                })
            }
            Fallback::Deny => Err(Rejected {
                scope: Scope::Global,
                quota: self
                    .global
                    .as_ref()
                    .map_or_else(|| self.key_quota(key), |b| b.quota()),
                wait: DENY_WAIT,
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

impl<C: Clock> Admission<C> {
    /// Admits or refuses one request on route number `route` for client `key`, with the
    /// **local** engine (whatever the backend: this is also the `local` fallback).
    ///
    /// Layers are checked in order global → route → key, and the first refusal is returned.
    /// Tokens taken by the layers above a refusing one are not given back, as in API Gateway.
    /// A `route` without a route layer skips that layer; so does an index out of range (a
    /// bug in the caller, asserted in debug builds).
    pub fn check(&self, route: usize, key: &str) -> Result<Admitted, Rejected> {
        debug_assert!(
            route < self.routes.len(),
            "route index {route} out of range"
        );
        if let Some(global) = &self.global {
            refuse(Scope::Global, global.quota(), global.check())?;
        }
        if let Some(bucket) = self.routes.get(route).and_then(|r| r.bucket.as_ref()) {
            refuse(Scope::Route, bucket.quota(), bucket.check())?;
        }
        let layer = match self.plan_of.get(key) {
            Some(&index) => &self.plans[index].1,
            None => &self.default,
        };
        let checked = layer.check_hash(self.hasher.hash_one(key));
        if checked.overflowed {
            self.overflowed.fetch_add(1, Ordering::Relaxed);
        }
        match checked.decision {
            Decision::Allowed { remaining, reset } => Ok(Admitted {
                quota: layer.quota(),
                remaining,
                reset,
            }),
            Decision::Limited { wait } => Err(Rejected {
                scope: Scope::Key,
                quota: layer.quota(),
                wait,
            }),
        }
    }

    /// Whether `key` belongs to a plan (for `require_known_key`). Creates no state.
    pub fn is_known_key(&self, key: &str) -> bool {
        self.plan_of.contains_key(key)
    }

    /// The name of `key`'s plan, if it has one. Creates no state.
    pub fn plan_of(&self, key: &str) -> Option<&str> {
        self.plan_of
            .get(key)
            .map(|&index| self.plans[index].0.as_str())
    }

    /// The index [`check`](Self::check) expects for the route named `name`.
    pub fn route_index(&self, name: &str) -> Option<usize> {
        self.routes.iter().position(|r| r.name == name)
    }

    /// Drops idle keys (buckets full again) in every keyed layer and shrinks their tables.
    /// Call it periodically, off the request path.
    pub fn reclaim(&self) {
        for (_, layer) in &self.plans {
            layer.reclaim();
        }
        self.default.reclaim();
    }

    /// Keys currently tracked across all keyed layers (≤ `max_keys` plus the number of
    /// configured plan keys; may briefly count a key being inserted or reclaimed).
    pub fn tracked_keys(&self) -> usize {
        self.budget.used()
    }

    /// How many checks so far went to the shared overflow bucket because the key cap was
    /// reached — a sign of key spraying, or of `max_keys` set too low.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }
}

impl<C: Clock> std::fmt::Debug for Admission<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("global", &self.global.as_ref().map(|b| b.quota()))
            .field(
                "routes",
                &self
                    .routes
                    .iter()
                    .map(|r| (&r.name, r.bucket.as_ref().map(|b| b.quota())))
                    .collect::<Vec<_>>(),
            )
            .field(
                "plans",
                &self
                    .plans
                    .iter()
                    .map(|(name, layer)| (name, layer.quota()))
                    .collect::<Vec<_>>(),
            )
            .field("default", &self.default.quota())
            .field("tracked_keys", &self.tracked_keys())
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

/// `Err(Rejected)` when `decision` refuses.
fn refuse(scope: Scope, quota: Quota, decision: Decision) -> Result<(), Rejected> {
    match decision {
        Decision::Allowed { .. } => Ok(()),
        Decision::Limited { wait } => Err(Rejected { scope, quota, wait }),
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::super::CLOSED_WAIT;
    use super::*;

    const DEFAULT: Quota = Quota {
        rate: 1.0,
        burst: 2,
    };
    const GOLD: Quota = Quota {
        rate: 10.0,
        burst: 5,
    };

    fn plans() -> Plans {
        Plans::new(
            DEFAULT,
            vec![("gold".into(), GOLD, vec!["gold-1".into(), "gold-2".into()])],
        )
    }

    fn admission(
        global: Option<Quota>,
        route: Option<Quota>,
        max_keys: usize,
    ) -> (Admission<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let a = Admission::new(
            global,
            vec![("records".into(), route), ("other".into(), None)],
            plans(),
            max_keys,
            clock.clone(),
        );
        (a, clock)
    }

    #[test]
    fn plan_keys_get_their_plan_and_other_keys_the_default() {
        let (a, _clock) = admission(None, None, 100);
        let gold = a.check(0, "gold-1").expect("full bucket");
        assert_eq!(gold.quota, GOLD);
        assert_eq!(gold.remaining, 4);
        assert_eq!(gold.reset, Duration::from_millis(100));
        let anon = a.check(0, "someone").expect("full bucket");
        assert_eq!(
            anon,
            Admitted {
                quota: DEFAULT,
                remaining: 1,
                reset: Duration::from_secs(1)
            }
        );
        assert_eq!(a.plan_of("gold-2"), Some("gold"));
        assert_eq!(a.plan_of("someone"), None);
        assert_eq!(a.tracked_keys(), 2);
    }

    #[test]
    fn layers_are_checked_global_then_route_then_key() {
        let global = Quota {
            rate: 1.0,
            burst: 4,
        };
        let route = Quota {
            rate: 1.0,
            burst: 3,
        };
        let (a, clock) = admission(Some(global), Some(route), 100);
        // Key layer refuses first (default burst 2) …
        a.check(0, "k").expect("1st");
        a.check(0, "k").expect("2nd");
        let r = a.check(0, "k").expect_err("key bucket empty");
        assert_eq!(
            r,
            Rejected {
                scope: Scope::Key,
                quota: DEFAULT,
                wait: Duration::from_millis(1000)
            }
        );
        // … and its refusal still spent route and global tokens (not returned, as in API
        // Gateway): route has 0 left, so another key is refused by the route layer.
        let r = a.check(0, "k2").expect_err("route bucket empty");
        assert_eq!(r.scope, Scope::Route);
        assert_eq!(r.quota, route);
        assert_eq!(r.wait, Duration::from_secs(1));
        // The second route has no route layer, but the global bucket is empty: each of the
        // four checks above took a global token, refused or not.
        let r = a.check(1, "k3").expect_err("global bucket empty");
        assert_eq!(
            r,
            Rejected {
                scope: Scope::Global,
                quota: global,
                wait: Duration::from_secs(1)
            }
        );
        clock.advance(Duration::from_secs(1));
        assert!(a.check(1, "k3").is_ok());
    }

    #[test]
    fn unknown_keys_checked_with_is_known_key_create_no_state() {
        let (a, _clock) = admission(None, None, 100);
        for i in 0..1000 {
            assert!(!a.is_known_key(&format!("intruder-{i}")));
            assert_eq!(a.plan_of(&format!("intruder-{i}")), None);
        }
        assert!(a.is_known_key("gold-1"));
        assert_eq!(a.tracked_keys(), 0);
    }

    #[test]
    fn cap_holds_under_spraying_and_plan_keys_never_overflow() {
        let max_keys = 500;
        let (a, _clock) = admission(None, None, max_keys);
        for i in 0..10 * max_keys {
            let _ = a.check(0, &format!("{i:x}"));
            assert!(a.tracked_keys() <= max_keys);
        }
        assert_eq!(a.tracked_keys(), max_keys);
        assert_eq!(a.overflowed(), 9 * max_keys as u64);
        // Past the cap, new keys without a plan share one default-quota bucket, now empty …
        let r = a
            .check(0, "late-comer")
            .expect_err("overflow bucket drained by the spray");
        assert_eq!(r.quota, DEFAULT);
        // … but a paying key still gets its own full bucket.
        let gold = a
            .check(0, "gold-1")
            .expect("plan keys always get their own bucket");
        assert_eq!(gold.remaining, 4);
        assert_eq!(a.tracked_keys(), max_keys + 1);
    }

    #[test]
    fn reclaim_covers_every_keyed_layer() {
        let (a, clock) = admission(None, None, 100);
        a.check(0, "gold-1").expect("full");
        a.check(0, "x").expect("full");
        assert_eq!(a.tracked_keys(), 2);
        clock.advance(Duration::from_secs(10));
        a.reclaim();
        assert_eq!(a.tracked_keys(), 0);
        let again = a.check(0, "x").expect("reclaimed key starts full");
        assert_eq!(again.remaining, DEFAULT.burst - 1);
    }

    #[test]
    fn closed_layers_refuse_with_the_closed_wait() {
        let closed = Quota {
            rate: 0.0,
            burst: 10,
        };
        let (a, _clock) = admission(Some(closed), None, 100);
        assert_eq!(
            a.check(0, "k"),
            Err(Rejected {
                scope: Scope::Global,
                quota: closed,
                wait: CLOSED_WAIT
            })
        );
        let clock = FakeRelativeClock::default();
        let a = Admission::new(
            None,
            vec![("r".into(), None)],
            Plans::new(
                Quota {
                    rate: 5.0,
                    burst: 0,
                },
                vec![],
            ),
            100,
            clock,
        );
        assert_eq!(
            a.check(0, "k").expect_err("closed default").wait,
            CLOSED_WAIT
        );
        assert_eq!(a.tracked_keys(), 0);
    }

    #[test]
    fn route_index_finds_routes_by_name() {
        let (a, _clock) = admission(None, None, 1);
        assert_eq!(a.route_index("records"), Some(0));
        assert_eq!(a.route_index("other"), Some(1));
        assert_eq!(a.route_index("nope"), None);
    }

    fn reconfigure(
        a: &Admission<FakeRelativeClock>,
        global: Option<Quota>,
        route: Option<Quota>,
        gold: Quota,
        max_keys: usize,
    ) -> Admission<FakeRelativeClock> {
        a.reconfigured(
            global,
            vec![("records".into(), route), ("other".into(), None)],
            Plans::new(
                DEFAULT,
                vec![("gold".into(), gold, vec!["gold-1".into(), "gold-2".into()])],
            ),
            max_keys,
        )
    }

    #[test]
    fn reconfigured_keeps_the_state_of_unchanged_layers_and_starts_changed_ones_full() {
        let global = Quota {
            rate: 1.0,
            burst: 100,
        };
        let route = Quota {
            rate: 1.0,
            burst: 3,
        };
        let (a, clock) = admission(Some(global), Some(route), 100);
        // Empty the route bucket, key "k"'s default bucket and gold-1's plan bucket.
        for key in ["x1", "x2", "x3"] {
            a.check(0, key).expect("route bucket has 3");
        }
        assert_eq!(
            a.check(0, "x4").expect_err("route empty").scope,
            Scope::Route
        );
        a.check(1, "k").expect("1st");
        a.check(1, "k").expect("2nd");
        assert_eq!(a.check(1, "k").expect_err("key empty").scope, Scope::Key);
        for _ in 0..GOLD.burst {
            a.check(1, "gold-1").expect("gold has 5");
        }
        let used_global = 3 + 1 + 3 + GOLD.burst;

        let gold = Quota {
            rate: 10.0,
            burst: 7,
        };
        let b = reconfigure(&a, Some(global), Some(route), gold, 100);
        // Unchanged: global, the route, the default key layer — same tokens as before.
        assert_eq!(
            b.check(0, "y").expect_err("still empty").scope,
            Scope::Route
        );
        let r = b.check(1, "k").expect_err("k's bucket carried over");
        assert_eq!((r.scope, r.wait), (Scope::Key, Duration::from_secs(1)));
        // Changed: the gold plan starts full, with its new quota.
        let g = b.check(1, "gold-1").expect("fresh plan bucket");
        assert_eq!((g.quota, g.remaining), (gold, gold.burst - 1));
        // The global bucket went on counting across the reload: of its 100 tokens, `a` took
        // `used_global` and `b` three so far.
        let mut more = 0;
        let refusal = loop {
            match b.check(1, &format!("fresh-{more}")) {
                Ok(_) => more += 1,
                Err(r) => break r,
            }
        };
        assert_eq!(refusal.scope, Scope::Global);
        assert_eq!(more, global.burst - used_global - 3);
        // Old and new draw from the same carried-over buckets, and share the clock's refill.
        clock.advance(Duration::from_secs(1));
        a.check(0, "y").expect("one route token refilled");
        assert_eq!(
            b.check(0, "y2").expect_err("a took it").scope,
            Scope::Global
        );
    }

    #[test]
    fn reconfigured_matches_layers_by_name_and_quota() {
        let route = Quota {
            rate: 1.0,
            burst: 1,
        };
        let (a, _clock) = admission(None, Some(route), 100);
        a.check(0, "k").expect("route has 1");
        // Same quota, same name: carried over.
        let same = reconfigure(&a, None, Some(route), GOLD, 100);
        assert_eq!(
            same.check(0, "k2").expect_err("carried").scope,
            Scope::Route
        );
        // Changed quota: fresh.
        let faster = Quota {
            rate: 2.0,
            burst: 1,
        };
        let changed = reconfigure(&a, None, Some(faster), GOLD, 100);
        assert!(changed.check(0, "k3").is_ok());
        // A route that did not exist before, or lost its layer and got it back: fresh.
        let renamed = a.reconfigured(None, vec![("renamed".into(), Some(route))], plans(), 100);
        assert!(renamed.check(0, "k4").is_ok());
        // A new global layer starts full (its one token goes to the request the carried-over
        // route bucket then refuses).
        let with_global = reconfigure(&a, Some(route), Some(route), GOLD, 100);
        assert_eq!(
            with_global
                .check(0, "k5")
                .expect_err("route still empty")
                .scope,
            Scope::Route
        );
        assert_eq!(
            with_global.check(1, "k6").expect_err("global spent").scope,
            Scope::Global
        );
    }

    #[test]
    fn reconfigured_shares_the_key_budget_with_its_new_bound() {
        let (a, clock) = admission(None, None, 3);
        a.check(0, "gold-1").expect("plan key");
        a.check(0, "x").expect("tracked");
        a.check(0, "y").expect("tracked");
        assert_eq!(a.tracked_keys(), 3);
        // Gold's quota changes: its layer (1 key) is replaced; the default layer is kept.
        let gold = Quota {
            rate: 1.0,
            burst: 1,
        };
        let b = reconfigure(&a, None, None, gold, 4);
        assert_eq!(
            b.tracked_keys(),
            3,
            "the old gold layer still exists in `a`"
        );
        drop(a);
        assert_eq!(b.tracked_keys(), 2, "dropping it gave its slot back");
        b.check(0, "z").expect("room under the new bound");
        b.check(0, "w").expect("room under the new bound");
        assert_eq!(b.tracked_keys(), 4);
        assert!(b.check(0, "v").is_ok(), "overflow bucket, not a new slot");
        assert_eq!(b.tracked_keys(), 4);
        assert_eq!(b.overflowed(), 1);
        // A lower bound evicts nobody; reclaim brings the count down.
        let c = reconfigure(&b, None, None, gold, 1);
        assert_eq!(c.tracked_keys(), 4);
        clock.advance(Duration::from_secs(60));
        c.reclaim();
        assert_eq!(c.tracked_keys(), 0);
        assert_eq!(c.overflowed(), 1, "the overflow count is carried over");
    }

    #[test]
    fn admission_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Admission<FakeRelativeClock>>();
        assert_send_sync::<Admission>();
    }
}
