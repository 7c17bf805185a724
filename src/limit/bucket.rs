//! One unkeyed token bucket: the global and route layers.

use governor::clock::Clock;

use super::clock::DefaultClock;
use super::engine::{CellStore, Engine};
use super::{Decision, Quota, CLOSED_WAIT};

/// A single token bucket shared by every request that reaches it.
///
/// Lock-free: a check is one compare-exchange loop on one atomic.
#[derive(Debug)]
pub struct Bucket<C: Clock = DefaultClock> {
    quota: Quota,
    /// `None` for a closed layer (`rate = 0` or `burst = 0`), which needs no state.
    engine: Option<Engine<CellStore, C>>,
}

impl<C: Clock> Bucket<C> {
    /// A full bucket. `quota` should have passed [`Quota::validate`]; out-of-range values are
    /// clamped as [`Quota`] documents.
    pub fn new(quota: Quota, clock: C) -> Self {
        let engine = quota
            .gcra()
            .map(|gcra| Engine::new(gcra, CellStore::default(), clock));
        Bucket { quota, engine }
    }

    /// Takes a token, or says how long until one is available.
    pub fn check(&self) -> Decision {
        match &self.engine {
            Some(engine) => engine.check(0).decision,
            None => Decision::Limited { wait: CLOSED_WAIT },
        }
    }

    /// Takes `cost` tokens at once (at most the burst), or says how long until they are
    /// available. The Redis fallback pays a replica's fleet share this way.
    pub(crate) fn check_n(&self, cost: u32) -> Decision {
        match &self.engine {
            Some(engine) => engine.check_n(0, cost).decision,
            None => Decision::Limited { wait: CLOSED_WAIT },
        }
    }

    /// The quota this bucket enforces.
    pub fn quota(&self) -> Quota {
        self.quota
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;

    fn bucket(rate: f64, burst: u32) -> (Bucket<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (Bucket::new(Quota { rate, burst }, clock.clone()), clock)
    }

    fn admitted(b: &Bucket<FakeRelativeClock>, n: usize) -> usize {
        (0..n).filter(|_| b.check().is_allowed()).count()
    }

    #[test]
    fn starts_full_and_reports_remaining_and_reset() {
        let (b, _clock) = bucket(10.0, 3);
        let expect = |remaining, reset_ms| Decision::Allowed {
            remaining,
            reset: Duration::from_millis(reset_ms),
        };
        assert_eq!(b.check(), expect(2, 100));
        assert_eq!(b.check(), expect(1, 200));
        assert_eq!(b.check(), expect(0, 300));
        assert_eq!(
            b.check(),
            Decision::Limited {
                wait: Duration::from_millis(100)
            }
        );
    }

    #[test]
    fn reset_is_exact_between_token_boundaries() {
        let (b, clock) = bucket(1.0, 5);
        b.check();
        clock.advance(Duration::from_millis(500));
        // One token was spent at 0 and half of it has come back; the second one leaves the
        // bucket 1.5 tokens short.
        assert_eq!(
            b.check(),
            Decision::Allowed {
                remaining: 3,
                reset: Duration::from_millis(1500)
            }
        );
    }

    /// AWS: "if a caller sends 1,000 requests in the first millisecond, API Gateway serves
    /// 500 and throttles the rest" (rate 1000, burst 500).
    #[test]
    fn aws_example_1000_requests_in_first_millisecond_serves_500() {
        let (b, clock) = bucket(1000.0, 500);
        // All at t = 0 …
        assert_eq!(admitted(&b, 1000), 500);
        // … or spread over the first millisecond: one token refills at its very end.
        let (b, clock2) = bucket(1000.0, 500);
        let mut served = 0;
        for _ in 0..1000 {
            served += usize::from(b.check().is_allowed());
            clock2.advance(Duration::from_nanos(1000));
        }
        assert!((500..=501).contains(&served), "served {served}");
        drop(clock);
    }

    /// AWS: "if the caller sends 500 requests in the first millisecond and then spreads
    /// another 500 evenly over the next 999 ms, API Gateway serves all 1,000".
    #[test]
    fn aws_example_500_then_500_spread_over_the_second_serves_all() {
        let (b, clock) = bucket(1000.0, 500);
        assert_eq!(admitted(&b, 500), 500);
        clock.advance(Duration::from_millis(1));
        let step = Duration::from_nanos(999_000_000 / 500);
        let mut served = 500;
        for _ in 0..500 {
            served += usize::from(b.check().is_allowed());
            clock.advance(step);
        }
        assert_eq!(served, 1000);
    }

    #[test]
    fn fractional_rate_refills_one_token_every_two_seconds() {
        let (b, clock) = bucket(0.5, 1);
        assert!(b.check().is_allowed());
        assert_eq!(
            b.check(),
            Decision::Limited {
                wait: Duration::from_secs(2)
            }
        );
        clock.advance(Duration::from_millis(1999));
        assert_eq!(
            b.check(),
            Decision::Limited {
                wait: Duration::from_millis(1)
            }
        );
        clock.advance(Duration::from_millis(1));
        assert_eq!(
            b.check(),
            Decision::Allowed {
                remaining: 0,
                reset: Duration::from_secs(2)
            }
        );
    }

    #[test]
    fn zero_rate_or_zero_burst_rejects_everything() {
        for (rate, burst) in [(0.0, 100), (100.0, 0), (0.0, 0)] {
            let (b, clock) = bucket(rate, burst);
            for _ in 0..3 {
                assert_eq!(b.check(), Decision::Limited { wait: CLOSED_WAIT });
                clock.advance(Duration::from_secs(86_400));
            }
        }
    }
}
