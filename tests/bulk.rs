//! Bulk records (`Content-Type: application/x-ndjson`) over real sockets against the
//! embedded emulator: per-record checks, admission and outcomes, whole-request bounds,
//! batching, and the counters.

mod common;
mod redis_support;

use common::{config_toml, route, Harness};
use redis_support::RedisServer;
use serde_json::{json, Value};
use sluicegate::config::{BackendErrorPolicy, Config, KeyLimit, LimitBackend};
use sluicegate::units::ByteSize;

const NDJSON: &str = "application/x-ndjson";

const ECHO: &str = r#"
[[emulator.functions]]
name = "echo"
latency = "5ms"
"#;

/// A bulk POST to `/records`: status, headers and JSON body.
async fn bulk(
    h: &Harness,
    content_type: &str,
    body: impl Into<String>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = h
        .http
        .post(h.url("/records"))
        .header("content-type", content_type)
        .body(body.into())
        .send()
        .await
        .expect("answered");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.expect("a JSON body");
    (status, headers, body)
}

fn statuses(body: &Value) -> Vec<u64> {
    body["results"]
        .as_array()
        .expect("results is a list")
        .iter()
        .map(|entry| {
            entry["http_status"]
                .as_u64()
                .expect("every entry has a status")
        })
        .collect()
}

fn config(functions: &str, routes: &str, edit: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config::from_toml(&config_toml(functions, routes)).expect("valid");
    edit(&mut config);
    config
}

