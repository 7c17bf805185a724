//! A token bucket owned by one holder whose quota can change in place: the invoke gate's
//! rate bucket and the emulator's invoke quota.
//!
//! Same semantics and the same rounding as the admission layers (`Quota::gcra`: the
//! period is rounded *up* to whole nanoseconds, `rate = 0` or `burst = 0` closes the
//! bucket), kept as GCRA: one number, the theoretical arrival time `tat`. At `now` the
//! bucket lacks `deficit = max(tat − now, 0)` nanoseconds of being full, i.e. it holds
//! `burst − deficit / T` tokens; a take is allowed while `deficit ≤ (burst − 1)·T` and moves
//! `tat` on by `T`. Integers throughout, so boundaries are exact and nothing can panic.
//!
//! # Why not governor's `RateLimiter`
//!
//! The admission layers use governor ([`Bucket`](crate::limit::Bucket)); this bucket needs what a
//! `RateLimiter` cannot do, because its quota is fixed at construction and its state is only
//! reachable through a check that consumes:
//!
//! - change the rate or the burst **keeping the tokens it holds** (adaptive AIMD lowers and
//!   raises the invoke rate; a reload changes rate and burst of a gate that lives on);
//! - give an unused token back ([`refund`](AdjustableBucket::refund): a gate slot dropped
//!   before its invoke was sent);
//! - empty itself ([`empty`](AdjustableBucket::empty): Lambda throttled us, so its bucket is
//!   empty and ours should be too);
//! - say how long until the next token without taking it ([`peek`](AdjustableBucket::peek)).
//!
//! Each of those is a line of arithmetic on `tat`, so the holder serialises access (`&mut
//! self`, behind its own lock) and passes the time in, which keeps tests deterministic.

use std::time::Duration;

use tokio::time::Instant;

use super::Quota;

/// Why no token was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A token will be there after this long (at least 1 ns, at most the time an empty
    /// bucket takes to fill: ten years, [`MAX_REFILL`](super::MAX_REFILL)).
    Wait(Duration),
    /// The quota is closed (`rate = 0` or `burst = 0`): no token will ever be there.
    Closed,
}

/// A token bucket (`rate` tokens per second, `burst` capacity) whose quota can change in
/// place; see the module docs.
#[derive(Clone, Debug)]
pub struct AdjustableBucket {
    quota: Quota,
    /// `T` and `burst`, in nanoseconds and tokens; `None` while the quota is closed.
    gcra: Option<Gcra>,
    /// Time zero for `tat`.
    origin: Instant,
    /// Theoretical arrival time, in nanoseconds after `origin`.
    tat: u64,
}

#[derive(Clone, Copy, Debug)]
struct Gcra {
    /// Nanoseconds per token, at least 1.
    period: u64,
    burst: u64,
}

impl Gcra {
    fn of(quota: Quota) -> Option<Gcra> {
        let gcra = quota.gcra()?;
        Some(Gcra {
            // At most `MAX_REFILL / burst` (see `Quota::gcra`), so it fits in u64.
            period: u64::try_from(gcra.replenish_interval().as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
            burst: u64::from(gcra.burst_size().get()),
        })
    }

    /// `burst × T`: the deficit of an empty bucket. At most `MAX_REFILL` by `Quota::gcra`'s
    /// clamp; saturating all the same.
    fn full_deficit(self) -> u64 {
        self.period.saturating_mul(self.burst)
    }

    /// `(burst − 1) × T`: the largest deficit that still holds a whole token.
    fn tolerance(self) -> u64 {
        self.period.saturating_mul(self.burst - 1)
    }

    /// `self.burst` tokens measured in `other`'s period.
    fn full_deficit_in(self, other: Gcra) -> u64 {
        other.period.saturating_mul(self.burst)
    }
}

impl AdjustableBucket {
    /// A full bucket. `quota` should have passed [`Quota::validate`]; other values are
    /// clamped as [`Quota`] documents.
    pub fn new(quota: Quota, now: Instant) -> Self {
        AdjustableBucket {
            quota,
            gcra: Gcra::of(quota),
            origin: now,
            tat: 0,
        }
    }

    /// The quota in force.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Takes one token at `now`, or says how long until one is there.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Refusal> {
        let gcra = self.gcra.ok_or(Refusal::Closed)?;
        self.peek(now)?;
        let now = self.nanos(now);
        self.tat = self.tat.max(now).saturating_add(gcra.period);
        Ok(())
    }

