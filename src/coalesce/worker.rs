//! The per-route worker: queue → batches → one delivery task per batch. The queue is a
//! channel (`fifo`) or the fair queue (`per_key`), read through one [`Inbox`], so the
//! worker has one code path for both.
//!
//! When a batch is sent ([`Flush`]): always when it is full (`max_records` or `max_bytes`)
//! and when `max_wait` has passed since its first record. Before that, `window` holds it;
//! `adaptive` sends it early only while none of the route's batches is in flight — Nagle's
//! rule for batches. A lone record on an idle route leaves at once (its latency is the
//! invoke's), and records that arrive while an invoke is out wait for it to come back,
//! for a full batch, or for `max_wait`, whichever is first: the answer of one invoke is
//! the earliest another small one could start to pay. Full batches never wait, so the
//! rule costs no throughput, and a record waits at most `max_wait` plus the gate.
//! Measured on the paused clock (the tests below, 64 free slots, 2 ms invokes):
//! 10,000 records/s in bursts of 10 per ms made batches of 10 when a free slot sent a
//! batch; this rule makes them 20 (a full batch every 2 ms), with every record answered
//! within 1 ms of wait plus the invoke. At low load the two are the same. A batch that is
//! only waiting for in-flight invokes holds no gate slot meanwhile, so other routes of
//! the function are not kept from it. `linger` (0 by default) adds a floor, as Kafka's
//! `linger.ms`: a partial batch leaves early only once it is that old, which at moderate load
//! trades up to `linger` of latency for fuller invokes (2,000 records/s against 2 ms
//! invokes: about 4 records per invoke without, 10 with 5 ms).
//!
//! Closing (shutdown after the grace period): the worker stops forming batches, answers
//! every record it holds or that is still queued with [`RecordError::Closed`] (`503`), and
//! exits. Batches already handed to a delivery task are not touched: Lambda may be
//! processing them, and their callers get the real result.
//!
//! Supervision ([`supervise`]): a worker that panics is restarted on the same queue; the
//! records it held (never sent) are answered `503` ([`RecordError::WorkerFailed`]).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::sync::{watch, Notify};
use tokio::time::{sleep_until, Instant};
use tracing::Instrument;

use super::deliver::Delivery;
use super::envelope::framed_len;
use super::fair::FairQueue;
use super::{BatchSpec, Message, RecordError};
use crate::config::Flush;
use crate::invoke::{Invoke, InvokePermit};

/// Process-wide batch ids: `b1`, `b2`, … on the batch span and on each record's request span.
static NEXT_BATCH_ID: AtomicU64 = AtomicU64::new(1);

/// Records being gathered into one invoke, with their exact framed size.
struct Batch {
    messages: Vec<Message>,
    entry_bytes: usize,
}

impl Batch {
    fn new(capacity: usize) -> Self {
        Batch {
            messages: Vec::with_capacity(capacity),
            entry_bytes: 0,
        }
    }

    fn is_full(&self, spec: &BatchSpec) -> bool {
        self.messages.len() >= spec.max_records
    }

    /// Whether `m` can join without the payload passing `max_bytes`. An empty batch always
    /// takes it (`submit` refused any record that cannot fit an invoke on its own).
    fn fits(&self, m: &Message, spec: &BatchSpec) -> bool {
        let size = framed_len(self.entry_bytes + m.entry.len(), self.messages.len() + 1);
        self.messages.is_empty() || size <= spec.max_bytes
    }

    fn push(&mut self, m: Message) {
        self.entry_bytes += m.entry.len();
        self.messages.push(m);
    }

    /// Drops records whose caller has gone, so they never reach Lambda.
    fn prune(&mut self, now: Instant) {
        Message::prune_gone(&mut self.messages, now);
        self.entry_bytes = self.messages.iter().map(|m| m.entry.len()).sum();
    }
}

/// The route's queue as the worker reads it: a record stops counting against
/// `queue.max_bytes` the moment the worker takes it, on every path that takes one. Either
/// queue answers `recv` with `None`, and `try_recv` with `Disconnected`, once it is empty
/// and closed or every batcher handle is gone.
pub(super) enum Inbox {
    /// `queue.fairness = "fifo"`: the channel, in arrival order.
    Fifo(mpsc::Receiver<Message>),
    /// `queue.fairness = "per_key"`: round robin across keys (see `fair.rs`).
    Fair(Arc<FairQueue>),
}

