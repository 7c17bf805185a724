//! Usage-quota counters of this process: per client key, the requests counted in its
//! current period ([`UsageCounters`]), and the state file that keeps them across restarts.
//!
//! # Counting
//!
//! A key's entry holds its current period (`[start, end)`, from
//! [`UsageQuota::window`](crate::usage::UsageQuota::window)) and the requests counted in it.
//! A check in a later period finds the entry's period over and starts again from zero, so a
//! key's count resets at the period's start without any timer. Admission calls
//! [`UsageCounters::take`] only once every throttling layer admitted the request; the count
//! then rises by one unless the limit is reached, which refuses the request (and counts
//! nothing).
//!
//! # Bounded memory
//!
//! Keys are client input. Keys on a plan come from the config (a bounded set) and always get
//! an entry; every other key takes one of at most `max_keys` slots. Past that, new keys share
//! one **overflow** counter, as new keys share the overflow bucket of the key layer: spraying
//! keys then uses up the sprayers' own shared quota, never a tracked key's. Entries of a
//! past period carry no information; [`UsageCounters::reclaim`] drops them.
//!
//! # Durability (local backend)
//!
//! [`UsageCounters::save`] writes every entry of a current period to the state file
//! atomically: a temporary file in the same directory, `fsync`, `rename` over the old file,
//! then `fsync` of the directory — a crash leaves the old file or the new one, never half of
//! one. The server saves at most once a second while counts change, and once more at
//! shutdown. [`UsageCounters::load`] reads it at start and drops periods that are over; a file
//! that cannot be read or parsed is logged, moved aside to `<file>.corrupt-<unix time>`, and
//! the process starts with empty counters — a bad file never stops the proxy.
//!
//! With the Redis backend the counters live in Redis; these local ones follow what Redis
//! counted for the requests this replica admitted ([`UsageCounters::observe`]) and decide
//! while Redis is down.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::usage::Window;

/// One key's count in one period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Count {
    /// The period's first second (Unix time).
    start: u64,
    /// The next period's first second.
    end: u64,
    /// Requests counted in the period.
    used: u64,
    /// The limit of the last check (for the gauge of keys at their quota).
    limit: u64,
    /// Whether the entry holds one of the `max_keys` slots (a key without a plan, or one
    /// restored from the state file), so that only those give a slot back when reclaimed.
    #[serde(skip)]
    slotted: bool,
}

impl Count {
    fn empty(window: Window, limit: u64) -> Count {
        Count {
            start: window.start,
            end: window.end,
            used: 0,
            limit,
            slotted: false,
        }
    }

    /// Moves to `window`, starting from zero when it is another period than the one held.
    fn roll(&mut self, window: Window) {
        if (self.start, self.end) != (window.start, window.end) {
            *self = Count {
                slotted: self.slotted,
                ..Count::empty(window, self.limit)
            };
        }
    }

    /// Counts one request unless `limit` is reached: `Ok(used)` or `Err(used)`.
    fn take(&mut self, window: Window, limit: u64) -> Result<u64, u64> {
        self.roll(window);
        self.limit = limit;
        if self.used >= limit {
            return Err(self.used);
        }
        self.used += 1;
        Ok(self.used)
    }
}

/// The per-key usage counters of one process, shared by every `Admission` it builds (a
/// reload keeps them: counts are per key and period, whatever the plan's limit).
pub struct UsageCounters {
    map: DashMap<Box<str>, Count, ahash::RandomState>,
    /// Slots taken by keys without a plan; at most `max` (see the module docs).
    bounded: AtomicUsize,
    max: AtomicUsize,
    /// The counter shared by new keys without a plan while the slots are all taken.
    overflow: Mutex<Option<Count>>,
    /// Set by every change, cleared by a save: whether the state file is behind.
    dirty: AtomicBool,
}

/// What [`UsageCounters::load`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// No state file yet: empty counters.
    Missing,
    /// Entries restored, and entries dropped because their period is over.
    Restored {
        /// Entries of a current period, now counting again.
        restored: usize,
        /// Entries whose period ended while the process was down.
        expired: usize,
    },
    /// The file could not be read or parsed; it was moved to this path (`None` if even
    /// that failed) and the counters start empty.
    MovedAside(Option<PathBuf>),
}

/// The state file's content.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    counters: Vec<Entry>,
}

// No `deny_unknown_fields`: serde does not support it together with `flatten`.
#[derive(Serialize, Deserialize)]
struct Entry {
    key: String,
    #[serde(flatten)]
    count: Count,
}

/// The state file's format version.
const VERSION: u32 = 1;

