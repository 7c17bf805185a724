//! How well a shared invoke quota keeps Lambda's throttles away: three sluicegate replicas
//! (in-process) share one function's invoke-rate bucket in Redis, in front of one emulated
//! function whose account quota is 10 invokes/s, each replica configured just under it
//! (9.5/s) — so without sharing the three would send ~28.5/s.
//!
//! Run: `cargo bench --bench redis_invoke_quota` (needs Debian's `redis-server`; it starts its
//! own on a free loopback port). `SLUICEGATE_BENCH_SECS` sets the load's length (default 10).
//! Each replica is offered 100 records/s (3× what the quota delivers). Figures go in
//! BENCHMARKS.md under "Redis backend"; nothing here asserts them. The property that holds by
//! construction — all replicas' attempts together stay within one bucket — is asserted in
//! `tests/redis_scale_out.rs`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/redis_support/mod.rs"]
mod redis_support;

use std::time::Duration;

use common::{paced_load, quantile, Harness};
use redis_support::RedisServer;
use sluicegate::config::Config;
use tokio::time::Instant;

const FUNCTIONS: &str = r#"
[[emulator.functions]]
name = "quota"
latency = "20ms"
invoke_rate = 10.0
"#;

const ROUTE: &str = r#"
[[routes]]
name = "records"
function = "quota"
batch = { max_records = 10, max_wait = "50ms" }
queue = { max_pending = 50 }
invoke = { rate = 9.5, burst = 5, max_concurrency = 4 }
request_timeout = "5s"
"#;

/// A replica sharing `redis`; `lambda` is another replica's emulator, or `None` to embed it.
fn replica(redis: &RedisServer, lambda: Option<std::net::SocketAddr>) -> Config {
    let (emulator, endpoint, rest) = match lambda {
        None => (
            "enabled = true",
            "http://127.0.0.1:0".to_owned(),
            format!("{FUNCTIONS}{ROUTE}"),
        ),
        Some(addr) => (
            "enabled = false",
            format!("http://{addr}"),
            ROUTE.to_owned(),
        ),
    };
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[limits]
backend = "redis"
redis_url = "{url}"
redis_timeout = "2s"
global = {{ rate = 100000.0, burst = 100000 }}
default = {{ rate = 100000.0, burst = 100000 }}

[lambda]
endpoint_url = "{endpoint}"

[emulator]
{emulator}
listen = "127.0.0.1:0"

{rest}
"#,
        url = redis.url()
    );
    Config::from_toml(&toml).expect("bench config is valid")
}

fn main() {
    let secs: f64 = std::env::var("SLUICEGATE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let redis = RedisServer::start();
        let first = Harness::start_config(replica(&redis, None)).await;
        let lambda = first.emulator();
        let mut replicas = vec![first];
        for _ in 0..2 {
            replicas.push(Harness::start_config(replica(&redis, Some(lambda))).await);
        }
        let started = Instant::now();
        let loads: Vec<_> = replicas
            .iter()
            .map(|h| {
                let (http, url) = (h.http.clone(), h.url("/records"));
                tokio::spawn(async move {
                    paced_load(
                        &http,
                        &url,
                        r#"{"n":1}"#,
                        100.0,
                        Duration::from_secs_f64(secs),
                    )
                    .await
                })
            })
            .collect();
        let mut answers = Vec::new();
        for load in loads {
            answers.extend(load.await.expect("load task"));
        }
        let elapsed = started.elapsed();
        let stats = replicas[0].stats("quota").await;
        let invocations = stats["invocations"].as_u64().unwrap_or(0);
        let records = stats["records"].as_u64().unwrap_or(0);
        let throttles = stats["throttles"]["CallerRateLimitExceeded"]
            .as_u64()
            .unwrap_or(0);
        let count = |status: u16| answers.iter().filter(|a| a.status == status).count();
        let ok: Vec<Duration> = answers
            .iter()
            .filter(|a| a.status == 200)
            .map(|a| a.latency)
            .collect();
        println!(
            "3 replicas × 100 records/s for {secs} s ({elapsed:.1?}): {invocations} invokes \
             ({:.2}/s of the 10/s quota), {throttles} throttled ({:.2} % of attempts), \
             {records} records delivered ({:.1}/s); answers: {} × 200 (p50 {:?}, p99 {:?}), \
             {} × 429, {} other",
            invocations as f64 / elapsed.as_secs_f64(),
            100.0 * throttles as f64 / (invocations + throttles).max(1) as f64,
            records as f64 / elapsed.as_secs_f64(),
            ok.len(),
            quantile(&ok, 0.5),
            quantile(&ok, 0.99),
            count(429),
            answers.len() - ok.len() - count(429),
        );
    });
}
