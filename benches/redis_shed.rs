//! Shed-path throughput of the Redis backend against the local engine, in the same run.
//!
//! Run: `cargo bench --bench redis_shed` (needs Debian's `redis-server`; it starts its own on a
//! free loopback port). `SLUICEGATE_BENCH_SECS` sets each measurement's length (default 3).
//! Figures go in BENCHMARKS.md under "Redis backend"; nothing here asserts a speed.
//!
//! Every request is shed: the client key's bucket is empty (`rate = 0.001`, `burst = 1`,
//! drained first), so each decision walks all three layers — global and route admit, the key
//! layer refuses — which in Redis is one script call with three buckets.
//!
//! 1. `Admission::admit` driven by 64 concurrent tasks (and, for Redis, by one task: with one
//!    request in flight at a time every decision is a full round trip; with 64 they share the
//!    multiplexed connection and are pipelined).
//! 2. The whole proxy: 64 concurrent HTTP clients posting to a sluicegate that answers `429`,
//!    local vs Redis. The server and the load generator run on separate runtimes of two
//!    threads each; with `redis-server` that is five busy threads on this machine's two
//!    cores, the same for both backends.

#[path = "../tests/redis_support/mod.rs"]
mod redis_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis_support::RedisServer;
use sluicegate::config::Config;
use sluicegate::limit::{Admission, Plans, Quota, RedisBackend, RedisOptions, TokioClock};
use tokio::time::Instant;

const WIDE: Quota = Quota {
    rate: 1e6,
    burst: 1_000_000,
};
const EMPTY: Quota = Quota {
    rate: 0.001,
    burst: 1,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn admission(backend: Option<RedisBackend>) -> Arc<Admission<TokioClock>> {
    Arc::new(
        Admission::new(
            Some(WIDE),
            vec![("records".into(), Some(WIDE))],
            Plans::new(EMPTY, vec![]),
            1_000_000,
            TokioClock,
        )
        .with_backend(backend),
    )
}

/// Decisions per second with `tasks` tasks calling `admit` back to back for `secs`.
async fn drive_admit(admission: &Arc<Admission<TokioClock>>, tasks: usize, secs: f64) -> f64 {
    // Drains the key's bucket (if an earlier run has not already).
    let _ = admission.admit(0, "k").await;
    per_second(tasks, secs, |stop, count| {
        let admission = Arc::clone(admission);
        async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let refused = admission.admit(0, "k").await;
                assert!(refused.is_err(), "the key bucket stays empty");
                n += 1;
                if n % 64 == 0 {
                    // A ready future never yields; let the other tasks (and the timer) run.
                    tokio::task::yield_now().await;
                }
            }
            count.fetch_add(n, Ordering::Relaxed);
        }
    })
    .await
}

/// Runs `tasks` copies of `work` for `secs`: each counts what it did into its `count` and
/// returns once `stop` is set. Returns the total count per second.
async fn per_second<F, Fut>(tasks: usize, secs: f64, work: F) -> f64
where
    F: Fn(Arc<AtomicBool>, Arc<AtomicU64>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| tokio::spawn(work(Arc::clone(&stop), Arc::clone(&count))))
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        handle.await.expect("task");
    }
    count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn proxy_config(redis: Option<&RedisServer>) -> Config {
    let backend = match redis {
        // A saturated proxy can take longer than the default 50 ms to see a reply; this
        // measures the Redis path, so no call may fall back (a fallback would admit a 200).
        Some(redis) => format!(
            "backend = \"redis\"\nredis_url = \"{}\"\nredis_timeout = \"5s\"",
            redis.url()
        ),
        None => "backend = \"local\"".to_owned(),
    };
    Config::from_toml(&format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[limits]
{backend}
global = {{ rate = 1000000.0, burst = 1000000 }}
default = {{ rate = 0.001, burst = 1 }}

[lambda]
endpoint_url = "http://127.0.0.1:0"

[emulator]
enabled = true
listen = "127.0.0.1:0"
[[emulator.functions]]
name = "echo"
latency = "1ms"

[[routes]]
name = "records"
function = "echo"
limit = {{ rate = 1000000.0, burst = 1000000 }}
"#
    ))
    .expect("bench config is valid")
}