impl UsageCounters {
    /// Empty counters with room for `max_keys` keys without a plan.
    pub fn new(max_keys: usize) -> UsageCounters {
        UsageCounters {
            map: DashMap::with_hasher(ahash::RandomState::new()),
            bounded: AtomicUsize::new(0),
            max: AtomicUsize::new(max_keys),
            overflow: Mutex::new(None),
            dirty: AtomicBool::new(false),
        }
    }

    /// A reload's new `max_keys`: a lower bound stops new keys until reclaim frees room.
    pub fn set_max_keys(&self, max_keys: usize) {
        self.max.store(max_keys, Ordering::Relaxed);
    }

    /// Counts one request of `key` in `window` unless `limit` is reached: `Ok(used)` with
    /// the new count, or `Err(used)` when refused. `planned`: the key is on a plan from the
    /// config, so it always gets its own entry.
    pub(crate) fn take(
        &self,
        key: &str,
        window: Window,
        limit: u64,
        planned: bool,
    ) -> Result<u64, u64> {
        let taken = self.with_count(key, window, limit, planned, |count| {
            count.take(window, limit)
        });
        if taken.is_ok() {
            self.dirty.store(true, Ordering::Relaxed);
        }
        taken
    }

    /// Runs `f` on `key`'s entry (created when missing and there is room, else the
    /// overflow counter). The shard lock is held only across `f`.
    fn with_count<T>(
        &self,
        key: &str,
        window: Window,
        limit: u64,
        planned: bool,
        f: impl FnOnce(&mut Count) -> T,
    ) -> T {
        if let Some(mut count) = self.map.get_mut(key) {
            return f(&mut count);
        }
        if !planned && !self.reserve() {
            let mut overflow = self.overflow.lock();
            let count = overflow.get_or_insert_with(|| Count::empty(window, limit));
            return f(count);
        }
        match self.map.entry(key.into()) {
            // Another request created it between our `get_mut` and `entry`.
            dashmap::mapref::entry::Entry::Occupied(mut entry) => {
                if !planned {
                    self.bounded.fetch_sub(1, Ordering::Relaxed);
                }
                f(entry.get_mut())
            }
            dashmap::mapref::entry::Entry::Vacant(entry) => {
                let mut count = Count {
                    slotted: !planned,
                    ..Count::empty(window, limit)
                };
                let out = f(&mut count);
                entry.insert(count);
                out
            }
        }
    }

    fn reserve(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.bounded
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Requests of `key` counted in `window` (0 for a key not seen in it). Creates no entry.
    pub fn used(&self, key: &str, window: Window) -> u64 {
        self.map
            .get(key)
            .filter(|c| (c.start, c.end) == (window.start, window.end))
            .map_or(0, |c| c.used)
    }

    /// Sets `key`'s count in `window` (the admin API's `UpdateUsage`): an entry is created
    /// whatever the key bound, as an operator asked for it.
    pub fn set(&self, key: &str, window: Window, limit: u64, used: u64) {
        let mut count = self
            .map
            .entry(key.into())
            .or_insert(Count::empty(window, limit));
        count.roll(window);
        count.limit = limit;
        count.used = used;
        drop(count);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Follows what Redis counted for `key` (a request this replica admitted there), so the
    /// local counters can take over with the shared count while Redis is down. Never lowers
    /// a count.
    pub(crate) fn observe(&self, key: &str, window: Window, limit: u64, used: u64, planned: bool) {
        self.with_count(key, window, limit, planned, |count| {
            count.roll(window);
            count.limit = limit;
            count.used = count.used.max(used);
        });
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Drops entries whose period ended before `now` (since the Unix epoch) and frees their
    /// slots; shrinks the table when it is mostly empty.
    pub fn reclaim(&self, now: Duration) {
        let now = now.as_secs();
        let mut removed = 0;
        self.map.retain(|_, count| {
            let keep = count.end > now;
            removed += usize::from(!keep && count.slotted);
            keep
        });
        // Only entries that took a slot give one back; saturating all the same.
        let _ = self
            .bounded
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(removed))
            });
        let mut overflow = self.overflow.lock();
        if overflow.is_some_and(|c| c.end <= now) {
            *overflow = None;
        }
        drop(overflow);
        if self.map.len() <= self.map.capacity() / 4 {
            self.map.shrink_to_fit();
        }
    }

    /// Keys (the overflow counter included) whose count in their current period has reached
    /// the limit of their last check.
    pub fn at_limit(&self, now: Duration) -> usize {
        let now = now.as_secs();
        let full = |c: &Count| c.end > now && c.used >= c.limit;
        let keys = self.map.iter().filter(|c| full(c.value())).count();
        keys + usize::from(self.overflow.lock().is_some_and(|c| full(&c)))
    }

