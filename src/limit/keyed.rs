//! Keyed token buckets sharing one quota, with bounded memory.

use std::sync::Arc;

use governor::clock::Clock;

use super::clock::DefaultClock;
use super::engine::{Checked, Engine, KeyBudget, KeyStore};
use super::{Decision, Quota, CLOSED_WAIT};

/// One token bucket per client key, all with the same quota.
///
/// Keys are stored hashed (see the [module docs](super)); the number of tracked keys is
/// capped, new keys past the cap share one overflow bucket, and [`KeyedBuckets::reclaim`]
/// drops keys whose bucket is full again. A check takes a shard read lock of a `DashMap` and
/// one compare-exchange; only a key's first check takes the shard's write lock.
#[derive(Debug)]
pub struct KeyedBuckets<C: Clock = DefaultClock> {
    quota: Quota,
    /// `None` for a closed layer, which refuses every key and tracks none.
    engine: Option<Engine<KeyStore, C>>,
    budget: Arc<KeyBudget>,
    hasher: ahash::RandomState,
}

impl<C: Clock> KeyedBuckets<C> {
    /// Buckets for at most `max_keys` keys; further new keys share the overflow bucket
    /// until [`reclaim`](Self::reclaim) frees room.
    pub fn new(quota: Quota, clock: C, max_keys: usize) -> Self {
        Self::with_budget(quota, clock, Arc::new(KeyBudget::new(max_keys)), true)
    }

    /// Buckets drawing on a budget shared with other layers. `capped = false` always tracks
    /// new keys (still counting them), for plan layers whose keys come from the config.
    pub(crate) fn with_budget(
        quota: Quota,
        clock: C,
        budget: Arc<KeyBudget>,
        capped: bool,
    ) -> Self {
        let engine = quota
            .gcra()
            .map(|gcra| Engine::new(gcra, KeyStore::new(Arc::clone(&budget), capped), clock));
        KeyedBuckets {
            quota,
            engine,
            budget,
            hasher: ahash::RandomState::new(),
        }
    }

    /// Takes a token from `key`'s bucket, or says how long until one is available.
    pub fn check(&self, key: &str) -> Decision {
        self.check_hash(self.hasher.hash_one(key)).decision
    }

    /// Checks a key already hashed by the caller (`Admission` hashes once for all layers).
    pub(crate) fn check_hash(&self, hash: u64) -> Checked {
        match &self.engine {
            Some(engine) => engine.check(hash),
            None => Checked {
                decision: Decision::Limited { wait: CLOSED_WAIT },
                overflowed: false,
            },
        }
    }

    /// [`check_hash`](Self::check_hash) taking `cost` tokens at once (at most the burst).
    pub(crate) fn check_hash_n(&self, hash: u64, cost: u32) -> Checked {
        match &self.engine {
            Some(engine) => engine.check_n(hash, cost),
            None => Checked {
                decision: Decision::Limited { wait: CLOSED_WAIT },
                overflowed: false,
            },
        }
    }

    /// The quota every key of this layer gets.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Number of keys with their own bucket in this layer (read-locks every shard).
    pub fn len(&self) -> usize {
        self.engine.as_ref().map_or(0, |e| e.limiter().len())
    }

    /// Whether no key has its own bucket in this layer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys tracked against this layer's budget: ≥ [`len`](Self::len) while checks are in
    /// flight, equal when quiet. When the budget is shared, this counts every layer sharing it.
    pub fn tracked_keys(&self) -> usize {
        self.budget.used()
    }

