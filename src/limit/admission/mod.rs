//! The layered admission decision: global → route → key, locally or through Redis.
//!
//! This file holds the layers and the local decision ([`Admission::check`]); `build` makes
//! them from a config and carries them over on reload ([`Admission::reconfigured`]);
//! `redis` decides the same layers in Redis ([`Admission::admit`], the [`Fallback`] policy).
//!
//! [`Fallback`]: crate::backend::Fallback

mod build;
mod redis;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;

pub use self::redis::Admit;
use self::redis::RedisLayers;
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

/// A route's admission layer, matched by name on reload.
struct RouteLayer<C: Clock> {
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
    routes: Vec<RouteLayer<C>>,
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
    shared: Option<RedisLayers>,
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
