//! Admission control with AWS API Gateway throttling semantics.
//!
//! Every request passes up to three token buckets, in order: the **global** layer
//! (account/stage), the **route** layer, and the **key** layer (the client's usage plan, or
//! the `default` quota for keys without one). Each bucket follows API Gateway's rules:
//!
//! - `rate` tokens are added per second (fractional rates such as `0.5` are fine) up to
//!   `burst` tokens; a bucket starts full; a request takes one token or is refused.
//! - `rate = 0` or `burst = 0` closes the layer: it refuses everything, with a wait of
//!   [`CLOSED_WAIT`] (one hour — a large but finite number, so `Retry-After` stays a
//!   meaningful integer instead of "never").
//! - A refusal names the refusing layer ([`Scope`]), its [`Quota`] and the **exact** time until
//!   that layer has a token again ([`Rejected::wait`]): never early, and not rounded —
//!   rounding up to whole seconds for `Retry-After` is the server's job.
//! - A token that an upper layer gave is **not** returned when a lower layer refuses (as in API
//!   Gateway): a client hammering its own key bucket also spends the route's and the
//!   account's tokens.
//! - An admitted request carries its key layer's state ([`Admitted`]): whole tokens left and
//!   the time until the bucket is full again, for the `RateLimit` header.
//!
//! # Engine
//!
//! The arithmetic is [`governor`]'s GCRA, which is exactly this token bucket
//! (`Quota::with_period(1/rate).allow_burst(burst)`); the period is rounded *up* to whole
//! nanoseconds so a bucket never runs faster than its configured rate. We plug our own state
//! stores into governor's `RateLimiter` (see `engine.rs`) to get the exact reset time, the key
//! cap and the overflow bucket described below. Everything is generic over governor's
//! [`Clock`](governor::clock::Clock): production uses [`TokioClock`] (so `tokio::time::pause()`
//! controls admission in tests too), unit tests use `governor::clock::FakeRelativeClock`.
//!
//! The same bucket, with the same rounding ([`Quota`] → period), also serves where one
//! holder needs to change a quota in place, refund or empty a bucket: [`AdjustableBucket`],
//! the invoke gate's rate bucket and the emulator's invoke quota (its module docs say why
//! governor's `RateLimiter` cannot do that). [`ceil_secs`] is the one rounding of a wait to
//! whole seconds.
//!
//! `tower_governor` is not used as-is because it truncates `Retry-After` to whole seconds
//! (sending `0` for every sub-second wait, which makes well-behaved clients retry at once),
//! holds a single quota per layer (no usage plans, no global → route → key chain), and leaves
//! its keyed state unbounded (one entry per distinct key, forever, unless the application
//! sweeps it).
//!
//! # Keyed state is bounded
//!
//! Keys are whatever clients send (API keys, IPs, header values), so:
//!
//! - Keys are stored as a 64-bit hash from a per-process randomly seeded
//!   [`ahash::RandomState`] — 16 bytes of state per key plus the table's slack. Two keys that
//!   collide share one bucket; with a 64-bit hash the chance that *any* two of 1M tracked keys
//!   collide is about `n² / 2⁶⁵ ≈ 3·10⁻⁸`, and the random seed keeps clients from
//!   manufacturing collisions. Plan membership is decided on the exact key string, never on
//!   the hash, so a collision can never lend a client someone else's plan.
//! - `max_keys` caps the number of tracked keys across all keyed layers. When the cap is
//!   reached, a *new* key without a plan gets no state of its own: it is checked against one
//!   shared **overflow** bucket with the `default` quota. Key spraying therefore degrades only
//!   the sprayers' service and that of other keys first seen while the cap is reached;
//!   keys already tracked keep their buckets and memory stays bounded. Plan keys are listed
//!   in the config — a fixed, bounded set — so they always get their own bucket (they count
//!   towards the cap, but a sprayer cannot push a paying key into the overflow bucket); the
//!   total is therefore at most `max_keys` plus the number of configured plan keys.
//! - [`Admission::reclaim`] drops keys whose bucket is full again (governor's
//!   `retain_recent`) and shrinks the tables, so memory returns near its baseline; the server
//!   calls it periodically. A reclaimed key that comes back starts with a full bucket, which is
//!   exactly the state it was dropped in.
//! - Unknown keys create state only if they are admitted to the key layer at all: with
//!   `require_known_key`, the server refuses them with [`Admission::is_known_key`] before
//!   calling [`Admission::check`], so they never create state.
//!
//! # Shared limits: the Redis backend
//!
//! With `[limits] backend = "redis"` every replica checks the same buckets in Redis
//! ([`redis`] module, [`Admission::with_backend`]): one Lua script holds the same GCRA in the
//! same integer nanoseconds, checks a request's layers in the same order with the same
//! "upper tokens stay taken" rule, and so gives the local engine's decisions — including
//! `remaining`, `reset` and the exact `wait` — for the same request sequence (a property
//! test holds the two to it). Time is Redis' own clock, so replicas' clocks never matter;
//! a request costs one round trip on a connection that concurrent requests share
//! (pipelined). [`Admission::admit`] is the entry point that follows the configured
//! backend: locally it is [`Admission::check`], ready at once; with Redis it is a future,
//! bounded by `limits.redis_timeout`. While Redis cannot be reached, `on_backend_error`
//! ([`Fallback`]) decides at once, without waiting on Redis: `local` uses this replica's
//! buckets with the configured limits (N replicas may then admit up to N× the shared
//! limits), `allow` admits, `deny` refuses. Each function's invoke-rate bucket is shared the
//! same way (`invoke::Gate::shared`).
//!
//! # Reload
//!
//! [`Admission::reconfigured`] builds the admission for a new config and hands every layer
//! whose quota did not change over as the same bucket (keys keep their tokens); new or
//! changed layers start full.
//!
//! # Use
//!
//! ```
//! use sluicegate::limit::{Admission, Plans, Quota, Scope};
//!
//! let default = Quota { rate: 100.0, burst: 200 };
//! let gold = Quota { rate: 500.0, burst: 1000 };
//! let plans = Plans::new(default, vec![("gold".into(), gold, vec!["gold-key-1".into()])]);
//! let admission = Admission::new(
//!     Some(Quota { rate: 1000.0, burst: 500 }),
//!     vec![("records".into(), None)],
//!     plans,
//!     1_000_000,
//!     sluicegate::limit::TokioClock,
//! );
//! let admitted = admission.check(0, "gold-key-1").expect("a fresh bucket has tokens");
//! assert_eq!(admitted.quota, gold);
//! assert_eq!(admitted.remaining, 999);
//! # let _ = Scope::Key;
//! ```
//!
//! The Tower middleware ([`AdmissionLayer`]) reads the client key from the [`ClientKey`]
//! request extension and answers refusals with a caller-supplied response; mapping a
//! [`Rejected`] to `429` and headers happens in `server`, the only module that knows HTTP
//! responses.

