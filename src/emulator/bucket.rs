//! The invoke-rate quota: a token bucket (`rate` tokens per second, `capacity` tokens, starts
//! full), kept as GCRA in integer nanoseconds so that boundaries are exact.
//!
//! GCRA stores one number, the theoretical arrival time `tat` of the next request if the
//! bucket were empty. A request at `now` is admitted when `tat - now <= (capacity - 1) * T`,
//! where `T` is the emission interval `1 / rate`; admitting moves `tat` on by `T`. This is the
//! same bucket (`governor` uses it too) without floating-point drift.

use std::time::Duration;

use tokio::time::Instant;

const NANOS_PER_SEC: f64 = 1e9;

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A token will be available after this long.
    Wait(Duration),
    /// The quota is zero: no request will ever be admitted.
    Never,
}

#[derive(Debug)]
pub(crate) struct TokenBucket {
    /// Emission interval in nanoseconds, rounded up so the bucket never admits more than
    /// `rate` per second; `None` when the rate is zero.
    interval: Option<u128>,
    /// How far `tat` may run ahead of `now`: `(capacity - 1) * interval`.
    tolerance: u128,
    capacity: u32,
    /// Time zero for `tat`.
    origin: Instant,
    /// Theoretical arrival time, in nanoseconds after `origin`.
    tat: u128,
}

impl TokenBucket {
    /// A full bucket. `rate` must be finite and non-negative (config validation checks it).
    pub(crate) fn new(rate: f64, capacity: u32, now: Instant) -> Self {
        let interval = (rate > 0.0).then(|| {
            // Float-to-int `as` saturates, so a tiny rate becomes a huge (not wrapped)
            // interval; capping it at ~584 years keeps the sums below far from u128's limit.
            ((NANOS_PER_SEC / rate).ceil() as u128).clamp(1, u128::from(u64::MAX))
        });
        let tolerance = interval.map_or(0, |t| {
            t.saturating_mul(u128::from(capacity.saturating_sub(1)))
        });
        Self {
            interval,
            tolerance,
            capacity,
            origin: now,
            tat: 0,
        }
    }

    /// Takes one token at `now`, or says how long until one is available.
    pub(crate) fn try_take(&mut self, now: Instant) -> Result<(), Refusal> {
        let Some(interval) = self.interval else {
            return Err(Refusal::Never);
        };
        if self.capacity == 0 {
            return Err(Refusal::Never);
        }
        let now = now.saturating_duration_since(self.origin).as_nanos();
        let tat = self.tat.max(now);
        let ahead = tat - now;
        if ahead > self.tolerance {
            let wait = ahead - self.tolerance;
            return Err(Refusal::Wait(Duration::from_nanos(
                u64::try_from(wait).unwrap_or(u64::MAX),
            )));
        }
        self.tat = tat.saturating_add(interval);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(origin: Instant, ms: u64) -> Instant {
        origin + Duration::from_millis(ms)
    }

    #[test]
    fn starts_full_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3, t0);
        for _ in 0..3 {
            assert_eq!(bucket.try_take(t0), Ok(()));
        }
        assert_eq!(
            bucket.try_take(t0),
            Err(Refusal::Wait(Duration::from_millis(100)))
        );
        assert_eq!(
            bucket.try_take(at(t0, 99)),
            Err(Refusal::Wait(Duration::from_millis(1)))
        );
        assert_eq!(bucket.try_take(at(t0, 100)), Ok(()));
        assert!(bucket.try_take(at(t0, 100)).is_err());
        // Idle time refills up to the capacity and no further.
        for _ in 0..3 {
            assert_eq!(bucket.try_take(at(t0, 10_000)), Ok(()));
        }
        assert!(bucket.try_take(at(t0, 10_000)).is_err());
    }

    #[test]
    fn fractional_rate_waits_seconds() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(0.5, 1, t0);
        assert_eq!(bucket.try_take(t0), Ok(()));
        assert_eq!(
            bucket.try_take(t0),
            Err(Refusal::Wait(Duration::from_secs(2)))
        );
        assert_eq!(bucket.try_take(at(t0, 2_000)), Ok(()));
    }

    #[test]
    fn zero_rate_or_zero_capacity_refuses_everything() {
        let t0 = Instant::now();
        assert_eq!(
            TokenBucket::new(0.0, 5, t0).try_take(t0),
            Err(Refusal::Never)
        );
        assert_eq!(
            TokenBucket::new(10.0, 0, t0).try_take(t0),
            Err(Refusal::Never)
        );
    }

    #[test]
    fn tiny_rate_does_not_overflow() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1e-300, 2, t0);
        assert_eq!(bucket.try_take(t0), Ok(()));
        assert_eq!(bucket.try_take(t0), Ok(()));
        assert_eq!(
            bucket.try_take(t0),
            Err(Refusal::Wait(Duration::from_nanos(u64::MAX)))
        );
    }

    proptest! {
        /// Over any window starting at creation, the bucket admits at most `capacity + rate·t`.
        #[test]
        fn never_admits_more_than_capacity_plus_rate_times_elapsed(
            rate in 0.1f64..1000.0,
            capacity in 1u32..50,
            mut offsets_ms in proptest::collection::vec(0u64..5_000, 1..300),
        ) {
            offsets_ms.sort_unstable();
            let t0 = Instant::now();
            let mut bucket = TokenBucket::new(rate, capacity, t0);
            let mut admitted = 0u64;
            for &ms in &offsets_ms {
                if bucket.try_take(at(t0, ms)).is_ok() {
                    admitted += 1;
                }
                let bound = f64::from(capacity) + rate * (ms as f64 / 1000.0);
                prop_assert!(admitted as f64 <= bound, "admitted {admitted} > {bound} after {ms}ms");
            }
        }

        /// A caller that waits exactly the advertised time is admitted.
        #[test]
        fn advertised_wait_is_never_early(
            rate in 0.1f64..1000.0,
            capacity in 1u32..20,
            offsets_ms in proptest::collection::vec(0u64..100, 1..100),
        ) {
            let t0 = Instant::now();
            let mut bucket = TokenBucket::new(rate, capacity, t0);
            let mut now = t0;
            for ms in offsets_ms {
                now += Duration::from_millis(ms);
                if let Err(Refusal::Wait(wait)) = bucket.try_take(now) {
                    now += wait;
                    prop_assert_eq!(bucket.try_take(now), Ok(()));
                }
            }
        }
    }
}