    /// Whether a token is there at `now`, without taking it: `Ok` if so, or how long until
    /// one is. A caller that waits the reported time and tries again is admitted (unless
    /// someone else took the token first).
    pub fn peek(&self, now: Instant) -> Result<(), Refusal> {
        let gcra = self.gcra.ok_or(Refusal::Closed)?;
        let short = self
            .deficit(self.nanos(now))
            .saturating_sub(gcra.tolerance());
        if short == 0 {
            Ok(())
        } else {
            Err(Refusal::Wait(Duration::from_nanos(short)))
        }
    }

    /// Gives one token back (it was taken but not used), never past `burst`.
    pub fn refund(&mut self, now: Instant) {
        let Some(gcra) = self.gcra else { return };
        let now = self.nanos(now);
        let deficit = self.deficit(now).saturating_sub(gcra.period);
        self.tat = now.saturating_add(deficit);
    }

    /// Drops every whole and partial token: the next one is a full period away.
    pub fn empty(&mut self, now: Instant) {
        let Some(gcra) = self.gcra else { return };
        let now = self.nanos(now);
        let deficit = self.deficit(now).max(gcra.full_deficit());
        self.tat = now.saturating_add(deficit);
    }

    /// Switches to `quota` at `now`, keeping the tokens the bucket holds (whole and
    /// partial), capped at the new burst. A bucket that was closed holds nothing, so it
    /// reopens empty.
    pub fn set_quota(&mut self, quota: Quota, now: Instant) {
        let old = self.gcra;
        self.quota = quota;
        self.gcra = Gcra::of(quota);
        let Some(new) = self.gcra else { return };
        let now = self.nanos(now);
        let deficit = match old {
            None => new.full_deficit(),
            Some(old) => {
                // The deficit in tokens, `whole + part / old.period`, re-expressed in the new
                // period. The part is rounded up: the bucket may lose a nanosecond's worth of
                // a token, never gain one.
                let deficit = self.deficit(now);
                let (whole, part) = (deficit / old.period, deficit % old.period);
                let part =
                    (u128::from(part) * u128::from(new.period)).div_ceil(u128::from(old.period));
                let converted = whole
                    .saturating_mul(new.period)
                    .saturating_add(u64::try_from(part).unwrap_or(u64::MAX));
                // Held tokens `old.burst − deficit` capped at `new.burst`: in deficit terms,
                // shifted by the change of burst and never below zero.
                let held = old.full_deficit_in(new).saturating_sub(converted);
                new.full_deficit()
                    .saturating_sub(held.min(new.full_deficit()))
            }
        };
        self.tat = now.saturating_add(deficit);
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    fn deficit(&self, now: u64) -> u64 {
        self.tat.saturating_sub(now)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn quota(rate: f64, burst: u32) -> Quota {
        Quota { rate, burst }
    }

    fn at(origin: Instant, ms: u64) -> Instant {
        origin + Duration::from_millis(ms)
    }

    fn wait_ms(ms: u64) -> Result<(), Refusal> {
        Err(Refusal::Wait(Duration::from_millis(ms)))
    }

    #[test]
    fn starts_full_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut bucket = AdjustableBucket::new(quota(10.0, 3), t0);
        for _ in 0..3 {
            assert_eq!(bucket.try_take(t0), Ok(()));
        }
        assert_eq!(bucket.try_take(t0), wait_ms(100));
        assert_eq!(bucket.try_take(at(t0, 99)), wait_ms(1));
        assert_eq!(bucket.try_take(at(t0, 100)), Ok(()));
        assert!(bucket.try_take(at(t0, 100)).is_err());
        // Idle time refills up to the burst and no further.
        for _ in 0..3 {
            assert_eq!(bucket.try_take(at(t0, 10_000)), Ok(()));
        }
        assert!(bucket.try_take(at(t0, 10_000)).is_err());
    }

    #[test]
    fn a_fractional_rate_waits_whole_seconds_between_tokens() {
        let t0 = Instant::now();
        let mut bucket = AdjustableBucket::new(quota(0.5, 1), t0);
        assert_eq!(bucket.try_take(t0), Ok(()));
        assert_eq!(bucket.try_take(t0), wait_ms(2_000));
        assert_eq!(bucket.try_take(at(t0, 2_000)), Ok(()));
    }

    #[test]
    fn a_zero_rate_or_zero_burst_is_closed() {
        let t0 = Instant::now();
        for (rate, burst) in [(0.0, 5), (10.0, 0), (f64::NAN, 5), (-1.0, 5)] {
            let mut bucket = AdjustableBucket::new(quota(rate, burst), t0);
            assert_eq!(bucket.try_take(t0), Err(Refusal::Closed), "{rate} {burst}");
            assert_eq!(bucket.peek(at(t0, 1_000_000)), Err(Refusal::Closed));
            bucket.refund(t0);
            bucket.empty(t0);
            assert_eq!(bucket.try_take(t0), Err(Refusal::Closed));
        }
    }

    #[test]
    fn absurd_rates_give_bounded_waits_without_overflow() {
        let t0 = Instant::now();
        for rate in [1e-300, 1e-30, f64::MIN_POSITIVE] {
            let mut bucket = AdjustableBucket::new(quota(rate, 2), t0);
            assert_eq!(bucket.try_take(t0), Ok(()));
            assert_eq!(bucket.try_take(t0), Ok(()));
            match bucket.try_take(t0) {
                Err(Refusal::Wait(wait)) => assert!(wait <= super::super::MAX_REFILL, "{rate}"),
                other => panic!("{rate}: {other:?}"),
            }
        }
        let mut fast = AdjustableBucket::new(quota(1e300, u32::MAX), t0);
        assert_eq!(fast.try_take(t0), Ok(()));
    }

    #[test]
    fn peek_reports_without_taking() {
        let t0 = Instant::now();
        let mut bucket = AdjustableBucket::new(quota(4.0, 1), t0);
        assert_eq!(bucket.peek(t0), Ok(()));
        assert_eq!(bucket.peek(t0), Ok(()));
        assert_eq!(bucket.try_take(t0), Ok(()));
        assert_eq!(bucket.peek(at(t0, 100)), wait_ms(150));
        assert_eq!(bucket.peek(at(t0, 250)), Ok(()));
    }

    #[test]
    fn a_refunded_token_comes_back_but_never_past_the_burst() {
        let t0 = Instant::now();
        let mut bucket = AdjustableBucket::new(quota(1.0, 2), t0);
        assert_eq!(bucket.try_take(t0), Ok(()));
        bucket.refund(t0);
        bucket.refund(t0);
        // Two tokens at most, however many refunds.
        assert_eq!(bucket.try_take(t0), Ok(()));
        assert_eq!(bucket.try_take(t0), Ok(()));
        assert_eq!(bucket.try_take(t0), wait_ms(1_000));
    }

    #[test]
    fn emptying_drops_partial_tokens_too() {
        let t0 = Instant::now();
        let mut bucket = AdjustableBucket::new(quota(2.0, 3), t0);
        assert_eq!(bucket.try_take(t0), Ok(()));
        // 2.6 tokens at 300 ms; emptied, the next one is a whole period (500 ms) away.
        bucket.empty(at(t0, 300));
        assert_eq!(bucket.peek(at(t0, 300)), wait_ms(500));
    }

    #[test]
    fn a_new_rate_keeps_the_tokens_held_and_refills_at_the_new_rate() {
        let t0 = Instant::now();
        let mut bucket = AdjustableBucket::new(quota(1.0, 10), t0);
        for _ in 0..10 {
            assert_eq!(bucket.try_take(t0), Ok(()));
        }
        // 1.5 tokens at 1.5 s; at 4/s the missing half token takes 125 ms.
        bucket.set_quota(quota(4.0, 10), at(t0, 1_500));
        assert_eq!(bucket.quota(), quota(4.0, 10));
        assert_eq!(bucket.try_take(at(t0, 1_500)), Ok(()));
        assert_eq!(bucket.try_take(at(t0, 1_500)), wait_ms(125));
    }

    #[test]
    fn a_new_burst_caps_the_tokens_held() {
        let t0 = Instant::now();
        let mut bucket = AdjustableBucket::new(quota(1.0, 10), t0);
        for _ in 0..4 {
            assert_eq!(bucket.try_take(t0), Ok(()));
        }
        // Six tokens held; a burst of 3 keeps three, and the new rate refills.
        bucket.set_quota(quota(2.0, 3), t0);
        for _ in 0..3 {
            assert_eq!(bucket.try_take(t0), Ok(()));
        }
        assert_eq!(bucket.peek(t0), wait_ms(500));
        // A larger burst adds room, not tokens.
        bucket.set_quota(quota(2.0, 30), t0);
        assert_eq!(bucket.peek(t0), wait_ms(500));
    }

    #[test]
    fn a_closed_bucket_reopens_empty() {
        let t0 = Instant::now();
        let mut bucket = AdjustableBucket::new(quota(0.0, 3), t0);
        bucket.set_quota(quota(10.0, 3), t0);
        assert_eq!(bucket.peek(t0), wait_ms(100));
        bucket.set_quota(quota(10.0, 0), t0);
        assert_eq!(bucket.peek(t0), Err(Refusal::Closed));
    }

    /// One step of a random schedule.
    #[derive(Clone, Debug)]
    enum Step {
        Take,
        Refund,
        Empty,
        SetRate(f64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => Just(Step::Take),
            1 => Just(Step::Refund),
            1 => Just(Step::Empty),
            1 => (0.1f64..1000.0).prop_map(Step::SetRate),
        ]
    }

    proptest! {
        /// From any instant, a bucket admits at most `burst + rate·t` takes over the next `t`.
        #[test]
        fn never_admits_more_than_burst_plus_rate_times_elapsed(
            rate in 0.1f64..1000.0,
            burst in 1u32..50,
            mut offsets_ms in proptest::collection::vec(0u64..5_000, 1..300),
        ) {
            offsets_ms.sort_unstable();
            let t0 = Instant::now();
            let mut bucket = AdjustableBucket::new(quota(rate, burst), t0);
            let mut admitted = 0u64;
            for &ms in &offsets_ms {
                if bucket.try_take(at(t0, ms)).is_ok() {
                    admitted += 1;
                }
                let bound = f64::from(burst) + rate * (ms as f64 / 1000.0);
                prop_assert!(admitted as f64 <= bound, "admitted {admitted} > {bound} after {ms}ms");
            }
        }

        /// Rate changes and emptying never let more through than the highest rate in force
        /// allows, and a refund returns at most the token it refunds.
        #[test]
        fn changes_never_admit_more_than_burst_plus_fastest_rate_times_elapsed(
            rate in 0.1f64..1000.0,
            burst in 1u32..50,
            steps in proptest::collection::vec((0u64..200, step()), 1..300),
        ) {
            let t0 = Instant::now();
            let mut bucket = AdjustableBucket::new(quota(rate, burst), t0);
            let (mut now, mut fastest, mut net) = (t0, rate, 0i64);
            for (ms, step) in steps {
                now += Duration::from_millis(ms);
                match step {
                    Step::Take => net += i64::from(bucket.try_take(now).is_ok()),
                    Step::Refund if net > 0 => {
                        bucket.refund(now);
                        net -= 1;
                    }
                    Step::Refund => {}
                    Step::Empty => bucket.empty(now),
                    Step::SetRate(r) => {
                        bucket.set_quota(quota(r, burst), now);
                        fastest = fastest.max(r);
                    }
                }
                let elapsed = now.duration_since(t0).as_secs_f64();
                let bound = f64::from(burst) + fastest * elapsed;
                prop_assert!(net as f64 <= bound, "{net} > {bound}");
            }
        }

        /// A caller that waits exactly the reported time is admitted, and one that comes a
        /// nanosecond early is not: the wait is exact, never early.
        #[test]
        fn the_reported_wait_is_never_early(
            rate in 0.1f64..1000.0,
            burst in 1u32..20,
            steps in proptest::collection::vec((0u64..100, step()), 1..100),
        ) {
            let t0 = Instant::now();
            let mut bucket = AdjustableBucket::new(quota(rate, burst), t0);
            let mut now = t0;
            for (ms, step) in steps {
                now += Duration::from_millis(ms);
                match step {
                    Step::Refund => bucket.refund(now),
                    Step::Empty => bucket.empty(now),
                    Step::SetRate(r) => bucket.set_quota(quota(r, burst), now),
                    Step::Take => {}
                }
                if let Err(Refusal::Wait(wait)) = bucket.try_take(now) {
                    prop_assert!(wait > Duration::ZERO);
                    prop_assert!(bucket.peek(now + wait - Duration::from_nanos(1)).is_err());
                    now += wait;
                    prop_assert_eq!(bucket.try_take(now), Ok(()));
                }
            }
        }

        /// A new quota never leaves more tokens than the new burst, nor more than were held.
        #[test]
        fn a_new_quota_keeps_at_most_the_tokens_held_and_the_new_burst(
            rate in 0.1f64..1000.0,
            burst in 1u32..50,
            taken in 0u32..50,
            new_rate in 0.1f64..1000.0,
            new_burst in 1u32..50,
        ) {
            let t0 = Instant::now();
            let mut bucket = AdjustableBucket::new(quota(rate, burst), t0);
            let taken = taken.min(burst);
            for _ in 0..taken {
                prop_assert_eq!(bucket.try_take(t0), Ok(()));
            }
            bucket.set_quota(quota(new_rate, new_burst), t0);
            let held = (0..=new_burst).take_while(|_| bucket.try_take(t0).is_ok()).count();
            let expected = (burst - taken).min(new_burst) as usize;
            prop_assert_eq!(held, expected);
        }
    }
}
