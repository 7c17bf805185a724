//! `Idempotency-Key` on bulk NDJSON requests, over real sockets with the embedded emulator:
//! the key scopes per line (`<key>/<position>`, blank lines not counted), each line is
//! replayed, joined or refused as a `/records` request with that key would be, lines that
//! were shed are processed on the retry, and the emulator never sees a record twice
//! (`duplicate_records == 0`).

mod common;
mod redis_support;

use common::{config_toml, redis_replica, route, Harness};
use redis_support::RedisServer;
use serde_json::{json, Value};
use sluicegate::config::{Config, KeyLimit};

const NDJSON: &str = "application/x-ndjson";

const ECHO: &str = r#"
[[emulator.functions]]
name = "echo"
latency = "1ms"
"#;

/// A bulk POST to `/records` with `Idempotency-Key: key`: status and JSON body.
async fn bulk(h: &Harness, key: &str, body: &str) -> (u16, Value) {
    let response = h
        .http
        .post(h.url("/records"))
        .header("content-type", NDJSON)
        .header("idempotency-key", key)
        .body(body.to_owned())
        .send()
        .await
        .expect("answered");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

/// The same, streamed (`Accept: application/x-ndjson`): status and one value per line.
async fn bulk_streamed(h: &Harness, key: &str, body: &str) -> (u16, Vec<Value>) {
    let response = h
        .http
        .post(h.url("/records"))
        .header("content-type", NDJSON)
        .header("accept", NDJSON)
        .header("idempotency-key", key)
        .body(body.to_owned())
        .send()
        .await
        .expect("answered");
    let status = response.status().as_u16();
    let text = response.text().await.expect("the body");
    let lines = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    (status, lines)
}

fn results(body: &Value) -> &[Value] {
    body["results"].as_array().expect("results is a list")
}

fn statuses(entries: &[Value]) -> Vec<u64> {
    entries
        .iter()
        .map(|entry| entry["http_status"].as_u64().expect("a status"))
        .collect()
}

/// Which entries say they are another request's outcome; `"replayed"` is `true` or absent.
fn replayed(entries: &[Value]) -> Vec<bool> {
    entries
        .iter()
        .map(|entry| match &entry["replayed"] {
            Value::Null => false,
            Value::Bool(true) => true,
            other => panic!("\"replayed\": {other} in {entry}"),
        })
        .collect()
}

/// `entry` without `field`.
fn without(entry: &Value, field: &str) -> Value {
    let mut entry = entry.clone();
    entry
        .as_object_mut()
        .expect("an entry is an object")
        .remove(field);
    entry
}

/// An entry without its `"replayed"` field: what the original answer said.
fn unmarked(entry: &Value) -> Value {
    without(entry, "replayed")
}

#[tokio::test]
async fn the_same_bulk_with_the_same_key_is_replayed_line_by_line_with_no_new_record() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    let body = "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n";
    let (status, first) = bulk(&h, "batch-1", body).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(statuses(results(&first)), [200, 200, 200]);
    assert_eq!(replayed(results(&first)), [false, false, false]);
    assert_eq!(h.stats("echo").await["records"], 3);

    let (status, again) = bulk(&h, "batch-1", body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["failed"], 0);
    assert_eq!(replayed(results(&again)), [true, true, true], "{again}");
    for (replay, original) in results(&again).iter().zip(results(&first)) {
        // The rest is the stored answer, the same record id among it.
        assert_eq!(unmarked(replay), *original);
    }
    // On the wire, `"replayed"` comes right after `"http_status"`.
    let text = h
        .http
        .post(h.url("/records"))
        .header("content-type", NDJSON)
        .header("idempotency-key", "batch-1")
        .body(body)
        .send()
        .await
        .expect("answered")
        .text()
        .await
        .expect("the body");
    let first_id = results(&first)[0]["id"].as_str().expect("an id");
    assert!(
        text.starts_with(&format!(
            r#"{{"failed":0,"results":[{{"http_status":200,"replayed":true,"id":"{first_id}","#
        )),
        "{text}"
    );
    let stats = h.stats("echo").await;
    assert_eq!(
        (
            stats["records"].as_u64(),
            stats["duplicate_records"].as_u64()
        ),
        (Some(3), Some(0)),
        "{stats}"
    );
}

