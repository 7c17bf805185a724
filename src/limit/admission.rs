//! The layered admission decision: global → route → key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;

use super::bucket::Bucket;
use super::clock::DefaultClock;
use super::engine::KeyBudget;
use super::keyed::KeyedBuckets;
use super::{Decision, Quota, Scope};

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
    bucket: Option<Bucket<C>>,
}

/// All admission layers of one proxy: shared by every request (behind an `Arc`), lock-free
/// for the unkeyed layers and shard-locked for keyed ones.
pub struct Admission<C: Clock = DefaultClock> {
    global: Option<Bucket<C>>,
    routes: Vec<Route<C>>,
    /// Exact API key → index into `plans`. Keyed by the full string, not its hash, so a
    /// hash collision can never grant a plan.
    plan_of: HashMap<Box<str>, usize, ahash::RandomState>,
    plans: Vec<(String, KeyedBuckets<C>)>,
    /// Keys without a plan; owns the overflow bucket.
    default: KeyedBuckets<C>,
    budget: Arc<KeyBudget>,
    /// Hashes client keys for every keyed layer; seeded randomly per process.
    hasher: ahash::RandomState,
    overflowed: AtomicU64,
}

impl<C: Clock + Clone> Admission<C> {
    /// Builds every layer with full buckets.
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
        let mut plan_of = HashMap::with_hasher(ahash::RandomState::new());
        let mut plan_layers = Vec::with_capacity(plans.plans.len());
        for (index, plan) in plans.plans.into_iter().enumerate() {
            for key in plan.keys {
                plan_of.entry(key.into_boxed_str()).or_insert(index);
            }
            let layer =
                KeyedBuckets::with_budget(plan.quota, clock.clone(), Arc::clone(&budget), false);
            plan_layers.push((plan.name, layer));
        }
        let routes = routes
            .into_iter()
            .map(|(name, quota)| Route {
                name,
                bucket: quota.map(|q| Bucket::new(q, clock.clone())),
            })
            .collect();
        Admission {
            global: global.map(|q| Bucket::new(q, clock.clone())),
            routes,
            plan_of,
            plans: plan_layers,
            default: KeyedBuckets::with_budget(plans.default, clock, Arc::clone(&budget), true),
            budget,
            hasher: ahash::RandomState::new(),
            overflowed: AtomicU64::new(0),
        }
    }
}

impl<C: Clock> Admission<C> {
    /// Admits or refuses one request on route number `route` for client `key`.
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
            .field("global", &self.global.as_ref().map(Bucket::quota))
            .field(
                "routes",
                &self
                    .routes
                    .iter()
                    .map(|r| (&r.name, r.bucket.as_ref().map(Bucket::quota)))
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

    #[test]
    fn admission_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Admission<FakeRelativeClock>>();
        assert_send_sync::<Admission>();
    }
}
