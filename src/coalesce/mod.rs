//! Coalescing: admitted records of one route are grouped into Lambda batch invokes, and
//! each record's result is handed back to the caller waiting for it.
//!
//! The shape is tower's `Buffer`: a cheap, cloneable handle ([`Batcher`]) sends a
//! [`Message`] — the record already serialized as its envelope entry, the caller's
//! deadline and a `oneshot` reply sender — into the route's bounded queue; one worker task
//! per route drains the queue into batches and spawns one dispatch task per batch. The
//! queue is a channel with `queue.fairness = "fifo"`, and with `"per_key"` (the default) a
//! fair queue (`fair.rs`) that serves the keys with records waiting in weighted round
//! robin and, when full, sheds the key holding the most rather than the newcomer.
//!
//! The worker and the delivery loop reach Lambda only through [`Invoke`] (the function's
//! gate and one invoke attempt): in production the function's
//! [`Invoker`](crate::invoke::Invoker), in this module's unit tests a scripted fake
//! (`fake.rs`) on the paused clock, which is how flushing, pruning, retries, splitting,
//! closing and the one-outcome-per-record guarantee below are tested.
//!
//! Guarantees:
//! - the queue is bounded in records (`queue.max_pending`) and in bytes (`queue.max_bytes`,
//!   the records' envelope entries, counted from `submit` until the worker takes the record
//!   into a batch); a full queue refuses at once with a `Retry-After` computed from the
//!   measured drain rate ([`RecordError::QueueFull`]), and so does a queue that, at that
//!   rate, cannot reach the record before its caller's deadline (FIFO: the records queued;
//!   per key: the records drawn before it in round robin). A per-key queue refuses only a
//!   newcomer whose key holds the most records; any other newcomer displaces the newest
//!   record of the key that does, and that record's caller is answered `QueueFull` with the
//!   same `Retry-After`;
//! - a queued record is held once: its envelope entry, with the record itself a slice of it;
//! - a batch flushes at `max_records` or `max_bytes` (envelope included, so the invoke
//!   payload never exceeds it), when `max_wait` has passed since its first record, or —
//!   with `flush = "adaptive"` — as soon as none of the route's batches is in flight and
//!   the function's gate has a free slot (Nagle's rule; `worker.rs` says why);
//! - records whose caller has gone (disconnected: its receiver dropped; or deadline
//!   passed) are dropped before dispatch and never reach Lambda;
//! - every submitted record's caller receives exactly one [`Outcome`]: each reply sender
//!   is moved into exactly one `send`, and a sender dropped without a send (a panicking
//!   dispatch task) surfaces to the caller as [`RecordError::Lost`], never as silence.

mod deliver;
mod envelope;
mod fair;
#[cfg(test)]
mod fake;
mod worker;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::config::{
    Envelope, Fairness, Flush, Invocation, RetryConfig, RouteConfig, ENVELOPE_FRAME,
};
use crate::dlq::DeadLetterSink;
use crate::invoke::retry::RetryBudget;
use crate::invoke::{Invoke, InvokeFailure};

pub use self::envelope::FunctionError;
pub use self::fair::KeyWeights;

/// What a route's batcher needs from the config.
#[derive(Clone, Debug)]
pub struct BatchSpec {
    /// The route's name, for logs, metrics and dead letters.
    pub route: String,
    /// How records go into a payload.
    pub envelope: Envelope,
    /// Synchronous or asynchronous invokes: decides how an answer is read.
    pub invocation: Invocation,
    /// Records per invoke (1 for the raw envelope).
    pub max_records: usize,
    /// Largest invoke payload in bytes, envelope included.
    pub max_bytes: usize,
    /// Longest a batch waits after its first record.
    pub max_wait: Duration,
    /// When a batch is sent.
    pub flush: Flush,
    /// With the adaptive flush, the least a partial batch waits before it may leave early.
    pub linger: Duration,
    /// Bound on records waiting in the queue.
    pub max_pending: usize,
    /// Bound on the bytes of queued records' entries.
    pub max_queued_bytes: usize,
    /// The order records are drawn in, and who is shed when the queue is full.
    pub fairness: Fairness,
    /// Records per second the route can deliver at most (invoke rate × batch size); the
    /// drain estimate until a backlog has been measured.
    pub nominal_drain_rate: f64,
    /// How failed invokes are retried (attempts, backoff, budget).
    pub retry: RetryConfig,
    /// Split a batch whose invoke failed with a function error, to isolate the failing record.
    pub bisect: bool,
}

impl BatchSpec {
    /// The batcher's settings for `route`, defaults resolved (`max_records` and
    /// `max_bytes` per envelope and invocation).
    pub fn from_route(route: &RouteConfig) -> Self {
        BatchSpec {
            route: route.name.clone(),
            envelope: route.envelope,
            invocation: route.invocation,
            max_records: route.max_records(),
            max_bytes: usize::try_from(route.max_bytes()).unwrap_or(usize::MAX),
            max_wait: route.batch.max_wait,
            linger: route.batch.linger,
            flush: route.batch.flush,
            max_pending: route.queue.max_pending,
            max_queued_bytes: route.queue.max_bytes.as_usize(),
            fairness: route.queue.fairness,
            nominal_drain_rate: route.invoke.rate * route.max_records() as f64,
            retry: route.retry.clone(),
            bisect: route.bisect_on_function_error,
        }
    }
}

