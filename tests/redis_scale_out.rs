//! Scale-out through Redis, black-box: three sluicegate replicas (in-process, each with its
//! own listeners) share one `redis-server` that each test starts on a free port.
//!
//! - a simultaneous burst through all three replicas admits one bucket's worth, not three;
//! - a shared invoke quota holds every replica's invoke attempts together to one bucket's
//!   bound, not three;
//! - killing Redis mid-run leaves every request answered (fallback), and the shared limits
//!   return when Redis restarts on the same port.
//!
//! Assertions are bounds that hold by construction (a bucket's `burst + rate × elapsed`,
//! with `elapsed` measured around the load), not throughput: the throttle rate and latency
//! figures of the shared quota are measured by `cargo bench --bench redis_invoke_quota`
//! (BENCHMARKS.md). The tests run one at a time (they share two cores with three servers
//! each).

mod common;
mod redis_support;

use std::net::SocketAddr;
use std::time::Duration;

use common::{paced_load, Answer, Harness};
use redis_support::RedisServer;
use serde_json::Value;
use sluicegate::config::Config;
use tokio::time::Instant;

/// One heavy test at a time: timing bounds assume the machine is not running two of them.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A replica's config. `lambda`: `None` embeds the emulator with `functions`; `Some(addr)`
/// sends invokes to that (another replica's) emulator instead.
fn replica(redis: &RedisServer, limits: &str, lambda: Option<SocketAddr>, rest: &str) -> Config {
    let (emulator, endpoint) = match lambda {
        None => (
            "enabled = true",
            "[lambda]\nendpoint_url = \"http://127.0.0.1:0\"\n".to_owned(),
        ),
        Some(addr) => (
            "enabled = false",
            format!("[lambda]\nendpoint_url = \"http://{addr}\"\n"),
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
{limits}

{endpoint}

[emulator]
{emulator}
listen = "127.0.0.1:0"

{rest}
"#,
        url = redis.url()
    );
    Config::from_toml(&toml).expect("test config is valid")
}

const ECHO: &str = r#"
[[emulator.functions]]
name = "echo"
latency = "1ms"

[[routes]]
name = "records"
function = "echo"
batch = { max_records = 50, max_wait = "5ms" }
invoke = { rate = 10000.0, burst = 10000, max_concurrency = 50 }
"#;

async fn three(configs: impl Fn() -> Config) -> Vec<Harness> {
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Harness::start_config(configs()).await);
    }
    replicas
}

/// `n` requests for `key` through each replica, all at once; the answers in one list.
async fn burst(replicas: &[Harness], key: &str, n: usize) -> (Vec<(u16, Value)>, Duration) {
    let started = Instant::now();
    let requests = replicas.iter().flat_map(|h| {
        (0..n).map(move |i| {
            let request = h
                .http
                .post(h.url("/records"))
                .header("x-api-key", key)
                .body(format!("{i}"));
            async move {
                let response = request.send().await.expect("answered");
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                (status, body)
            }
        })
    });
    let answers = futures_util::future::join_all(requests).await;
    (answers, started.elapsed())
}

