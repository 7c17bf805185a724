//! Building the layers: from scratch ([`Admission::new`]) or, on a live reload, from the
//! running admission, carrying over every layer whose quota did not change
//! ([`Admission::reconfigured`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use governor::clock::Clock;

use super::{Admission, Plans, RouteLayer};
use crate::limit::bucket::Bucket;
use crate::limit::clock::WallClock;
use crate::limit::engine::KeyBudget;
use crate::limit::keyed::KeyedBuckets;
use crate::limit::usage::UsageCounters;
use crate::limit::Quota;

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
            Shared {
                budget,
                hasher: ahash::RandomState::new(),
                usage: Arc::new(UsageCounters::new(max_keys)),
                wall: WallClock::system(),
            },
            clock,
            |_| None,
        )
    }

    /// The same admission with usage-quota periods read from `wall` (a fake clock in tests)
    /// instead of the system clock.
    pub fn with_wall_clock(mut self, wall: WallClock) -> Self {
        self.wall = wall;
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
    /// Usage-quota counters and the wall clock are always carried over: counts are per key
    /// and period, so a plan whose quota limit changed keeps each key's count and applies the
    /// new limit from the next request on.
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
        self.usage.set_max_keys(max_keys);
        let same = |old: &Quota, new: &Quota| old == new;
        let result = Admission::build(
            global,
            routes,
            plans,
            Shared {
                budget: Arc::clone(&self.budget),
                hasher: self.hasher.clone(),
                usage: Arc::clone(&self.usage),
                wall: self.wall.clone(),
            },
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
        shared: Shared,
        clock: C,
        reuse: impl Fn(Layer<'_>) -> Option<Reused<C>>,
    ) -> Self {
        let Shared {
            budget,
            hasher,
            usage,
            wall,
        } = shared;
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
        let plan_usage = plans.plans.iter().map(|p| p.usage).collect();
        for (index, plan) in plans.plans.into_iter().enumerate() {
            for key in plan.keys {
                plan_of.entry(key.into_boxed_str()).or_insert(index);
            }
            let layer = keyed(Layer::Plan(&plan.name, &plan.quota), plan.quota, false);
            plan_layers.push((plan.name, layer));
        }
        let routes = routes
            .into_iter()
            .map(|(name, quota)| RouteLayer {
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
            plan_usage,
            default_usage: plans.default_usage,
            usage,
            wall,
            budget,
            hasher,
            overflowed: AtomicU64::new(0),
            clock,
            shared: None,
        }
    }
}

/// What every `Admission` of a process shares with the one it replaces on reload.
struct Shared {
    budget: Arc<KeyBudget>,
    /// Carried-over layers are keyed by its hashes.
    hasher: ahash::RandomState,
    usage: Arc<UsageCounters>,
    wall: WallClock,
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
