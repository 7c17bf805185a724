//! governor's GCRA over our own state stores.
//!
//! governor's `RateLimiter` does the arithmetic; its `StateStore` trait lets us own the
//! storage. We need that for three things governor's built-in stores cannot give:
//!
//! - the exact *reset* time: governor reports the remaining whole tokens but keeps the
//!   bucket's theoretical arrival time (TAT) private. Our stores write the TAT they commit
//!   into the [`Probe`] passed as governor's "key", so the caller reads it without a second
//!   lookup and without racing other requests;
//! - the key cap and the shared overflow bucket ([`KeyStore`]);
//! - hashed keys: the map holds `u64 → AtomicU64`, 16 bytes per key.
//!
//! A state cell holds the TAT in nanoseconds since the limiter's start; `0` means "no state
//! yet", governor's own convention (a committed TAT is never `0`, it is at least one period).

use std::cell::Cell;
use std::hash::{BuildHasher, Hash, Hasher};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use governor::clock::{Clock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::RateLimiter;

use super::Decision;

/// governor's "key": the hashed client key in, the committed TAT and the overflow flag out.
///
/// governor passes the key by reference to the state store and asks nothing of it beyond
/// `Hash + Eq + Clone`, and never stores it (our stores keep only `hash`), so it can carry
/// results back. It lives on the caller's stack for one check, hence `Cell` (not `Sync`,
/// which governor does not require of keys).
#[derive(Clone, Debug)]
pub(crate) struct Probe {
    hash: u64,
    /// The TAT this check committed (nanoseconds since the limiter's start); 0 if refused.
    tat: Cell<u64>,
    /// Whether the check used the shared overflow bucket instead of the key's own.
    overflowed: Cell<bool>,
}

impl Probe {
    fn new(hash: u64) -> Probe {
        Probe {
            hash,
            tat: Cell::new(0),
            overflowed: Cell::new(false),
        }
    }
}

impl PartialEq for Probe {
    fn eq(&self, other: &Probe) -> bool {
        self.hash == other.hash
    }
}

impl Eq for Probe {}

impl Hash for Probe {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Runs governor's decision `f` against one state cell and commits its new TAT.
///
/// The cell *is* the bucket's whole state and publishes no other memory, so `Relaxed` is
/// enough: a compare-exchange always acts on the latest value in the cell's modification
/// order, so concurrent draws each see the previous one's TAT (a stale first `load` only
/// costs a retry). A refusal writes nothing.
fn measure_and_replace_cell<T, E, F>(cell: &AtomicU64, probe: &Probe, f: F) -> Result<T, E>
where
    F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
{
    let mut prev = cell.load(Ordering::Relaxed);
    loop {
        let (outcome, tat) = f(NonZeroU64::new(prev).map(|n| Nanos::from(n.get())))?;
        match cell.compare_exchange_weak(prev, tat.as_u64(), Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => {
                probe.tat.set(tat.as_u64());
                return Ok(outcome);
            }
            Err(actual) => prev = actual,
        }
    }
}

/// State of one unkeyed bucket.
#[derive(Debug, Default)]
pub(crate) struct CellStore(AtomicU64);

impl StateStore for CellStore {
    type Key = Probe;

    fn measure_and_replace<T, F, E>(&self, probe: &Probe, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        measure_and_replace_cell(&self.0, probe, f)
    }
}

/// The count of tracked keys, shared by every keyed layer of one `Admission`.
///
/// Invariant: `used` ≥ the number of entries in the maps, at every instant. A slot is
/// taken *before* an entry is inserted (and given back if another request inserted the same
/// key first) and given back only *after* entries are removed. So under any interleaving the
/// capped layer cannot insert past `max`; the count is exact whenever no check or reclaim is
/// in flight. One atomic rather than summing `DashMap::len` (which read-locks every shard)
/// keeps the cap check on the insert path O(1).
///
/// `max` can change (a reload's new `max_keys`): lowering it below `used` only stops new
/// keys until reclaim brings `used` down; it never evicts a tracked key.
#[derive(Debug)]
pub(crate) struct KeyBudget {
    used: AtomicUsize,
    max: AtomicUsize,
}

impl KeyBudget {
    pub(crate) fn new(max: usize) -> KeyBudget {
        KeyBudget {
            used: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub(crate) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Takes a slot if one is free. `Relaxed` suffices: the counter guards no other memory,
    /// and `fetch_update` is a CAS loop, so two racing reservations cannot both take the
    /// last slot.
    fn try_reserve(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used < max).then_some(used + 1)
            })
            .is_ok()
    }

    /// Takes a slot even past the cap (plan keys: a bounded set from the config).
    fn force_reserve(&self) {
        self.used.fetch_add(1, Ordering::Relaxed);
    }

    fn release(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// `BuildHasher` for keys that are already ahash outputs: uniformly distributed under a
/// per-process random seed, so hashing them again would only cost time.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PreHashed;

impl BuildHasher for PreHashed {
    type Hasher = PreHashedHasher;

    fn build_hasher(&self) -> PreHashedHasher {
        PreHashedHasher(0)
    }
}

#[derive(Debug)]
pub(crate) struct PreHashedHasher(u64);

impl Hasher for PreHashedHasher {
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed with this; mix anything else in rather than ignore it.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// State of a keyed layer: one cell per tracked key hash, plus the overflow cell.
pub(crate) struct KeyStore {
    map: DashMap<u64, AtomicU64, PreHashed>,
    budget: Arc<KeyBudget>,
    /// `true` for the layer of keys without a plan: a new key past the cap uses `overflow`.
    /// `false` for plan layers, whose keys come from the config and always get a cell.
    capped: bool,
    /// The bucket shared by every new key that arrives while the cap is reached.
    overflow: AtomicU64,
}

impl KeyStore {
    pub(crate) fn new(budget: Arc<KeyBudget>, capped: bool) -> KeyStore {
        KeyStore {
            map: DashMap::with_hasher(PreHashed),
            budget,
            capped,
            overflow: AtomicU64::new(0),
        }
    }
}

/// Summarised: a derived `Debug` would print every tracked key.
impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("keys", &self.map.len())
            .field("capped", &self.capped)
            .finish_non_exhaustive()
    }
}

impl StateStore for KeyStore {
    type Key = Probe;

    fn measure_and_replace<T, F, E>(&self, probe: &Probe, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // Fast path: a tracked key. The shard's read lock is held only across the CAS, and
        // reclaim (which write-locks the shard) cannot remove the cell under us.
        if let Some(cell) = self.map.get(&probe.hash) {
            return measure_and_replace_cell(&cell, probe, f);
        }
        if !self.capped {
            self.budget.force_reserve();
        } else if !self.budget.try_reserve() {
            probe.overflowed.set(true);
            return measure_and_replace_cell(&self.overflow, probe, f);
        }
        match self.map.entry(probe.hash) {
            // Another request inserted this key between our `get` and `entry`: use its cell
            // and give back the slot we took.
            Entry::Occupied(entry) => {
                self.budget.release(1);
                measure_and_replace_cell(entry.get(), probe, f)
            }
            Entry::Vacant(entry) => {
                // Downgrade to a read lock so other keys of this shard proceed during the CAS.
                let cell = entry.insert(AtomicU64::new(0)).downgrade();
                measure_and_replace_cell(&cell, probe, f)
            }
        }
    }
}

/// A layer dropped by a reload gives its keys' slots back to the budget it shares with the
/// layers that remain. Dropping is exclusive access, so no check can insert meanwhile.
impl Drop for KeyStore {
    fn drop(&mut self) {
        self.budget.release(self.map.len());
    }
}

impl ShrinkableKeyedStateStore<Probe> for KeyStore {
    /// Drops cells whose TAT is at or below `drop_below` (governor passes "now − one period"):
    /// those buckets are full, indistinguishable from a key never seen.
    ///
    /// `retain` write-locks one shard at a time, so a concurrent check of a key in that shard
    /// either ran before (its fresh TAT keeps the cell) or runs after (and starts a new,
    /// full cell — the same state as the one dropped). The budget is released after the
    /// removals, keeping `used` ≥ entries.
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = drop_below.as_u64();
        let mut removed = 0;
        self.map.retain(|_, tat| {
            let keep = tat.load(Ordering::Relaxed) > drop_below;
            removed += usize::from(!keep);
            keep
        });
        self.budget.release(removed);
    }

    /// Shrinks only when at most a quarter of the capacity is in use: hashbrown grows by
    /// doubling, so shrinking a table that is still half full would make a steady key
    /// population grow and shrink it on every reclaim. Shrinking write-locks each shard
    /// while it rehashes; it runs off the request path, from the periodic reclaim.
    fn shrink_to_fit(&self) {
        if self.map.len() <= self.map.capacity() / 4 {
            self.map.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A decision plus whether it was made by the overflow bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Checked {
    pub(crate) decision: Decision,
    pub(crate) overflowed: bool,
}

/// governor's limiter over one of our stores, reporting [`Decision`]s.
#[derive(Debug)]
pub(crate) struct Engine<S: StateStore<Key = Probe>, C: Clock> {
    limiter: RateLimiter<Probe, S, C, StateInformationMiddleware>,
    /// Read right after governor records its own start, so `origin` ≥ that start.
    origin: C::Instant,
}

impl<S: StateStore<Key = Probe>, C: Clock> Engine<S, C> {
    pub(crate) fn new(quota: governor::Quota, state: S, clock: C) -> Self {
        let limiter = RateLimiter::new(quota, state, clock);
        let origin = limiter.clock().now();
        Engine { limiter, origin }
    }

    pub(crate) fn limiter(&self) -> &RateLimiter<Probe, S, C, StateInformationMiddleware> {
        &self.limiter
    }

    pub(crate) fn check(&self, hash: u64) -> Checked {
        // Read the clock before governor does, so `now` ≤ governor's own reading and
        // `origin` ≥ its start. Both make `wait` and `reset` exact or later (by the
        // nanoseconds between readings), never early. With a fake clock they are exact.
        let now = self.limiter.clock().now();
        let probe = Probe::new(hash);
        let decision = match self.limiter.check_key(&probe) {
            Ok(snapshot) => {
                let elapsed = now.duration_since(self.origin).as_u64();
                Decision::Allowed {
                    remaining: snapshot.remaining_burst_capacity(),
                    reset: Duration::from_nanos(probe.tat.get().saturating_sub(elapsed)),
                }
            }
            Err(not_until) => Decision::Limited {
                wait: not_until.wait_time_from(now),
            },
        };
        Checked {
            decision,
            overflowed: probe.overflowed.get(),
        }
    }

    /// Takes `cost` tokens at once (all or none), as [`check`](Self::check) takes one. A
    /// cost above the bucket's burst is clamped to the burst, so it can still be paid by a
    /// full bucket: the Redis fallback's fleet share must never close a layer outright.
    pub(crate) fn check_n(&self, hash: u64, cost: u32) -> Checked {
        let now = self.limiter.clock().now();
        let probe = Probe::new(hash);
        let n = |cost: u32| std::num::NonZeroU32::new(cost.max(1)).expect("at least 1");
        let outcome = match self.limiter.check_key_n(&probe, n(cost)) {
            Ok(outcome) => outcome,
            Err(governor::InsufficientCapacity(burst)) => self
                .limiter
                .check_key_n(&probe, n(burst))
                .expect("a bucket's own burst fits in it"),
        };
        let decision = match outcome {
            Ok(snapshot) => {
                let elapsed = now.duration_since(self.origin).as_u64();
                Decision::Allowed {
                    remaining: snapshot.remaining_burst_capacity(),
                    reset: Duration::from_nanos(probe.tat.get().saturating_sub(elapsed)),
                }
            }
            Err(not_until) => Decision::Limited {
                wait: not_until.wait_time_from(now),
            },
        };
        Checked {
            decision,
            overflowed: probe.overflowed.get(),
        }
    }
}
