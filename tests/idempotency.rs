//! `Idempotency-Key`, black-box over real sockets with the embedded emulator: replay, join,
//! conflict, sheds not stored, a `504`'s record stored for the retry, a proptest that N
//! concurrent duplicates make one invoke, two replicas sharing one real `redis-server`, and
//! the retry storm (clients that retry every `504` / `503` with the same key make the
//! emulator process no record twice: `duplicate_records == 0`).

mod common;
mod redis_support;

use std::time::Duration;

use common::{config_toml, redis_replica, route, Harness};
use redis_support::RedisServer;
use serde_json::Value;
use sluicegate::config::Config;

const ECHO: &str = r#"
[[emulator.functions]]
name = "echo"
latency = "1ms"
"#;

/// One answer: status, whether it is marked replayed, `Retry-After`, body.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    replayed: bool,
    retry_after: Option<String>,
    body: Value,
}

async fn send(h: &Harness, key: Option<&str>, body: &str, timeout_ms: Option<u64>) -> Answer {
    let mut request = h.http.post(h.url("/records")).body(body.to_owned());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    if let Some(ms) = timeout_ms {
        request = request.header("x-sluicegate-timeout-ms", ms.to_string());
    }
    let response = request.send().await.expect("answered");
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().expect("ASCII").to_owned())
    };
    let replayed = match header("idempotent-replayed").as_deref() {
        None => false,
        Some("true") => true,
        Some(other) => panic!("Idempotent-Replayed: {other}"),
    };
    let retry_after = header("retry-after");
    let body = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        replayed,
        retry_after,
        body,
    }
}

