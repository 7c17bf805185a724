//! One emulated function at run time: its invoke quota, its concurrency slots, its counters,
//! and what a run of it does (sleep for the latency, or time out).

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::config::FunctionConfig;
use super::handler::{self, Outcome, Payload};
use super::stats::{bump, Counters, FunctionStats};
use crate::quota::{AdjustableBucket, Quota, Refusal};

#[derive(Debug)]
pub(crate) struct Function {
    pub(crate) cfg: FunctionConfig,
    pub(crate) counters: Counters,
    /// Lifetime record counter for `fail_every`.
    seen_records: AtomicU64,
    /// The invoke quota: the crate's one token bucket, with the admission layers' rounding.
    /// A blocking mutex: the critical section is a few integer operations and never awaits,
    /// so an async mutex would only add cost.
    bucket: Option<Mutex<AdjustableBucket>>,
    /// Runs holding a concurrency slot now.
    in_flight: AtomicU32,
    /// Woken whenever a slot is released, for queued `Event` invokes.
    released: Notify,
    /// Reported as `LastModified` / `RevisionId`.
    pub(crate) created: SystemTime,
    pub(crate) revision_id: String,
}

/// How a run ended.
#[derive(Debug)]
pub(crate) enum Execution {
    Finished(Outcome),
    /// The run outlived the function's timeout; Lambda stopped it.
    TimedOut,
}

impl Function {
    pub(crate) fn new(cfg: FunctionConfig) -> Self {
        let bucket = cfg
            .invoke_rate
            .zip(cfg.effective_invoke_burst())
            .map(|(rate, burst)| {
                Mutex::new(AdjustableBucket::new(Quota { rate, burst }, Instant::now()))
            });
        Self {
            cfg,
            counters: Counters::default(),
            seen_records: AtomicU64::new(0),
            bucket,
            in_flight: AtomicU32::new(0),
            released: Notify::new(),
            created: SystemTime::now(),
            revision_id: super::request_id(),
        }
    }

    pub(crate) fn stats(&self) -> FunctionStats {
        self.counters
            .snapshot(self.in_flight.load(Ordering::Relaxed))
    }

    /// Spends one token of the invoke quota.
    pub(crate) fn take_invoke_token(&self) -> Result<(), Refusal> {
        let Some(bucket) = &self.bucket else {
            return Ok(());
        };
        bucket.lock().try_take(Instant::now())
    }

    /// Takes a concurrency slot if the reserved concurrency allows one more run.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<ConcurrencySlot> {
        let limit = self.cfg.reserved_concurrency.unwrap_or(u32::MAX);
        // Relaxed is enough: the count is the only data guarded here, and read-modify-write
        // operations on one atomic are totally ordered, so the limit can never be overshot.
        let previous = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        self.counters
            .peak_concurrency
            .fetch_max(previous + 1, Ordering::Relaxed);
        Some(ConcurrencySlot {
            function: Arc::clone(self),
        })
    }

    /// Waits for a concurrency slot, as Lambda's internal queue does for `Event` invokes.
    /// Returns `None` if `closed` fires first (the emulator shut down).
    pub(crate) async fn acquire_queued(
        self: &Arc<Self>,
        closed: &mut watch::Receiver<bool>,
    ) -> Option<ConcurrencySlot> {
        loop {
            // Register for the wake-up *before* trying, so a release between the failed
            // try and the await is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(slot) = self.try_acquire() {
                return Some(slot);
            }
            tokio::select! {
                () = &mut released => {}
                // Either `true` was sent or the sender is gone: both mean shut down.
                _ = closed.wait_for(|closed| *closed) => return None,
            }
        }
    }

    /// Runs the handler while holding `slot`: decides the outcome at once (so record numbers
    /// follow arrival order), then "works" for the configured latency, or is stopped at the
    /// function timeout. The slot is released when this returns.
    pub(crate) async fn execute(&self, slot: ConcurrencySlot, payload: Payload) -> Execution {
        self.counters.note_records(&payload);
        let outcome = handler::run(&self.cfg, &self.seen_records, &mut rand::rng(), &payload);
        let execution = if self.cfg.latency > self.cfg.timeout {
            tokio::time::sleep(self.cfg.timeout).await;
            bump(&self.counters.timeouts);
            bump(&self.counters.errors);
            Execution::TimedOut
        } else {
            // An instant function answers at once: a zero sleep would still wait for the
            // timer's next millisecond tick.
            if !self.cfg.latency.is_zero() {
                tokio::time::sleep(self.cfg.latency).await;
            }
            self.counters
                .record_failures
                .fetch_add(outcome.failed_records, Ordering::Relaxed);
            if outcome.unhandled {
                bump(&self.counters.errors);
            }
            Execution::Finished(outcome)
        };
        drop(slot);
        execution
    }

    /// An accepted `Event` invoke: queue for a slot, then run; nobody waits for the answer.
    /// It counts as queued from the moment this is called (before the future is first
    /// polled), so stats read right after the 202 already include it.
    pub(crate) fn run_event(
        self: Arc<Self>,
        payload: Payload,
        mut closed: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send + 'static {
        bump(&self.counters.queued_events);
        async move {
            let slot = self.acquire_queued(&mut closed).await;
            self.counters.queued_events.fetch_sub(1, Ordering::Relaxed);
            if let Some(slot) = slot {
                self.execute(slot, payload).await;
            }
        }
    }
}

