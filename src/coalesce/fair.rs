//! The route queue with `queue.fairness = "per_key"`: deficit round robin across the keys
//! with records waiting, and displacement of the heaviest key's newest record when full.
//!
//! A FIFO queue lets one key with a generous plan fill `max_pending`, and every other key
//! is then shed with `429 scope=queue` although its own bucket is full. Here:
//!
//! - **order**: the keys holding records form a ring; the key at its head is served up to
//!   `weight` records (its plan's, 1 without a plan), then goes to the back — deficit round
//!   robin with unit cost per record (Shreedhar & Varghese; fq_codel's flow queues). A
//!   key that arrives joins at the back; a key whose last record leaves leaves the ring.
//! - **shedding**: when the queue is full (`max_pending` records, or `queue.max_bytes`
//!   bytes with the newcomer), the newcomer displaces the newest record of the key holding
//!   the most queued records; that caller is answered [`QueueFull`](super::RecordError)
//!   (`429 scope=queue`) by the batcher. A newcomer whose own key holds the most (ties
//!   included) is refused instead, as a FIFO queue would: a flooding key sheds itself,
//!   never a lighter one. Displacing the newest, not the oldest, keeps the records that
//!   have waited longest — those closest to being sent.
//! - **cost**: O(1) per record, amortised. A key's records are a `VecDeque` in a slab slot
//!   found through one hash lookup; the ring is a doubly linked list through the slots, so
//!   a key leaves it from anywhere; "the key with the most" is the top of a count → keys
//!   index (`by_count[c]` lists the slots holding `c` records, each slot knowing its place
//!   in its list), which moves by one bucket per record. When the byte bound needs more
//!   than one record displaced, each displaced record was paid for by its own push.
//! - **memory**: a key's slot is freed the moment its last record leaves (drawn or
//!   displaced) and reused by the next new key; the map from key to slot holds only keys
//!   with records waiting, so it is bounded by `max_pending`, as the slab is.
//!
//! One `parking_lot` mutex guards the whole structure: every operation is a few pointer
//! moves, the worker takes one record per lock, and submitters never hold it across an
//! await. A [`Notify`] wakes the worker; it is the only waiter, so `notify_one`'s stored
//! permit covers a push that lands between its empty check and its wait.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::Notify;

use super::{Message, QueuedBytes};
use crate::config::PlanConfig;

/// Each API key's fair-queue weight, from its plan's `weight`, for
/// [`Batcher::submit_weighted`](super::Batcher::submit_weighted).
#[derive(Debug, Default)]
pub struct KeyWeights(HashMap<Box<str>, u32, ahash::RandomState>);

impl KeyWeights {
    /// The weights of `plans`' keys. Keys of plans with weight 1 are left out (1 is every
    /// other key's weight), so a config without weights costs no lookup table. A key listed
    /// in two plans (the loader refuses that) takes the first, as admission does.
    pub fn from_plans(plans: &[PlanConfig]) -> Self {
        let mut weights = HashMap::with_hasher(ahash::RandomState::new());
        for plan in plans.iter().filter(|p| p.weight != 1) {
            for key in &plan.keys {
                weights
                    .entry(key.clone().into_boxed_str())
                    .or_insert(plan.weight);
            }
        }
        KeyWeights(weights)
    }

    /// `key`'s weight: its plan's, or 1 for a key without a plan.
    pub fn weight_of(&self, key: &str) -> u32 {
        if self.0.is_empty() {
            return 1;
        }
        self.0.get(key).copied().unwrap_or(1)
    }
}

/// Why a record was not queued (it was dropped, and its charge with it).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// Full, and the newcomer's key holds the most records.
    Full,
    /// The queue is closed.
    Closed,
}

/// A route's fair queue, shared by its batcher handles and its worker.
pub(super) struct FairQueue {
    state: parking_lot::Mutex<State>,
    ready: Notify,
    max_pending: usize,
    max_bytes: usize,
    queued: Arc<QueuedBytes>,
}

impl FairQueue {
    /// An empty queue bounded by `max_pending` records and `max_bytes` bytes, counted in
    /// `queued`.
    pub(super) fn new(max_pending: usize, max_bytes: usize, queued: Arc<QueuedBytes>) -> Self {
        FairQueue {
            state: parking_lot::Mutex::new(State::default()),
            ready: Notify::new(),
            max_pending,
            max_bytes,
            queued,
        }
    }

