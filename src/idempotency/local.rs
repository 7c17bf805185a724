//! This replica's idempotency entries: a bounded map from [`Scope`] to the request's body
//! hash and either its progress (in flight) or its stored response (completed).
//!
//! Bounds: `max_entries` entries and `max_bytes` bytes, in-flight entries included (each
//! weighs [`IN_FLIGHT_WEIGHT`]). Room is made by dropping completed entries, oldest
//! completion first; an in-flight entry is never dropped — its record may be running, and
//! forgetting it would let a retry invoke it again — so when in-flight entries alone fill
//! the bounds a new key is refused ([`Full`]). A completed entry lives `ttl` from its
//! completion. A response that does not fit even after every other completed entry is gone
//! is kept all the same (it may have run, so it is not forgotten): the bytes bound can be
//! passed by at most that one response, which is the first to go when the next one comes.
//!
//! Plain data behind the caller's mutex; `now` is passed in, so tests drive the clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{BodyHash, Progress, Scope, Snapshot};

/// What an in-flight entry is counted as against `max_bytes`: its map slot, scope, hash and
/// progress channel, rounded up.
pub(crate) const IN_FLIGHT_WEIGHT: usize = 256;

/// The bounds of the store (`[idempotency]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    /// How long a completed entry is kept.
    pub(crate) ttl: Duration,
    /// Most entries, in flight and completed.
    pub(crate) max_entries: usize,
    /// Most bytes of entries (see the module docs for the one-response overshoot).
    pub(crate) max_bytes: usize,
}

/// What the store knows about a (scope, body hash).
pub(crate) enum Lookup {
    /// No entry: the caller may claim the scope.
    Absent,
    /// The scope's entry is for another body.
    Conflict,
    /// The scope's request completed: its stored response.
    Replay(Arc<Snapshot>),
    /// The scope's request is in flight: its progress, to wait on.
    Join(watch::Receiver<Progress>),
}

/// The bounds are full of in-flight entries: nothing can be dropped to make room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Full;

enum State {
    InFlight(watch::Receiver<Progress>),
    Completed {
        snapshot: Arc<Snapshot>,
        expires: Instant,
        seq: u64,
    },
}

struct Entry {
    hash: BodyHash,
    weight: usize,
    state: State,
}

/// The bounded map.
pub(crate) struct LocalStore {
    limits: Limits,
    entries: HashMap<Scope, Entry>,
    /// Completed entries by completion order: the front is the oldest, first to expire (the
    /// ttl is the same for all) and first to be evicted.
    completed: BTreeMap<u64, Scope>,
    next_seq: u64,
    bytes: usize,
}

impl LocalStore {
    pub(crate) fn new(limits: Limits) -> Self {
        LocalStore {
            limits,
            entries: HashMap::new(),
            completed: BTreeMap::new(),
            next_seq: 0,
            bytes: 0,
        }
    }

    /// New bounds (a reload): entries past them are evicted now, oldest completed first.
    pub(crate) fn reconfigure(&mut self, limits: Limits) {
        self.limits = limits;
        self.make_room(0, 0);
    }