mod adjustable;
mod admission;
mod bucket;
mod clock;
mod engine;
mod keyed;
mod layer;
pub mod redis;

#[cfg(test)]
mod props;
#[cfg(test)]
mod redis_tests;

use std::num::NonZeroU32;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::adjustable::{AdjustableBucket, Refusal};
pub use self::admission::{Admission, Admit, Admitted, Plan, Plans, Rejected};
pub use self::bucket::Bucket;
pub use self::clock::{DefaultClock, TokioClock, TokioInstant};
pub use self::keyed::KeyedBuckets;
pub use self::layer::{AdmissionLayer, AdmissionService, ClientKey, ResponseFuture, ANONYMOUS_KEY};
pub use self::redis::{Fallback, RedisBackend, RedisOptions};

/// The wait reported by a closed layer (`rate = 0` or `burst = 0`): one hour.
///
/// A closed layer never admits anything, so any wait is a lie; a large finite one keeps
/// `Retry-After` a plain integer and tells clients to go away for a long time.
pub const CLOSED_WAIT: Duration = Duration::from_secs(3600);

/// The largest rate [`Quota::validate`] accepts: one token per nanosecond, the engine's
/// resolution.
pub const MAX_RATE: f64 = 1e9;

/// The longest refill time (`burst / rate`) [`Quota::validate`] accepts: ten years. Slower
/// buckets are configuration mistakes, and the bound keeps the engine's nanosecond arithmetic
/// far from overflowing `u64` (≈ 584 years).
pub const MAX_REFILL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// `d` in whole seconds, rounded up (saturating): the one rounding behind `Retry-After`, the
/// `RateLimit` fields and the emulator's Lambda figures. Waiting the rounded time is never
/// early. Callers that must never say 0 (`Retry-After`) take `.max(1)` themselves.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// One token bucket's parameters: `rate` tokens per second, at most `burst` tokens.
///
/// This is the type the config file uses directly: `{ rate = 100.0, burst = 200 }`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Tokens added per second; may be fractional. `0` closes the layer.
    pub rate: f64,
    /// Bucket capacity, and the number of requests a full bucket admits at once. `0` closes
    /// the layer.
    pub burst: u32,
}