#[tokio::test]
async fn each_line_is_checked_on_its_own_and_answered_in_order() {
    let config = config(ECHO, &route("records", "echo", ""), |c| {
        c.server.max_record_bytes = ByteSize(64);
        c.server.max_json_depth = 6;
    });
    let h = Harness::start_config(config).await;
    let too_large = format!(r#"{{"pad":"{}"}}"#, "x".repeat(80));
    let body = format!("{{\"n\":1}}\n{too_large}\n{{nope\n[[[[[[[1]]]]]]]\n{{\"n\":2}}\n");
    let (status, headers, body) = bulk(&h, NDJSON, body).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(statuses(&body), [200, 413, 400, 400, 200], "{body}");
    assert_eq!(body["failed"], 3);
    let results = &body["results"];
    assert_eq!(results[0]["status"], "success");
    assert_eq!(results[0]["body"], json!({"n": 1}));
    assert_eq!(results[4]["body"], json!({"n": 2}));
    assert_ne!(results[0]["id"], results[4]["id"]);
    assert_eq!(
        results[1],
        json!({"http_status": 413, "error": "payload_too_large",
               "message": "record is larger than server.max_record_bytes (64 bytes)"})
    );
    assert_eq!(results[2]["error"], "bad_request");
    assert!(
        results[2]["message"]
            .as_str()
            .expect("a message")
            .contains("not valid JSON"),
        "{body}"
    );
    assert_eq!(results[3]["error"], "bad_request");
    assert!(
        results[3]["message"]
            .as_str()
            .expect("a message")
            .contains("nest"),
        "{body}"
    );
    assert_eq!(
        h.stats("echo").await["records"],
        2,
        "refused lines never reach the function"
    );
}

#[tokio::test]
async fn a_key_with_burst_3_gets_3_records_through_and_the_rest_shed_one_by_one() {
    let config = config(ECHO, &route("records", "echo", ""), |c| {
        c.limits.default = KeyLimit {
            rate: 0.01,
            burst: 3,
            quota: None,
        };
    });
    let h = Harness::start_config(config).await;
    let body: String = (1..=5).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    let (status, headers, body) = bulk(&h, NDJSON, body).await;
    assert_eq!(status, 200);
    // Three tokens, three records: the request itself spends none.
    assert_eq!(statuses(&body), [200, 200, 200, 429, 429], "{body}");
    assert_eq!(body["failed"], 2);
    for shed in &body["results"].as_array().expect("a list")[3..] {
        assert_eq!(shed["error"], "rate_limited");
        assert_eq!(shed["scope"], "key");
        // One token every 100 s.
        let wait = shed["retry_after_ms"].as_u64().expect("a wait");
        assert!((99_000..=100_000).contains(&wait), "{shed}");
    }
    assert_eq!(headers["retry-after"], "100");
    assert_eq!(headers["ratelimit-policy"], "\"key\";q=3;w=300");
    assert_eq!(headers["ratelimit"], "\"key\";r=0;t=100");
    assert_eq!(h.stats("echo").await["records"], 3);
    // The key's bucket is empty: a single record is refused too.
    assert_eq!(h.post("/records", "1").await.status(), 429);
}

#[tokio::test]
async fn an_admitted_bulk_carries_the_key_layers_ratelimit_fields() {
    let config = config(ECHO, &route("records", "echo", ""), |c| {
        c.limits.default = KeyLimit {
            rate: 1.0,
            burst: 10,
            quota: None,
        };
    });
    let h = Harness::start_config(config).await;
    let (status, headers, body) = bulk(&h, NDJSON, "1\n2\n3\n").await;
    assert_eq!(status, 200);
    assert_eq!(statuses(&body), [200, 200, 200]);
    assert_eq!(body["failed"], 0);
    assert!(!headers.contains_key("retry-after"));
    assert_eq!(headers["ratelimit-policy"], "\"key\";q=10;w=10");
    let remaining = headers["ratelimit"].to_str().expect("text");
    assert!(remaining.starts_with("\"key\";r=7;"), "{remaining}");
}

#[tokio::test]
async fn more_records_than_max_bulk_records_is_one_413() {
    let config = config(ECHO, &route("records", "echo", ""), |c| {
        c.server.max_bulk_records = 3;
    });
    let h = Harness::start_config(config).await;
    let (status, _, body) = bulk(&h, NDJSON, "1\n2\n3\n").await;
    assert_eq!((status, body["failed"].as_u64()), (200, Some(0)));
    let (status, _, body) = bulk(&h, NDJSON, "1\n2\n\n3\n4\n").await;
    assert_eq!(status, 413);
    assert_eq!(
        body,
        json!({"error": "payload_too_large",
               "message": "the body holds more than server.max_bulk_records (3) records"})
    );
    assert_eq!(
        h.stats("echo").await["records"],
        3,
        "none of the 413's records"
    );
}

#[tokio::test]
async fn a_body_over_max_bulk_bytes_is_one_413() {
    let config = config(ECHO, &route("records", "echo", ""), |c| {
        c.server.max_bulk_bytes = ByteSize(100);
    });
    let h = Harness::start_config(config).await;
    let body: String = (0..30).map(|i| format!("{i}\n")).collect();
    assert!(body.len() > 70 && body.len() <= 100, "{}", body.len());
    let (status, _, _) = bulk(&h, NDJSON, body.clone()).await;
    assert_eq!(status, 200);
    let (status, _, answer) = bulk(&h, NDJSON, body.repeat(2)).await;
    assert_eq!(status, 413);
    assert_eq!(
        answer,
        json!({"error": "payload_too_large",
               "message": "the body is larger than server.max_bulk_bytes (100 bytes)"})
    );
    assert_eq!(h.stats("echo").await["records"], 30);
}

#[tokio::test]
async fn blank_lines_are_skipped_and_crlf_is_accepted() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    let (status, _, body) = bulk(&h, NDJSON, "\n{\"a\":1}\r\n\r\n   \n[2]\n\n").await;
    assert_eq!(status, 200);
    assert_eq!(statuses(&body), [200, 200]);
    assert_eq!(body["results"][0]["body"], json!({"a": 1}));
    assert_eq!(body["results"][1]["body"], json!([2]));
    let (status, _, body) = bulk(&h, NDJSON, "\n \r\n").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "bad_request");
}

#[tokio::test]
async fn records_join_batches_and_each_entry_is_its_own_records_result() {
    let routes = route(
        "records",
        "echo",
        r#"batch = { max_records = 25, max_wait = "100ms", flush = "window" }"#,
    );
    let h = Harness::start(&config_toml(ECHO, &routes)).await;
    let body: String = (0..100).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    let (status, _, body) = bulk(&h, NDJSON, body).await;
    assert_eq!(status, 200);
    assert_eq!(body["failed"], 0);
    let results = body["results"].as_array().expect("a list");
    assert_eq!(results.len(), 100);
    for (i, entry) in results.iter().enumerate() {
        assert_eq!(entry["http_status"], 200);
        assert_eq!(entry["body"], json!({"i": i}), "entry {i}");
    }
    let stats = h.stats("echo").await;
    assert_eq!(stats["records"], 100);
    assert_eq!(stats["invocations"], 4, "100 records in batches of 25");
}