#[tokio::test]
async fn a_changed_line_is_refused_422_and_the_others_replayed() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    let (_, first) = bulk(&h, "batch-2", "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n").await;
    assert_eq!(statuses(results(&first)), [200, 200, 200]);
    let (status, again) = bulk(&h, "batch-2", "{\"n\":1}\n{\"n\":20}\n{\"n\":3}\n").await;
    assert_eq!(status, 200);
    let entries = results(&again);
    assert_eq!(statuses(entries), [200, 422, 200], "{again}");
    assert_eq!(again["failed"], 1);
    assert_eq!(replayed(entries), [true, false, true]);
    assert_eq!(
        entries[1],
        json!({"http_status": 422, "error": "idempotency_key_reused",
               "message": "this Idempotency-Key was already used with a different request body; use a new key for a new request"})
    );
    assert_eq!(h.stats("echo").await["records"], 3);
}

#[tokio::test]
async fn lines_shed_by_admission_are_processed_on_the_retry_and_the_rest_replayed() {
    let toml = |burst: u32| {
        let mut config =
            Config::from_toml(&config_toml(ECHO, &route("records", "echo", ""))).expect("valid");
        config.limits.default = KeyLimit {
            rate: 0.01,
            burst,
            quota: None,
        };
        config
    };
    let h = Harness::start_config(toml(3)).await;
    let body = "1\n2\n3\n4\n5\n";
    let (_, first) = bulk(&h, "batch-3", body).await;
    assert_eq!(
        statuses(results(&first)),
        [200, 200, 200, 429, 429],
        "{first}"
    );
    assert_eq!(h.stats("echo").await["records"], 3);
    // Room for the retry's five records (a replayed line spends its token too).
    h.running
        .reload(toml(100))
        .await
        .expect("the reload applies");
    let (_, retry) = bulk(&h, "batch-3", body).await;
    let entries = results(&retry);
    assert_eq!(statuses(entries), [200, 200, 200, 200, 200], "{retry}");
    assert_eq!(replayed(entries), [true, true, true, false, false]);
    assert_eq!(entries[3]["body"], 4);
    assert_eq!(entries[4]["body"], 5);
    let stats = h.stats("echo").await;
    assert_eq!(
        (
            stats["records"].as_u64(),
            stats["duplicate_records"].as_u64()
        ),
        (Some(5), Some(0)),
        "{stats}"
    );
    // All five are stored now.
    let (_, third) = bulk(&h, "batch-3", body).await;
    assert_eq!(replayed(results(&third)), [true; 5]);
    assert_eq!(h.stats("echo").await["records"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_identical_bulks_with_one_key_process_each_record_once() {
    let functions = r#"
[[emulator.functions]]
name = "slow"
latency = "300ms"
"#;
    let h = Harness::start(&config_toml(functions, &route("records", "slow", ""))).await;
    let body = "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n{\"n\":4}\n";
    let ((sa, a), (sb, b)) = tokio::join!(bulk(&h, "twin", body), bulk(&h, "twin", body));
    assert_eq!((sa, sb), (200, 200));
    assert_eq!(statuses(results(&a)), [200; 4], "{a}");
    assert_eq!(statuses(results(&b)), [200; 4], "{b}");
    let (ra, rb) = (replayed(results(&a)), replayed(results(&b)));
    for position in 0..4 {
        assert!(
            ra[position] != rb[position],
            "line {position}: exactly one answer is the joiner's: {a} {b}"
        );
        assert_eq!(
            unmarked(&results(&a)[position]),
            unmarked(&results(&b)[position]),
            "the same record, the same answer"
        );
    }
    let stats = h.stats_when("slow", |s| s["in_flight"] == 0).await;
    assert_eq!(
        (
            stats["records"].as_u64(),
            stats["duplicate_records"].as_u64()
        ),
        (Some(4), Some(0)),
        "{stats}"
    );
}

#[tokio::test]
async fn a_bad_key_is_one_400_naming_the_header_and_nothing_is_processed() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    for bad in ["k".repeat(257), "two words".to_owned()] {
        let (status, body) = bulk(&h, &bad, "1\n2\n").await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"], "bad_request");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("Idempotency-Key")),
            "{body}"
        );
    }
    assert_eq!(h.stats("echo").await["records"], 0);
}

#[tokio::test]
async fn positions_skip_blank_lines_and_an_invalid_line_is_never_stored() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    let (_, first) = bulk(&h, "batch-4", "\"a\"\n{nope\n\"c\"\n").await;
    assert_eq!(statuses(results(&first)), [200, 400, 200]);
    // Blank lines and surrounding whitespace change neither a position nor a record.
    let (_, again) = bulk(&h, "batch-4", "\n  \"a\" \r\n\n\"b\"\n\n\"c\"\n").await;
    let entries = results(&again);
    assert_eq!(statuses(entries), [200, 200, 200], "{again}");
    // The line that was refused at its check is processed now, as a first request.
    assert_eq!(replayed(entries), [true, false, true]);
    assert_eq!(entries[1]["body"], "b");
    assert_eq!(h.stats("echo").await["records"], 3);
    // Line 2 of the bulk is the `/records` request with the key `batch-4/2`.
    let single = h
        .http
        .post(h.url("/records"))
        .header("idempotency-key", "batch-4/2")
        .body("\"c\"")
        .send()
        .await
        .expect("answered");
    assert_eq!(single.status(), 200);
    assert_eq!(single.headers()["idempotent-replayed"], "true");
    let single: Value = single.json().await.expect("JSON");
    assert_eq!(single, without(&results(&first)[2], "http_status"));
    assert_eq!(h.stats("echo").await["records"], 3);
}

