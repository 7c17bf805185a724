//! Cost of one `Admission::check` (global → route → key) with the production clock.
//!
//! Run: `cargo bench --bench admission` (add `-- --quick` for a short run). Figures go in
//! BENCHMARKS.md; nothing here asserts a speed.
//!
//! Quotas are large so every check is admitted and does the full three-layer walk.

use std::hint::black_box;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use governor::clock::{Clock, QuantaClock};
use sluicegate::limit::{Admission, Plans, Quota, TokioClock};

const WIDE_OPEN: Quota = Quota {
    rate: 1e9,
    burst: u32::MAX,
};

fn admission(max_keys: usize) -> Admission<TokioClock> {
    Admission::new(
        Some(WIDE_OPEN),
        vec![("records".into(), Some(WIDE_OPEN))],
        Plans::new(WIDE_OPEN, vec![]),
        max_keys,
        TokioClock,
    )
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("client-key-{i:08}")).collect()
}

/// Single thread, cycling through `n` distinct keys that are all already tracked.
fn single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("check");
    group.throughput(Throughput::Elements(1));
    for n in [1usize, 10_000, 1_000_000] {
        let keys = keys(n);
        let admission = admission(2 * n);
        for key in &keys {
            admission.check(0, key).expect("wide open");
        }
        let mut i = 0;
        group.bench_with_input(BenchmarkId::new("keys", n), &keys, |b, keys| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(admission.check(0, black_box(&keys[i])))
            })
        });
    }
    group.finish();
}

/// Two threads (this machine has two cores) checking at once: each thread does `iters`
/// checks and the reported time is the wall time per check *per thread*.
fn contended(c: &mut Criterion) {
    let mut group = c.benchmark_group("check_2_threads");
    group.throughput(Throughput::Elements(2));
    for (name, n) in [("same_key", 1usize), ("keys_10k", 10_000)] {
        let keys = Arc::new(keys(n));
        let admission = Arc::new(admission(2 * n));
        for key in keys.iter() {
            admission.check(0, key).expect("wide open");
        }
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                // Wall time on purpose: criterion wants the real time two OS threads took,
                // and no tokio runtime (paused or not) is involved.
                #[allow(clippy::disallowed_methods)]
                let start = Instant::now();
                let threads: Vec<_> = (0..2)
                    .map(|t| {
                        let (admission, keys) = (Arc::clone(&admission), Arc::clone(&keys));
                        thread::spawn(move || {
                            for i in 0..iters as usize {
                                let key = &keys[(i * 2 + t) % keys.len()];
                                let _ = black_box(admission.check(0, black_box(key)));
                            }
                        })
                    })
                    .collect();
                for t in threads {
                    t.join().expect("bench thread panicked");
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

/// What the clock costs: a check reads it twice per layer (ours, then governor's).
/// `TokioClock` is the default so `tokio::time::pause()` drives admission; governor's
/// TSC-based `QuantaClock` is the faster alternative.
fn clocks(c: &mut Criterion) {
    let mut group = c.benchmark_group("clock");
    group.bench_function("tokio_now", |b| b.iter(|| black_box(TokioClock.now())));
    let quanta = QuantaClock::default();
    group.bench_function("quanta_now", |b| b.iter(|| black_box(quanta.now())));
    let admission = Admission::new(
        Some(WIDE_OPEN),
        vec![("records".into(), Some(WIDE_OPEN))],
        Plans::new(WIDE_OPEN, vec![]),
        2,
        quanta,
    );
    group.bench_function("check_1_key_with_quanta_clock", |b| {
        b.iter(|| black_box(admission.check(0, black_box("client-key"))))
    });
    group.finish();
}

/// Every benchmark here, with a short warm-up and measurement. Written out rather than with
/// `criterion_group!` (which expands to exactly this) because that macro's `pub fn` cannot
/// carry a doc comment.
fn benches() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    single_thread(&mut criterion);
    contended(&mut criterion);
    clocks(&mut criterion);
}
criterion_main!(benches);