/// A record's result, as the function reported it.
#[derive(Debug)]
pub enum Delivered {
    /// The function processed the record; `body` is its per-record result (`null` when
    /// the response shape carries none, as with `batchItemFailures`).
    Success {
        /// The function's result for this record, as it wrote it.
        body: Box<RawValue>,
    },
    /// The function reported this record failed; `error` is what it said.
    Failed {
        /// The function's error for this record, as it wrote it.
        error: Box<RawValue>,
    },
    /// Lambda queued the batch (`invocation = "event"`).
    Accepted,
}

/// Why a record has no result from the function.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The queue is full, or cannot reach the record before its caller's deadline: refused
    /// at `submit`, before the record was queued; or, in a per-key fair queue, displaced
    /// from the full queue by a newcomer of a key holding fewer records.
    #[error("the route's queue is full")]
    QueueFull {
        /// How long the queue needs to drain at the measured rate (at most an hour).
        retry_after: Duration,
    },
    /// The batcher is closed (shutdown or route removed by a reload): the record was not
    /// sent.
    #[error("sluicegate is shutting down")]
    Closed,
    /// The route's worker failed (panicked) while it held the record, before the record was
    /// sent; the worker was restarted.
    #[error("the route's batch worker failed before the record was sent to Lambda")]
    WorkerFailed,
    /// The record's envelope entry alone is larger than one invoke's payload may be.
    #[error("record of {size} bytes cannot fit one invoke of at most {limit} bytes")]
    TooLarge {
        /// Bytes of the record's envelope entry.
        size: usize,
        /// Bytes one record may take: `max_bytes` less the envelope's frame.
        limit: usize,
    },
    /// The invoke failed for good: not retryable, or out of attempts or retry budget on a
    /// route without a dead-letter sink.
    #[error(transparent)]
    Invoke(#[from] InvokeFailure),
    /// The function failed the whole invoke (`X-Amz-Function-Error`).
    #[error(transparent)]
    Function(#[from] FunctionError),
    /// The function's answer cannot be read as this record's result: not JSON, not an
    /// accepted envelope answer, naming records the batch does not hold, or listing this
    /// record twice. The message says which.
    #[error("the function's response is malformed: {0}")]
    MalformedResponse(String),
    /// The function's answer does not mention this record.
    #[error("the function's response has no result for this record")]
    MissingResult,
    /// The task holding the record's reply ended without answering (it panicked).
    #[error("the record's result was lost (its batch task ended without answering)")]
    Lost,
    /// The caller's deadline passed while the record waited for an attempt (in the queue,
    /// a batch or the function's gate); no further attempt carries it.
    #[error("the caller's deadline passed before the record had a result")]
    Expired,
    /// An attempt failed and the next one could not start before the caller's deadline;
    /// the failure of the last attempt.
    #[error("the caller's deadline comes before the next retry ({0})")]
    DeadlineBeforeRetry(InvokeFailure),
    /// Retries were exhausted and the route's dead-letter sink confirmed the record.
    #[error("retries exhausted; the record was dead-lettered as {id} ({failure})")]
    DeadLettered {
        /// The dead letter's id, by which it can be found and redriven.
        id: String,
        /// The last attempt's failure.
        failure: InvokeFailure,
    },
    /// Retries were exhausted and the dead-letter sink could not keep the record.
    #[error("retries exhausted ({failure}), and {sink}")]
    NotDeadLettered {
        /// The last attempt's failure.
        failure: InvokeFailure,
        /// Why the sink did not keep it.
        sink: crate::dlq::SinkError,
    },
}

/// The one answer a caller gets.
pub type Outcome = Result<Delivered, RecordError>;

/// One queued record.
#[derive(Debug)]
pub struct Message {
    id: Arc<str>,
    key: Arc<str>,
    /// The record as it goes into the payload: its envelope entry, or the raw body.
    entry: Bytes,
    /// The record's own JSON (a slice of `entry`), for dead letters.
    body: Bytes,
    enqueued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Outcome>,
    span: tracing::Span,
    /// The entry's share of the queue's byte bound, given back when the worker takes the
    /// record (or when the record is dropped before that).
    charge: Charge,
}

impl Message {
    /// The worker took the record out of the queue: its bytes no longer count against
    /// `queue.max_bytes`.
    fn taken(mut self) -> Self {
        self.charge.release();
        self
    }

    fn answer(self, outcome: Outcome) {
        // The caller may have gone (deadline, disconnect); nobody is left to tell.
        let _ = self.reply.send(outcome);
    }

    /// Removes the records whose caller has gone. A caller past its deadline is answered
    /// [`RecordError::Expired`]: dropped unanswered, its ticket would resolve as `Lost`
    /// (a `502`) in a race with its own deadline timer. A caller that disconnected hears
    /// nothing, as nobody listens.
    fn prune_gone(messages: &mut Vec<Message>, now: Instant) {
        if !messages.iter().any(|m| m.is_gone(now)) {
            return;
        }
        for m in std::mem::take(messages) {
            if m.is_gone(now) {
                m.answer(Err(RecordError::Expired));
            } else {
                messages.push(m);
            }
        }
    }

    fn is_gone(&self, now: Instant) -> bool {
        self.reply.is_closed() || self.deadline <= now
    }
}

/// A submitted record's claim on its result.
#[derive(Debug)]
pub struct Ticket {
    /// The record's id (`r<n>`), unique in this process: its `id` in the batch envelope.
    pub id: Arc<str>,
    rx: oneshot::Receiver<Outcome>,
}

impl Ticket {
    /// Waits for the record's outcome. The caller bounds this with its deadline; dropping
    /// the ticket marks the record gone so it is not dispatched.
    pub async fn outcome(self) -> Outcome {
        self.rx.await.unwrap_or(Err(RecordError::Lost))
    }
}

/// The batcher's side of the route's queue.
#[derive(Clone, Debug)]
enum Queue {
    Fifo(mpsc::Sender<Message>),
    Fair(Arc<fair::FairSender>),
}

/// Handle to one route's batcher. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Batcher {
    queue: Queue,
    queued: Arc<QueuedBytes>,
    spec: Arc<BatchSpec>,
    drain: Arc<DrainMeter>,
    closing: Arc<watch::Sender<bool>>,
}