impl Quota {
    /// Checks the values the engine can represent: `rate` finite, `>= 0` and at most
    /// [`MAX_RATE`]; for an open bucket, `burst / rate` at most [`MAX_REFILL`].
    ///
    /// The message names the problem but not the key; the config loader adds the key.
    pub fn validate(&self) -> Result<(), String> {
        let Quota { rate, burst } = *self;
        if !rate.is_finite() || rate < 0.0 {
            return Err(format!("rate must be a finite number >= 0, got {rate}"));
        }
        if rate > MAX_RATE {
            return Err(format!(
                "rate must be at most {MAX_RATE} (one token per nanosecond), got {rate}"
            ));
        }
        if rate > 0.0 && burst > 0 && f64::from(burst) / rate > MAX_REFILL.as_secs_f64() {
            return Err(format!(
                "burst / rate is the time to refill the bucket and must be at most ten years, \
                 got {burst} / {rate}"
            ));
        }
        Ok(())
    }

    /// Whether this layer refuses everything (`rate = 0` or `burst = 0`).
    pub fn is_closed(&self) -> bool {
        self.gcra().is_none()
    }

    /// Time for an empty bucket to become full (`burst / rate`), used for
    /// `RateLimit-Policy: ...;w=`.
    ///
    /// Computed from the engine's rounded period, so it agrees with [`Decision::Allowed`]'s
    /// `reset`. A closed layer reports zero when `burst = 0` (there is nothing to fill) and
    /// [`CLOSED_WAIT`] when `rate = 0` (it never fills).
    pub fn refill_time(&self) -> Duration {
        match self.gcra() {
            Some(quota) => quota.burst_size_replenished_in(),
            None if self.burst == 0 => Duration::ZERO,
            None => CLOSED_WAIT,
        }
    }

    /// The governor quota for an open bucket; `None` for a closed one.
    ///
    /// Values [`Quota::validate`] rejects are clamped rather than trusted: a non-finite or
    /// negative rate closes the layer, the period is kept between 1 ns and
    /// `MAX_REFILL / burst`, so governor's `period × (burst − 1)` cannot overflow.
    pub(crate) fn gcra(&self) -> Option<governor::Quota> {
        let burst = NonZeroU32::new(self.burst)?;
        // NaN is not finite either.
        if !self.rate.is_finite() || self.rate <= 0.0 {
            return None;
        }
        // Rounding the period up means the bucket never refills faster than `rate`.
        let longest = (MAX_REFILL.as_nanos() as u64) / u64::from(burst.get());
        let period = (1e9 / self.rate).ceil().clamp(1.0, longest as f64) as u64;
        governor::Quota::with_period(Duration::from_nanos(period)).map(|q| q.allow_burst(burst))
    }
}

/// Which admission layer a decision is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The account/stage bucket shared by every request.
    Global,
    /// The bucket of the request's route.
    Route,
    /// The client key's bucket (its plan's quota, or `default`).
    Key,
}

impl Scope {
    /// The name used in the `429` body (`"scope"`) and the `RateLimit*` headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Route => "route",
            Scope::Key => "key",
        }
    }
}