    /// Keys with an entry.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key has an entry.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether counts changed since the last [`save`](Self::save).
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Relaxed)
    }

    /// Writes every entry of a current period to `path` atomically (see the module docs).
    /// Blocking file I/O: run it off the async runtime. On failure the counters stay dirty,
    /// so the next save tries again.
    pub fn save(&self, path: &Path, now: Duration) -> std::io::Result<()> {
        // Cleared before the snapshot: a count that changes while we write sets it again.
        self.dirty.store(false, Ordering::Relaxed);
        let now_secs = now.as_secs();
        let counters = self
            .map
            .iter()
            .filter(|c| c.end > now_secs)
            .map(|c| Entry {
                key: c.key().to_string(),
                count: *c.value(),
            })
            .collect();
        let state = StateFile {
            version: VERSION,
            counters,
        };
        let written = write_atomically(path, &state);
        if written.is_err() {
            self.dirty.store(true, Ordering::Relaxed);
        }
        written
    }

    /// Reads the state file at start (see the module docs). Never fails: a file that cannot
    /// be used is logged and moved aside. Restored keys take slots as any key does (plan
    /// membership is not known here, and the file holds at most what the bounds allowed).
    pub fn load(&self, path: &Path, now: Duration) -> Loaded {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
            Err(e) => return Loaded::MovedAside(move_aside(path, now, &e)),
        };
        let state: StateFile = match serde_json::from_slice(&text) {
            Ok(state) => state,
            Err(e) => return Loaded::MovedAside(move_aside(path, now, &e)),
        };
        if state.version != VERSION {
            let e = format!("unknown state file version {}", state.version);
            return Loaded::MovedAside(move_aside(path, now, &e));
        }
        let now = now.as_secs();
        let (mut restored, mut expired) = (0, 0);
        for Entry { key, count } in state.counters {
            if count.end <= now || count.start >= count.end {
                expired += 1;
                continue;
            }
            self.bounded.fetch_add(1, Ordering::Relaxed);
            self.map.insert(
                key.into_boxed_str(),
                Count {
                    slotted: true,
                    ..count
                },
            );
            restored += 1;
        }
        tracing::info!(
            path = %path.display(),
            restored,
            expired,
            "usage-quota counters restored"
        );
        Loaded::Restored { restored, expired }
    }
}

impl std::fmt::Debug for UsageCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageCounters")
            .field("keys", &self.map.len())
            .field("dirty", &self.is_dirty())
            .finish_non_exhaustive()
    }
}