/// Closes a [`Batcher`] without keeping its queue open.
#[derive(Clone, Debug)]
pub struct Closer(Arc<watch::Sender<bool>>);

impl Closer {
    /// Stops the worker: records not yet sent to Lambda are answered `503` (closed), and no
    /// new record is taken. Batches already being delivered finish normally.
    pub fn close(&self) {
        self.0.send_replace(true);
    }
}

static NEXT_RECORD_ID: AtomicU64 = AtomicU64::new(1);

impl Batcher {
    /// Starts the route's worker on the current runtime, invoking through `invoker` (the
    /// function's [`Invoker`](crate::invoke::Invoker), or a test's fake). `dlq` receives the
    /// records whose retries are exhausted.
    pub fn spawn<I: Invoke>(
        spec: BatchSpec,
        invoker: Arc<I>,
        dlq: Option<DeadLetterSink>,
    ) -> Batcher {
        let queued = Arc::new(QueuedBytes::default());
        let (queue, inbox) = match spec.fairness {
            Fairness::Fifo => {
                let (tx, rx) = mpsc::channel(spec.max_pending);
                (Queue::Fifo(tx), worker::Inbox::Fifo(rx))
            }
            Fairness::PerKey => {
                let fair = Arc::new(fair::FairQueue::new(
                    spec.max_pending,
                    spec.max_queued_bytes,
                    Arc::clone(&queued),
                ));
                let sender = fair::FairSender(Arc::clone(&fair));
                (Queue::Fair(Arc::new(sender)), worker::Inbox::Fair(fair))
            }
        };
        let spec = Arc::new(spec);
        let drain = Arc::new(DrainMeter::new(spec.nominal_drain_rate));
        let delivery = Arc::new(deliver::Delivery {
            spec: Arc::clone(&spec),
            invoker,
            budget: RetryBudget::new(spec.retry.budget),
            dlq,
            drain: Arc::clone(&drain),
            metrics: Default::default(),
        });
        let (closing, closed) = watch::channel(false);
        tokio::spawn(worker::supervise(inbox, delivery, closed));
        Batcher {
            queue,
            queued,
            spec,
            drain,
            closing: Arc::new(closing),
        }
    }

    /// Queues a record for `key` and returns the ticket for its result, or refuses at once.
    /// The key is served at weight 1 by a per-key fair queue; see
    /// [`submit_weighted`](Self::submit_weighted).
    pub fn submit(
        &self,
        key: &Arc<str>,
        body: &RawValue,
        deadline: Instant,
    ) -> Result<Ticket, RecordError> {
        self.submit_weighted(key, 1, body, deadline)
    }