impl Inbox {
    /// Cancel-safe, as the worker's `select!` needs: a record is either returned or still
    /// queued.
    async fn recv(&mut self) -> Option<Message> {
        match self {
            Inbox::Fifo(rx) => rx.recv().await.map(Message::taken),
            Inbox::Fair(fair) => fair.recv().await,
        }
    }

    fn try_recv(&mut self) -> Result<Message, TryRecvError> {
        match self {
            Inbox::Fifo(rx) => rx.try_recv().map(Message::taken),
            Inbox::Fair(fair) => fair.try_recv(),
        }
    }

    fn close(&mut self) {
        match self {
            Inbox::Fifo(rx) => rx.close(),
            Inbox::Fair(fair) => fair.close(),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Inbox::Fifo(rx) => rx.is_empty(),
            Inbox::Fair(fair) => fair.is_empty(),
        }
    }
}

/// How many of the route's batches are in delivery (first attempt, retries and splits), and
/// a wake-up for the worker when that falls to zero: the adaptive flush's "route is idle".
#[derive(Default)]
struct InFlight {
    batches: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    fn is_idle(&self) -> bool {
        self.batches.load(Ordering::Acquire) == 0
    }

    /// Counts a batch until the guard drops, which is when its delivery task ends — even
    /// by a panic, since the runtime drops a panicked task's future.
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.batches.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(Arc::clone(self))
    }

    /// Resolves once no batch is in flight. `notify_one` keeps a permit when the worker is
    /// not waiting yet, so a last batch ending between the check and the wait is not missed;
    /// a stale permit only costs one more check.
    async fn wait_idle(&self) {
        while !self.is_idle() {
            self.idle.notified().await;
        }
    }
}

struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.batches.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_one();
        }
    }
}

/// Answers everything the worker still holds with `Closed`. The queue is closed first so
/// no sender can slip a record in after the drain.
fn fail_all(rx: &mut Inbox, held: Vec<Message>) {
    rx.close();
    for m in held {
        m.answer(Err(RecordError::Closed));
    }
    while let Ok(m) = rx.try_recv() {
        m.answer(Err(RecordError::Closed));
    }
}

/// What the worker holds between the queue and a delivery task. It lives in the
/// supervisor, outside the worker's future, so that the records of a worker that panicked
/// can still be answered.
struct Held {
    /// The batch being gathered.
    batch: Batch,
    /// A record that did not fit the previous batch's byte bound; it opens the next one.
    carry: Option<Message>,
}

impl Held {
    fn take_all(&mut self) -> Vec<Message> {
        let mut all = std::mem::take(&mut self.batch.messages);
        self.batch.entry_bytes = 0;
        all.extend(self.carry.take());
        all
    }
}

/// Runs the route's worker, and restarts it if it panics. The records it held then were
/// never sent (a batch leaves [`Held`] before its delivery task is spawned), so their
/// callers are answered [`RecordError::WorkerFailed`] (`503`, safe to retry), with an error
/// log; the queue and its callers carry over to the restarted worker. Records already in a
/// delivery task are not the worker's: if that task panics they surface as
/// [`RecordError::Lost`] (`502`), since Lambda may have run them.
pub(super) async fn supervise<I: Invoke>(
    mut rx: Inbox,
    delivery: Arc<Delivery<I>>,
    closing: watch::Receiver<bool>,
) {
    let mut held = Held {
        batch: Batch::new(delivery.spec.max_records),
        carry: None,
    };
    // Outside the worker's future: batches spawned before a panic still count after it.
    let in_flight = Arc::new(InFlight::default());
    loop {
        let worker = run(&mut rx, &delivery, &in_flight, closing.clone(), &mut held);
        // Unwind safety: after a panic only `held` (whole `Message` values) and `rx` are
        // used again, and neither can be left half-updated by a panic.
        match AssertUnwindSafe(worker).catch_unwind().await {
            Ok(()) => return,
            Err(panic) => {
                let reason = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".to_owned());
                let records = held.take_all();
                tracing::error!(
                    route = %delivery.spec.route,
                    records = records.len(),
                    panic = %reason,
                    "the route's batch worker panicked: answering the records it held 503 \
                     (never sent) and restarting it"
                );
                for m in records {
                    m.answer(Err(RecordError::WorkerFailed));
                }
                // A worker that fails again at once must not spin a core.
                tokio::time::sleep(RESTART_DELAY).await;
            }
        }
    }
}