#[tokio::test]
async fn a_record_whose_batch_hits_a_function_error_gets_its_own_502() {
    let functions = r#"
[[emulator.functions]]
name = "crashy"
handler = "poison"
failure = "crash"
latency = "5ms"
"#;
    // Bisecting (the default) isolates the poison record; the others are sent again.
    let routes = route(
        "records",
        "crashy",
        r#"batch = { max_records = 10, max_wait = "100ms", flush = "window" }"#,
    );
    let h = Harness::start(&config_toml(functions, &routes)).await;
    let body = "{\"n\":1}\n{\"poison\":true}\n{\"n\":2}\n";
    let (status, _, body) = bulk(&h, NDJSON, body).await;
    assert_eq!(status, 200);
    assert_eq!(statuses(&body), [200, 502, 200], "{body}");
    assert_eq!(body["failed"], 1);
    let failed = &body["results"][1];
    assert_eq!(failed["error"], "function_error");
    assert_eq!(failed["kind"], "Unhandled");
    assert!(
        failed["message"]
            .as_str()
            .expect("a message")
            .contains("poison"),
        "{failed}"
    );
    assert_eq!(body["results"][2]["body"], json!({"n": 2}));
}

#[tokio::test]
async fn a_record_past_the_deadline_gets_its_own_504() {
    let functions = r#"
[[emulator.functions]]
name = "slow"
latency = "600ms"
"#;
    let h = Harness::start(&config_toml(functions, &route("records", "slow", ""))).await;
    let response = h
        .http
        .post(h.url("/records"))
        .header("content-type", NDJSON)
        .header("x-sluicegate-timeout-ms", "150")
        .body("1\n2\n")
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(statuses(&body), [504, 504]);
    assert_eq!(body["failed"], 2);
    for entry in body["results"].as_array().expect("a list") {
        assert_eq!(entry["error"], "timeout", "{entry}");
    }
}

#[tokio::test]
async fn a_charset_other_than_utf8_is_415_and_utf8_is_served() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    let (status, _, body) = bulk(&h, "application/x-ndjson; charset=latin1", "1\n").await;
    assert_eq!(status, 415);
    assert_eq!(body["error"], "unsupported_media_type");
    assert!(
        body["message"]
            .as_str()
            .expect("a message")
            .contains("charset=latin1"),
        "{body}"
    );
    let (status, _, body) = bulk(&h, "application/x-ndjson; charset=UTF-8", "1\n").await;
    assert_eq!((status, statuses(&body)), (200, vec![200]));
    assert_eq!(h.stats("echo").await["records"], 1);
}

#[tokio::test]
async fn bulk_records_are_counted_one_by_one() {
    // The route name is unique to this test: the recorder is process-wide.
    let config = config(ECHO, &route("bulk-metrics", "echo", ""), |c| {
        c.limits.default = KeyLimit {
            rate: 0.01,
            burst: 2,
            quota: None,
        };
    });
    let h = Harness::start_config(config).await;
    let response = h
        .http
        .post(h.url("/bulk-metrics"))
        .header("content-type", NDJSON)
        .body("1\n2\n{nope\n3\n")
        .send()
        .await
        .expect("answered");
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(statuses(&body), [200, 200, 400, 429]);
    let metrics = h
        .http
        .get(format!("http://{}/metrics", h.running.admin_addr))
        .send()
        .await
        .expect("metrics answered")
        .text()
        .await
        .expect("text");
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} in\n{metrics}"))
    };
    let requests = |status: &str, scope: &str| {
        value(&format!(
            "sluicegate_requests_total{{route=\"bulk-metrics\",status=\"{status}\",scope=\"{scope}\"}}"
        ))
    };
    assert_eq!(requests("200", "none"), 2.0);
    assert_eq!(requests("400", "none"), 1.0);
    assert_eq!(requests("429", "key"), 1.0);
    assert_eq!(
        value("sluicegate_bulk_requests_total{route=\"bulk-metrics\",status=\"200\"}"),
        1.0
    );
    assert_eq!(
        value("sluicegate_bulk_records_total{route=\"bulk-metrics\"}"),
        4.0
    );
}

