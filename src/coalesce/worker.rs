//! The per-route worker: channel → batches → one delivery task per batch.
//!
//! Closing (shutdown after the grace period): the worker stops forming batches, answers
//! every record it holds or that is still queued with [`RecordError::Closed`] (`503`), and
//! exits. Batches already handed to a delivery task are not touched: Lambda may be
//! processing them, and their callers get the real result.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};
use tracing::Instrument;

use super::deliver::Delivery;
use super::envelope::framed_len;
use super::{BatchSpec, Message, RecordError};
use crate::config::Flush;
use crate::invoke::Slot;

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
/// `queue.max_bytes` the moment the worker takes it, on every path that takes one.
struct Inbox(mpsc::Receiver<Message>);

impl Inbox {
    async fn recv(&mut self) -> Option<Message> {
        self.0.recv().await.map(Message::taken)
    }

    fn try_recv(&mut self) -> Result<Message, TryRecvError> {
        self.0.try_recv().map(Message::taken)
    }

    fn close(&mut self) {
        self.0.close();
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Answers everything the worker still holds with `Closed`. The channel is closed first so
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

pub(super) async fn run(
    rx: mpsc::Receiver<Message>,
    delivery: Arc<Delivery>,
    mut closing: watch::Receiver<bool>,
) {
    let mut rx = Inbox(rx);
    let spec = Arc::clone(&delivery.spec);
    let invoker = Arc::clone(&delivery.invoker);
    let adaptive = spec.flush == Flush::Adaptive;
    // A record that did not fit the previous batch's byte bound opens the next one.
    let mut carry: Option<Message> = None;
    loop {
        if *closing.borrow() {
            fail_all(&mut rx, carry.into_iter().collect());
            return;
        }
        let first = match carry.take() {
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
        let mut batch = Batch::new(spec.max_records);
        batch.push(first);

        // Pinned once per batch so the worker keeps its place in the gate's FIFO queue
        // across loop turns; in window mode it is only polled after the batch closes.
        let acquire = invoker.gate().acquire();
        tokio::pin!(acquire);
        let mut slot: Option<Slot> = None;

        while !batch.is_full(&spec) {
            // Whatever is already queued joins without waiting: under load this is what
            // makes batches full.
            match rx.try_recv() {
                Ok(m) if batch.fits(&m, &spec) => {
                    batch.push(m);
                    continue;
                }
                Ok(m) => {
                    carry = Some(m);
                    break;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {}
            }
            tokio::select! {
                biased;
                _ = closing.changed() => break,
                s = &mut acquire, if adaptive => {
                    slot = Some(s);
                    break;
                }
                _ = sleep_until(flush_at) => break,
                m = rx.recv() => match m {
                    Some(m) if batch.fits(&m, &spec) => batch.push(m),
                    Some(m) => {
                        carry = Some(m);
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
                    let mut held = batch.messages;
                    held.extend(carry.take());
                    fail_all(&mut rx, held);
                    return;
                }
            },
        };
        // A batch not yet sent when closing began is not sent: the grace period is over.
        if *closing.borrow() {
            let mut held = batch.messages;
            held.extend(carry.take());
            fail_all(&mut rx, held);
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
        delivery
            .drain
            .on_dispatch(batch.messages.len(), backlogged, Instant::now());
        tokio::spawn(
            Arc::clone(&delivery)
                .deliver(batch.messages, Some(slot))
                .instrument(span),
        );
    }
}
