//! Resident memory of keyed admission state: baseline, 1M tracked keys, after reclaim, and
//! under key spraying past the cap.
//!
//! Run: `cargo bench --bench keys_memory` (a plain `main`, release profile). Prints figures for
//! BENCHMARKS.md; asserts only the bound on tracked keys.

use std::fmt::Write as _;
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use sluicegate::limit::{Admission, Plans, Quota};

const KEYS: usize = 1_000_000;
/// The shipped config's `limits.default`.
const DEFAULT: Quota = Quota {
    rate: 100.0,
    burst: 200,
};

/// `(VmRSS, VmHWM)` in KiB, from /proc/self/status.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn report(stage: &str, baseline: u64, admission: &Admission<FakeRelativeClock>) {
    let (rss, peak) = rss_kib();
    let tracked = admission.tracked_keys();
    let extra = rss.saturating_sub(baseline);
    let per_key = if tracked > 0 {
        format!("{:.1} B/key", extra as f64 * 1024.0 / tracked as f64)
    } else {
        "-".to_owned()
    };
    println!(
        "{stage:<44} tracked={tracked:>8}  VmRSS={:>8.1} MiB  (+{:>6.1} MiB, {per_key})  VmHWM={:>7.1} MiB",
        rss as f64 / 1024.0,
        extra as f64 / 1024.0,
        peak as f64 / 1024.0,
    );
}

/// Checks `count` distinct keys `prefix-<i>` without keeping the strings around.
fn track(admission: &Admission<FakeRelativeClock>, prefix: &str, count: usize) {
    let mut key = String::with_capacity(32);
    for i in 0..count {
        key.clear();
        write!(key, "{prefix}-{i:08}").expect("writing to a String cannot fail");
        let _ = admission.check(0, &key);
    }
}

fn main() {
    let clock = FakeRelativeClock::default();
    let admission = Admission::new(
        None,
        vec![("records".into(), None)],
        Plans::new(DEFAULT, vec![]),
        KEYS,
        clock.clone(),
    );
    let (baseline, _) = rss_kib();
    report("baseline (empty admission)", baseline, &admission);

    track(&admission, "client", KEYS);
    report("after tracking 1M distinct keys", baseline, &admission);

    // Past the refill time every bucket is full again, plus one period (governor keeps a
    // bucket until it has been full for one period).
    clock.advance(DEFAULT.refill_time() + Duration::from_secs(1));
    admission.reclaim();
    report(
        "after reclaim (clock past refill time)",
        baseline,
        &admission,
    );

    track(&admission, "again", KEYS);
    report("1M new keys after reclaim", baseline, &admission);

    track(&admission, "spray", 3 * KEYS);
    assert!(admission.tracked_keys() <= KEYS);
    report("3M more keys sprayed at the 1M cap", baseline, &admission);
    println!("overflow checks: {}", admission.overflowed());

    clock.advance(DEFAULT.refill_time() + Duration::from_secs(1));
    admission.reclaim();
    report("after second reclaim", baseline, &admission);
}