    /// Queues `m` for its key, served `weight` records per round, and returns the records it
    /// displaced (their bytes already given back; the caller answers them). `m`'s bytes are
    /// charged here, under the lock, so the byte check and the charge cannot interleave with
    /// another submitter's.
    pub(super) fn push(&self, mut m: Message, weight: u32) -> Result<Vec<Message>, Refused> {
        let weight = weight.max(1);
        let need = m.entry.len();
        let mut state = self.state.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        let own = state.count_of(&m.key);
        let mut displaced: Vec<(Message, u32)> = Vec::new();
        let mut freed = 0usize;
        loop {
            // Other bytes only leave while we hold the lock (records dropped elsewhere), so
            // the real figure is at most this one.
            let bytes = self.queued.get().saturating_sub(freed);
            let full = state.len >= self.max_pending || bytes.saturating_add(need) > self.max_bytes;
            if !full {
                break;
            }
            match state.largest() {
                Some((slot, count)) if count > own => {
                    let (victim, victim_weight) = state.remove_newest(slot);
                    freed += victim.charge.bytes;
                    displaced.push((victim, victim_weight));
                }
                _ => {
                    // Only the byte bound can get here after displacing: not enough room even
                    // so. Put the records back, newest last, and refuse the newcomer instead.
                    for (victim, victim_weight) in displaced.into_iter().rev() {
                        state.enqueue(victim, victim_weight);
                    }
                    return Err(Refused::Full);
                }
            }
        }
        let mut displaced: Vec<Message> = displaced.into_iter().map(|(v, _)| v).collect();
        for victim in &mut displaced {
            victim.charge.release();
        }
        // Room was checked above under this lock, and only submitters holding it add bytes.
        m.charge = self.queued.add(need);
        state.enqueue(m, weight);
        drop(state);
        self.ready.notify_one();
        Ok(displaced)
    }

    /// Takes the next record in round-robin order; its bytes stop counting against the
    /// bound. `Disconnected` once the queue is empty and closed (or its handles are gone).
    pub(super) fn try_recv(&self) -> Result<Message, TryRecvError> {
        let mut state = self.state.lock();
        match state.dequeue() {
            Some(m) => Ok(m.taken()),
            None if state.closed || state.senders_gone => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Waits for the next record; `None` once the queue is empty and closed. Cancel-safe: a
    /// record stays queued until a call returns it.
    pub(super) async fn recv(&self) -> Option<Message> {
        loop {
            match self.try_recv() {
                Ok(m) => return Some(m),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => self.ready.notified().await,
            }
        }
    }

    /// Refuses new records from now on; those queued can still be taken.
    pub(super) fn close(&self) {
        self.state.lock().closed = true;
        self.ready.notify_one();
    }

    /// Every batcher handle is gone: once empty, the worker's `recv` ends.
    pub(super) fn senders_gone(&self) {
        self.state.lock().senders_gone = true;
        self.ready.notify_one();
    }

    /// Records queued.
    pub(super) fn len(&self) -> usize {
        self.state.lock().len
    }

    /// Whether no record is queued.
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// About how many records will be drawn before a new record of `key` (at `weight`): the
    /// rounds until its turn, each serving every waiting key its weight, never more than the
    /// queue holds. This is what a record waits for, where a FIFO queue's depth is not.
    pub(super) fn records_ahead(&self, key: &str, weight: u32) -> usize {
        let state = self.state.lock();
        let (own, weight, total) = match state.index.get(key) {
            Some(&s) => {
                let slot = &state.slots[s];
                (slot.records.len(), slot.weight, state.active_weight)
            }
            None => {
                let weight = weight.max(1);
                (0, weight, state.active_weight + u64::from(weight))
            }
        };
        let rounds = (own as u64 + 1).div_ceil(u64::from(weight));
        let ahead = rounds.saturating_mul(total);
        usize::try_from(ahead).unwrap_or(usize::MAX).min(state.len)
    }

    /// Keys with records queued (each holds one slot).
    #[cfg(test)]
    pub(super) fn live_keys(&self) -> usize {
        self.state.lock().index.len()
    }
}

impl std::fmt::Debug for FairQueue {
    /// Sizes only: the records themselves are callers' data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.lock();
        f.debug_struct("FairQueue")
            .field("len", &state.len)
            .field("keys", &state.index.len())
            .field("max_pending", &self.max_pending)
            .field("max_bytes", &self.max_bytes)
            .field("closed", &state.closed)
            .finish_non_exhaustive()
    }
}

/// Hands the batcher's side of a [`FairQueue`] around: when the last handle drops, the
/// worker learns that nothing more will come (as a channel's receiver does).
#[derive(Debug)]
pub(super) struct FairSender(pub(super) Arc<FairQueue>);

impl Drop for FairSender {
    fn drop(&mut self) {
        self.0.senders_gone();
    }
}

/// One key's records and its place in the ring and in the count index.
#[derive(Default)]
struct Slot {
    /// `None` while the slot is free.
    key: Option<Arc<str>>,
    weight: u32,
    /// Records left in the key's current turn; 0 until it reaches the head of the ring.
    credit: u32,
    records: VecDeque<Message>,
    /// Index in `by_count[records.len()]`.
    pos: usize,
    prev: usize,
    next: usize,
}

/// A freed slot keeps a buffer of at most this many records for the next key; a bigger
/// one (a key that flooded) is given back.
const KEPT_SLOT_CAPACITY: usize = 8;

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Keys with records waiting → their slot. Bounded by `max_pending`; seeded per process
    /// so client-chosen keys cannot aim at one bucket.
    index: HashMap<Arc<str>, usize, ahash::RandomState>,
    /// The ring's head: the key being served.
    head: Option<usize>,
    /// `by_count[c]`: the slots holding exactly `c` records (`by_count[0]` stays empty).
    by_count: Vec<Vec<usize>>,
    /// The most records any key holds (0 when empty).
    max: usize,
    len: usize,
    /// Sum of the weights of the keys in the ring.
    active_weight: u64,
    closed: bool,
    senders_gone: bool,
}