    /// Entries held now (in flight and completed).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes counted against `max_bytes` now.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn lookup(&mut self, scope: &Scope, hash: &BodyHash, now: Instant) -> Lookup {
        self.expire(now);
        let Some(entry) = self.entries.get(scope) else {
            return Lookup::Absent;
        };
        // An entry expired out of order (the ttl was shortened by a reload) is gone too.
        if let State::Completed { expires, .. } = entry.state {
            if expires <= now {
                self.remove(scope);
                return Lookup::Absent;
            }
        }
        if entry.hash != *hash {
            return Lookup::Conflict;
        }
        match &entry.state {
            State::InFlight(progress) => Lookup::Join(progress.clone()),
            State::Completed { snapshot, .. } => Lookup::Replay(Arc::clone(snapshot)),
        }
    }

    /// Records `scope` as in flight for `hash`, making room first; the sender publishes its
    /// progress to joiners. Call after a [`Lookup::Absent`] under the same lock.
    pub(crate) fn claim(
        &mut self,
        scope: Scope,
        hash: BodyHash,
        now: Instant,
    ) -> Result<watch::Sender<Progress>, Full> {
        self.expire(now);
        if !self.make_room(1, IN_FLIGHT_WEIGHT) {
            return Err(Full);
        }
        let (tx, rx) = watch::channel(Progress::default());
        self.bytes += IN_FLIGHT_WEIGHT;
        let previous = self.entries.insert(
            scope,
            Entry {
                hash,
                weight: IN_FLIGHT_WEIGHT,
                state: State::InFlight(rx),
            },
        );
        debug_assert!(previous.is_none(), "claimed only after Lookup::Absent");
        Ok(tx)
    }

    /// Ends the in-flight entry of `scope`: stores `snapshot` as its completed response,
    /// or (`None`) forgets the scope, so a retry is a real retry.
    pub(crate) fn settle(&mut self, scope: &Scope, snapshot: Option<Arc<Snapshot>>, now: Instant) {
        let Some(entry) = self.entries.get(scope) else {
            return;
        };
        if !matches!(entry.state, State::InFlight(_)) {
            return;
        }
        let hash = entry.hash;
        self.remove(scope);
        let Some(snapshot) = snapshot else {
            return;
        };
        let weight = snapshot.weight();
        // Kept even when it does not fit (module docs): it may have run.
        self.make_room(1, weight);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += weight;
        self.completed.insert(seq, *scope);
        self.entries.insert(
            *scope,
            Entry {
                hash,
                weight,
                state: State::Completed {
                    snapshot,
                    expires: now + self.limits.ttl,
                    seq,
                },
            },
        );
    }

    /// Drops completed entries whose ttl has passed, from the oldest.
    fn expire(&mut self, now: Instant) {
        while let Some((_, scope)) = self.completed.first_key_value() {
            let scope = *scope;
            let expired = match self.entries.get(&scope) {
                Some(Entry {
                    state: State::Completed { expires, .. },
                    ..
                }) => *expires <= now,
                _ => true,
            };
            if !expired {
                break;
            }
            self.remove(&scope);
        }
    }

    /// Evicts the oldest completed entries until `entries` more entries of `weight` more
    /// bytes fit; false when only in-flight entries are left and they still do not.
    fn make_room(&mut self, entries: usize, weight: usize) -> bool {
        let fits = |s: &Self| {
            s.entries.len() + entries <= s.limits.max_entries
                && s.bytes + weight <= s.limits.max_bytes
        };
        while !fits(self) {
            let Some((_, scope)) = self.completed.first_key_value() else {
                return false;
            };
            let scope = *scope;
            self.remove(&scope);
            metrics::counter!("sluicegate_idempotency_evictions_total").increment(1);
        }
        true
    }

    fn remove(&mut self, scope: &Scope) {
        if let Some(entry) = self.entries.remove(scope) {
            self.bytes -= entry.weight;
            if let State::Completed { seq, .. } = entry.state {
                self.completed.remove(&seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::StatusCode;

    fn limits(max_entries: usize, max_bytes: usize) -> Limits {
        Limits {
            ttl: Duration::from_secs(600),
            max_entries,
            max_bytes,
        }
    }

    fn scope(i: u32) -> Scope {
        Scope::new("records", "k", &format!("key-{i}"))
    }

    fn snapshot(body: &'static str) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            status: StatusCode::OK,
            headers: http::HeaderMap::new(),
            extensions: http::Extensions::new(),
            body: Bytes::from_static(body.as_bytes()),
        })
    }

    /// Claims and completes `scope(i)` with `body`.
    fn complete(store: &mut LocalStore, i: u32, body: &'static str, now: Instant) {
        let hash = BodyHash::of(b"{}");
        assert!(matches!(
            store.lookup(&scope(i), &hash, now),
            Lookup::Absent
        ));
        let _tx = store.claim(scope(i), hash, now).expect("room");
        store.settle(&scope(i), Some(snapshot(body)), now);
    }

    fn is_replay(store: &mut LocalStore, i: u32, now: Instant) -> bool {
        matches!(
            store.lookup(&scope(i), &BodyHash::of(b"{}"), now),
            Lookup::Replay(_)
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_completed_entry_is_replayed_until_its_ttl_passes() {
        let mut store = LocalStore::new(limits(10, 1 << 20));
        let start = Instant::now();
        complete(&mut store, 1, r#"{"id":"r1"}"#, start);
        tokio::time::advance(Duration::from_secs(599)).await;
        assert!(is_replay(&mut store, 1, Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!is_replay(&mut store, 1, Instant::now()));
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn max_entries_evicts_the_oldest_completed_entry() {
        let mut store = LocalStore::new(limits(3, 1 << 20));
        for i in 0..3 {
            complete(&mut store, i, "{}", Instant::now());
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        complete(&mut store, 3, "{}", Instant::now());
        let now = Instant::now();
        assert!(!is_replay(&mut store, 0, now), "the oldest went first");
        assert!(is_replay(&mut store, 1, now));
        assert!(is_replay(&mut store, 2, now));
        assert!(is_replay(&mut store, 3, now));
        assert_eq!(store.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn max_bytes_evicts_the_oldest_completed_entries_until_the_new_one_fits() {
        let body = "x".repeat(1000).leak();
        let one = snapshot(body).weight();
        // Room for three responses and one in-flight entry.
        let mut store = LocalStore::new(limits(100, 3 * one + IN_FLIGHT_WEIGHT));
        for i in 0..3 {
            complete(&mut store, i, body, Instant::now());
        }
        assert_eq!(store.bytes(), 3 * one);
        complete(&mut store, 3, body, Instant::now());
        let now = Instant::now();
        assert!(!is_replay(&mut store, 0, now));
        assert!(is_replay(&mut store, 1, now) && is_replay(&mut store, 3, now));
        assert_eq!(store.bytes(), 3 * one);
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_entries_are_never_evicted_and_a_full_store_refuses_new_keys() {
        let mut store = LocalStore::new(limits(2, 1 << 20));
        let now = Instant::now();
        let hash = BodyHash::of(b"{}");
        let _a = store.claim(scope(0), hash, now).expect("room");
        let _b = store.claim(scope(1), hash, now).expect("room");
        assert_eq!(store.claim(scope(2), hash, now).err(), Some(Full));
        // Both are still in flight: a duplicate joins, it does not find the scope free.
        assert!(matches!(
            store.lookup(&scope(0), &hash, now),
            Lookup::Join(_)
        ));
        assert!(matches!(
            store.lookup(&scope(1), &hash, now),
            Lookup::Join(_)
        ));
        // Once one completes it can be evicted for a new key.
        store.settle(&scope(0), Some(snapshot("{}")), now);
        let _c = store
            .claim(scope(2), hash, now)
            .expect("the completed entry made room");
        assert!(matches!(
            store.lookup(&scope(0), &hash, now),
            Lookup::Absent
        ));
        assert!(matches!(
            store.lookup(&scope(1), &hash, now),
            Lookup::Join(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_entries_count_against_max_bytes() {
        let mut store = LocalStore::new(limits(100, 2 * IN_FLIGHT_WEIGHT));
        let now = Instant::now();
        let hash = BodyHash::of(b"{}");
        let _a = store.claim(scope(0), hash, now).expect("room");
        let _b = store.claim(scope(1), hash, now).expect("room");
        assert_eq!(store.claim(scope(2), hash, now).err(), Some(Full));
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_key_with_another_body_is_a_conflict_in_flight_and_completed() {
        let mut store = LocalStore::new(limits(10, 1 << 20));
        let now = Instant::now();
        let _tx = store
            .claim(scope(0), BodyHash::of(b"{\"a\":1}"), now)
            .expect("room");
        assert!(matches!(
            store.lookup(&scope(0), &BodyHash::of(b"{\"a\":2}"), now),
            Lookup::Conflict
        ));
        store.settle(&scope(0), Some(snapshot("{}")), now);
        assert!(matches!(
            store.lookup(&scope(0), &BodyHash::of(b"{\"a\":2}"), now),
            Lookup::Conflict
        ));
        assert!(matches!(
            store.lookup(&scope(0), &BodyHash::of(b"{\"a\":1}"), now),
            Lookup::Replay(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_outcome_frees_the_scope_for_a_real_retry() {
        let mut store = LocalStore::new(limits(10, 1 << 20));
        let now = Instant::now();
        let hash = BodyHash::of(b"{}");
        let _tx = store.claim(scope(0), hash, now).expect("room");
        store.settle(&scope(0), None, now);
        assert!(matches!(
            store.lookup(&scope(0), &hash, now),
            Lookup::Absent
        ));
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_with_smaller_bounds_evicts_completed_entries_oldest_first() {
        let mut store = LocalStore::new(limits(10, 1 << 20));
        for i in 0..4 {
            complete(&mut store, i, "{}", Instant::now());
        }
        store.reconfigure(limits(2, 1 << 20));
        let now = Instant::now();
        assert_eq!(store.len(), 2);
        assert!(!is_replay(&mut store, 1, now));
        assert!(is_replay(&mut store, 2, now) && is_replay(&mut store, 3, now));
    }
}