#[tokio::test]
async fn a_streamed_bulk_is_replayed_line_by_line_too() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    let body = "{\"n\":1}\n{\"n\":2}\n";
    let (status, first) = bulk_streamed(&h, "stream-1", body).await;
    assert_eq!(status, 200);
    assert_eq!(statuses(&first), [200, 200]);
    assert_eq!(replayed(&first), [false, false]);
    let (_, again) = bulk_streamed(&h, "stream-1", "{\"n\":1}\n{\"n\":9}\n").await;
    assert_eq!(statuses(&again), [200, 422], "{again:?}");
    assert_eq!(replayed(&again), [true, false]);
    assert_eq!(unmarked(&again[0]), first[0]);
    assert_eq!(again[1]["error"], "idempotency_key_reused");
    // A non-streamed resend replays what the streamed request stored.
    let (_, whole) = bulk(&h, "stream-1", body).await;
    assert_eq!(replayed(results(&whole)), [true, true]);
    assert_eq!(h.stats("echo").await["records"], 2);
}

// --- two replicas on Redis ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_on_one_replica_the_others_lines_are_409_then_replayed() {
    let redis = RedisServer::start();
    let functions = "[[emulator.functions]]\nname = \"slow\"\nlatency = \"800ms\"\n";
    let a = Harness::start_config(redis_replica(&redis.url(), functions, None)).await;
    let b = Harness::start_config(redis_replica(&redis.url(), "", Some(a.emulator()))).await;
    let body = "{\"n\":1}\n{\"n\":2}\n";
    let on_a = tokio::spawn({
        let request = a
            .http
            .post(a.url("/records"))
            .header("content-type", NDJSON)
            .header("idempotency-key", "shared-bulk")
            .body(body);
        async move {
            let response = request.send().await.expect("answered");
            response.json::<Value>().await.expect("JSON")
        }
    });
    a.stats_when("slow", |s| s["in_flight"] == 1).await;
    let (status, on_b) = bulk(&b, "shared-bulk", body).await;
    assert_eq!(status, 200);
    let entries = results(&on_b);
    assert_eq!(statuses(entries), [409, 409], "{on_b}");
    assert_eq!(entries[0]["error"], "idempotency_key_in_flight");
    let first = on_a.await.expect("joined");
    assert_eq!(statuses(results(&first)), [200, 200], "{first}");
    // Completed on A: B replays both lines from Redis.
    let (_, again) = bulk(&b, "shared-bulk", body).await;
    assert_eq!(replayed(results(&again)), [true, true], "{again}");
    for (replay, original) in results(&again).iter().zip(results(&first)) {
        assert_eq!(unmarked(replay), *original);
    }
    let stats = a.stats("slow").await;
    assert_eq!(
        (
            stats["records"].as_u64(),
            stats["duplicate_records"].as_u64()
        ),
        (Some(2), Some(0)),
        "{stats}"
    );
}