    /// Queues a record for `key`, whose plan gives it `weight` records per round of a
    /// per-key fair queue (ignored by a FIFO queue), and returns the ticket for its result,
    /// or refuses at once.
    pub fn submit_weighted(
        &self,
        key: &Arc<str>,
        weight: u32,
        body: &RawValue,
        deadline: Instant,
    ) -> Result<Ticket, RecordError> {
        let n = NEXT_RECORD_ID.fetch_add(1, Ordering::Relaxed);
        let id: Arc<str> = format!("r{n}").into();
        let (entry, body) = match self.spec.envelope {
            Envelope::Raw => {
                let entry = Bytes::copy_from_slice(body.get().as_bytes());
                (entry.clone(), entry)
            }
            Envelope::Batch => envelope::entry(&id, key, body),
        };
        let limit = self.spec.max_bytes.saturating_sub(ENVELOPE_FRAME as usize);
        if entry.len() > limit {
            return Err(RecordError::TooLarge {
                size: entry.len(),
                limit,
            });
        }
        let charge = match &self.queue {
            Queue::Fifo(_) => self.queued.charge(entry.len(), self.spec.max_queued_bytes),
            // The fair queue charges under its own lock, once it knows whom it displaces.
            Queue::Fair(_) => Some(self.queued.add(0)),
        };
        let Some(charge) = charge else {
            return Err(RecordError::QueueFull {
                retry_after: self.drain_estimate(),
            });
        };
        // A record the queue cannot drain before its caller's deadline would only time out
        // in the queue: shed it now, while the caller can still act on Retry-After.
        let depth = match &self.queue {
            Queue::Fifo(_) => self.queue_depth(),
            Queue::Fair(fair) => fair.0.records_ahead(key, weight),
        };
        if depth > 0 {
            if let Some(rate) = self.drain.measured_rate() {
                let wait = Duration::from_secs_f64(depth as f64 / rate);
                if Instant::now() + wait > deadline {
                    return Err(RecordError::QueueFull {
                        retry_after: self.drain_estimate(),
                    });
                }
            }
        }
        let (reply, rx) = oneshot::channel();
        let message = Message {
            id: Arc::clone(&id),
            key: Arc::clone(key),
            entry,
            body,
            enqueued: Instant::now(),
            deadline,
            reply,
            span: tracing::Span::current(),
            charge,
        };
        // A refused message is dropped here, and its charge with it.
        match &self.queue {
            Queue::Fifo(tx) => match tx.try_send(message) {
                Ok(()) => Ok(Ticket { id, rx }),
                Err(mpsc::error::TrySendError::Full(_)) => Err(RecordError::QueueFull {
                    retry_after: self.drain_estimate(),
                }),
                Err(mpsc::error::TrySendError::Closed(_)) => Err(RecordError::Closed),
            },
            Queue::Fair(fair) => match fair.0.push(message, weight) {
                Ok(displaced) => {
                    self.answer_displaced(displaced);
                    Ok(Ticket { id, rx })
                }
                Err(fair::Refused::Full) => Err(RecordError::QueueFull {
                    retry_after: self.drain_estimate(),
                }),
                Err(fair::Refused::Closed) => Err(RecordError::Closed),
            },
        }
    }

    /// Answers records a newcomer displaced from a full fair queue as a full queue refuses:
    /// `429 scope=queue` with the drain estimate, outside the queue's lock.
    fn answer_displaced(&self, displaced: Vec<Message>) {
        if displaced.is_empty() {
            return;
        }
        metrics::counter!("sluicegate_queue_displaced_total", "route" => self.spec.route.clone())
            .increment(displaced.len() as u64);
        let retry_after = self.drain_estimate();
        for m in displaced {
            m.answer(Err(RecordError::QueueFull { retry_after }));
        }
    }

    /// A handle that closes this batcher (see [`Closer::close`]) without keeping it alive.
    pub fn closer(&self) -> Closer {
        Closer(Arc::clone(&self.closing))
    }

    /// The queue as a rate-limit policy: capacity `max_pending`, refilled at the drain rate.
    pub fn queue_policy(&self) -> crate::limit::Quota {
        crate::limit::Quota {
            rate: self.drain.rate(),
            burst: u32::try_from(self.spec.max_pending).unwrap_or(u32::MAX),
        }
    }

    /// Records waiting in the queue (not yet taken into a batch).
    pub fn queue_depth(&self) -> usize {
        match &self.queue {
            Queue::Fifo(tx) => self.spec.max_pending - tx.capacity(),
            Queue::Fair(fair) => fair.0.len(),
        }
    }

    /// Bytes of the records waiting in the queue.
    pub fn queued_bytes(&self) -> usize {
        self.queued.0.load(Ordering::Relaxed)
    }

    /// The settings this batcher was started with.
    pub fn spec(&self) -> &BatchSpec {
        &self.spec
    }

    /// How long until the queue has drained at the measured rate.
    fn drain_estimate(&self) -> Duration {
        let rate = self.drain.rate();
        let depth = self.queue_depth().max(1) as f64;
        Duration::from_secs_f64((depth / rate).min(3600.0))
    }
}

/// The bytes of a route's queued records.
#[derive(Debug, Default)]
struct QueuedBytes(AtomicUsize);

impl QueuedBytes {
    /// Counts `bytes` more against `max`, or refuses when they would pass it.
    ///
    /// Add first, then check and undo: concurrent submitters never together pass `max` (a
    /// submitter may be refused while another's undo is pending — harmless at the bound).
    fn charge(self: &Arc<Self>, bytes: usize, max: usize) -> Option<Charge> {
        let before = self.0.fetch_add(bytes, Ordering::AcqRel);
        if before.saturating_add(bytes) > max {
            self.0.fetch_sub(bytes, Ordering::AcqRel);
            return None;
        }
        Some(Charge {
            queue: Arc::clone(self),
            bytes,
        })
    }

    /// Counts `bytes` more with no bound check: for a caller that checked the room under a
    /// lock that every other adder takes too (the fair queue).
    fn add(self: &Arc<Self>, bytes: usize) -> Charge {
        self.0.fetch_add(bytes, Ordering::AcqRel);
        Charge {
            queue: Arc::clone(self),
            bytes,
        }
    }

    fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// One record's bytes in [`QueuedBytes`]. Released exactly once: when the worker takes the
/// record, or on drop — a refused `try_send`, a record answered `Closed` from the queue,
/// a worker that ended — whichever comes first.
#[derive(Debug)]
struct Charge {
    queue: Arc<QueuedBytes>,
    bytes: usize,
}

impl Charge {
    fn release(&mut self) {
        let bytes = std::mem::take(&mut self.bytes);
        if bytes > 0 {
            self.queue.0.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release();
    }
}

/// How fast the queue drains *when it is backlogged*: records dispatched per second of
/// time during which records were waiting. Idle time is not counted — a queue that was
/// empty says nothing about how fast it can drain, and counting it would make a burst
/// after a pause look undrainable. Smoothed over windows of at least one busy second.
///
/// A plain mutex: it is taken once per dispatched batch (not per request) and held for a
/// few arithmetic operations.
#[derive(Debug)]
struct DrainMeter {
    inner: parking_lot::Mutex<Meter>,
}

#[derive(Debug)]
struct Meter {
    /// The previous dispatch, if records were still waiting then.
    busy_since: Option<Instant>,
    busy: Duration,
    count: u64,
    rate: f64,
    measured: bool,
}

/// Busy time that makes one measurement.
const DRAIN_WINDOW: Duration = Duration::from_secs(1);

impl DrainMeter {
    fn new(nominal: f64) -> Self {
        DrainMeter {
            inner: parking_lot::Mutex::new(Meter {
                busy_since: None,
                busy: Duration::ZERO,
                count: 0,
                rate: nominal.max(0.001),
                measured: false,
            }),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Meter> {
        self.inner.lock()
    }

    /// A batch of `records` was dispatched at `now`; `backlogged` says whether records were
    /// still waiting behind it.
    fn on_dispatch(&self, records: usize, backlogged: bool, now: Instant) {
        let mut m = self.lock();
        if let Some(since) = m.busy_since {
            m.busy += now.saturating_duration_since(since);
            m.count += records as u64;
            if m.busy >= DRAIN_WINDOW {
                let observed = m.count as f64 / m.busy.as_secs_f64();
                m.rate = if m.measured {
                    0.5 * m.rate + 0.5 * observed
                } else {
                    observed
                };
                m.measured = true;
                m.busy = Duration::ZERO;
                m.count = 0;
            }
        }
        m.busy_since = backlogged.then_some(now);
    }

    /// The drain rate once at least one busy window has been measured.
    fn measured_rate(&self) -> Option<f64> {
        let m = self.lock();
        m.measured.then_some(m.rate.max(0.001))
    }

    fn rate(&self) -> f64 {
        self.lock().rate.max(0.001)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Flush;
    use proptest::prelude::*;

    #[test]
    fn queued_bytes_are_bounded_and_given_back_exactly_once() {
        let queue = Arc::new(QueuedBytes::default());
        let mut a = queue.charge(600, 1000).expect("600 of 1000 fit");
        assert!(
            queue.charge(401, 1000).is_none(),
            "600 + 401 passes the bound"
        );
        assert_eq!(
            queue.0.load(Ordering::Relaxed),
            600,
            "a refusal leaves no trace"
        );
        let b = queue.charge(400, 1000).expect("600 + 400 fit exactly");
        a.release();
        a.release();
        assert_eq!(queue.0.load(Ordering::Relaxed), 400);
        drop(a);
        assert_eq!(
            queue.0.load(Ordering::Relaxed),
            400,
            "a released charge gives nothing back twice"
        );
        drop(b);
        assert_eq!(queue.0.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_drain_rate_ignores_idle_time() {
        let meter = DrainMeter::new(100.0);
        let t0 = Instant::now();
        // Idle for a minute between single dispatches: no backlog, no measurement.
        meter.on_dispatch(1, false, t0);
        meter.on_dispatch(1, false, t0 + Duration::from_secs(60));
        assert_eq!(meter.measured_rate(), None);
        assert_eq!(
            meter.rate(),
            100.0,
            "the nominal rate stands until a backlog is seen"
        );
        // Backlogged: 20 records every 100 ms is 200 records/s.
        let busy = t0 + Duration::from_secs(120);
        for i in 0..=11 {
            meter.on_dispatch(20, true, busy + Duration::from_millis(100 * i));
        }
        let rate = meter.measured_rate().expect("a busy second was measured");
        assert!((rate - 200.0).abs() < 1.0, "{rate}");
        // A long pause, then another backlog: the pause is not counted.
        let later = busy + Duration::from_secs(600);
        meter.on_dispatch(20, false, busy + Duration::from_millis(1200));
        for i in 0..=11 {
            meter.on_dispatch(20, true, later + Duration::from_millis(100 * i));
        }
        let rate = meter.measured_rate().unwrap();
        assert!((rate - 200.0).abs() < 1.0, "{rate}");
    }

    #[tokio::test(start_paused = true)]
    async fn displaced_records_are_counted_per_route() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let mut spec = fake::spec(1);
        spec.max_pending = 2;
        let (batcher, _lambda) =
            fake::start(spec, fake::ScriptedLambda::echo(1, Duration::from_secs(1)));
        let body = RawValue::from_string("1".to_owned()).expect("JSON");
        let deadline = Instant::now() + Duration::from_secs(60);
        // The worker has not run yet: `a` fills the queue, `b` and `c` each displace one.
        let submitted: Vec<_> = metrics::with_local_recorder(&recorder, || {
            ["a", "a", "b", "c"]
                .into_iter()
                .map(|key| batcher.submit(&Arc::from(key), &body, deadline))
                .collect()
        });
        let mut displaced = 0;
        for s in submitted {
            let ticket = s.expect("lighter keys displace, so every newcomer is taken");
            if let Err(RecordError::QueueFull { .. }) = ticket.outcome().await {
                displaced += 1;
            }
        }
        assert_eq!(displaced, 2);
        let text = handle.render();
        let line = "sluicegate_queue_displaced_total{route=\"test\"} 2";
        assert!(text.contains(line), "missing {line}:\n{text}");
    }

    /// Lambda's invoke quota as the fake applies it: a token bucket of `rate` per second
    /// and `burst` capacity, starting full, on the paused clock.
    struct Quota {
        rate: f64,
        burst: f64,
        tokens: f64,
        at: Duration,
    }

    impl Quota {
        fn new(rate: f64, burst: f64) -> Self {
            Quota {
                rate,
                burst,
                tokens: burst,
                at: Duration::ZERO,
            }
        }

        fn take(&mut self, at: Duration) -> bool {
            let elapsed = at.saturating_sub(self.at).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
            self.at = at;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                true
            } else {
                false
            }
        }
    }

    /// A function with a 10 invokes/s quota (burst 10), 100 ms latency, that throttles an
    /// invoke over the quota; `throttles` counts them.
    fn quota_function(
        gate: crate::invoke::Gate,
        throttles: &Arc<AtomicUsize>,
    ) -> fake::ScriptedLambda {
        let mut quota = Quota::new(10.0, 10.0);
        let throttles = Arc::clone(throttles);
        fake::ScriptedLambda::new(gate, Duration::from_millis(100)).answer(move |call| {
            if quota.take(call.at) {
                fake::Reply::Echo
            } else {
                throttles.fetch_add(1, Ordering::SeqCst);
                fake::Reply::Fail(fake::throttled(None))
            }
        })
    }

    /// Submits `per_second` records a second for `duration`, each with a 5 s deadline, and
    /// returns the tickets of those the queue took and how many it shed at the door.
    async fn paced(batcher: &Batcher, per_second: f64, duration: Duration) -> (Vec<Ticket>, usize) {
        let key: Arc<str> = Arc::from("k");
        let body = RawValue::from_string(r#"{"n":1}"#.to_owned()).expect("JSON");
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
        let end = Instant::now() + duration;
        let (mut taken, mut shed) = (Vec::new(), 0);
        while tick.tick().await < end {
            match batcher.submit(&key, &body, Instant::now() + Duration::from_secs(5)) {
                Ok(ticket) => taken.push(ticket),
                Err(RecordError::QueueFull { retry_after }) => {
                    assert!(retry_after > Duration::ZERO);
                    shed += 1;
                }
                Err(other) => panic!("unexpected refusal: {other:?}"),
            }
        }
        (taken, shed)
    }

    /// seed-000 on the paused clock (the wall-clock figure lives in `loadtest/`): at 3×
    /// overload of a 10 invokes/s function, invokes just under the quota with full batches
    /// deliver ≥ 95 % of its capacity, Lambda throttles (almost) nothing, the excess is
    /// refused at submit, and nothing the queue took times out.
    #[tokio::test(start_paused = true)]
    async fn under_3x_overload_the_quota_is_delivered_without_throttles_and_the_excess_is_shed() {
        let throttles = Arc::new(AtomicUsize::new(0));
        let gate = crate::invoke::Gate::new(crate::invoke::GateConfig {
            max_concurrency: 5,
            rate: 9.9,
            burst: 5,
            adaptive: false,
        });
        let lambda = Arc::new(quota_function(gate, &throttles));
        let mut spec = fake::spec(10);
        spec.max_pending = 400;
        spec.nominal_drain_rate = 9.9 * 10.0;
        let batcher = Batcher::spawn(spec, Arc::clone(&lambda), None);
        let capacity = 10.0 * 10.0;

        let (taken, shed) = paced(&batcher, 3.0 * capacity, Duration::from_secs(6)).await;
        let submitted = taken.len() + shed;
        let mut timed_out = 0;
        for ticket in taken {
            match ticket.outcome().await {
                Ok(Delivered::Success { .. }) => {}
                Err(RecordError::Expired | RecordError::DeadlineBeforeRetry(_)) => timed_out += 1,
                other => panic!("unexpected outcome {other:?}"),
            }
        }
        let calls = lambda.calls();
        let window = Duration::from_secs(2)..Duration::from_secs(6);
        let delivered = calls
            .iter()
            .filter(|c| c.ran && window.contains(&c.at))
            .map(|c| c.ids.len())
            .sum::<usize>() as f64
            / 4.0;
        let invocations = calls.iter().filter(|c| c.ran).count();
        let throttles = throttles.load(Ordering::SeqCst);
        eprintln!(
            "paused seed-000: delivered {delivered:.1} records/s of {capacity}, {invocations} invokes, {throttles} throttled, {shed} of {submitted} shed"
        );
        assert!(
            delivered >= 0.95 * capacity,
            "delivered {delivered:.1} records/s, below 95% of {capacity}"
        );
        assert!(
            throttles as f64 <= 0.01 * invocations as f64,
            "{throttles} throttles in {invocations} invokes"
        );
        assert!(
            shed > submitted / 3,
            "the excess is shed: {shed} of {submitted}"
        );
        assert_eq!(timed_out, 0, "nothing the queue took is left to time out");
        assert!(lambda.peak_concurrency() <= 5);
    }

    /// The adaptive gate on the paused clock: an invoke rate set five times above the
    /// function's quota comes down to it within seconds, with few throttles.
    #[tokio::test(start_paused = true)]
    async fn adaptive_limits_tame_an_invoke_rate_set_five_times_too_high() {
        let throttles = Arc::new(AtomicUsize::new(0));
        let gate = crate::invoke::Gate::new(crate::invoke::GateConfig {
            max_concurrency: 10,
            rate: 50.0,
            burst: 1,
            adaptive: true,
        });
        let lambda = Arc::new(quota_function(gate, &throttles));
        let mut spec = fake::spec(1);
        spec.retry.max_attempts = 3;
        let batcher = Batcher::spawn(spec, Arc::clone(&lambda), None);

        let (taken, _shed) = paced(&batcher, 60.0, Duration::from_secs(10)).await;
        for ticket in taken {
            // Throttled-out and timed-out records are fine here: the rate is what counts.
            let _ = ticket.outcome().await;
        }
        let invocations = lambda.calls().iter().filter(|c| c.ran).count();
        let throttles = throttles.load(Ordering::SeqCst);
        let rate_now = lambda.gate().limits().rate;
        eprintln!(
            "paused adaptive: {invocations} invokes, {throttles} throttled, rate now {rate_now:.2}/s"
        );
        assert!(
            (throttles as f64) < 0.05 * (invocations + throttles) as f64,
            "{throttles} throttles in {} invoke attempts",
            invocations + throttles
        );
        assert!(
            rate_now <= 12.0,
            "the invoke rate came down to the quota: {rate_now}"
        );
        assert!(
            invocations >= 80,
            "the quota is still used: {invocations} invokes in 10 s"
        );
    }

    /// After an idle pause the drain estimate is not diluted by idle time, so a burst the
    /// route can serve within its callers' deadlines is taken, not shed.
    #[tokio::test(start_paused = true)]
    async fn a_burst_after_an_idle_pause_is_not_shed() {
        let gate = crate::invoke::Gate::new(crate::invoke::GateConfig {
            max_concurrency: 10,
            rate: 100.0,
            burst: 10,
            adaptive: false,
        });
        let mut spec = fake::spec(1);
        spec.envelope = Envelope::Raw;
        spec.nominal_drain_rate = 100.0;
        let (batcher, lambda) = fake::start(
            spec,
            fake::ScriptedLambda::new(gate, Duration::from_millis(10)),
        );
        // A backlog first, so the drain rate is measured, then a long idle pause.
        let warm: Vec<_> = (0..300)
            .map(|n| fake::submit(&batcher, &n.to_string(), Duration::from_secs(30)))
            .collect();
        for t in warm {
            assert!(t.outcome().await.is_ok());
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let key: Arc<str> = Arc::from("k");
        let deadline = Instant::now() + Duration::from_secs(30);
        let burst: Vec<_> = (0..64)
            .map(|n| {
                let body = RawValue::from_string(n.to_string()).expect("JSON");
                batcher.submit(&key, &body, deadline)
            })
            .collect();
        for b in burst {
            let ticket = b.expect("the burst is taken after an idle pause");
            assert!(ticket.outcome().await.is_ok());
        }
        assert_eq!(lambda.calls().len(), 364);
    }

    #[derive(Clone, Debug)]
    enum Step {
        Echo,
        Throttle(u64),
        Unavailable,
        Unknown,
        TooLarge,
        FunctionError,
        Garbled,
        NoResults,
        Rejected,
    }

    impl Step {
        fn reply(&self) -> fake::Reply {
            use crate::invoke::{InvokeFailure, UnknownCause};
            match self {
                Step::Echo => fake::Reply::Echo,
                Step::Throttle(ms) => {
                    fake::Reply::Fail(fake::throttled(Some(Duration::from_millis(*ms))))
                }
                Step::Unavailable => fake::Reply::Fail(fake::unavailable()),
                Step::Unknown => fake::Reply::Fail(InvokeFailure::OutcomeUnknown {
                    cause: UnknownCause::ConnectionLost,
                    message: "reset".to_owned(),
                }),
                Step::TooLarge => fake::Reply::Fail(InvokeFailure::TooLarge {
                    message: "too large".to_owned(),
                }),
                Step::FunctionError => fake::Reply::FunctionError,
                Step::Garbled => fake::Reply::Payload("not json"),
                Step::NoResults => fake::Reply::Payload(r#"{"results":[]}"#),
                Step::Rejected => fake::Reply::Fail(InvokeFailure::Rejected {
                    kind: "ResourceNotFoundException".to_owned(),
                    message: "no such function".to_owned(),
                }),
            }
        }
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => Just(Step::Echo),
            1 => (0u64..3000).prop_map(Step::Throttle),
            1 => Just(Step::Unavailable),
            1 => Just(Step::Unknown),
            1 => Just(Step::TooLarge),
            1 => Just(Step::FunctionError),
            1 => Just(Step::Garbled),
            1 => Just(Step::NoResults),
            1 => Just(Step::Rejected),
        ]
    }

    /// One caller: its key (and the key's weight), when it submits, its deadline, and when
    /// (if ever) it hangs up.
    #[derive(Clone, Debug)]
    struct Caller {
        key: u8,
        submit_at: u64,
        deadline: u64,
        hang_up_after: Option<u64>,
    }

    fn caller() -> impl Strategy<Value = Caller> {
        (
            0u8..3,
            0u64..500,
            1u64..3000,
            proptest::option::weighted(0.2, 0u64..3000),
        )
            .prop_map(|(key, submit_at, deadline, hang_up_after)| Caller {
                key,
                submit_at,
                deadline,
                hang_up_after,
            })
    }

    #[derive(Clone, Debug)]
    struct Route {
        max_records: usize,
        concurrency: usize,
        window: bool,
        bisect: bool,
        retry_timeouts: bool,
        max_attempts: u32,
        latency: u64,
        fairness: Fairness,
        /// Small bounds make the queue refuse and (per key) displace.
        max_pending: usize,
    }

    fn route() -> impl Strategy<Value = Route> {
        (
            1usize..8,
            1usize..4,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            1u32..5,
            0u64..50,
            prop_oneof![Just(Fairness::PerKey), Just(Fairness::Fifo)],
            prop_oneof![Just(1000usize), 1usize..6],
        )
            .prop_map(
                |(
                    max_records,
                    concurrency,
                    window,
                    bisect,
                    retry_timeouts,
                    max_attempts,
                    latency,
                    fairness,
                    max_pending,
                )| {
                    Route {
                        max_records,
                        concurrency,
                        window,
                        bisect,
                        retry_timeouts,
                        max_attempts,
                        latency,
                        fairness,
                        max_pending,
                    }
                },
            )
    }

    /// Runs `callers` against a route whose function answers its attempts with `script`
    /// (then echoes), and returns the outcome of each caller that stayed.
    fn run_script(route: &Route, script: &[Step], callers: &[Caller]) -> Vec<Option<Outcome>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a test runtime");
        runtime.block_on(async {
            let mut spec = fake::spec(route.max_records);
            spec.flush = if route.window {
                Flush::Window
            } else {
                Flush::Adaptive
            };
            spec.bisect = route.bisect;
            spec.retry.retry_timeouts = route.retry_timeouts;
            spec.retry.max_attempts = route.max_attempts;
            spec.fairness = route.fairness;
            spec.max_pending = route.max_pending;
            let lambda =
                fake::ScriptedLambda::echo(route.concurrency, Duration::from_millis(route.latency))
                    .script(script.iter().map(Step::reply));
            let (batcher, lambda) = fake::start(spec, lambda);
            let t0 = Instant::now();
            let tasks: Vec<_> = callers
                .iter()
                .cloned()
                .map(|c| {
                    let batcher = batcher.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep_until(t0 + Duration::from_millis(c.submit_at)).await;
                        let body = RawValue::from_string("1".to_owned()).expect("JSON");
                        let deadline = Instant::now() + Duration::from_millis(c.deadline);
                        let key: Arc<str> = Arc::from(format!("k{}", c.key));
                        let weight = u32::from(c.key) + 1;
                        let ticket = match batcher.submit_weighted(&key, weight, &body, deadline) {
                            Ok(ticket) => ticket,
                            Err(refused) => return Some(Err(refused)),
                        };
                        match c.hang_up_after {
                            Some(ms) => tokio::select! {
                                outcome = ticket.outcome() => Some(outcome),
                                _ = tokio::time::sleep(Duration::from_millis(ms)) => None,
                            },
                            None => Some(ticket.outcome().await),
                        }
                    })
                })
                .collect();
            // Generous on the paused clock: attempts × (cap + latency) is far below it.
            let bound = Duration::from_secs(600);
            let mut outcomes = Vec::new();
            for task in tasks {
                let outcome = tokio::time::timeout(bound, task)
                    .await
                    .expect("every caller hears back within the bound")
                    .expect("the caller task does not panic");
                outcomes.push(outcome);
            }
            assert_eq!(batcher.queued_bytes(), 0, "no queued bytes are left behind");
            // Every slot came back: nothing in flight, nothing leaked.
            // A sleep, not `yield_now`: a task that only yields keeps the paused runtime busy,
            // so the clock never auto-advances and an attempt still sleeping out its latency
            // or backoff would never hand its slot back.
            tokio::time::timeout(bound, async {
                while lambda.gate().limits().in_flight > 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("every gate slot is given back");
            outcomes
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever Lambda answers and whenever callers leave, with either queue and queue
        /// bounds small enough to refuse and displace, every caller that waits gets exactly
        /// one outcome (a oneshot carries at most one), and it is never `Lost`.
        #[test]
        fn every_submitted_record_gets_exactly_one_outcome(
            route in route(),
            script in proptest::collection::vec(step(), 0..12),
            callers in proptest::collection::vec(caller(), 1..40),
        ) {
            let outcomes = run_script(&route, &script, &callers);
            prop_assert_eq!(outcomes.len(), callers.len());
            for (caller, outcome) in callers.iter().zip(outcomes) {
                match outcome {
                    None => prop_assert!(caller.hang_up_after.is_some()),
                    Some(Err(RecordError::Lost)) => prop_assert!(false, "a record was lost"),
                    Some(_) => {}
                }
            }
        }
    }
}
