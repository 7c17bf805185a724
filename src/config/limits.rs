//! The `[limits]` section (admission: backend, key bound, global and default quotas) and
//! the `[[plans]]` usage plans.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::quota::Quota;
use crate::units;
use crate::usage::UsageQuota;

/// `limits.backend`: where admission and invoke-rate buckets live (default `local`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LimitBackend {
    /// In this process: each replica enforces its own quotas.
    Local,
    /// In Redis (`limits.redis_url`), shared by every replica.
    Redis,
}

/// `limits.on_backend_error`: what admission does while Redis is down (default `local`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BackendErrorPolicy {
    /// Fall back to this replica's local buckets.
    Local,
    /// Admit every request (fail open).
    Allow,
    /// Refuse every request (fail closed).
    Deny,
}

/// The `[limits]` section: admission's backend, its key bound and the global and default
/// quotas.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Where the buckets live (default `local`).
    pub backend: LimitBackend,
    /// Redis for the shared backend (default `redis://127.0.0.1:6379`); its password is
    /// masked when the config is shown.
    pub redis_url: String,
    /// What admission does while Redis is down (default `local`).
    pub on_backend_error: BackendErrorPolicy,
    /// With `backend = "redis"`: deadline of one call to Redis. A call that fails or misses
    /// it is decided by `on_backend_error`; `redis_down_after` of them in a row mark Redis
    /// down until `redis_up_after` probes find it back. No request waits on Redis longer than
    /// this (twice this on a Redis Cluster, whose key-layer call follows the others).
    #[serde(with = "units::duration")]
    pub redis_timeout: Duration,
    /// With `backend = "redis"`: the masters of a Redis Cluster (`redis://host:port` each),
    /// instead of `redis_url` (default empty: one Redis at `redis_url`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub redis_cluster: Vec<String>,
    /// The fewest live replicas the local fallback assumes when it gives each replica
    /// `rate / N` and `burst / N` (default: none, N is what the heartbeats counted, at
    /// least 1; `1..=10000`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_replicas: Option<u32>,
    /// Consecutive failed or late Redis calls that declare Redis down (default `3`,
    /// `1..=1000`).
    pub redis_down_after: u32,
    /// Consecutive good probes (250 ms apart, each answered within `redis_timeout`) that
    /// declare it up again (default `3`, `1..=1000`).
    pub redis_up_after: u32,
    /// Bound on tracked keys across all keyed layers (default `1000000`,
    /// `1..=100000000`).
    pub max_keys: usize,
    /// How often idle (full) key buckets are reclaimed (default `10s`).
    #[serde(with = "units::duration")]
    pub reclaim_interval: Duration,
    /// Account/stage layer; omit for none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global: Option<Quota>,
    /// Per-key layer for keys without a plan (default `{ rate = 100.0, burst = 200 }`, no
    /// usage quota).
    pub default: KeyLimit,
    /// With the local backend: the file that keeps usage-quota counters across restarts
    /// (default `data/quota-state.json`; only read and written when some key has a quota).
    pub quota_state: PathBuf,
}

/// `limits.default`: the throttle of keys without a plan, and optionally their usage quota.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyLimit {
    /// Requests per second per key; may be fractional, `0` closes the layer.
    pub rate: f64,
    /// Requests a key's full bucket lets through at once; `0` closes the layer.
    pub burst: u32,
    /// At most `limit` requests per key per `period` (`day` | `week` | `month`); none by
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<UsageQuota>,
}

impl KeyLimit {
    /// The `{rate, burst}` throttle.
    pub fn throttle(&self) -> Quota {
        Quota {
            rate: self.rate,
            burst: self.burst,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            backend: LimitBackend::Local,
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            on_backend_error: BackendErrorPolicy::Local,
            redis_timeout: Duration::from_millis(50),
            redis_cluster: Vec::new(),
            expected_replicas: None,
            redis_down_after: 3,
            redis_up_after: 3,
            max_keys: 1_000_000,
            reclaim_interval: Duration::from_secs(10),
            global: None,
            default: KeyLimit {
                rate: 100.0,
                burst: 200,
                quota: None,
            },
            quota_state: PathBuf::from("data/quota-state.json"),
        }
    }
}

/// A usage plan: API keys that share one `{rate, burst}` per key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// The plan's name: `/admin/keys/{key}` shows it, and a reload that keeps a plan's
    /// name and quota keeps its keys' buckets.
    pub name: String,
    /// Requests per second each key of the plan may make; may be fractional, `0` closes
    /// the layer.
    pub rate: f64,
    /// Requests a key's full bucket lets through at once; `0` closes the layer.
    pub burst: u32,
    /// The API keys on this plan (default none).
    #[serde(default)]
    pub keys: Vec<String>,
    /// The plan's usage quota: at most `limit` requests per key per `period`; none by
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<UsageQuota>,
    /// The plan's share of a route queue with `fairness = "per_key"`: records a key of
    /// this plan is served per round, against 1 for keys without a plan (default `1`,
    /// `1..=1000`).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl PlanConfig {
    /// The `{rate, burst}` each of this plan's keys gets (its throttle; the usage quota is
    /// the `quota` field).
    pub fn quota(&self) -> Quota {
        Quota {
            rate: self.rate,
            burst: self.burst,
        }
    }
}
