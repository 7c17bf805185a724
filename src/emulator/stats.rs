//! What the emulated Lambda saw, per function: the body of `GET /emulator/stats`.
//!
//! The field names are a contract: tests and load tests assert on them. Fields may be
//! added, never removed or renamed.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::handler::Payload;

/// Counters of every function, keyed by function name.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Each emulated function's counters, by function name.
    pub functions: BTreeMap<String, FunctionStats>,
}

/// One function's counters since the emulator started.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FunctionStats {
    /// Accepted invokes (`RequestResponse` and `Event`; not `DryRun`, not refused ones).
    pub invocations: u64,
    /// Records given to the handler: a batch envelope's length, or 1 for another payload.
    pub records: u64,
    /// Invokes refused with `TooManyRequestsException`, by `Reason`.
    pub throttles: Throttles,
    /// Runs that ended with `X-Amz-Function-Error` (crashes and timeouts).
    pub errors: u64,
    /// The most runs in flight at once.
    pub peak_concurrency: u32,
    /// Records the handler failed (reported per record, or the cause of a crash).
    #[serde(default)]
    pub record_failures: u64,
    /// Runs that hit the function timeout (also counted in `errors`).
    #[serde(default)]
    pub timeouts: u64,
    /// Invokes refused with `RequestTooLargeException`.
    #[serde(default)]
    pub too_large: u64,
    /// Invokes refused with `InvalidRequestContentException` (payload not JSON).
    #[serde(default)]
    pub invalid_payloads: u64,
    /// `DryRun` invokes answered.
    #[serde(default)]
    pub dry_runs: u64,
    /// Runs in flight now.
    #[serde(default)]
    pub in_flight: u32,
    /// Accepted `Event` invokes waiting for a concurrency slot.
    #[serde(default)]
    pub queued_events: u64,
    /// Records given to the handler whose bytes (a batch record's `body`, or a whole other
    /// payload) it had already been given: processing the same record twice. Remembered
    /// by a 128-bit hash over the last 1,000,000 records.
    #[serde(default)]
    pub duplicate_records: u64,
}

/// How many of the latest records' hashes a function remembers for `duplicate_records`.
pub(crate) const SEEN_RECORDS: usize = 1_000_000;

/// Throttles by the `Reason` field of `TooManyRequestsException`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Throttles {
    /// Invokes refused because the function's invoke rate was exceeded.
    #[serde(rename = "CallerRateLimitExceeded")]
    pub caller_rate_limit_exceeded: u64,
    /// Invokes refused because the function's reserved concurrency was in use.
    #[serde(rename = "ReservedFunctionConcurrentInvocationLimitExceeded")]
    pub reserved_function_concurrent_invocation_limit_exceeded: u64,
}

/// The live counters behind [`FunctionStats`].
///
/// Each counter is an independent atomic: a snapshot is not a consistent cut across
/// counters while invokes are running, which is fine for what it is used for (asserting
/// after the traffic has settled, and dashboards). Relaxed ordering throughout: no other
/// memory is published through these counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) invocations: AtomicU64,
    pub(crate) records: AtomicU64,
    pub(crate) rate_throttles: AtomicU64,
    pub(crate) concurrency_throttles: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) record_failures: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) too_large: AtomicU64,
    pub(crate) invalid_payloads: AtomicU64,
    pub(crate) dry_runs: AtomicU64,
    pub(crate) queued_events: AtomicU64,
    pub(crate) peak_concurrency: AtomicU32,
    pub(crate) duplicate_records: AtomicU64,
    seen: parking_lot::Mutex<Seen>,
}

/// The hashes of the latest records, oldest first out past `capacity`.
#[derive(Debug)]
struct Seen {
    capacity: usize,
    hashes: HashSet<u128>,
    order: VecDeque<u128>,
}

impl Default for Seen {
    fn default() -> Self {
        Seen {
            capacity: SEEN_RECORDS,
            hashes: HashSet::new(),
            order: VecDeque::new(),
        }
    }
}