/// One bucket's answer to one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// The request took a token.
    Allowed {
        /// Whole tokens left after this request.
        remaining: u32,
        /// Time until the bucket is full again (if nobody draws meanwhile).
        reset: Duration,
    },
    /// The bucket is empty.
    Limited {
        /// Exact time until one token is available — never early. [`CLOSED_WAIT`] for a
        /// closed layer.
        wait: Duration,
    },
}

impl Decision {
    /// Whether the request took a token.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_deserializes_from_config_and_rejects_unknown_fields() {
        let q: Quota = serde_json::from_str(r#"{"rate": 0.5, "burst": 3}"#).expect("valid quota");
        assert_eq!(
            q,
            Quota {
                rate: 0.5,
                burst: 3
            }
        );
        assert!(serde_json::from_str::<Quota>(r#"{"rate": 1.0, "burst": 1, "x": 1}"#).is_err());
    }

    #[test]
    fn validate_accepts_zero_and_fractional_rates() {
        for q in [
            Quota {
                rate: 0.0,
                burst: 10,
            },
            Quota {
                rate: 10.0,
                burst: 0,
            },
            Quota {
                rate: 0.5,
                burst: 1,
            },
            Quota {
                rate: MAX_RATE,
                burst: u32::MAX,
            },
        ] {
            assert_eq!(q.validate(), Ok(()), "{q:?}");
        }
    }

    #[test]
    fn validate_rejects_what_the_engine_cannot_represent() {
        for q in [
            Quota {
                rate: -1.0,
                burst: 10,
            },
            Quota {
                rate: f64::NAN,
                burst: 10,
            },
            Quota {
                rate: f64::INFINITY,
                burst: 10,
            },
            Quota {
                rate: 2e9,
                burst: 10,
            },
            Quota {
                rate: 1e-9,
                burst: 10,
            },
        ] {
            assert!(q.validate().is_err(), "{q:?}");
        }
    }

    #[test]
    fn refill_time_is_burst_over_rate() {
        assert_eq!(
            Quota {
                rate: 1000.0,
                burst: 500
            }
            .refill_time(),
            Duration::from_millis(500)
        );
        assert_eq!(
            Quota {
                rate: 0.5,
                burst: 2
            }
            .refill_time(),
            Duration::from_secs(4)
        );
        assert_eq!(
            Quota {
                rate: 0.0,
                burst: 2
            }
            .refill_time(),
            CLOSED_WAIT
        );
        assert_eq!(
            Quota {
                rate: 1.0,
                burst: 0
            }
            .refill_time(),
            Duration::ZERO
        );
    }

    #[test]
    fn period_rounds_up_to_whole_nanoseconds() {
        let q = Quota {
            rate: 3.0,
            burst: 1,
        }
        .gcra()
        .expect("open");
        assert_eq!(q.replenish_interval(), Duration::from_nanos(333_333_334));
    }

    #[test]
    fn unvalidated_quotas_are_clamped_not_trusted() {
        assert!(Quota {
            rate: f64::NAN,
            burst: 1
        }
        .is_closed());
        assert!(Quota {
            rate: -3.0,
            burst: 1
        }
        .is_closed());
        assert!(Quota {
            rate: f64::INFINITY,
            burst: 1
        }
        .is_closed());
        let fast = Quota {
            rate: 1e12,
            burst: 1,
        }
        .gcra()
        .expect("open");
        assert_eq!(fast.replenish_interval(), Duration::from_nanos(1));
        let slow = Quota {
            rate: 1e-12,
            burst: u32::MAX,
        }
        .gcra()
        .expect("open");
        assert!(slow.burst_size_replenished_in() <= MAX_REFILL);
    }

    #[test]
    fn ceil_secs_rounds_any_fraction_up() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1000)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_secs(Duration::MAX), u64::MAX);
    }

    #[test]
    fn scope_names_match_the_http_contract() {
        assert_eq!(Scope::Global.as_str(), "global");
        assert_eq!(Scope::Route.as_str(), "route");
        assert_eq!(Scope::Key.as_str(), "key");
    }
}