fn admitted(answers: &[(u16, Value)]) -> usize {
    answers.iter().filter(|(s, _)| *s == 200).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_admit_one_shared_burst_not_three() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let (rate, size) = (10.0, 20);
    let limits = format!(
        "redis_timeout = \"2s\"\nglobal = {{ rate = 100000.0, burst = 100000 }}\n\
         default = {{ rate = {rate}, burst = {size} }}"
    );
    let replicas = three(|| replica(&redis, &limits, None, ECHO)).await;

    let (answers, elapsed) = burst(&replicas, "shared-key", 60).await;
    let admitted = admitted(&answers) as f64;
    let bound = f64::from(size) + rate * elapsed.as_secs_f64() + 2.0;
    eprintln!("3 × 60 at once: {admitted} admitted in {elapsed:?} (bound {bound:.1})");
    assert!(
        admitted >= f64::from(size) && admitted <= bound,
        "admitted {admitted} of 180 in {elapsed:?}: expected {size} + {rate}/s × window, \
         not 3 × {size}"
    );
    for (status, body) in &answers {
        match status {
            200 => {}
            429 => {
                assert_eq!(body["scope"], "key");
                let ms = body["retry_after_ms"].as_u64().expect("retry_after_ms");
                assert!(
                    (1..=100).contains(&ms),
                    "one token at 10/s is at most 100 ms away: {ms}"
                );
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }

    // Headers come from Redis' state: after the burst, one replica's admitted response
    // reports the shared bucket (nearly empty), not its own full one. The bucket is empty
    // now, so the probe waits as long as each refusal says (never early), a bounded number
    // of times.
    let mut response = None;
    for _ in 0..20 {
        let probe = replicas[2]
            .http
            .post(replicas[2].url("/records"))
            .header("x-api-key", "shared-key")
            .body("1")
            .send()
            .await
            .expect("answered");
        if probe.status() != 429 {
            response = Some(probe);
            break;
        }
        let body: Value = probe.json().await.expect("a 429 body");
        let wait = body["retry_after_ms"].as_u64().expect("retry_after_ms");
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    let response = response.expect("a token came back within 20 waits");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["ratelimit-policy"], "\"key\";q=20;w=2");
    // A bucket of its own would have 19 left; the shared one has refilled only for as long
    // as the burst took.
    let field = response.headers()["ratelimit"].to_str().unwrap().to_owned();
    let remaining: u32 = field
        .strip_prefix("\"key\";r=")
        .and_then(|rest| rest.split(';').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("RateLimit field {field}"));
    assert!(remaining < 10, "{field}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_invoke_quota_bounds_the_attempts_of_all_replicas_together() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    // Lambda: 10 invokes/s for the account. Each replica is configured just under it — so
    // without sharing, three would send ~28.5/s.
    let functions = r#"
[[emulator.functions]]
name = "quota"
latency = "20ms"
invoke_rate = 10.0
"#;
    let route = r#"
[[routes]]
name = "records"
function = "quota"
batch = { max_records = 10, max_wait = "50ms" }
queue = { max_pending = 50 }
invoke = { rate = 9.5, burst = 5, max_concurrency = 4 }
request_timeout = "5s"
"#;
    let limits = "redis_timeout = \"2s\"\nglobal = { rate = 100000.0, burst = 100000 }\n\
                  default = { rate = 100000.0, burst = 100000 }";
    let first = Harness::start_config(replica(
        &redis,
        limits,
        None,
        &format!("{functions}{route}"),
    ))
    .await;
    let lambda = first.emulator();
    let mut replicas = vec![first];
    for _ in 0..2 {
        replicas.push(Harness::start_config(replica(&redis, limits, Some(lambda), route)).await);
    }

    // Each replica is offered 100 records/s for 4 s: 3× what the shared quota delivers.
    let seconds = 4.0;
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
                    Duration::from_secs_f64(seconds),
                )
                .await
            })
        })
        .collect();
    let mut answers: Vec<Answer> = Vec::new();
    for load in loads {
        answers.extend(load.await.expect("load task"));
    }
    let elapsed = started.elapsed();
    let stats = replicas[0].stats("quota").await;
    let invocations = stats["invocations"].as_u64().expect("invocations");
    let throttles = stats["throttles"]["CallerRateLimitExceeded"]
        .as_u64()
        .expect("throttle count");
    let ok = answers.iter().filter(|a| a.status == 200).count();
    eprintln!(
        "3 replicas: {invocations} invokes, {throttles} throttled, {ok} records delivered of {} \
         in {elapsed:?}",
        answers.len()
    );
    // Together the replicas' attempts — accepted or throttled, each took a token from the
    // shared bucket (burst 5, 9.5/s) — stayed within one bucket's bound, where three
    // unshared replicas would have sent up to 3 × 9.5/s.
    let attempts = invocations + throttles;
    let bound = 5.0 + 9.5 * elapsed.as_secs_f64() + 2.0;
    assert!(
        (attempts as f64) <= bound,
        "{attempts} invoke attempts in {elapsed:?} > {bound:.1}"
    );
    assert!(
        invocations >= 5,
        "the load reached Lambda: {invocations} invokes"
    );
    // Overload is shed (429), never failed: queues are short enough for the deadline.
    assert!(
        answers.iter().all(|a| a.status == 200 || a.status == 429),
        "every record delivered or shed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_redis_mid_run_answers_every_request_and_shared_limits_return() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let port = redis.port();
    let (rate, size) = (10.0, 20);
    let limits = format!(
        "redis_timeout = \"500ms\"\non_backend_error = \"local\"\n\
         global = {{ rate = 100000.0, burst = 100000 }}\n\
         default = {{ rate = {rate}, burst = {size} }}"
    );
    let replicas = three(|| replica(&redis, &limits, None, ECHO)).await;

    // 60 requests/s through each replica for 5 s (all on the anonymous key, so mostly shed);
    // Redis is killed after 1.5 s and restarted on the same port 2 s later.
    let loads: Vec<_> = replicas
        .iter()
        .map(|h| {
            let (http, url) = (h.http.clone(), h.url("/records"));
            tokio::spawn(
                async move { paced_load(&http, &url, "1", 60.0, Duration::from_secs(5)).await },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let redis = tokio::task::spawn_blocking(move || RedisServer::start_on(port))
        .await
        .expect("restart");
    let mut answers: Vec<Answer> = Vec::new();
    for load in loads {
        answers.extend(load.await.expect("load task"));
    }
    let slowest = answers.iter().map(|a| a.latency).max().unwrap_or_default();
    let count = |f: &dyn Fn(u16) -> bool| answers.iter().filter(|a| f(a.status)).count();
    eprintln!(
        "kill/restart: {} answers, {} admitted, {} shed, {} other; slowest {slowest:?}",
        answers.len(),
        count(&|s| s == 200),
        count(&|s| s == 429),
        count(&|s| s != 200 && s != 429)
    );
    assert!(answers.len() >= 3 * 290, "every request was answered");
    // No answer is an error, a 5xx or a 504: none waited out its deadline on Redis.
    assert_eq!(count(&|s| s != 200 && s != 429), 0, "no errors, no 5xx");

    // Each replica finds Redis again: its requests write their key buckets there.
    let mut conn = ::redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis answers");
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, h) in replicas.iter().enumerate() {
        let key = format!("back-{i}");
        loop {
            let response = h
                .http
                .post(h.url("/records"))
                .header("x-api-key", &key)
                .body("1")
                .send()
                .await
                .expect("answered");
            assert_eq!(response.status(), 200);
            let found: Vec<String> = ::redis::cmd("KEYS")
                .arg(format!("sluicegate:v1:k:*:{{{key}}}"))
                .query_async(&mut conn)
                .await
                .expect("KEYS");
            if !found.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} never came back to Redis"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Shared again: one burst through all three admits one bucket's worth.
    let (answers, elapsed) = burst(&replicas, "after-restart", 40).await;
    let admitted = admitted(&answers) as f64;
    let bound = f64::from(size) + rate * elapsed.as_secs_f64() + 2.0;
    eprintln!("after restart: {admitted} of 120 admitted in {elapsed:?} (bound {bound:.1})");
    assert!(
        admitted >= f64::from(size) && admitted <= bound,
        "admitted {admitted} in {elapsed:?}: the shared limit did not return"
    );
}

#[test]
fn redis_settings_have_defaults_and_bad_values_name_their_key() {
    let toml = |limits: &str| {
        format!(
            "[limits]\nbackend = \"redis\"\n{limits}\n\
             [[routes]]\nname = \"records\"\nfunction = \"f\"\n"
        )
    };
    let config = Config::from_toml(&toml("")).expect("defaults are valid");
    assert_eq!(config.limits.redis_timeout, Duration::from_millis(50));
    assert_eq!(config.limits.redis_url, "redis://127.0.0.1:6379");
    for (limits, key) in [
        ("redis_timeout = \"0ms\"", "limits.redis_timeout"),
        ("redis_timeout = \"1m\"", "limits.redis_timeout"),
        ("redis_url = \"http://nope\"", "limits.redis_url"),
    ] {
        let err = Config::from_toml(&toml(limits))
            .expect_err(limits)
            .to_string();
        assert!(err.contains(key), "{limits}: {err}");
    }
}