impl State {
    fn count_of(&self, key: &str) -> usize {
        self.index
            .get(key)
            .map_or(0, |&s| self.slots[s].records.len())
    }

    /// A slot holding the most records, and how many.
    fn largest(&self) -> Option<(usize, usize)> {
        let slot = *self.by_count.get(self.max)?.last()?;
        Some((slot, self.max))
    }

    fn enqueue(&mut self, m: Message, weight: u32) {
        let s = match self.index.get(&*m.key) {
            Some(&s) => s,
            None => self.open_slot(Arc::clone(&m.key)),
        };
        let slot = &mut self.slots[s];
        self.active_weight = self.active_weight - u64::from(slot.weight) + u64::from(weight);
        // A reload may have changed the key's plan: the latest weight counts.
        slot.weight = weight;
        slot.records.push_back(m);
        let count = slot.records.len();
        self.recount(s, count - 1, count);
        self.len += 1;
    }

    /// The next record in round-robin order.
    fn dequeue(&mut self) -> Option<Message> {
        let s = self.head?;
        let slot = &mut self.slots[s];
        if slot.credit == 0 {
            // The key's turn begins: `weight` records, each of unit cost.
            slot.credit = slot.weight;
        }
        let m = slot.records.pop_front();
        slot.credit = slot.credit.saturating_sub(1);
        let count = slot.records.len();
        let turn_over = slot.credit == 0;
        let next = slot.next;
        if m.is_some() {
            self.recount(s, count + 1, count);
            self.len -= 1;
        }
        if count == 0 {
            self.close_slot(s);
        } else if turn_over {
            self.head = Some(next);
        }
        m
    }

    /// Takes the newest record of slot `s` (to displace it), with the key's weight.
    fn remove_newest(&mut self, s: usize) -> (Message, u32) {
        let slot = &mut self.slots[s];
        let weight = slot.weight;
        let count = slot.records.len();
        let m = slot
            .records
            .pop_back()
            .expect("`largest` names a slot holding records");
        self.recount(s, count, count - 1);
        self.len -= 1;
        if count == 1 {
            self.close_slot(s);
        }
        (m, weight)
    }