/// `429`s per second from a sluicegate with `config`, under 64 concurrent clients.
fn drive_http(config: Config, secs: f64) -> f64 {
    let server_rt = runtime();
    let running = server_rt
        .block_on(sluicegate::server::start(config))
        .expect("sluicegate starts");
    let url = format!("http://{}/records", running.addr);
    let client_rt = runtime();
    let rate = client_rt.block_on(async {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(128)
            .build()
            .expect("client");
        // Drains the key's bucket (in Redis, the admit runs above already did).
        let first = http
            .post(&url)
            .header("x-api-key", "k")
            .body("1")
            .send()
            .await
            .expect("answered");
        assert!(matches!(first.status().as_u16(), 200 | 429));
        per_second(64, secs, |stop, count| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let response = http
                        .post(&url)
                        .header("x-api-key", "k")
                        .body("1")
                        .send()
                        .await
                        .expect("answered");
                    assert_eq!(response.status(), 429);
                    let _ = response.bytes().await;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await
    });
    server_rt.block_on(running.shutdown());
    rate
}

/// The middle value (figures of one kind from several rounds).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run briefly.
    let full = std::env::args().any(|a| a == "--bench");
    let secs: f64 = std::env::var("SLUICEGATE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if full { 2.0 } else { 0.2 });
    let rounds = if full { 3 } else { 1 };
    let redis = RedisServer::start();
    let rt = runtime();
    let backend = rt.block_on(async {
        let options = RedisOptions {
            // A benchmark measures throughput, not failover: don't fall back on a slow reply.
            timeout: Duration::from_secs(5),
            ..RedisOptions::new(redis.url())
        };
        let backend = RedisBackend::connect(options).await.expect("valid URL");
        assert!(backend.is_up(), "redis-server answers");
        backend
    });
    let local_admission = admission(None);
    let shared_admission = admission(Some(backend.clone()));

    // Local and Redis alternate, round after round, so a burst of load from elsewhere on
    // this shared machine hits both; the table reports medians.
    let (mut local, mut shared, mut serial) = (vec![], vec![], vec![]);
    let (mut http_local, mut http_redis) = (vec![], vec![]);
    for round in 1..=rounds {
        rt.block_on(async {
            local.push(drive_admit(&local_admission, 64, secs).await);
            shared.push(drive_admit(&shared_admission, 64, secs).await);
            serial.push(drive_admit(&shared_admission, 1, secs).await);
        });
        http_local.push(drive_http(proxy_config(None), secs));
        http_redis.push(drive_http(proxy_config(Some(&redis)), secs));
        eprintln!(
            "round {round}: admit local {:.0}/s, redis {:.0}/s (1 task {:.0}/s); \
             HTTP local {:.0}/s, redis {:.0}/s",
            local[round - 1],
            shared[round - 1],
            serial[round - 1],
            http_local[round - 1],
            http_redis[round - 1]
        );
    }
    assert!(backend.is_up(), "no fallback during the run");
    let ratios: Vec<f64> = http_redis
        .iter()
        .zip(&http_local)
        .map(|(r, l)| r / l)
        .collect();
    let (local, shared, serial) = (median(local), median(shared), median(serial));
    let (http_local, http_redis) = (median(http_local), median(http_redis));
    let lowest = ratios.iter().copied().fold(f64::INFINITY, f64::min);

    println!("## Redis backend: shed path, medians of {rounds} rounds of {secs} s\n");
    println!("| what | local | redis | redis / local |");
    println!("|---|---|---|---|");
    println!(
        "| `Admission::admit`, 64 tasks | {local:.0}/s | {shared:.0}/s | {:.3}× |",
        shared / local
    );
    println!(
        "| `Admission::admit`, 1 task (one round trip at a time) | | {serial:.0}/s | 64 tasks: {:.1}× this |",
        shared / serial
    );
    println!(
        "| HTTP `429`s, 64 clients | {http_local:.0}/s | {http_redis:.0}/s | {:.2}× (lowest round {lowest:.2}×) |",
        http_redis / http_local
    );
}
