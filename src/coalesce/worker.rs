//! The per-route worker: channel → batches → one dispatch task per batch.

use std::sync::Arc;

use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::time::{sleep_until, Instant};
use tracing::Instrument;

use super::deliver::Delivery;
use super::envelope::framed_len;
use super::{BatchSpec, Message};
use crate::config::Flush;
use crate::invoke::Slot;

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
        self.messages.retain(|m| !m.is_gone(now));
        self.entry_bytes = self.messages.iter().map(|m| m.entry.len()).sum();
    }
}

pub(super) async fn run(mut rx: mpsc::Receiver<Message>, delivery: Arc<Delivery>) {
    let spec = Arc::clone(&delivery.spec);
    let invoker = Arc::clone(&delivery.invoker);
    let adaptive = spec.flush == Flush::Adaptive;
    // A record that did not fit the previous batch's byte bound opens the next one.
    let mut carry: Option<Message> = None;
    let mut batch_seq: u64 = 0;
    loop {
        let first = match carry.take() {
            Some(m) => m,
            None => match rx.recv().await {
                Some(m) => m,
                // Every handle is gone: nothing more will arrive, and nothing is pending.
                None => return,
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
            None => acquire.await,
        };
        batch.prune(Instant::now());
        if batch.messages.is_empty() {
            continue;
        }
        batch_seq += 1;
        let span = tracing::info_span!(
            "batch",
            route = %spec.route,
            batch = batch_seq,
            records = batch.messages.len(),
            bytes = framed_len(batch.entry_bytes, batch.messages.len()),
        );
        for m in &batch.messages {
            span.follows_from(m.span.id());
        }
        tokio::spawn(
            Arc::clone(&delivery)
                .deliver(batch.messages, Some(slot))
                .instrument(span),
        );
    }
}
