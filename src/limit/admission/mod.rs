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
use super::clock::{DefaultClock, WallClock};
use super::engine::KeyBudget;
use super::keyed::KeyedBuckets;
use super::usage::UsageCounters;
use super::{Decision, Quota, Scope};
use crate::usage::{UsageQuota, UsageState};

/// A usage plan: API keys that each get a bucket with this quota.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The plan's name in the config (`[[plans]] name`).
    pub name: String,
    /// The bucket each of the plan's keys gets.
    pub quota: Quota,
    /// The API keys on this plan.
    pub keys: Vec<String>,
    /// The plan's usage quota, if it has one.
    pub usage: Option<UsageQuota>,
}

/// Usage plans from the config, and the `default` quota for keys without one.
#[derive(Clone, Debug, PartialEq)]
pub struct Plans {
    default: Quota,
    default_usage: Option<UsageQuota>,
    plans: Vec<Plan>,
}

impl Plans {
    /// `plans` is `(plan name, quota, API keys)` in config order. The config loader rejects a
    /// key listed in two plans; should one slip through, the first plan listing it wins.
    pub fn new(default: Quota, plans: Vec<(String, Quota, Vec<String>)>) -> Self {
        let plans = plans
            .into_iter()
            .map(|(name, quota, keys)| Plan {
                name,
                quota,
                keys,
                usage: None,
            })
            .collect();
        Plans {
            default,
            default_usage: None,
            plans,
        }
    }

    /// Adds usage quotas: `default` for keys without a plan, `by_plan` for the plans in
    /// config order (a missing item is no quota).
    pub fn with_usage_quotas(
        mut self,
        default: Option<UsageQuota>,
        by_plan: impl IntoIterator<Item = Option<UsageQuota>>,
    ) -> Self {
        self.default_usage = default;
        for (plan, usage) in self.plans.iter_mut().zip(by_plan) {
            plan.usage = usage;
        }
        self
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
    /// The key's usage quota and its count with this request, when it has a quota.
    pub usage: Option<UsageState>,
}

/// A refused request: the refusing layer, its quota and the exact wait for its next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rejected {
    /// The layer that refused.
    pub scope: Scope,
    /// That layer's quota (for `RateLimit-Policy`).
    pub quota: Quota,
    /// Exact and never early; [`CLOSED_WAIT`](super::CLOSED_WAIT) for a closed layer. The
    /// server rounds it up to whole seconds (at least 1) for `Retry-After`. For
    /// [`Scope::Quota`], the time until the next period starts.
    pub wait: Duration,
    /// For [`Scope::Quota`]: the quota and the key's count (`None` for every bucket).
    pub usage: Option<UsageState>,
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
    /// Usage quotas of the plans (same order as `plans`) and of keys without a plan.
    plan_usage: Vec<Option<UsageQuota>>,
    default_usage: Option<UsageQuota>,
    /// Counts against usage quotas; the same counters for every `Admission` of a process.
    usage: Arc<UsageCounters>,
    /// The clock of usage-quota periods.
    wall: WallClock,
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
        let plan = self.plan_of.get(key).copied();
        let layer = match plan {
            Some(index) => &self.plans[index].1,
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
                usage: self.count_usage(key, plan, layer.quota())?,
            }),
            Decision::Limited { wait } => Err(Rejected {
                scope: Scope::Key,
                quota: layer.quota(),
                wait,
                usage: None,
            }),
        }
    }

    /// Counts a request every bucket admitted against `key`'s usage quota, if it has one
    /// (`plan`: its plan's index). `throttle` is the key layer's quota, reported with a
    /// refusal.
    fn count_usage(
        &self,
        key: &str,
        plan: Option<usize>,
        throttle: Quota,
    ) -> Result<Option<UsageState>, Rejected> {
        let Some(quota) = self.usage_quota(plan) else {
            return Ok(None);
        };
        let now = self.wall.now();
        let window = quota.window(now);
        let state = |used| UsageState {
            quota,
            used,
            period_secs: window.secs(),
            reset: window.until_end(now),
        };
        match self.usage.take(key, window, quota.limit, plan.is_some()) {
            Ok(used) => {
                if used == quota.limit {
                    self.exhausted(plan);
                }
                Ok(Some(state(used)))
            }
            Err(used) => Err(Rejected {
                scope: Scope::Quota,
                quota: throttle,
                wait: window.until_end(now),
                usage: Some(state(used)),
            }),
        }
    }

    /// A key just used the last request of its quota's period.
    fn exhausted(&self, plan: Option<usize>) {
        let plan = plan.map_or("default", |index| self.plans[index].0.as_str());
        metrics::counter!("sluicegate_quota_exhausted_total", "plan" => plan.to_owned())
            .increment(1);
    }

    /// The usage quota of the plan at `plan`, or of keys without a plan.
    fn usage_quota(&self, plan: Option<usize>) -> Option<UsageQuota> {
        match plan {
            Some(index) => self.plan_usage.get(index).copied().flatten(),
            None => self.default_usage,
        }
    }

    /// `key`'s usage quota and its count in the current period, if the key has a quota.
    /// Creates no state. (With the Redis backend, the count this replica last saw.)
    pub fn usage_of(&self, key: &str) -> Option<UsageState> {
        let quota = self.usage_quota(self.plan_of.get(key).copied())?;
        let now = self.wall.now();
        let window = quota.window(now);
        Some(UsageState {
            quota,
            used: self.usage.used(key, window),
            period_secs: window.secs(),
            reset: window.until_end(now),
        })
    }

    /// The usage counters (the server saves and restores them, and reclaims past periods).
    pub fn usage_counters(&self) -> &Arc<UsageCounters> {
        &self.usage
    }

    /// The clock of usage-quota periods.
    pub fn wall_clock(&self) -> &WallClock {
        &self.wall
    }

    /// Whether any key has a usage quota (when none does, there is nothing to persist).
    pub fn has_usage_quotas(&self) -> bool {
        self.default_usage.is_some() || self.plan_usage.iter().any(Option::is_some)
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
        self.usage.reclaim(self.wall.now());
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
        Decision::Limited { wait } => Err(Rejected {
            scope,
            quota,
            wait,
            usage: None,
        }),
    }
}
