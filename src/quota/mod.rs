//! The token-bucket vocabulary shared by every limiter: a bucket's parameters ([`Quota`]:
//! `rate` tokens per second, at most `burst`) and one bucket's answer to one request
//! ([`Decision`]).
//!
//! A leaf: admission (`limit`), the invoke gate (`invoke`), the shared-limits backend
//! (`backend`) and the config all speak these types, so they live below all of them. The
//! semantics — API Gateway's token bucket, computed by governor's GCRA with the period
//! rounded *up* to whole nanoseconds — are described in `limit`'s module docs.
//!
//! The same bucket, with the same rounding ([`Quota`] → period), also serves where one
//! holder needs to change a quota in place, refund or empty a bucket: [`AdjustableBucket`],
//! the invoke gate's rate bucket and the emulator's invoke quota (its module docs say why
//! governor's `RateLimiter` cannot do that). [`ceil_secs`] is the one rounding of a wait to
//! whole seconds.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod adjustable;

pub use self::adjustable::{AdjustableBucket, Refusal};

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
    fn ceil_secs_rounds_any_fraction_up() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1000)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_secs(Duration::MAX), u64::MAX);
    }

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
}