impl Seen {
    /// Remembers `hash`; whether it was already remembered.
    fn seen_before(&mut self, hash: u128) -> bool {
        if !self.hashes.insert(hash) {
            return true;
        }
        self.order.push_back(hash);
        if self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.hashes.remove(&oldest);
            }
        }
        false
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// Counts the records of `payload` the function was already given (by the first 128
    /// bits of SHA-256 of each record's bytes). One lock per invoke, not per record.
    pub(crate) fn note_records(&self, payload: &Payload) {
        let hashes: Vec<u128> = payload
            .record_bytes()
            .map(|bytes| {
                let digest = Sha256::digest(bytes);
                let mut first = [0u8; 16];
                first.copy_from_slice(&digest[..16]);
                u128::from_be_bytes(first)
            })
            .collect();
        let mut seen = self.seen.lock();
        let duplicates = hashes.into_iter().filter(|h| seen.seen_before(*h)).count();
        drop(seen);
        self.duplicate_records
            .fetch_add(duplicates as u64, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, in_flight: u32) -> FunctionStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FunctionStats {
            invocations: get(&self.invocations),
            records: get(&self.records),
            throttles: Throttles {
                caller_rate_limit_exceeded: get(&self.rate_throttles),
                reserved_function_concurrent_invocation_limit_exceeded: get(
                    &self.concurrency_throttles
                ),
            },
            errors: get(&self.errors),
            peak_concurrency: self.peak_concurrency.load(Ordering::Relaxed),
            record_failures: get(&self.record_failures),
            timeouts: get(&self.timeouts),
            too_large: get(&self.too_large),
            invalid_payloads: get(&self.invalid_payloads),
            dry_runs: get(&self.dry_runs),
            in_flight,
            queued_events: get(&self.queued_events),
            duplicate_records: get(&self.duplicate_records),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn serializes_with_the_contract_field_names() {
        let counters = Counters::default();
        bump(&counters.invocations);
        bump(&counters.rate_throttles);
        let stats = Stats {
            functions: BTreeMap::from([("f".to_string(), counters.snapshot(0))]),
        };
        let value = serde_json::to_value(&stats).expect("serializes");
        let f = &value["functions"]["f"];
        assert_eq!(f["invocations"], 1);
        assert_eq!(f["records"], 0);
        assert_eq!(
            f["throttles"],
            json!({"CallerRateLimitExceeded": 1, "ReservedFunctionConcurrentInvocationLimitExceeded": 0})
        );
        assert_eq!(f["errors"], 0);
        assert_eq!(f["peak_concurrency"], 0);
        let back: Stats = serde_json::from_value(value).expect("parses back");
        assert_eq!(back, stats);
    }

    #[test]
    fn a_record_given_twice_is_a_duplicate_whatever_batch_carries_it() {
        let counters = Counters::default();
        let batch = |ids: &[&str], bodies: &[&str]| {
            let records: Vec<String> = ids
                .iter()
                .zip(bodies)
                .map(|(id, body)| format!(r#"{{"id":"{id}","key":"k","body":{body}}}"#))
                .collect();
            Payload::parse(format!(r#"{{"records":[{}]}}"#, records.join(",")).into())
                .expect("an envelope")
        };
        counters.note_records(&batch(&["r1", "r2"], &[r#"{"n":1}"#, r#"{"n":2}"#]));
        assert_eq!(counters.snapshot(0).duplicate_records, 0);
        // New ids, one body already processed.
        counters.note_records(&batch(&["r3", "r4"], &[r#"{"n":2}"#, r#"{"n":3}"#]));
        assert_eq!(counters.snapshot(0).duplicate_records, 1);
        let plain = Payload::parse(bytes::Bytes::from_static(b"{\"n\":9}")).expect("JSON");
        counters.note_records(&plain);
        let plain = Payload::parse(bytes::Bytes::from_static(b"{\"n\":9}")).expect("JSON");
        counters.note_records(&plain);
        assert_eq!(counters.snapshot(0).duplicate_records, 2);
    }

    #[test]
    fn the_seen_set_forgets_the_oldest_past_its_capacity() {
        let mut seen = Seen {
            capacity: 2,
            ..Seen::default()
        };
        assert!(!seen.seen_before(1));
        assert!(!seen.seen_before(2));
        assert!(seen.seen_before(1));
        assert!(!seen.seen_before(3));
        assert!(!seen.seen_before(1), "1 was the oldest and was forgotten");
        assert_eq!(seen.hashes.len(), 2);
    }

    #[test]
    fn parses_the_minimal_documented_shape() {
        let text = r#"{"functions":{"process-records":{"invocations":120,"records":2400,
            "throttles":{"CallerRateLimitExceeded":0,"ReservedFunctionConcurrentInvocationLimitExceeded":0},
            "errors":0,"peak_concurrency":4}}}"#;
        let stats: Stats = serde_json::from_str(text).expect("documented shape parses");
        assert_eq!(stats.functions["process-records"].records, 2400);
    }
}
