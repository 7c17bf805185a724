//! Property tests for the bucket maths, on a fake clock.

use std::time::Duration;

use governor::clock::FakeRelativeClock;
use proptest::prelude::*;

use super::{Bucket, Decision, KeyedBuckets, Quota};

/// Rates from one token per 100 s to 100k/s, bursts up to 64.
fn quota() -> impl Strategy<Value = Quota> {
    let rate = prop_oneof![0.01f64..1.0, 1.0f64..100.0, 100.0f64..100_000.0];
    (rate, 1u32..=64).prop_map(|(rate, burst)| Quota { rate, burst })
}

/// Gaps between requests, as multiples of the token period: often 0 (bursts), otherwise
/// up to three periods, so histories mix refusals, partial and full refills.
fn gaps() -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(prop_oneof![Just(0.0), 0.0f64..3.0], 1..200)
}

fn period_ns(quota: Quota) -> f64 {
    1e9 / quota.rate
}

fn fresh(quota: Quota) -> (Bucket<FakeRelativeClock>, FakeRelativeClock) {
    let clock = FakeRelativeClock::default();
    (Bucket::new(quota, clock.clone()), clock)
}

/// Replays a history and returns the bucket and clock right after it.
fn replay(quota: Quota, gaps: &[f64]) -> (Bucket<FakeRelativeClock>, FakeRelativeClock) {
    let (bucket, clock) = fresh(quota);
    for gap in gaps {
        clock.advance(Duration::from_nanos((gap * period_ns(quota)) as u64));
        bucket.check();
    }
    (bucket, clock)
}

/// Replays a history, then makes one more request that is admitted (waiting for a token if
/// needed), and returns its decision.
fn replay_then_admit(
    quota: Quota,
    gaps: &[f64],
) -> (Bucket<FakeRelativeClock>, FakeRelativeClock, u32, Duration) {
    let (bucket, clock) = replay(quota, gaps);
    let mut decision = bucket.check();
    if let Decision::Limited { wait } = decision {
        clock.advance(wait);
        decision = bucket.check();
    }
    match decision {
        Decision::Allowed { remaining, reset } => (bucket, clock, remaining, reset),
        Decision::Limited { wait } => panic!("refused right after waiting: {wait:?}"),
    }
}

proptest! {
    /// In any window [t0, t0 + t], a bucket admits at most `burst + rate·t` requests.
    ///
    /// GCRA gives, for admitted requests at times a_i ≤ a_j, `j − i + 1 ≤ burst +
    /// (a_j − a_i) / period`, and the engine rounds the period *up* to whole nanoseconds,
    /// so `(a_j − a_i) / period ≤ rate·(a_j − a_i)` exactly. The only slack needed is for
    /// evaluating `rate·t` in f64 here (relative error ~1e-16, far below 1e-6 tokens for
    /// these ranges) — well inside the "+1 for float rounding" the spec allows.
    #[test]
    fn never_admits_more_than_burst_plus_rate_times_window(quota in quota(), gaps in gaps()) {
        let (bucket, clock) = fresh(quota);
        let mut now = 0u64;
        let mut admitted = Vec::new();
        for gap in &gaps {
            let step = (gap * period_ns(quota)) as u64;
            clock.advance(Duration::from_nanos(step));
            now += step;
            if bucket.check().is_allowed() {
                admitted.push(now);
            }
        }
        for i in 0..admitted.len() {
            for j in i..admitted.len() {
                let count = (j - i + 1) as f64;
                let window = (admitted[j] - admitted[i]) as f64 / 1e9;
                let bound = f64::from(quota.burst) + quota.rate * window + 1e-6;
                prop_assert!(count <= bound, "{count} admitted in {window}s > {bound}");
            }
        }
    }

    /// `wait` is exact: 1 ms before it (when it is at least 1 ms) and 1 ns before it the
    /// request is refused; exactly at it, with nobody else drawing, it is admitted.
    #[test]
    fn wait_is_exact_and_never_early(quota in quota(), gaps in gaps()) {
        let (bucket, clock) = replay(quota, &gaps);
        // Drain whatever is left, so the next request is refused.
        let wait = loop {
            if let Decision::Limited { wait } = bucket.check() {
                break wait;
            }
        };
        prop_assert!(wait > Duration::ZERO);
        let mut waited = Duration::ZERO;
        if wait >= Duration::from_millis(1) {
            waited = wait - Duration::from_millis(1);
            clock.advance(waited);
            prop_assert_eq!(bucket.check(), Decision::Limited { wait: Duration::from_millis(1) });
        }
        let one_ns = Duration::from_nanos(1);
        clock.advance(wait - one_ns - waited);
        prop_assert_eq!(bucket.check(), Decision::Limited { wait: one_ns });
        clock.advance(one_ns);
        prop_assert!(bucket.check().is_allowed());
    }

    /// `remaining` is exact: that many more immediate requests are admitted, then none.
    #[test]
    fn remaining_is_exact(quota in quota(), gaps in gaps()) {
        let (bucket, _clock, remaining, _reset) = replay_then_admit(quota, &gaps);
        prop_assert!(remaining < quota.burst);
        for _ in 0..remaining {
            prop_assert!(bucket.check().is_allowed());
        }
        prop_assert!(!bucket.check().is_allowed());
    }

    /// `reset` is exact: after it the bucket is full (`burst` immediate admissions, and no
    /// more); 1 ns before it, it is not.
    #[test]
    fn reset_is_exact(quota in quota(), gaps in gaps()) {
        let (bucket, clock, _remaining, reset) = replay_then_admit(quota, &gaps);
        clock.advance(reset);
        for _ in 0..quota.burst {
            prop_assert!(bucket.check().is_allowed());
        }
        prop_assert!(!bucket.check().is_allowed());

        let (bucket, clock, _remaining, reset) = replay_then_admit(quota, &gaps);
        prop_assert!(reset > Duration::ZERO);
        clock.advance(reset - Duration::from_nanos(1));
        let admitted = (0..quota.burst).filter(|_| bucket.check().is_allowed()).count();
        prop_assert!(admitted < quota.burst as usize);
    }

    /// A key's bucket in a keyed layer decides exactly like an unkeyed bucket.
    #[test]
    fn keyed_bucket_matches_unkeyed_bucket(quota in quota(), gaps in gaps()) {
        let clock = FakeRelativeClock::default();
        let bucket = Bucket::new(quota, clock.clone());
        let keyed = KeyedBuckets::new(quota, clock.clone(), 10);
        for gap in &gaps {
            clock.advance(Duration::from_nanos((gap * period_ns(quota)) as u64));
            prop_assert_eq!(keyed.check("k"), bucket.check());
        }
    }
}