    /// A slot for `key`, new at the back of the ring.
    fn open_slot(&mut self, key: Arc<str>) -> usize {
        let s = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot::default());
                self.slots.len() - 1
            }
        };
        self.index.insert(Arc::clone(&key), s);
        let slot = &mut self.slots[s];
        slot.key = Some(key);
        slot.weight = 0;
        slot.credit = 0;
        match self.head {
            None => {
                slot.prev = s;
                slot.next = s;
                self.head = Some(s);
            }
            Some(head) => {
                // The back of the ring is just before its head.
                let tail = self.slots[head].prev;
                self.slots[s].prev = tail;
                self.slots[s].next = head;
                self.slots[tail].next = s;
                self.slots[head].prev = s;
            }
        }
        s
    }

    /// Frees slot `s`, whose key holds no record any more: out of the ring, out of the map.
    fn close_slot(&mut self, s: usize) {
        let (prev, next) = (self.slots[s].prev, self.slots[s].next);
        if next == s {
            self.head = None;
        } else {
            self.slots[prev].next = next;
            self.slots[next].prev = prev;
            if self.head == Some(s) {
                self.head = Some(next);
            }
        }
        let slot = &mut self.slots[s];
        self.active_weight -= u64::from(slot.weight);
        slot.weight = 0;
        slot.credit = 0;
        if let Some(key) = slot.key.take() {
            self.index.remove(&key);
        }
        if slot.records.capacity() > KEPT_SLOT_CAPACITY {
            slot.records = VecDeque::new();
        }
        self.free.push(s);
    }

    /// Moves slot `s` from `by_count[from]` to `by_count[to]` (counts 0 are not listed),
    /// keeping `max` the top non-empty bucket.
    fn recount(&mut self, s: usize, from: usize, to: usize) {
        if from > 0 {
            let pos = self.slots[s].pos;
            let bucket = &mut self.by_count[from];
            bucket.swap_remove(pos);
            if let Some(&moved) = bucket.get(pos) {
                self.slots[moved].pos = pos;
            }
        }
        if to > 0 {
            if self.by_count.len() <= to {
                self.by_count.resize_with(to + 1, Vec::new);
            }
            self.slots[s].pos = self.by_count[to].len();
            self.by_count[to].push(s);
        }
        self.max = self.max.max(to);
        // Counts move by one, so this steps down at most once.
        while self.max > 0 && self.by_count[self.max].is_empty() {
            self.max -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::sync::oneshot;
    use tokio::time::Instant;

    use super::*;
    use crate::coalesce::{Charge, Outcome};

    /// A record of `key` whose entry is `text` (its size is `text.len()` bytes).
    fn record(queue: &FairQueue, key: &str, text: &str) -> (Message, oneshot::Receiver<Outcome>) {
        let (reply, rx) = oneshot::channel();
        let entry = Bytes::copy_from_slice(text.as_bytes());
        let m = Message {
            id: Arc::from(text),
            key: Arc::from(key),
            entry: entry.clone(),
            body: entry,
            enqueued: Instant::now(),
            deadline: Instant::now() + Duration::from_secs(60),
            reply,
            span: tracing::Span::none(),
            charge: Charge {
                queue: Arc::clone(&queue.queued),
                bytes: 0,
            },
        };
        (m, rx)
    }

    fn queue(max_pending: usize, max_bytes: usize) -> FairQueue {
        FairQueue::new(max_pending, max_bytes, Arc::new(QueuedBytes::default()))
    }

    /// Pushes `text` for `key` at `weight` and returns the ids of the records it displaced.
    fn push(q: &FairQueue, key: &str, weight: u32, text: &str) -> Result<Vec<String>, String> {
        let (m, _rx) = record(q, key, text);
        match q.push(m, weight) {
            Ok(displaced) => Ok(displaced.iter().map(|m| m.id.to_string()).collect()),
            Err(Refused::Full) => Err(format!("full: {text}")),
            Err(Refused::Closed) => Err(format!("closed: {text}")),
        }
    }

    fn drain(q: &FairQueue) -> Vec<String> {
        std::iter::from_fn(|| q.try_recv().ok())
            .map(|m| m.id.to_string())
            .collect()
    }

    #[test]
    fn key_weights_come_from_plans_and_default_to_one() {
        let plan = |name: &str, weight: u32, keys: &[&str]| PlanConfig {
            name: name.to_owned(),
            rate: 1.0,
            burst: 1,
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            weight,
            quota: None,
        };
        let weights =
            KeyWeights::from_plans(&[plan("gold", 5, &["g1", "g2"]), plan("basic", 1, &["b1"])]);
        assert_eq!(weights.weight_of("g2"), 5);
        assert_eq!(weights.weight_of("b1"), 1);
        assert_eq!(weights.weight_of("nobody"), 1);
        assert_eq!(weights.0.len(), 2, "weight-1 keys take no room");
    }

    #[test]
    fn records_are_drawn_round_robin_across_keys_by_weight() {
        let q = queue(100, usize::MAX);
        for n in 0..5 {
            push(&q, "a", 1, &format!("a{n}")).unwrap();
        }
        for n in 0..5 {
            push(&q, "b", 3, &format!("b{n}")).unwrap();
        }
        push(&q, "c", 1, "c0").unwrap();
        assert_eq!(
            drain(&q),
            ["a0", "b0", "b1", "b2", "c0", "a1", "b3", "b4", "a2", "a3", "a4"],
            "a gets 1 per round, b 3, c 1; a key that runs out leaves the ring"
        );
        assert_eq!(q.len(), 0);
        assert_eq!(q.live_keys(), 0);
    }

    #[test]
    fn a_key_arriving_mid_round_joins_at_the_back() {
        let q = queue(100, usize::MAX);
        for n in 0..3 {
            push(&q, "a", 2, &format!("a{n}")).unwrap();
        }
        push(&q, "b", 1, "b0").unwrap();
        let first = q.try_recv().unwrap();
        assert_eq!(&*first.id, "a0");
        push(&q, "c", 1, "c0").unwrap();
        push(&q, "b", 1, "b1").unwrap();
        assert_eq!(
            drain(&q),
            ["a1", "b0", "c0", "a2", "b1"],
            "a finishes its turn of 2, then b, then the newcomer c"
        );
    }

    #[test]
    fn a_full_queue_displaces_the_newest_record_of_the_largest_key() {
        let q = queue(4, usize::MAX);
        for n in 0..3 {
            push(&q, "a", 1, &format!("a{n}")).unwrap();
        }
        push(&q, "b", 1, "b0").unwrap();
        let (m, mut displaced_rx) = record(&q, "c", "c0");
        let displaced = q.push(m, 1).expect("c is lighter than a");
        assert_eq!(
            displaced.iter().map(|m| &*m.id).collect::<Vec<_>>(),
            ["a2"],
            "the newest record of the key with the most"
        );
        // The queue hands the displaced record back unanswered: the batcher answers it.
        assert!(displaced_rx.try_recv().is_err());
        assert_eq!(q.len(), 4);
        assert_eq!(push(&q, "d", 1, "d0").unwrap(), ["a1"]);
        assert_eq!(drain(&q), ["a0", "b0", "c0", "d0"]);
    }

    #[test]
    fn a_newcomer_whose_key_holds_the_most_is_refused() {
        let q = queue(4, usize::MAX);
        for n in 0..3 {
            push(&q, "a", 1, &format!("a{n}")).unwrap();
        }
        push(&q, "b", 1, "b0").unwrap();
        assert_eq!(push(&q, "a", 1, "a3"), Err("full: a3".to_owned()));
        assert_eq!(push(&q, "b", 1, "b1").unwrap(), ["a2"]);
        assert_eq!(
            push(&q, "b", 1, "b2"),
            Err("full: b2".to_owned()),
            "a tie with the largest counts as the largest"
        );
        assert_eq!(q.len(), 4, "refusals leave the queue as it was");
        assert_eq!(drain(&q), ["a0", "b0", "a1", "b1"]);
    }

    #[test]
    fn a_key_whose_records_are_gone_frees_its_slot() {
        let q = queue(3, usize::MAX);
        push(&q, "a", 1, "a0").unwrap();
        push(&q, "a", 1, "a1").unwrap();
        push(&q, "b", 1, "b0").unwrap();
        assert_eq!(q.live_keys(), 2);
        assert_eq!(push(&q, "c", 1, "c0").unwrap(), ["a1"]);
        assert_eq!(q.live_keys(), 3);
        assert_eq!(drain(&q), ["a0", "b0", "c0"]);
        assert_eq!(
            q.live_keys(),
            0,
            "no key keeps a slot once its records are gone"
        );

        // A displacement that takes a key's last record frees its slot too.
        let q = queue(2, usize::MAX);
        push(&q, "x", 1, "x0").unwrap();
        push(&q, "y", 1, "y0").unwrap();
        assert_eq!(push(&q, "z", 1, "z0").unwrap(), ["y0"]);
        assert_eq!(q.live_keys(), 2);
        assert_eq!(drain(&q), ["x0", "z0"]);
        assert_eq!(q.live_keys(), 0);
        assert_eq!(q.state.lock().slots.len(), 2, "freed slots are reused");
        assert_eq!(q.state.lock().active_weight, 0);
    }

    #[test]
    fn the_byte_bound_displaces_until_the_newcomer_fits_or_refuses_it_unchanged() {
        // Each record's entry is its text: "aN" is 2 bytes.
        let q = queue(100, 8);
        for n in 0..3 {
            push(&q, "a", 1, &format!("a{n}")).unwrap();
        }
        push(&q, "b", 1, "b0").unwrap();
        assert_eq!(q.queued.get(), 8);
        assert_eq!(
            push(&q, "c", 1, "c-0").unwrap(),
            ["a2", "a1"],
            "3 bytes need two of a's records out"
        );
        assert_eq!(q.queued.get(), 7, "a0 b0 c-0");
        // Nothing is larger than the newcomer's key by enough: the queue stays as it was.
        assert_eq!(push(&q, "b", 1, "b-1"), Err("full: b-1".to_owned()));
        assert_eq!(q.queued.get(), 7);
        assert_eq!(q.len(), 3);
        let taken = drain(&q);
        assert_eq!(taken, ["a0", "b0", "c-0"]);
        assert_eq!(q.queued.get(), 0, "taken records give their bytes back");
    }

    #[test]
    fn a_refused_byte_displacement_puts_the_records_back_in_order() {
        let q = queue(100, 6);
        push(&q, "a", 1, "a0").unwrap();
        push(&q, "a", 1, "a1").unwrap();
        push(&q, "c", 1, "c0").unwrap();
        // 6 bytes queued; "c-lng" needs 5: a1 out is not enough, and then `a` no longer
        // holds more than `c`.
        assert_eq!(push(&q, "c", 1, "c-lng"), Err("full: c-lng".to_owned()));
        assert_eq!(q.queued.get(), 6);
        assert_eq!(drain(&q), ["a0", "c0", "a1"]);
    }

    #[test]
    fn a_closed_queue_refuses_and_hands_out_what_it_holds() {
        let q = queue(10, usize::MAX);
        push(&q, "a", 1, "a0").unwrap();
        q.close();
        assert_eq!(push(&q, "a", 1, "a1"), Err("closed: a1".to_owned()));
        assert_eq!(&*q.try_recv().unwrap().id, "a0");
        assert!(matches!(q.try_recv(), Err(TryRecvError::Disconnected)));
    }

    #[test]
    fn records_ahead_counts_rounds_not_depth() {
        let q = queue(100, usize::MAX);
        for n in 0..50 {
            push(&q, "a", 1, &format!("a{n}")).unwrap();
        }
        assert_eq!(q.records_ahead("b", 1), 2, "one of a's, then b's own");
        assert_eq!(
            q.records_ahead("a", 1),
            50,
            "a waits behind its whole backlog"
        );
        push(&q, "g", 4, "g0").unwrap();
        assert_eq!(
            q.records_ahead("g", 4),
            5,
            "g's second record comes within one round: one of a's and four of g's"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn recv_wakes_for_a_push_and_ends_when_the_handles_are_gone() {
        let q = Arc::new(queue(10, usize::MAX));
        let sender = FairSender(Arc::clone(&q));
        let worker = {
            let q = Arc::clone(&q);
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(m) = q.recv().await {
                    got.push(m.id.to_string());
                }
                got
            })
        };
        tokio::task::yield_now().await;
        push(&sender.0, "a", 1, "a0").unwrap();
        tokio::task::yield_now().await;
        push(&sender.0, "b", 1, "b0").unwrap();
        drop(sender);
        let got = tokio::time::timeout(Duration::from_secs(1), worker)
            .await
            .expect("recv ends once the last handle is gone")
            .unwrap();
        assert_eq!(got, ["a0", "b0"]);
    }
}