#[tokio::test]
async fn a_retry_with_the_same_key_is_replayed_without_a_second_invoke() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    let first = send(&h, Some("order-1"), r#"{"n":1}"#, None).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert!(!first.replayed);
    assert_eq!(first.body["body"], serde_json::json!({"n":1}));
    let again = send(&h, Some("order-1"), r#"{"n":1}"#, None).await;
    assert_eq!(again.status, 200);
    assert!(again.replayed, "a replay says so");
    assert_eq!(
        again.body, first.body,
        "the stored response, same record id"
    );
    let stats = h.stats("echo").await;
    assert_eq!(
        (stats["invocations"].as_u64(), stats["records"].as_u64()),
        (Some(1), Some(1))
    );
    // Without the header nothing is deduplicated.
    assert_eq!(send(&h, None, r#"{"n":1}"#, None).await.status, 200);
    assert_eq!(h.stats("echo").await["records"], 2);
}

#[tokio::test]
async fn two_concurrent_requests_with_one_key_join_one_invoke_and_get_the_same_body() {
    let functions = r#"
[[emulator.functions]]
name = "slow"
latency = "300ms"
"#;
    let h = Harness::start(&config_toml(functions, &route("records", "slow", ""))).await;
    let (a, b) = tokio::join!(
        send(&h, Some("join-1"), r#"{"n":7}"#, None),
        send(&h, Some("join-1"), r#"{"n":7}"#, None)
    );
    assert_eq!((a.status, b.status), (200, 200), "{a:?} {b:?}");
    assert_eq!(a.body, b.body);
    assert_eq!(
        [a.replayed, b.replayed].iter().filter(|r| **r).count(),
        1,
        "the joiner's answer is marked, the leader's is not"
    );
    let stats = h.stats("slow").await;
    assert_eq!(
        (stats["invocations"].as_u64(), stats["records"].as_u64()),
        (Some(1), Some(1))
    );
}

#[tokio::test]
async fn the_same_key_with_another_body_is_422_idempotency_key_reused() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    assert_eq!(send(&h, Some("k"), r#"{"n":1}"#, None).await.status, 200);
    let other = send(&h, Some("k"), r#"{"n":2}"#, None).await;
    assert_eq!(other.status, 422, "{other:?}");
    assert_eq!(other.body["error"], "idempotency_key_reused");
    assert!(
        other.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("Idempotency-Key") && m.contains("different request body")),
        "{other:?}"
    );
    assert_eq!(h.stats("echo").await["records"], 1);
    // The key is scoped per client: another API key may use the same idempotency key.
    let response = h
        .http
        .post(h.url("/records"))
        .header("x-api-key", "someone-else")
        .header("idempotency-key", "k")
        .body(r#"{"n":2}"#)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("idempotent-replayed").is_none());
}

#[tokio::test]
async fn a_key_too_long_or_not_visible_ascii_is_400_naming_the_header() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    let longest = "k".repeat(256);
    assert_eq!(send(&h, Some(&longest), "1", None).await.status, 200);
    for bad in ["k".repeat(257), "two words".to_owned()] {
        let answer = send(&h, Some(&bad), "1", None).await;
        assert_eq!(answer.status, 400, "{answer:?}");
        assert_eq!(answer.body["error"], "bad_request");
        assert!(
            answer.body["message"]
                .as_str()
                .is_some_and(|m| m.contains("Idempotency-Key")),
            "{answer:?}"
        );
    }
    assert_eq!(h.stats("echo").await["records"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_shed_429_is_not_stored_so_the_retry_is_a_real_retry() {
    let functions = r#"
[[emulator.functions]]
name = "slow"
latency = "1s"
"#;
    let routes = route(
        "records",
        "slow",
        r#"batch = { max_records = 1 }
queue = { max_pending = 1 }
invoke = { max_concurrency = 1 }"#,
    );
    let h = Harness::start(&config_toml(functions, &routes)).await;
    // Fillers without a key at once: one runs (1 s), what the queue holds waits, the rest
    // are shed. The first shed proves the queue full, and it stays full until that run
    // ends.
    let (shed_tx, mut shed_rx) = tokio::sync::mpsc::channel::<()>(8);
    let fillers: Vec<_> = (0..8)
        .map(|i| {
            let request = h.http.post(h.url("/records")).body(format!("{i}"));
            let shed_tx = shed_tx.clone();
            tokio::spawn(async move {
                let status = request.send().await.expect("answered").status();
                if status == 429 {
                    let _ = shed_tx.send(()).await;
                }
                status
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(5), shed_rx.recv())
        .await
        .expect("a filler was shed");
    let shed = send(&h, Some("retry-me"), r#"{"n":"keyed"}"#, None).await;
    assert_eq!(shed.status, 429, "{shed:?}");
    assert_eq!(shed.body["scope"], "queue");
    let mut served = 0;
    for filler in fillers {
        served += u64::from(filler.await.expect("joined") == 200);
    }
    let retry = send(&h, Some("retry-me"), r#"{"n":"keyed"}"#, None).await;
    assert_eq!(retry.status, 200, "{retry:?}");
    assert!(
        !retry.replayed,
        "the 429 was not stored: this is a real retry"
    );
    let stats = h.stats("slow").await;
    assert_eq!(stats["records"].as_u64(), Some(served + 1));
    assert_eq!(stats["duplicate_records"], 0);
}

#[tokio::test]
async fn a_504_caller_deadline_then_a_retry_gets_the_stored_200_with_no_second_invoke() {
    let functions = r#"
[[emulator.functions]]
name = "slow"
latency = "600ms"
"#;
    let h = Harness::start(&config_toml(functions, &route("records", "slow", ""))).await;
    let early = send(&h, Some("late-1"), r#"{"n":5}"#, Some(150)).await;
    assert_eq!(early.status, 504, "{early:?}");
    assert_eq!(early.body["error"], "timeout");
    // The function finishes the record after the caller left.
    h.stats_when("slow", |s| s["records"] == 1 && s["in_flight"] == 0)
        .await;
    let retry = send(&h, Some("late-1"), r#"{"n":5}"#, None).await;
    assert_eq!(retry.status, 200, "{retry:?}");
    assert!(retry.replayed);
    assert_eq!(retry.body["body"], serde_json::json!({"n":5}));
    let stats = h.stats("slow").await;
    assert_eq!(
        (stats["invocations"].as_u64(), stats["records"].as_u64()),
        (Some(1), Some(1))
    );
}

#[tokio::test]
async fn an_outcome_that_stays_unknown_is_stored_as_504_outcome_unknown_not_invoked_again() {
    let functions = r#"
[[emulator.functions]]
name = "slow"
latency = "600ms"
"#;
    // The read timeout passes while the function runs: Lambda may have processed the
    // record, and the route does not retry read timeouts (not declared idempotent).
    let config = Config::from_toml_with_env(
        &config_toml(functions, &route("records", "slow", "")),
        "<test>",
        [(
            "SLUICEGATE_LAMBDA__READ_TIMEOUT".to_owned(),
            "200ms".to_owned(),
        )],
    )
    .expect("test config is valid");
    let h = Harness::start_config(config).await;
    let first = send(&h, Some("unknown-1"), r#"{"n":1}"#, None).await;
    assert_eq!(first.status, 504, "{first:?}");
    assert_eq!(first.body["error"], "outcome_unknown");
    let retry = send(&h, Some("unknown-1"), r#"{"n":1}"#, None).await;
    assert_eq!(retry.status, 504, "{retry:?}");
    assert!(
        retry.replayed,
        "the truth is replayed, the record is not invoked again"
    );
    assert_eq!(retry.body, first.body);
    let stats = h.stats_when("slow", |s| s["in_flight"] == 0).await;
    assert_eq!(stats["invocations"], 1, "{stats}");
}

#[tokio::test]
async fn entries_survive_a_reload_in_flight_and_completed() {
    let functions = r#"
[[emulator.functions]]
name = "slow"
latency = "600ms"
"#;
    let toml = |rate: &str| {
        config_toml(
            functions,
            &route(
                "records",
                "slow",
                &format!("limit = {{ rate = {rate}, burst = 1000 }}"),
            ),
        )
    };
    let h = Harness::start(&toml("1000.0")).await;
    let done = send(&h, Some("before"), "1", None).await;
    assert_eq!(done.status, 200);
    let early = send(&h, Some("in-flight"), "2", Some(150)).await;
    assert_eq!(early.status, 504, "{early:?}");
    let config = Config::from_toml(&toml("2000.0")).expect("valid");
    h.running.reload(config).await.expect("the reload applies");
    let replay = send(&h, Some("before"), "1", None).await;
    assert_eq!((replay.status, replay.replayed), (200, true), "{replay:?}");
    assert_eq!(replay.body, done.body);
    // The record in flight across the reload: joined or replayed, never invoked again.
    let retry = send(&h, Some("in-flight"), "2", None).await;
    assert_eq!((retry.status, retry.replayed), (200, true), "{retry:?}");
    let stats = h.stats_when("slow", |s| s["in_flight"] == 0).await;
    assert_eq!(stats["records"], 2, "{stats}");
}

#[test]
fn n_concurrent_duplicates_make_exactly_one_invoke() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config as RunnerConfig, TestRunner};

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let functions = r#"
[[emulator.functions]]
name = "slow"
latency = "50ms"
"#;
    let h = runtime.block_on(Harness::start(&config_toml(
        functions,
        &route("records", "slow", ""),
    )));
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 8,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let case = std::sync::atomic::AtomicU32::new(0);
    runner
        .run(&(2usize..24, 0u64..40), |(n, stagger_ms)| {
            let i = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            runtime.block_on(async {
                let before = h.stats("slow").await["records"].as_u64().unwrap_or(0);
                let key = format!("case-{i}");
                let body = format!(r#"{{"case":{i}}}"#);
                // Spread over up to `stagger_ms`: some join in flight, some replay after.
                let requests = (0..n).map(|j| {
                    let (key, body) = (key.clone(), body.clone());
                    let h = &h;
                    async move {
                        let wait = stagger_ms * j as u64 / n as u64;
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                        send(h, Some(&key), &body, None).await
                    }
                });
                let answers = futures_util::future::join_all(requests).await;
                for a in &answers {
                    prop_assert_eq!(a.status, 200, "{:?}", a);
                    prop_assert_eq!(&a.body, &answers[0].body);
                }
                prop_assert_eq!(answers.iter().filter(|a| !a.replayed).count(), 1);
                let stats = h.stats("slow").await;
                prop_assert_eq!(stats["records"].as_u64(), Some(before + 1));
                prop_assert_eq!(&stats["duplicate_records"], &Value::from(0));
                Ok(())
            })
        })
        .expect("every case makes exactly one invoke");
}

// --- two replicas on one Redis --------------------------------------------------------

async fn two_replicas(redis: &RedisServer, latency: &str) -> (Harness, Harness) {
    let functions = format!("[[emulator.functions]]\nname = \"slow\"\nlatency = \"{latency}\"\n");
    let a = Harness::start_config(redis_replica(&redis.url(), &functions, None)).await;
    let b = Harness::start_config(redis_replica(&redis.url(), "", Some(a.emulator()))).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_on_one_replica_is_replayed_on_the_other() {
    let redis = RedisServer::start();
    let (a, b) = two_replicas(&redis, "1ms").await;
    let first = send(&a, Some("shared-1"), r#"{"n":1}"#, None).await;
    assert_eq!(first.status, 200, "{first:?}");
    let on_b = send(&b, Some("shared-1"), r#"{"n":1}"#, None).await;
    assert_eq!(on_b.status, 200, "{on_b:?}");
    assert!(on_b.replayed);
    assert_eq!(on_b.body, first.body);
    let other_body = send(&b, Some("shared-1"), r#"{"n":2}"#, None).await;
    assert_eq!(other_body.status, 422);
    assert_eq!(other_body.body["error"], "idempotency_key_reused");
    let stats = a.stats("slow").await;
    assert_eq!(
        (stats["invocations"].as_u64(), stats["records"].as_u64()),
        (Some(1), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_on_one_replica_the_other_answers_409_with_retry_after_and_no_invoke() {
    let redis = RedisServer::start();
    let (a, b) = two_replicas(&redis, "800ms").await;
    let on_a = tokio::spawn({
        let request = a
            .http
            .post(a.url("/records"))
            .header("idempotency-key", "shared-2")
            .body(r#"{"n":2}"#);
        async move {
            let response = request.send().await.expect("answered");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("JSON"))
        }
    });
    a.stats_when("slow", |s| s["in_flight"] == 1).await;
    let on_b = send(&b, Some("shared-2"), r#"{"n":2}"#, None).await;
    assert_eq!(on_b.status, 409, "{on_b:?}");
    assert_eq!(on_b.retry_after.as_deref(), Some("1"));
    assert_eq!(on_b.body["error"], "idempotency_key_in_flight");
    let (status, body) = on_a.await.expect("joined");
    assert_eq!(status, 200);
    // Once completed, B replays it.
    let again = send(&b, Some("shared-2"), r#"{"n":2}"#, None).await;
    assert_eq!(again.status, 200, "{again:?}");
    assert!(again.replayed);
    assert_eq!(again.body, body);
    let stats = a.stats("slow").await;
    assert_eq!(
        (stats["invocations"].as_u64(), stats["records"].as_u64()),
        (Some(1), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_a_request_with_a_key_is_refused_503_and_not_invoked() {
    let mut redis = RedisServer::start();
    let (a, _b) = two_replicas(&redis, "1ms").await;
    redis.kill();
    let refused = send(&a, Some("down-1"), "1", None).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.body["error"], "idempotency_unavailable");
    assert_eq!(refused.retry_after.as_deref(), Some("1"));
    assert_eq!(a.stats("slow").await["invocations"], 0);
    // Without a key the request is served (admission falls back to local buckets).
    assert_eq!(send(&a, None, "1", None).await.status, 200);
}

// --- the retry storm ------------------------------------------------------------------

/// A slow, throttling function behind a small queue: callers see `504`s (their deadline is
/// shorter than the function's run), `429`s and `503`s, and retry them all.
fn storm_config() -> String {
    let functions = r#"
[[emulator.functions]]
name = "flaky"
latency = "250ms"
reserved_concurrency = 3
"#;
    let routes = route(
        "records",
        "flaky",
        r#"batch = { max_records = 4 }
queue = { max_pending = 16 }
invoke = { max_concurrency = 5 }"#,
    );
    config_toml(functions, &routes)
}

/// `clients` clients each send `per_client` distinct records, retrying every `504`, `503`,
/// `429` and `409` (after `Retry-After`, capped at 300 ms) up to 40 times; with `keyed`
/// every retry carries the record's own `Idempotency-Key`. Returns the final statuses.
async fn storm(h: &Harness, clients: usize, per_client: usize, keyed: bool) -> Vec<u16> {
    let tasks = (0..clients).map(|c| async move {
        let mut finals = Vec::new();
        for r in 0..per_client {
            let key = format!("storm-{c}-{r}");
            let body = format!(r#"{{"client":{c},"record":{r}}}"#);
            let mut status = 0;
            for attempt in 0..40u64 {
                // Deadlines from 100 ms (shorter than one run) to 700 ms.
                let timeout = 100 + (attempt * 37 + c as u64 * 13 + r as u64 * 7) % 600;
                let answer = send(h, keyed.then_some(key.as_str()), &body, Some(timeout)).await;
                status = answer.status;
                if !matches!(status, 504 | 503 | 429 | 409) {
                    break;
                }
                let wait = answer
                    .retry_after
                    .and_then(|s| s.parse::<u64>().ok())
                    .map_or(50, |s| (s * 1000).min(300));
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            finals.push(status);
        }
        finals
    });
    futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_storm_with_idempotency_keys_processes_no_record_twice() {
    let h = Harness::start(&storm_config()).await;
    let finals = storm(&h, 12, 4, true).await;
    assert!(finals.iter().all(|s| *s == 200), "{finals:?}");
    let stats = h.stats_when("flaky", |s| s["in_flight"] == 0).await;
    assert_eq!(stats["duplicate_records"], 0, "{stats}");
    assert_eq!(
        stats["records"], 48,
        "each record processed exactly once: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_storm_without_keys_processes_records_twice() {
    // The control: the check above has teeth.
    let h = Harness::start(&storm_config()).await;
    storm(&h, 12, 4, false).await;
    let stats = h.stats_when("flaky", |s| s["in_flight"] == 0).await;
    assert!(
        stats["duplicate_records"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_outlives_a_short_ttl_while_its_record_is_still_running() {
    // `ttl` (1 s) is shorter than the function's run (2.5 s): the in-flight claim must still
    // hold when another replica sees the key after the ttl, or that replica would invoke the
    // record a second time.
    let redis = RedisServer::start();
    let functions = "[[emulator.functions]]\nname = \"slow\"\nlatency = \"2500ms\"\n";
    let mut first = redis_replica(&redis.url(), functions, None);
    first.idempotency.ttl = Duration::from_secs(1);
    let a = Harness::start_config(first).await;
    let mut second = redis_replica(&redis.url(), "", Some(a.emulator()));
    second.idempotency.ttl = Duration::from_secs(1);
    let b = Harness::start_config(second).await;
    let on_a = tokio::spawn({
        let request = a
            .http
            .post(a.url("/records"))
            .header("idempotency-key", "long-1")
            .body(r#"{"n":1}"#);
        async move { request.send().await.expect("answered").status().as_u16() }
    });
    a.stats_when("slow", |s| s["in_flight"] == 1).await;
    // Past the ttl, while the record is still running.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let on_b = send(&b, Some("long-1"), r#"{"n":1}"#, None).await;
    assert_eq!(on_b.status, 409, "{on_b:?}");
    assert_eq!(on_a.await.expect("answered"), 200);
    let stats = a.stats("slow").await;
    assert_eq!(
        (stats["invocations"].as_u64(), stats["records"].as_u64()),
        (Some(1), Some(1))
    );
}