/// Temp file in the same directory (so `rename` is atomic), fsync, rename, fsync the
/// directory (so the rename itself survives a crash).
fn write_atomically(path: &Path, state: &StateFile) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = dir.join(name);
    let mut file = std::fs::File::create(&tmp)?;
    serde_json::to_writer(&mut file, state)?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    // Best effort: not every platform can open a directory to sync it.
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Moves an unusable state file to `<file>.corrupt-<unix time>` and says so.
fn move_aside(path: &Path, now: Duration, error: &dyn std::fmt::Display) -> Option<PathBuf> {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".corrupt-{}", now.as_secs()));
    let aside = PathBuf::from(name);
    match std::fs::rename(path, &aside) {
        Ok(()) => {
            tracing::error!(
                path = %path.display(),
                moved_to = %aside.display(),
                %error,
                "usage-quota state file unusable: moved aside, counting starts from zero"
            );
            Some(aside)
        }
        Err(rename) => {
            tracing::error!(
                path = %path.display(),
                %error,
                rename_error = %rename,
                "usage-quota state file unusable and could not be moved aside: counting starts \
                 from zero, and the next save replaces it"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn window(day: u64) -> Window {
        Window {
            start: day * DAY,
            end: (day + 1) * DAY,
        }
    }

    #[test]
    fn counts_up_to_the_limit_then_refuses_without_counting() {
        let counters = UsageCounters::new(10);
        let w = window(100);
        assert_eq!(counters.take("k", w, 2, false), Ok(1));
        assert_eq!(counters.take("k", w, 2, false), Ok(2));
        assert_eq!(counters.take("k", w, 2, false), Err(2));
        assert_eq!(counters.used("k", w), 2);
        assert_eq!(counters.at_limit(Duration::from_secs(100 * DAY)), 1);
        // The next period starts from zero.
        assert_eq!(counters.take("k", window(101), 2, false), Ok(1));
        assert_eq!(counters.used("k", w), 0, "the old period is gone");
    }

    #[test]
    fn a_raised_limit_applies_to_the_count_already_used() {
        let counters = UsageCounters::new(10);
        let w = window(5);
        for _ in 0..3 {
            counters.take("k", w, 3, true).expect("under the limit");
        }
        assert_eq!(counters.take("k", w, 3, true), Err(3));
        assert_eq!(counters.take("k", w, 5, true), Ok(4));
        assert_eq!(
            counters.take("k", w, 2, true),
            Err(4),
            "a lowered limit refuses"
        );
    }

    #[test]
    fn keys_past_the_bound_share_the_overflow_counter_and_plan_keys_never_do() {
        let counters = UsageCounters::new(1);
        let w = window(1);
        assert_eq!(counters.take("a", w, 2, false), Ok(1));
        assert_eq!(counters.take("b", w, 2, false), Ok(1), "overflow");
        assert_eq!(counters.take("c", w, 2, false), Ok(2), "overflow, shared");
        assert_eq!(counters.take("d", w, 2, false), Err(2));
        assert_eq!(
            counters.take("gold", w, 2, true),
            Ok(1),
            "a plan key has its own"
        );
        assert_eq!(counters.len(), 2);
        counters.reclaim(Duration::from_secs(2 * DAY));
        assert!(counters.is_empty());
        assert_eq!(
            counters.take("b", window(2), 2, false),
            Ok(1),
            "its slot is free again"
        );
        assert_eq!(counters.len(), 1);
    }

    #[test]
    fn only_entries_that_took_a_slot_give_one_back_when_reclaimed() {
        let counters = UsageCounters::new(1);
        // `a` takes the one slot in a period that outlives the reclaim below.
        assert_eq!(counters.take("a", window(10), 5, false), Ok(1));
        // A plan key and a key set by the admin API take no slot; their periods end first.
        counters
            .take("gold", window(1), 5, true)
            .expect("under the limit");
        counters.set("admin-set", window(1), 5, 1);
        counters.reclaim(Duration::from_secs(2 * DAY));
        assert_eq!(counters.len(), 1, "only a is left");
        // Reclaiming them gave no slot back: `a` still holds the only one.
        assert_eq!(counters.take("b", window(10), 5, false), Ok(1), "overflow");
        assert_eq!(
            counters.take("c", window(10), 5, false),
            Ok(2),
            "overflow, shared"
        );
        assert_eq!(counters.len(), 1, "no entry past max_keys");
    }

    #[test]
    fn redis_counts_are_followed_but_never_lowered() {
        let counters = UsageCounters::new(10);
        let w = window(1);
        counters.observe("k", w, 10, 7, false);
        assert_eq!(counters.used("k", w), 7);
        counters.observe("k", w, 10, 3, false);
        assert_eq!(counters.used("k", w), 7);
        counters.set("k", w, 10, 1);
        assert_eq!(counters.used("k", w), 1, "the admin API may lower it");
    }

    #[test]
    fn saved_counts_are_restored_and_past_periods_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state/quota.json");
        let counters = UsageCounters::new(10);
        counters.take("now", window(10), 5, false).expect("counted");
        counters.take("now", window(10), 5, false).expect("counted");
        counters.take("old", window(9), 5, false).expect("counted");
        assert!(counters.is_dirty());
        counters
            .save(&path, Duration::from_secs(9 * DAY + 5))
            .expect("saved");
        assert!(!counters.is_dirty());
        assert!(!dir.path().join("state/quota.json.tmp").exists());

        let restarted = UsageCounters::new(10);
        assert_eq!(
            restarted.load(&path, Duration::from_secs(10 * DAY + 5)),
            Loaded::Restored {
                restored: 1,
                expired: 1
            }
        );
        assert_eq!(restarted.used("now", window(10)), 2);
        assert_eq!(restarted.take("now", window(10), 3, false), Ok(3));
        assert_eq!(restarted.take("now", window(10), 3, false), Err(3));
    }

    #[test]
    fn an_unusable_state_file_is_moved_aside_and_counting_starts_empty() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("quota.json");
        let counters = UsageCounters::new(10);
        assert_eq!(counters.load(&path, Duration::ZERO), Loaded::Missing);
        for garbage in [
            &b"{\"version\":1,\"counters\":[{\"key\":"[..],
            b"\xff\xfe",
            b"{\"version\":9,\"counters\":[]}",
        ] {
            std::fs::write(&path, garbage).expect("written");
            let now = Duration::from_secs(1_700_000_000);
            let aside = dir.path().join("quota.json.corrupt-1700000000");
            assert_eq!(
                counters.load(&path, now),
                Loaded::MovedAside(Some(aside.clone()))
            );
            assert!(!path.exists());
            assert_eq!(std::fs::read(&aside).expect("kept"), garbage);
            std::fs::remove_file(aside).expect("removed");
        }
        assert!(counters.is_empty());
    }
}