/// Pause before a panicked worker is restarted.
const RESTART_DELAY: Duration = Duration::from_millis(100);

async fn run<I: Invoke>(
    rx: &mut Inbox,
    delivery: &Arc<Delivery<I>>,
    in_flight: &Arc<InFlight>,
    mut closing: watch::Receiver<bool>,
    held: &mut Held,
) {
    let spec = Arc::clone(&delivery.spec);
    let invoker = Arc::clone(&delivery.invoker);
    let adaptive = spec.flush == Flush::Adaptive;
    loop {
        if *closing.borrow() {
            fail_all(rx, held.take_all());
            return;
        }
        let first = match held.carry.take() {
            Some(m) => m,
            None => tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    // Every handle is gone: nothing more will arrive, and nothing is pending.
                    None => return,
                },
                _ = closing.changed() => continue,
            },
        };
        let flush_at = first.enqueued + spec.max_wait;
        // `linger`: a partial batch does not leave early before this, however idle the
        // route (`window` mode never sends it early anyway).
        let linger_at = first.enqueued + spec.linger;
        let mut lingered = Instant::now() >= linger_at;
        let Held { batch, carry } = &mut *held;
        batch.push(first);
        #[cfg(test)]
        tests::maybe_panic(&spec.route);

        // Pinned once per batch so the worker keeps its place in the gate's FIFO queue
        // across loop turns; it is only polled once the batch may be sent: in window mode
        // after the batch closes, in adaptive mode once the route is idle as well.
        let acquire = invoker.gate().acquire();
        tokio::pin!(acquire);
        let mut slot: Option<InvokePermit> = None;
        // Only this worker adds batches in flight, and it adds none while this batch forms:
        // once idle, the route stays idle until this batch leaves.
        let mut idle = adaptive && in_flight.is_idle();
        let wait_idle = in_flight.wait_idle();
        tokio::pin!(wait_idle);

        while !batch.is_full(&spec) {
            // Whatever is already queued joins without waiting: under load this is what
            // makes batches full.
            match rx.try_recv() {
                Ok(m) if batch.fits(&m, &spec) => {
                    batch.push(m);
                    continue;
                }
                Ok(m) => {
                    *carry = Some(m);
                    break;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {}
            }
            tokio::select! {
                biased;
                _ = closing.changed() => break,
                s = &mut acquire, if idle && lingered => {
                    slot = Some(s);
                    break;
                }
                () = &mut wait_idle, if adaptive && !idle => idle = true,
                () = sleep_until(linger_at), if adaptive && !lingered => lingered = true,
                _ = sleep_until(flush_at) => break,
                m = rx.recv() => match m {
                    Some(m) if batch.fits(&m, &spec) => batch.push(m),
                    Some(m) => {
                        *carry = Some(m);
                        break;
                    }
                    None => break,
                },
            }
        }

        // Callers that left while the batch filled need no slot.
        batch.prune(Instant::now());
        if batch.messages.is_empty() {
            continue;
        }
        let slot = match slot {
            Some(slot) => slot,
            None => tokio::select! {
                slot = &mut acquire => slot,
                _ = closing.changed() => {
                    fail_all(rx, held.take_all());
                    return;
                }
            },
        };
        // A batch not yet sent when closing began is not sent: the grace period is over.
        if *closing.borrow() {
            fail_all(rx, held.take_all());
            return;
        }
        batch.prune(Instant::now());
        if batch.messages.is_empty() {
            continue;
        }
        let batch_id = format!("b{}", NEXT_BATCH_ID.fetch_add(1, Ordering::Relaxed));
        let span = tracing::info_span!(
            "batch",
            batch = %batch_id,
            route = %spec.route,
            records = batch.messages.len(),
            bytes = framed_len(batch.entry_bytes, batch.messages.len()),
        );
        for m in &batch.messages {
            // The request span declared `batch` empty: now a record can be followed into
            // its invoke from either side.
            m.span.record("batch", batch_id.as_str());
            span.follows_from(m.span.id());
        }
        let backlogged = carry.is_some() || !rx.is_empty();
        // The batch leaves `held` here, for its delivery task: from now on its records
        // may reach Lambda, and they are no longer the worker's to answer.
        let messages = std::mem::replace(&mut batch.messages, Vec::with_capacity(spec.max_records));
        batch.entry_bytes = 0;
        delivery
            .drain
            .on_dispatch(messages.len(), backlogged, Instant::now());
        let counted = in_flight.enter();
        let deliver = Arc::clone(delivery).deliver(messages, Some(slot));
        tokio::spawn(
            async move {
                deliver.await;
                drop(counted);
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::time::{sleep_until, Instant};

    use crate::coalesce::fake::{self, ScriptedLambda};
    use crate::coalesce::{Delivered, RecordError};
    use crate::config::Flush;

    const MS: Duration = Duration::from_millis(1);
    const LONG: Duration = Duration::from_secs(60);

    /// Routes whose worker panics once, on its next record: a test-only fault.
    static PANIC_ONCE: Mutex<Vec<String>> = Mutex::new(Vec::new());

    pub(super) fn maybe_panic(route: &str) {
        let mut routes = PANIC_ONCE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = routes.iter().position(|r| r == route) {
            routes.remove(i);
            drop(routes);
            panic!("injected worker panic on route {route}");
        }
    }

    fn sizes_and_times(lambda: &ScriptedLambda) -> Vec<(usize, Duration)> {
        lambda.calls().iter().map(|c| (c.ids.len(), c.at)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_panics_is_restarted_and_the_record_it_held_hears_503() {
        let mut spec = fake::spec(20);
        spec.route = "panics-once".into();
        PANIC_ONCE.lock().unwrap().push("panics-once".into());
        let (batcher, lambda) = fake::start(spec, ScriptedLambda::echo(4, MS));

        let held = fake::submit(&batcher, "1", LONG);
        let outcome = held.outcome().await;
        assert!(
            matches!(outcome, Err(RecordError::WorkerFailed)),
            "{outcome:?}"
        );
        let after = fake::submit(&batcher, "2", LONG);
        let outcome = after.outcome().await;
        assert!(
            matches!(outcome, Ok(Delivered::Success { .. })),
            "the restarted worker serves the route: {outcome:?}"
        );
        assert_eq!(lambda.calls().len(), 1, "the held record was never sent");
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_panics_leaves_its_batches_in_delivery_to_answer_their_callers() {
        let mut spec = fake::spec(20);
        spec.route = "panics-in-flight".into();
        let (batcher, lambda) = fake::start(spec, ScriptedLambda::echo(4, 100 * MS));

        let sent = fake::submit(&batcher, "\"a\"", LONG);
        // `a` is out (idle route, free slot), for 100 ms.
        sleep_until(Instant::now() + 10 * MS).await;
        assert_eq!(
            lambda.calls().len(),
            0,
            "the fake records a call when it answers"
        );
        PANIC_ONCE.lock().unwrap().push("panics-in-flight".into());
        let held = fake::submit(&batcher, "\"b\"", LONG);

        let outcome = held.outcome().await;
        assert!(
            matches!(outcome, Err(RecordError::WorkerFailed)),
            "{outcome:?}"
        );
        let outcome = sent.outcome().await;
        assert!(
            matches!(outcome, Ok(Delivered::Success { .. })),
            "a batch in delivery outlives the worker's panic: {outcome:?}"
        );
        let after = fake::submit(&batcher, "\"c\"", LONG);
        let outcome = after.outcome().await;
        assert!(
            matches!(outcome, Ok(Delivered::Success { .. })),
            "the restarted worker serves the route: {outcome:?}"
        );
        let sent: Vec<Vec<String>> = lambda.calls().into_iter().map(|c| c.bodies).collect();
        assert_eq!(sent, [["\"a\""], ["\"c\""]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_inside_one_delivery_loses_that_batch_alone() {
        let lambda = ScriptedLambda::echo(4, 10 * MS).answer(|call| {
            if call.bodies == ["\"b\""] {
                fake::Reply::Panic
            } else {
                fake::Reply::Echo
            }
        });
        let (batcher, lambda) = fake::start(fake::spec(1), lambda);

        // Batches of one: all three are out at once, each in its own delivery task.
        let tickets = ["\"a\"", "\"b\"", "\"c\""].map(|b| fake::submit(&batcher, b, LONG));
        let [a, b, c] = tickets;
        let outcome = b.outcome().await;
        assert!(matches!(outcome, Err(RecordError::Lost)), "{outcome:?}");
        for ticket in [a, c] {
            let outcome = ticket.outcome().await;
            assert!(
                matches!(outcome, Ok(Delivered::Success { .. })),
                "the other batches in delivery are answered: {outcome:?}"
            );
        }
        assert_eq!(
            lambda.peak_concurrency(),
            3,
            "the three were in flight together"
        );
        let after = fake::submit(&batcher, "\"d\"", LONG);
        let outcome = after.outcome().await;
        assert!(
            matches!(outcome, Ok(Delivered::Success { .. })),
            "the worker carries on: {outcome:?}"
        );
        let answered: Vec<Vec<String>> = lambda.calls().into_iter().map(|c| c.bodies).collect();
        assert_eq!(answered, [["\"a\""], ["\"c\""], ["\"d\""]]);
    }

    /// Key `a` offers ten times what the queue holds, all at once, then key `b` three
    /// records; the function takes one batch of five at a time. Returns, per key, the
    /// bodies delivered, how many the queue refused at `submit`, and how many it displaced
    /// after taking them; and the bodies of each invoke.
    async fn flood(fairness: crate::config::Fairness) -> (Flooded, Flooded, Vec<Vec<String>>) {
        let mut spec = fake::spec(5);
        spec.max_pending = 10;
        spec.fairness = fairness;
        let (batcher, lambda) = fake::start(spec, ScriptedLambda::echo(1, 100 * MS));
        let submit = |key: &str, n: usize| {
            let key: Arc<str> = Arc::from(key);
            let body = serde_json::value::RawValue::from_string(format!("\"{key}{n}\""))
                .expect("test JSON");
            batcher.submit(&key, &body, Instant::now() + LONG)
        };
        let a: Vec<_> = (0..100).map(|n| submit("a", n)).collect();
        let b: Vec<_> = (0..3).map(|n| submit("b", n)).collect();
        let mut flooded = Vec::new();
        for submitted in [a, b] {
            let mut f = Flooded::default();
            for s in submitted {
                match s {
                    Err(RecordError::QueueFull { .. }) => f.refused += 1,
                    Err(other) => panic!("unexpected refusal {other:?}"),
                    Ok(ticket) => match ticket.outcome().await {
                        Ok(Delivered::Success { body }) => f.delivered.push(body.get().to_owned()),
                        Err(RecordError::QueueFull { retry_after }) => {
                            assert!(retry_after > Duration::ZERO);
                            f.displaced += 1;
                        }
                        other => panic!("unexpected outcome {other:?}"),
                    },
                }
            }
            flooded.push(f);
        }
        assert_eq!(batcher.queue_depth(), 0);
        assert_eq!(batcher.queued_bytes(), 0);
        let b = flooded.pop().expect("two keys");
        let a = flooded.pop().expect("two keys");
        let calls = lambda.calls().into_iter().map(|c| c.bodies).collect();
        (a, b, calls)
    }

    #[derive(Debug, Default)]
    struct Flooded {
        delivered: Vec<String>,
        refused: usize,
        displaced: usize,
    }

    #[tokio::test(start_paused = true)]
    async fn a_flooding_key_cannot_starve_a_light_key_in_a_fair_queue() {
        let (a, b, calls) = flood(crate::config::Fairness::PerKey).await;
        assert_eq!(b.delivered, ["\"b0\"", "\"b1\"", "\"b2\""], "{b:?}");
        assert_eq!((b.refused, b.displaced), (0, 0));
        assert_eq!(a.refused, 90, "the flood past the bound is refused at once");
        assert_eq!(
            a.displaced, 3,
            "each of b's records displaced one of a's newest"
        );
        assert_eq!(
            a.delivered,
            (0..7).map(|n| format!("\"a{n}\"")).collect::<Vec<_>>()
        );
        assert_eq!(
            calls,
            [
                ["\"a0\"", "\"b0\"", "\"a1\"", "\"b1\"", "\"a2\""],
                ["\"b2\"", "\"a3\"", "\"a4\"", "\"a5\"", "\"a6\""],
            ],
            "the keys take turns"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_flooding_key_starves_a_light_key_in_a_fifo_queue() {
        let (a, b, calls) = flood(crate::config::Fairness::Fifo).await;
        assert_eq!(b.refused, 3, "{b:?}");
        assert!(b.delivered.is_empty());
        assert_eq!((a.refused, a.displaced, a.delivered.len()), (90, 0, 10));
        assert_eq!(calls.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn records_in_a_fair_queue_outlive_a_worker_that_panics() {
        let mut spec = fake::spec(20);
        spec.route = "panics-once-fair".into();
        spec.fairness = crate::config::Fairness::PerKey;
        PANIC_ONCE.lock().unwrap().push("panics-once-fair".into());
        let (batcher, lambda) = fake::start(spec, ScriptedLambda::echo(4, MS));
        // Queued before the worker first runs: it takes `"a"`, panics holding it, and its
        // successor finds the other two where they were.
        let held = fake::submit(&batcher, "\"a\"", LONG);
        let queued = [
            fake::submit(&batcher, "\"b\"", LONG),
            fake::submit(&batcher, "\"c\"", LONG),
        ];
        let outcome = held.outcome().await;
        assert!(
            matches!(outcome, Err(RecordError::WorkerFailed)),
            "{outcome:?}"
        );
        for ticket in queued {
            let outcome = ticket.outcome().await;
            assert!(
                matches!(outcome, Ok(Delivered::Success { .. })),
                "{outcome:?}"
            );
        }
        let sent: Vec<Vec<String>> = lambda.calls().into_iter().map(|c| c.bodies).collect();
        assert_eq!(sent, [vec!["\"b\"".to_owned(), "\"c\"".to_owned()]]);
        assert_eq!(batcher.queued_bytes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn window_flush_sends_a_partial_batch_at_max_wait_and_full_batches_at_once() {
        let mut spec = fake::spec(5);
        spec.flush = Flush::Window;
        let (batcher, lambda) = fake::start(spec, ScriptedLambda::echo(10, 10 * MS));
        let t0 = Instant::now();

        let tickets: Vec<_> = (0..12)
            .map(|n| fake::submit(&batcher, &n.to_string(), LONG))
            .collect();
        for t in tickets {
            assert!(t.outcome().await.is_ok());
        }
        assert_eq!(
            sizes_and_times(&lambda),
            [(5, Duration::ZERO), (5, Duration::ZERO), (2, 50 * MS)],
            "full batches leave at once; the rest waits out max_wait"
        );

        // A lone record waits for the window even though the gate is free.
        sleep_until(t0 + Duration::from_secs(1)).await;
        let lone = fake::submit(&batcher, "\"lone\"", LONG);
        assert!(lone.outcome().await.is_ok());
        assert_eq!(lambda.calls()[3].at, Duration::from_secs(1) + 50 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn window_flush_lets_a_deadline_shorter_than_the_window_expire_unsent() {
        let mut spec = fake::spec(20);
        spec.flush = Flush::Window;
        spec.max_wait = Duration::from_secs(10);
        let (batcher, lambda) = fake::start(spec, ScriptedLambda::echo(10, 10 * MS));
        let ticket = fake::submit(&batcher, "1", 300 * MS);
        let outcome = ticket.outcome().await;
        assert!(matches!(outcome, Err(RecordError::Expired)), "{outcome:?}");
        assert!(lambda.calls().is_empty(), "an expired record is not sent");
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_flush_sends_a_lone_record_at_once_and_fills_batches_while_the_gate_is_busy() {
        let mut spec = fake::spec(20);
        spec.max_wait = Duration::from_secs(10);
        let (batcher, lambda) = fake::start(spec, ScriptedLambda::echo(1, 100 * MS));

        let first = fake::submit(&batcher, "0", LONG);
        // Let the worker dispatch the first record alone before the crowd arrives.
        tokio::task::yield_now().await;
        let crowd: Vec<_> = (1..=30)
            .map(|n| fake::submit(&batcher, &n.to_string(), LONG))
            .collect();
        assert!(first.outcome().await.is_ok());
        for t in crowd {
            assert!(t.outcome().await.is_ok());
        }
        assert_eq!(
            sizes_and_times(&lambda),
            [(1, Duration::ZERO), (20, 100 * MS), (10, 200 * MS)],
            "no window wait at low load; full batches behind a busy slot"
        );
    }

    /// What a steady load saw: invokes, records per invoke, and the longest a record
    /// waited from `submit` to its answer.
    #[derive(Debug)]
    struct Load {
        invokes: usize,
        records_per_invoke: f64,
        longest: Duration,
        peak_in_flight: usize,
    }

    /// Offers `per_tick` records every `tick` for `ticks` ticks (the paused clock's timer
    /// has millisecond steps, so a steady rate is a burst per tick) and waits for every
    /// answer, each within an hour of paused time.
    async fn steady_load(
        spec: crate::coalesce::BatchSpec,
        lambda: ScriptedLambda,
        per_tick: usize,
        tick: Duration,
        ticks: usize,
    ) -> Load {
        let (batcher, lambda) = fake::start(spec, lambda);
        let t0 = Instant::now();
        let mut answers = Vec::new();
        for n in 0..ticks {
            sleep_until(t0 + tick * u32::try_from(n).unwrap()).await;
            for _ in 0..per_tick {
                let ticket = fake::submit(&batcher, "1", LONG);
                let submitted = Instant::now();
                answers.push(tokio::spawn(async move {
                    assert!(ticket.outcome().await.is_ok());
                    submitted.elapsed()
                }));
            }
        }
        let mut longest = Duration::ZERO;
        for answer in answers {
            let waited = tokio::time::timeout(Duration::from_secs(3600), answer)
                .await
                .expect("every record is answered")
                .expect("the caller task does not panic");
            longest = longest.max(waited);
        }
        let calls = lambda.calls();
        Load {
            invokes: calls.len(),
            records_per_invoke: (per_tick * ticks) as f64 / calls.len() as f64,
            longest,
            peak_in_flight: lambda.peak_concurrency(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_flush_sends_each_record_at_once_at_low_load() {
        // 10 records/s, one every 100 ms, in front of a 5 ms function with a 50 ms window.
        let load = steady_load(
            fake::spec(20),
            ScriptedLambda::echo(64, 5 * MS),
            1,
            100 * MS,
            20,
        )
        .await;
        assert_eq!(load.invokes, 20, "one invoke per record: {load:?}");
        assert_eq!(
            load.longest,
            5 * MS,
            "a lone record waits for its invoke only, not for max_wait: {load:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_flush_keeps_batches_full_under_a_steady_load_with_free_slots() {
        // 10,000 records/s in front of a 2 ms function with 64 free slots: a free slot
        // alone would send each millisecond's 10 records as one invoke.
        let spec = fake::spec(20);
        let max_wait = spec.max_wait;
        let load = steady_load(spec, ScriptedLambda::echo(64, 2 * MS), 10, MS, 500).await;
        assert!(
            load.records_per_invoke >= 15.0,
            "batches stay large while invokes are in flight: {load:?}"
        );
        assert!(
            load.longest <= max_wait + 2 * MS,
            "no record waits longer than max_wait plus the invoke: {load:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_flush_at_moderate_load_batches_what_arrives_during_one_invoke() {
        // 1,000 records/s in front of a 5 ms function: each batch carries the records that
        // arrived while the previous one was out, and waits for nothing else.
        let load = steady_load(fake::spec(20), ScriptedLambda::echo(64, 5 * MS), 1, MS, 500).await;
        assert_eq!(load.peak_in_flight, 1, "{load:?}");
        assert!(
            (4.5..=5.5).contains(&load.records_per_invoke),
            "about rate × invoke time per batch: {load:?}"
        );
        assert!(
            load.longest <= 2 * 5 * MS,
            "a record waits at most one invoke out and its own: {load:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn linger_makes_fuller_batches_at_moderate_load_for_at_most_its_own_latency() {
        // 2,000 records/s in front of a 2 ms function: Nagle's rule alone sends what arrives
        // during one invoke (about 4); a 5 ms linger holds each partial batch 5 ms first.
        let plain = steady_load(fake::spec(20), ScriptedLambda::echo(64, 2 * MS), 2, MS, 500).await;
        let mut spec = fake::spec(20);
        spec.linger = 5 * MS;
        let lingered = steady_load(spec, ScriptedLambda::echo(64, 2 * MS), 2, MS, 500).await;
        assert!(
            plain.records_per_invoke <= 6.0,
            "without linger: what arrives during one invoke: {plain:?}"
        );
        assert!(
            lingered.records_per_invoke >= 9.0,
            "linger gathers rate × linger per batch: {lingered:?}"
        );
        assert!(
            lingered.longest <= 5 * MS + 2 * MS + MS,
            "a record waits at most the linger, the invoke and one tick: {lingered:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn records_whose_caller_left_are_pruned_before_dispatch() {
        let (batcher, lambda) = fake::start(fake::spec(1), ScriptedLambda::echo(1, 100 * MS));

        let a = fake::submit(&batcher, "\"a\"", LONG);
        let disconnected = fake::submit(&batcher, "\"gone\"", LONG);
        let expiring = fake::submit(&batcher, "\"late\"", 50 * MS);
        let c = fake::submit(&batcher, "\"c\"", LONG);
        drop(disconnected);

        assert!(a.outcome().await.is_ok());
        let late = expiring.outcome().await;
        assert!(matches!(late, Err(RecordError::Expired)), "{late:?}");
        assert!(c.outcome().await.is_ok());
        let sent: Vec<Vec<String>> = lambda.calls().into_iter().map(|c| c.bodies).collect();
        assert_eq!(
            sent,
            [vec!["\"a\"".to_owned()], vec!["\"c\"".to_owned()]],
            "only callers still waiting reach Lambda"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closing_answers_held_and_queued_records_closed_and_in_flight_ones_their_result() {
        closing_answers(crate::config::Fairness::PerKey).await;
        closing_answers(crate::config::Fairness::Fifo).await;
    }

    async fn closing_answers(fairness: crate::config::Fairness) {
        let mut spec = fake::spec(1);
        spec.fairness = fairness;
        let (batcher, lambda) = fake::start(spec, ScriptedLambda::echo(1, 1000 * MS));

        let in_flight = fake::submit(&batcher, "\"a\"", LONG);
        let held = fake::submit(&batcher, "\"b\"", LONG);
        let queued = fake::submit(&batcher, "\"c\"", LONG);
        // The worker has dispatched `a` and holds `b`, waiting for the only slot.
        sleep_until(Instant::now() + 10 * MS).await;
        batcher.closer().close();

        for ticket in [held, queued] {
            let outcome = ticket.outcome().await;
            assert!(matches!(outcome, Err(RecordError::Closed)), "{outcome:?}");
        }
        let refused = batcher.submit(
            &Arc::from("k"),
            &serde_json::value::RawValue::from_string("1".into()).unwrap(),
            Instant::now() + LONG,
        );
        assert!(matches!(refused, Err(RecordError::Closed)), "{refused:?}");
        let outcome = in_flight.outcome().await;
        assert!(
            matches!(outcome, Ok(Delivered::Success { .. })),
            "a batch Lambda may be running is answered with its result: {outcome:?}"
        );
        assert_eq!(lambda.calls().len(), 1);
        assert_eq!(batcher.queued_bytes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_bytes_count_records_until_the_worker_takes_them() {
        let mut spec = fake::spec(1);
        // `{"id":"rN…","key":"k","body":"xxxxxxxxxx"}` is about 45 bytes: room for two.
        spec.max_queued_bytes = 100;
        let (batcher, _lambda) = fake::start(spec, ScriptedLambda::echo(1, 1000 * MS));
        let body = "\"xxxxxxxxxx\"";

        let a = fake::submit(&batcher, body, LONG);
        let b = fake::submit(&batcher, body, LONG);
        assert!(batcher.queued_bytes() > 0);
        // The worker takes `a` into flight and `b` into its next batch: their bytes leave.
        sleep_until(Instant::now() + 10 * MS).await;
        assert_eq!(batcher.queued_bytes(), 0);
        let c = fake::submit(&batcher, body, LONG);
        let d = fake::submit(&batcher, body, LONG);
        let one = batcher.queued_bytes();
        assert!(one > 0 && one <= 100, "{one}");
        let raw = serde_json::value::RawValue::from_string(body.into()).unwrap();
        let refused = batcher.submit(&Arc::from("k"), &raw, Instant::now() + LONG);
        assert!(
            matches!(refused, Err(RecordError::QueueFull { .. })),
            "a third record passes queue.max_bytes: {refused:?}"
        );
        assert_eq!(batcher.queued_bytes(), one, "a refusal leaves no trace");
        drop(d);
        for t in [a, b, c] {
            assert!(t.outcome().await.is_ok());
        }
        assert_eq!(
            batcher.queued_bytes(),
            0,
            "a disconnected record's bytes are given back when the worker drops it"
        );
    }
}