/// A held concurrency slot; dropping it releases the slot, however the run ended
/// (finished, timed out, or its task was cancelled).
#[derive(Debug)]
pub(crate) struct ConcurrencySlot {
    function: Arc<Function>,
}

impl Drop for ConcurrencySlot {
    fn drop(&mut self) {
        self.function.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.function.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn function(cfg: FunctionConfig) -> Arc<Function> {
        Arc::new(Function::new(cfg))
    }

    #[test]
    fn reserved_concurrency_caps_slots_and_dropping_a_slot_frees_it() {
        let f = function(FunctionConfig {
            reserved_concurrency: Some(2),
            ..FunctionConfig::new("f")
        });
        let a = f.try_acquire().expect("first slot");
        let b = f.try_acquire().expect("second slot");
        assert!(f.try_acquire().is_none());
        drop(a);
        let c = f.try_acquire().expect("freed slot");
        assert_eq!(f.stats().in_flight, 2);
        assert_eq!(f.stats().peak_concurrency, 2);
        drop((b, c));
        assert_eq!(f.stats().in_flight, 0);
    }

    #[test]
    fn zero_reserved_concurrency_never_gives_a_slot_and_none_is_unlimited() {
        let zero = function(FunctionConfig {
            reserved_concurrency: Some(0),
            ..FunctionConfig::new("f")
        });
        assert!(zero.try_acquire().is_none());
        let open = function(FunctionConfig::new("f"));
        let slots: Vec<ConcurrencySlot> = (0..1000)
            .map(|_| open.try_acquire().expect("unreserved"))
            .collect();
        assert_eq!(open.stats().peak_concurrency, 1000);
        drop(slots);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_event_runs_when_a_slot_is_released() {
        let f = function(FunctionConfig {
            reserved_concurrency: Some(1),
            ..FunctionConfig::new("f")
        });
        let (_closed_tx, closed) = watch::channel(false);
        let held = f.try_acquire().expect("slot");
        let payload = Payload::parse(bytes::Bytes::from_static(b"{}")).expect("JSON");
        let task = tokio::spawn(Arc::clone(&f).run_event(payload, closed));
        tokio::task::yield_now().await;
        assert_eq!(f.stats().queued_events, 1);
        drop(held);
        task.await.expect("event task finishes");
        assert_eq!(f.stats().queued_events, 0);
        assert_eq!(f.stats().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_event_is_dropped_at_shutdown() {
        let f = function(FunctionConfig {
            reserved_concurrency: Some(0),
            ..FunctionConfig::new("f")
        });
        let (closed_tx, closed) = watch::channel(false);
        let payload = Payload::parse(bytes::Bytes::from_static(b"{}")).expect("JSON");
        let task = tokio::spawn(Arc::clone(&f).run_event(payload, closed));
        tokio::task::yield_now().await;
        closed_tx.send_replace(true);
        task.await.expect("event task ends");
        assert_eq!(f.stats().queued_events, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn run_longer_than_the_timeout_stops_at_the_timeout_and_counts_an_error() {
        let f = function(FunctionConfig {
            latency: Duration::from_secs(10),
            timeout: Duration::from_secs(3),
            ..FunctionConfig::new("f")
        });
        let start = Instant::now();
        let slot = f.try_acquire().expect("slot");
        let payload = Payload::parse(bytes::Bytes::from_static(b"{}")).expect("JSON");
        let execution = f.execute(slot, payload).await;
        assert!(matches!(execution, Execution::TimedOut));
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        let stats = f.stats();
        assert_eq!((stats.errors, stats.timeouts, stats.in_flight), (1, 1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn an_instant_function_answers_without_waiting_for_a_timer_tick() {
        let f = function(FunctionConfig {
            latency: Duration::ZERO,
            ..FunctionConfig::new("f")
        });
        // Off the millisecond grid: a zero sleep would wait for the next tick.
        tokio::time::advance(Duration::from_micros(300)).await;
        let start = Instant::now();
        let slot = f.try_acquire().expect("slot");
        let payload = Payload::parse(bytes::Bytes::from_static(b"{}")).expect("JSON");
        let execution = f.execute(slot, payload).await;
        assert!(matches!(execution, Execution::Finished(_)));
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn invoke_quota_refills_with_time() {
        let f = function(FunctionConfig {
            invoke_rate: Some(2.0),
            ..FunctionConfig::new("f")
        });
        assert_eq!(f.take_invoke_token(), Ok(()));
        assert_eq!(f.take_invoke_token(), Ok(()));
        assert_eq!(
            f.take_invoke_token(),
            Err(Refusal::Wait(Duration::from_millis(500)))
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(f.take_invoke_token(), Ok(()));
    }
}
