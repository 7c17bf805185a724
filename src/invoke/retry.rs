//! Retry policy: exponential backoff with jitter, and a retry budget.
//!
//! Backoff for the retry after attempt `n` (1-based) is `min(cap, base × 2^(n-1))`, then
//! jittered: `full` draws uniformly from `[0, d]`, `equal` from `[d/2, d]`, a ratio `r`
//! from `[d × (1 - r), d]`. A throttle's own `Retry-After` is a floor: the retry never comes
//! sooner than Lambda asked — up to `cap`, because that number comes from the network and
//! `1e300` seconds must neither overflow a `Duration` nor park a batch past every deadline.
//!
//! The budget keeps retries to a fraction of recent invokes (like the AWS SDK's retry
//! quota, and Finagle's retry budget): over a sliding 10-second window, retries may reach
//! `budget × invokes` plus a floor of 10 per second (Finagle's `minRetriesPerSec`), so that
//! a quiet route with a few batches in flight can still retry each of them through a short
//! blip. When Lambda is in trouble, retries cannot multiply the load on it: above the
//! floor they stay a fraction of the traffic, and every retry passes the function's gate
//! (invoke rate and concurrency) like a first attempt.
//!
//! # Why not tower's `retry::budget::TpsBudget` and `retry::backoff`
//!
//! `TpsBudget` is the same Finagle budget (a sliding window, a per-second floor, a share of
//! deposits), but it turns the share into a whole number of deposits per retry,
//! `⌊1 / fraction⌋`, so `budget = 0.3` would allow a third and `0.15` a sixth — not what the
//! config says — and it `assert!`s (panics) on values outside its ranges. Its
//! `ExponentialBackoff` adds jitter *on top of* the exponential delay (`[d, d × (1 +
//! jitter)]`), where the README promises `full`, `equal` and ratio jitter *below* it, and
//! it has no notion of a throttle's `Retry-After` floor. Both fit tower's `Retry`
//! middleware, which replays one request per policy; our retries are per batch, inside
//! the coalescer's delivery loop, so the middleware would not be used either.

use std::collections::VecDeque;
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng;
use tokio::time::Instant;

use crate::config::{Jitter, RetryConfig};

/// The delay before the retry that follows attempt `attempt` (1-based).
pub fn backoff(
    config: &RetryConfig,
    attempt: u32,
    retry_after: Option<Duration>,
    rng: &mut impl Rng,
) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let ceiling = config.base.saturating_mul(1u32 << exp).min(config.cap);
    let d = ceiling.as_secs_f64();
    let jittered = match config.jitter {
        Jitter::Full => rng.random_range(0.0..=d),
        Jitter::Equal => d / 2.0 + rng.random_range(0.0..=d / 2.0),
        Jitter::Ratio(r) => d * (1.0 - r * rng.random_range(0.0..=1.0)),
    };
    // `jittered` lies in `[0, d]`; float rounding could still take it a hair past `ceiling`
    // (or past `Duration`'s range when `cap` is huge), so convert without panicking and bound.
    let delay = Duration::try_from_secs_f64(jittered)
        .unwrap_or(ceiling)
        .min(ceiling);
    match retry_after {
        Some(floor) => delay.max(floor.min(config.cap)),
        None => delay,
    }
}

const WINDOW: Duration = Duration::from_secs(10);
const SLOT: Duration = Duration::from_secs(1);
/// Retries allowed per second of the window regardless of traffic: enough for a quiet route's
/// in-flight batches (up to `max_concurrency`, 10 by default) to each retry through a blip.
const MIN_RETRIES_PER_SEC: f64 = 10.0;
/// Retries allowed per window regardless of traffic.
const FLOOR: f64 = MIN_RETRIES_PER_SEC * WINDOW.as_secs_f64();

/// Retries ≤ `fraction` × invokes over the last 10 seconds (+ a floor of 100).
#[derive(Debug)]
pub struct RetryBudget {
    fraction: f64,
    slots: Mutex<VecDeque<(Instant, u32, u32)>>,
}

impl RetryBudget {
    /// A budget allowing `fraction` retries per invoke (the route's `retry.budget`), with no
    /// history yet.
    pub fn new(fraction: f64) -> Self {
        RetryBudget {
            fraction,
            slots: Mutex::new(VecDeque::new()),
        }
    }

    fn with_current<T>(&self, f: impl FnOnce(&mut VecDeque<(Instant, u32, u32)>) -> T) -> T {
        let now = Instant::now();
        // A `parking_lot` mutex: held for a few deque operations, never across an await.
        let mut slots = self.slots.lock();
        while slots
            .front()
            .is_some_and(|(start, _, _)| now.saturating_duration_since(*start) >= WINDOW)
        {
            slots.pop_front();
        }
        if slots
            .back()
            .is_none_or(|(start, _, _)| now.saturating_duration_since(*start) >= SLOT)
        {
            slots.push_back((now, 0, 0));
        }
        f(&mut slots)
    }