    /// Drops keys whose bucket is full again, then shrinks the table if it is mostly empty.
    ///
    /// Runs off the request path (the server calls it periodically); it write-locks one
    /// shard at a time, so checks on other shards proceed.
    pub fn reclaim(&self) {
        if let Some(engine) = &self.engine {
            engine.limiter().retain_recent();
            engine.limiter().shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;

    fn keyed(
        rate: f64,
        burst: u32,
        max_keys: usize,
    ) -> (KeyedBuckets<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (
            KeyedBuckets::new(Quota { rate, burst }, clock.clone(), max_keys),
            clock,
        )
    }

    #[test]
    fn keys_are_isolated() {
        let (k, _clock) = keyed(1.0, 2, 100);
        assert!(k.check("a").is_allowed());
        assert!(k.check("a").is_allowed());
        assert_eq!(
            k.check("a"),
            Decision::Limited {
                wait: Duration::from_secs(1)
            }
        );
        assert_eq!(
            k.check("b"),
            Decision::Allowed {
                remaining: 1,
                reset: Duration::from_secs(1)
            }
        );
        assert_eq!(k.len(), 2);
        assert_eq!(k.tracked_keys(), 2);
    }

    #[test]
    fn cap_holds_under_key_spraying_and_new_keys_share_the_overflow_bucket() {
        let max_keys = 1000;
        let (k, _clock) = keyed(1.0, 3, max_keys);
        let mut overflow_admitted = 0;
        for i in 0..10 * max_keys {
            let admitted = k.check(&format!("spray-{i}")).is_allowed();
            if i >= max_keys {
                overflow_admitted += usize::from(admitted);
            }
            assert!(k.tracked_keys() <= max_keys);
        }
        assert_eq!(k.len(), max_keys);
        assert_eq!(k.tracked_keys(), max_keys);
        // Past the cap, all new keys drew from one shared bucket of burst 3.
        assert_eq!(overflow_admitted, 3);
        // Keys tracked before the cap keep their own buckets.
        assert_eq!(
            k.check("spray-0"),
            Decision::Allowed {
                remaining: 1,
                reset: Duration::from_secs(2)
            }
        );
    }

    #[test]
    fn cap_holds_when_two_threads_spray_concurrently() {
        let max_keys = 5000;
        let (k, _clock) = keyed(10.0, 5, max_keys);
        std::thread::scope(|s| {
            for t in 0..2 {
                let k = &k;
                s.spawn(move || {
                    for i in 0..5 * max_keys {
                        k.check(&format!("{t}-{i}"));
                        // Both threads also hit shared keys, racing to insert them.
                        k.check(&format!("shared-{}", i % 64));
                    }
                });
            }
        });
        assert_eq!(k.len(), max_keys);
        assert_eq!(k.tracked_keys(), max_keys);
    }

    #[test]
    fn reclaim_drops_idle_keys_and_keeps_busy_ones() {
        let (k, clock) = keyed(1.0, 2, 100);
        k.check("idle");
        clock.advance(Duration::from_secs(1));
        k.check("busy");
        k.check("busy");
        // At 3 s "idle" has been full for 2 s and goes; "busy" has only just refilled, and a
        // bucket is kept until it has been full for one period (governor's `retain_recent`).
        clock.advance(Duration::from_secs(2));
        k.reclaim();
        assert_eq!(k.len(), 1);
        assert_eq!(k.tracked_keys(), 1);
        clock.advance(Duration::from_secs(2));
        k.reclaim();
        assert!(k.is_empty());
        assert_eq!(k.tracked_keys(), 0);
    }

    #[test]
    fn reclaimed_key_starts_full_and_never_fuller_than_burst() {
        let (k, clock) = keyed(1.0, 3, 100);
        for _ in 0..3 {
            assert!(k.check("a").is_allowed());
        }
        clock.advance(Duration::from_secs(60));
        k.reclaim();
        assert!(k.is_empty());
        assert_eq!(
            k.check("a"),
            Decision::Allowed {
                remaining: 2,
                reset: Duration::from_secs(1)
            }
        );
        assert!(k.check("a").is_allowed());
        assert!(k.check("a").is_allowed());
        assert!(!k.check("a").is_allowed());
    }

    #[test]
    fn reclaim_frees_room_under_the_cap() {
        let (k, clock) = keyed(1.0, 1, 2);
        k.check("a");
        k.check("b");
        k.check("c"); // overflow
        assert_eq!(k.len(), 2);
        clock.advance(Duration::from_secs(5));
        k.reclaim();
        assert!(k.check("c").is_allowed());
        assert_eq!(k.len(), 1);
    }

    #[test]
    fn closed_layer_refuses_every_key_and_tracks_none() {
        let (k, _clock) = keyed(0.0, 10, 100);
        assert_eq!(k.check("a"), Decision::Limited { wait: CLOSED_WAIT });
        assert!(k.is_empty());
        assert_eq!(k.tracked_keys(), 0);
        k.reclaim();
    }
}
