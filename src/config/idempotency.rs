//! The `[idempotency]` section: whether requests carrying `Idempotency-Key` are processed
//! at most once, and the bounds of what is kept for them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::{self, ByteSize};

/// The `[idempotency]` section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// Whether `Idempotency-Key` is honoured (default `true`; it acts only on requests that
    /// carry the header). `false` ignores the header.
    pub enabled: bool,
    /// How long a completed request's response is kept for replay (default `10m`,
    /// `1s..=7d`); with the Redis backend, the Redis keys' expiry too.
    #[serde(with = "units::duration")]
    pub ttl: Duration,
    /// Most keys kept by this replica, in flight and completed (default `100000`,
    /// `1..=100000000`); the oldest completed go first, in-flight ones never.
    pub max_entries: usize,
    /// Most bytes of kept responses on this replica (default `64MiB`, `64KiB..=64GiB`).
    pub max_bytes: ByteSize,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            enabled: true,
            ttl: Duration::from_secs(600),
            max_entries: 100_000,
            max_bytes: ByteSize(64 * 1024 * 1024),
        }
    }
}