    /// Counts a first attempt.
    pub fn record_invoke(&self) {
        self.with_current(|slots| {
            if let Some(last) = slots.back_mut() {
                last.1 = last.1.saturating_add(1);
            }
        });
    }

    /// Takes permission for one retry, or refuses when the budget is spent.
    pub fn try_retry(&self) -> bool {
        let fraction = self.fraction;
        self.with_current(|slots| {
            let (invokes, retries) = slots.iter().fold((0u64, 0u64), |(i, r), s| {
                (i + u64::from(s.1), r + u64::from(s.2))
            });
            let allowed = FLOOR + fraction * invokes as f64;
            if (retries + 1) as f64 > allowed {
                return false;
            }
            if let Some(last) = slots.back_mut() {
                last.2 = last.2.saturating_add(1);
            }
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn config(jitter: Jitter) -> RetryConfig {
        RetryConfig {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
            jitter,
            ..RetryConfig::default()
        }
    }

    proptest! {
        #[test]
        fn backoff_stays_within_its_jitter_band(attempt in 1u32..40, seed: u64, ratio in 0.0f64..=1.0) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            for jitter in [Jitter::Full, Jitter::Equal, Jitter::Ratio(ratio)] {
                let cfg = config(jitter);
                let ceiling = (0.1 * 2f64.powi(attempt as i32 - 1)).min(10.0);
                let d = backoff(&cfg, attempt, None, &mut rng).as_secs_f64();
                let floor = match jitter {
                    Jitter::Full => 0.0,
                    Jitter::Equal => ceiling / 2.0,
                    Jitter::Ratio(r) => ceiling * (1.0 - r),
                };
                prop_assert!(d <= ceiling + 1e-9, "{d} > {ceiling}");
                prop_assert!(d + 1e-9 >= floor, "{d} < {floor}");
            }
        }

        #[test]
        fn a_throttles_retry_after_is_a_floor_up_to_the_cap(attempt in 1u32..10, seed: u64, secs in 0u64..30) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let cfg = config(Jitter::Full);
            let floor = Duration::from_secs(secs);
            let delay = backoff(&cfg, attempt, Some(floor), &mut rng);
            prop_assert!(delay >= floor.min(cfg.cap));
            prop_assert!(delay <= cfg.cap);
        }

        #[test]
        fn backoff_never_panics_and_never_exceeds_the_cap(
            attempt: u32,
            seed: u64,
            base_ns in 1u64..=u64::MAX,
            cap_secs: u64,
            retry_after_secs: u64,
            ratio in 0.0f64..=1.0,
        ) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let cap = Duration::from_secs(cap_secs);
            for jitter in [Jitter::Full, Jitter::Equal, Jitter::Ratio(ratio)] {
                let cfg = RetryConfig {
                    base: Duration::from_nanos(base_ns).min(cap),
                    cap,
                    jitter,
                    ..RetryConfig::default()
                };
                let retry_after = Some(Duration::from_secs(retry_after_secs));
                prop_assert!(backoff(&cfg, attempt, retry_after, &mut rng) <= cap);
                prop_assert!(backoff(&cfg, attempt, None, &mut rng) <= cap);
            }
        }
    }

    #[test]
    fn full_jitter_spreads_retries_instead_of_stampeding() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let cfg = config(Jitter::Full);
        let delays: Vec<Duration> = (0..100).map(|_| backoff(&cfg, 3, None, &mut rng)).collect();
        let distinct: std::collections::HashSet<_> = delays.iter().map(|d| d.as_millis()).collect();
        assert!(
            distinct.len() > 50,
            "100 retries landed on only {} distinct milliseconds",
            distinct.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_at_a_fraction_of_invokes() {
        let budget = RetryBudget::new(0.2);
        for _ in 0..100 {
            budget.record_invoke();
        }
        let granted = (0..1000).filter(|_| budget.try_retry()).count();
        assert_eq!(granted, 120, "floor 100 + 20% of 100 invokes");
        tokio::time::advance(WINDOW + SLOT).await;
        assert!(
            budget.try_retry(),
            "the window slides: old retries no longer count"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_route_can_retry_each_batch_in_flight_through_a_blip() {
        // Ten batches (a default max_concurrency's worth) each retried four times within
        // a few seconds: a blip, not a storm.
        let budget = RetryBudget::new(0.2);
        for _ in 0..10 {
            budget.record_invoke();
        }
        for round in 0..4 {
            for batch in 0..10 {
                assert!(budget.try_retry(), "round {round}, batch {batch} refused");
            }
            tokio::time::advance(Duration::from_millis(700)).await;
        }
    }
}
