//! The `[limits]` section (admission: backend, key bound, global and default quotas) and
//! the `[[plans]]` usage plans.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::quota::Quota;
use crate::units;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LimitBackend {
    Local,
    Redis,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BackendErrorPolicy {
    Local,
    Allow,
    Deny,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub backend: LimitBackend,
    pub redis_url: String,
    pub on_backend_error: BackendErrorPolicy,
    /// With `backend = "redis"`: deadline of one call to Redis. A call that fails or misses
    /// it marks Redis down and `on_backend_error` decides until a probe finds it back, so no
    /// request waits on Redis longer than this.
    #[serde(with = "units::duration")]
    pub redis_timeout: Duration,
    /// Bound on tracked keys across all keyed layers.
    pub max_keys: usize,
    /// How often idle (full) key buckets are reclaimed.
    #[serde(with = "units::duration")]
    pub reclaim_interval: Duration,
    /// Account/stage layer; omit for none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global: Option<Quota>,
    /// Per-key layer for keys without a plan.
    pub default: Quota,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            backend: LimitBackend::Local,
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            on_backend_error: BackendErrorPolicy::Local,
            redis_timeout: Duration::from_millis(50),
            max_keys: 1_000_000,
            reclaim_interval: Duration::from_secs(10),
            global: None,
            default: Quota {
                rate: 100.0,
                burst: 200,
            },
        }
    }
}

/// A usage plan: API keys that share one `{rate, burst}` per key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    pub name: String,
    pub rate: f64,
    pub burst: u32,
    #[serde(default)]
    pub keys: Vec<String>,
}

impl PlanConfig {
    pub fn quota(&self) -> Quota {
        Quota {
            rate: self.rate,
            burst: self.burst,
        }
    }
}