#[tokio::test]
async fn accept_ndjson_streams_one_line_per_record_in_input_order_as_they_complete() {
    // One record per invoke, one invoke at a time, 250 ms each: the records are answered
    // 250 ms apart, so a streamed answer's first line arrives well before its last.
    let functions = r#"
[[emulator.functions]]
name = "slow"
latency = "250ms"
"#;
    let routes = route(
        "records",
        "slow",
        "batch = { max_records = 1 }\ninvoke = { rate = 100.0, burst = 100, max_concurrency = 1 }",
    );
    let h = Harness::start(&config_toml(functions, &routes)).await;
    let mut response = h
        .http
        .post(h.url("/records"))
        .header("content-type", NDJSON)
        .header("accept", NDJSON)
        .body("{\"n\":1}\n{nope\n{\"n\":2}\n{\"n\":3}\n")
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], NDJSON);
    let mut text = String::new();
    let mut first_line_at = None;
    while let Some(chunk) =
        tokio::time::timeout(std::time::Duration::from_secs(10), response.chunk())
            .await
            .expect("the stream ends in time")
            .expect("the body reads")
    {
        text.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        if first_line_at.is_none() && text.contains('\n') {
            first_line_at = Some(tokio::time::Instant::now());
        }
    }
    let gap = first_line_at.expect("at least one line").elapsed();
    assert!(
        gap >= std::time::Duration::from_millis(400),
        "the last records were answered {gap:?} after the first line: not streamed"
    );
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(text.ends_with('\n'));
    let statuses: Vec<u64> = lines
        .iter()
        .map(|l| l["http_status"].as_u64().expect("a status"))
        .collect();
    assert_eq!(statuses, [200, 400, 200, 200]);
    assert_eq!(lines[0]["body"], json!({"n": 1}));
    assert_eq!(lines[1]["error"], "bad_request");
    assert_eq!(lines[2]["body"], json!({"n": 2}));
    assert_eq!(lines[3]["body"], json!({"n": 3}));
}

#[tokio::test]
async fn a_streamed_answer_carries_the_admission_sheds_retry_after() {
    let config = config(ECHO, &route("records", "echo", ""), |c| {
        c.limits.default = KeyLimit {
            rate: 0.01,
            burst: 1,
            quota: None,
        };
    });
    let h = Harness::start_config(config).await;
    let response = h
        .http
        .post(h.url("/records"))
        .header("content-type", NDJSON)
        .header("accept", "application/json;q=0.5, application/x-ndjson")
        .body("1\n2\n")
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["retry-after"], "100");
    assert_eq!(response.headers()["ratelimit"], "\"key\";r=0;t=100");
    let text = response.text().await.expect("the body");
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON"))
        .collect();
    assert_eq!(lines[0]["http_status"], 200);
    assert_eq!(lines[1]["http_status"], 429);
    assert_eq!(lines[1]["scope"], "key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_each_record_spends_a_token_of_the_shared_bucket() {
    let redis = RedisServer::start();
    let shared = |c: &mut Config| {
        c.limits.backend = LimitBackend::Redis;
        c.limits.redis_url = redis.url();
        // A slow Redis must not fall back to local buckets mid-test.
        c.limits.redis_timeout = std::time::Duration::from_secs(2);
        c.limits.on_backend_error = BackendErrorPolicy::Deny;
        c.limits.default = KeyLimit {
            rate: 0.01,
            burst: 3,
            quota: None,
        };
    };
    let a = Harness::start_config(config(ECHO, &route("records", "echo", ""), shared)).await;
    let b = Harness::start_config(config(ECHO, &route("records", "echo", ""), shared)).await;
    let (status, headers, body) = bulk(&a, NDJSON, "1\n2\n").await;
    assert_eq!((status, statuses(&body)), (200, vec![200, 200]));
    assert!(!headers.contains_key("retry-after"));
    // The other replica sees the one token left, then sheds the rest record by record.
    let (status, headers, body) = bulk(&b, NDJSON, "3\n4\n5\n").await;
    assert_eq!(
        (status, statuses(&body)),
        (200, vec![200, 429, 429]),
        "{body}"
    );
    assert_eq!(body["results"][1]["scope"], "key");
    assert_eq!(headers["retry-after"], "100");
    assert_eq!(
        a.stats("echo").await["records"].as_u64().unwrap_or(0)
            + b.stats("echo").await["records"].as_u64().unwrap_or(0),
        3
    );
}
