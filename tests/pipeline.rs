//! The core pipeline, black-box over real sockets: HTTP → admission → batcher →
//! aws-sdk-lambda → embedded emulator → each caller's own result.

mod common;

use std::time::Duration;

use common::{config_toml, route, Harness};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ECHO: &str = r#"
[[emulator.functions]]
name = "echo"
latency = "10ms"
"#;

#[tokio::test]
async fn a_record_round_trips_to_its_caller() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    let response = h.post("/records", r#"{"n":41}"#).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers().contains_key("ratelimit"),
        "admitted responses carry RateLimit"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "success");
    assert_eq!(body["body"], json!({"n": 41}));
    assert!(body["id"].as_str().is_some_and(|id| id.starts_with('r')));
    let stats = h.stats("echo").await;
    assert_eq!(stats["invocations"], 1);
    assert_eq!(stats["records"], 1);
}

#[tokio::test]
async fn concurrent_callers_are_batched_and_each_gets_its_own_record() {
    let routes = route(
        "records",
        "echo",
        r#"batch = { max_records = 20, max_wait = "200ms", flush = "window" }
invoke = { max_concurrency = 10 }"#,
    );
    let h = Harness::start(&config_toml(ECHO, &routes)).await;
    let mut callers = Vec::new();
    for caller in 0..100 {
        let http = h.http.clone();
        let url = h.url("/records");
        callers.push(tokio::spawn(async move {
            for n in 0..10 {
                let sent = json!({"caller": caller, "n": n});
                let response = http
                    .post(&url)
                    .body(sent.to_string())
                    .send()
                    .await
                    .expect("answered");
                assert_eq!(response.status(), 200, "caller {caller} record {n}");
                let body: Value = response.json().await.expect("json");
                assert_eq!(body["body"], sent, "a caller gets its own record back");
            }
        }));
    }
    for caller in callers {
        caller.await.expect("caller task succeeds");
    }
    let stats = h.stats("echo").await;
    assert_eq!(stats["records"], 1000);
    let invocations = stats["invocations"].as_u64().unwrap();
    assert!(
        invocations <= 60,
        "1000 records in batches of up to 20 took {invocations} invokes"
    );
    assert_eq!(stats["errors"], 0);
}

#[tokio::test]
async fn adaptive_flush_sends_a_lone_record_without_waiting_for_the_window() {
    // max_wait is far longer than the caller's deadline: only an adaptive flush (a free
    // invoke slot) can answer in time.
    let routes = route(
        "records",
        "echo",
        r#"batch = { max_records = 20, max_wait = "10s", flush = "adaptive" }
request_timeout = "2s""#,
    );
    let h = Harness::start(&config_toml(ECHO, &routes)).await;
    let response = h.post("/records", "1").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn window_flush_waits_for_max_wait_when_the_batch_is_not_full() {
    let routes = route(
        "records",
        "echo",
        r#"batch = { max_records = 20, max_wait = "10s", flush = "window" }
request_timeout = "300ms""#,
    );
    let h = Harness::start(&config_toml(ECHO, &routes)).await;
    let response = h.post("/records", "1").await;
    assert_eq!(
        response.status(),
        504,
        "the window had not closed before the deadline"
    );
    let stats = h.stats("echo").await;
    assert_eq!(
        stats["invocations"], 0,
        "an expired caller's record is not sent"
    );
}

#[tokio::test]
async fn partial_failures_in_the_results_shape_answer_422_for_failed_records_only() {
    let functions = r#"
[[emulator.functions]]
name = "picky"
handler = "poison"
response = "results"
latency = "10ms"
"#;
    let routes = route(
        "records",
        "picky",
        r#"batch = { max_records = 10, max_wait = "150ms", flush = "window" }"#,
    );
    let h = Harness::start(&config_toml(functions, &routes)).await;
    let (good, bad) = tokio::join!(
        h.post("/records", r#"{"poison":false,"n":1}"#),
        h.post("/records", r#"{"poison":true}"#)
    );
    assert_eq!(good.status(), 200);
    assert_eq!(bad.status(), 422);
    let bad: Value = bad.json().await.unwrap();
    assert_eq!(bad["status"], "error");
    assert!(
        bad["error"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("poison"),
        "{bad}"
    );
    assert_eq!(
        h.stats("picky").await["invocations"],
        1,
        "both records travelled in one batch"
    );
}

#[tokio::test]
async fn partial_failures_in_the_batch_item_failures_shape_answer_422_for_listed_records() {
    let functions = r#"
[[emulator.functions]]
name = "sqs-style"
handler = "poison"
response = "batch_item_failures"
latency = "10ms"
"#;
    let routes = route(
        "records",
        "sqs-style",
        r#"batch = { max_records = 10, max_wait = "150ms", flush = "window" }"#,
    );
    let h = Harness::start(&config_toml(functions, &routes)).await;
    let (good, bad) = tokio::join!(
        h.post("/records", r#"{"n":1}"#),
        h.post("/records", r#"{"poison":true}"#)
    );
    assert_eq!(good.status(), 200);
    let good: Value = good.json().await.unwrap();
    assert_eq!(good["status"], "success");
    assert_eq!(
        good["body"],
        Value::Null,
        "batchItemFailures carries no body for successes"
    );
    assert_eq!(bad.status(), 422);
    assert_eq!(h.stats("sqs-style").await["invocations"], 1);
}

#[tokio::test]
async fn a_function_error_answers_502_with_the_functions_message() {
    let functions = r#"
[[emulator.functions]]
name = "crashy"
handler = "poison"
failure = "crash"
latency = "5ms"
"#;
    let h = Harness::start(&config_toml(functions, &route("records", "crashy", ""))).await;
    let response = h.post("/records", r#"{"poison":true}"#).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "function_error");
    assert_eq!(body["kind"], "Unhandled");
    assert!(
        body["message"].as_str().unwrap().contains("poison"),
        "{body}"
    );
    assert_eq!(h.stats("crashy").await["errors"], 1);
}

#[tokio::test]
async fn a_function_timeout_answers_502_with_lambdas_timeout_message() {
    let functions = r#"
[[emulator.functions]]
name = "slow"
latency = "2s"
timeout = "100ms"
"#;
    let h = Harness::start(&config_toml(functions, &route("records", "slow", ""))).await;
    let response = h.post("/records", "1").await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("Task timed out"),
        "{body}"
    );
}

#[tokio::test]
async fn a_full_queue_sheds_429_with_retry_after() {
    let functions = r#"
[[emulator.functions]]
name = "slow"
latency = "400ms"
"#;
    let routes = route(
        "records",
        "slow",
        r#"batch = { max_records = 1 }
queue = { max_pending = 2 }
invoke = { max_concurrency = 1 }"#,
    );
    let h = Harness::start(&config_toml(functions, &routes)).await;
    let bodies: Vec<String> = (0..8).map(|n| n.to_string()).collect();
    let requests = bodies.iter().map(|b| h.post("/records", b));
    let responses = futures_util::future::join_all(requests).await;
    let mut shed = 0;
    let mut served = 0;
    for response in responses {
        match response.status().as_u16() {
            200 => served += 1,
            429 => {
                shed += 1;
                let retry_after: u64 = response.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(retry_after >= 1);
                assert_eq!(
                    response.headers()["ratelimit-policy"]
                        .to_str()
                        .unwrap()
                        .split(';')
                        .next(),
                    Some("\"queue\"")
                );
                assert!(response.headers()["ratelimit-policy"]
                    .to_str()
                    .unwrap()
                    .contains(";q=2;"));
                assert!(response.headers()["ratelimit"]
                    .to_str()
                    .unwrap()
                    .starts_with("\"queue\";r=0;t="));
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["error"], "rate_limited");
                assert_eq!(body["scope"], "queue");
                assert!(body["retry_after_ms"].as_u64().unwrap() > 0);
            }
            other => panic!("unexpected status {other}"),
        }
    }
    // One in flight, one held by the worker, two in the queue: the rest are shed.
    assert!(served <= 4, "served {served}");
    assert!(shed >= 4, "shed {shed}");
}

#[tokio::test]
async fn the_callers_deadline_answers_504() {
    let functions = r#"
[[emulator.functions]]
name = "slow"
latency = "1500ms"
"#;
    let h = Harness::start(&config_toml(functions, &route("records", "slow", ""))).await;
    let response = h
        .http
        .post(h.url("/records"))
        .header("x-sluicegate-timeout-ms", "150")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "timeout");
}

/// Polls the admin view of the first route until `ready` holds; bounded in count and time.
async fn until_route(h: &Harness, what: &str, ready: impl Fn(&Value) -> bool) {
    let url = format!("http://{}/admin/routes", h.running.admin_addr);
    for _ in 0..500 {
        let body: Value = common::get_json(&h.http, &url).await;
        if ready(&body["routes"][0]) {
            return;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the route never reached: {what}");
}

/// The wire half of pruning: a caller that hangs up drops its ticket, so its record is not
/// sent. (Which records the worker prunes, and when, is unit-tested in `coalesce::worker`.)
#[tokio::test]
async fn a_disconnected_callers_record_is_not_sent() {
    let functions = r#"
[[emulator.functions]]
name = "slow"
latency = "500ms"
"#;
    let routes = route(
        "records",
        "slow",
        "batch = { max_records = 1 }\ninvoke = { max_concurrency = 1 }",
    );
    let h = Harness::start(&config_toml(functions, &routes)).await;
    let post = |who: &'static str| {
        let http = h.http.clone();
        let url = h.url("/records");
        tokio::spawn(async move {
            http.post(url)
                .body(format!(r#"{{"who":"{who}"}}"#))
                .send()
                .await
                .unwrap()
                .status()
        })
    };

    // A occupies the only invoke slot; F waits for it in the worker.
    let first = post("a");
    until_route(&h, "A in flight", |r| r["invoke"]["in_flight"] == 1).await;
    let held = post("f");
    // B is queued behind them, then its caller hangs up.
    let mut socket = tokio::net::TcpStream::connect(h.running.addr)
        .await
        .unwrap();
    let body = r#"{"who":"b"}"#;
    let request = format!(
        "POST /records HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    until_route(&h, "a record queued behind the held one", |r| {
        r["queue_depth"] == 1
    })
    .await;
    drop(socket);

    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(held.await.unwrap(), 200);
    // C proves the route still works, after B's turn has come and gone.
    let third = h.post("/records", r#"{"who":"c"}"#).await;
    assert_eq!(third.status(), 200);
    let stats = h.stats("slow").await;
    assert_eq!(
        stats["records"], 3,
        "only A, F and C reached Lambda: {stats}"
    );
}

#[tokio::test]
async fn malformed_and_oversized_bodies_get_clear_errors() {
    let mut toml = config_toml(ECHO, &route("records", "echo", ""));
    toml = toml.replace("[server]\n", "[server]\nmax_record_bytes = \"1KiB\"\n");
    let h = Harness::start(&toml).await;

    let response = h.post("/records", r#"{"n":"#).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "bad_request");
    assert!(
        body["message"].as_str().unwrap().contains("not valid JSON"),
        "{body}"
    );

    let response = h.post("/records", "").await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("empty"),
        "{body}"
    );

    let big = format!("\"{}\"", "x".repeat(2048));
    let response = h.post("/records", &big).await;
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("max_record_bytes"),
        "{body}"
    );

    let response = h
        .http
        .post(h.url("/records"))
        .header("x-sluicegate-timeout-ms", "soon")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("x-sluicegate-timeout-ms"),
        "{body}"
    );

    let response = h.post("/nowhere", "1").await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "not_found");

    let response = h.http.get(h.url("/records")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    let response = h.post("/healthz", "1").await;
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET, HEAD");
    let response = h.http.head(h.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);

    assert_eq!(
        h.stats("echo").await["invocations"],
        0,
        "no bad input reached Lambda"
    );
}

#[tokio::test]
async fn event_routes_answer_202_once_lambda_queued_the_batch() {
    let routes = route("events", "echo", "invocation = \"event\"");
    let h = Harness::start(&config_toml(ECHO, &routes)).await;
    let response = h.post("/events", r#"{"e":1}"#).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "accepted");
}

#[tokio::test]
async fn raw_envelope_sends_the_record_as_the_payload() {
    let routes = route("raw", "echo", "envelope = \"raw\"");
    let h = Harness::start(&config_toml(ECHO, &routes)).await;
    let (a, b) = tokio::join!(h.post("/raw", r#"{"x":[1,2]}"#), h.post("/raw", r#""two""#));
    let a: Value = a.json().await.unwrap();
    let b: Value = b.json().await.unwrap();
    assert_eq!(
        a["body"],
        json!({"x": [1, 2]}),
        "echo returns a non-envelope payload as-is"
    );
    assert_eq!(b["body"], json!("two"));
    assert_eq!(
        h.stats("echo").await["invocations"],
        2,
        "raw is one record per invoke"
    );
}

#[tokio::test]
async fn a_lambda_throttle_is_shed_as_upstream_429() {
    let functions = r#"
[[emulator.functions]]
name = "tiny-quota"
latency = "5ms"
invoke_rate = 0.1
invoke_burst = 1
"#;
    // One attempt: no retry waits out the throttle, so the caller sees Lambda's answer.
    let routes = route(
        "records",
        "tiny-quota",
        "batch = { max_records = 1 }\nretry = { max_attempts = 1 }",
    );
    let h = Harness::start(&config_toml(functions, &routes)).await;
    assert_eq!(h.post("/records", "1").await.status(), 200);
    let response = h.post("/records", "2").await;
    assert_eq!(response.status(), 429);
    assert!(
        response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(
        response.headers()["ratelimit-policy"],
        "\"upstream\";q=10;w=1"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["scope"], "upstream");
    let stats = h.stats("tiny-quota").await;
    assert_eq!(stats["throttles"]["CallerRateLimitExceeded"], 1);
}

#[tokio::test]
async fn an_unknown_function_answers_502_naming_lambdas_error() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "missing-fn", ""))).await;
    let response = h.post("/records", "1").await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("ResourceNotFoundException"),
        "{body}"
    );
    let ready = h.http.get(h.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "a missing function is not ready");
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    assert_eq!(
        h.http.get(h.url("/healthz")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        h.http.get(h.url("/readyz")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn the_sdk_classifies_the_emulators_throttle_by_reason() {
    use sluicegate::config::Invocation;
    use sluicegate::invoke::{Gate, InvokeFailure, Invoker};
    let functions = r#"
[[emulator.functions]]
name = "one-at-a-time"
latency = "300ms"
reserved_concurrency = 1
"#;
    let h = Harness::start(&config_toml(
        functions,
        &route("records", "one-at-a-time", ""),
    ))
    .await;
    let lambda = sluicegate::config::LambdaConfig {
        endpoint_url: Some(format!("http://{}", h.emulator())),
        ..Default::default()
    };
    let client = sluicegate::invoke::build_client(&lambda)
        .await
        .expect("a client for the emulator");
    let invoker = std::sync::Arc::new(
        Invoker::new(&client, "one-at-a-time".into(), Gate::concurrency_only(2))
            .expect("an invoker"),
    );
    let (a, b) = tokio::join!(
        async {
            let slot = invoker.gate().acquire().await;
            invoker
                .invoke("{}".into(), Invocation::RequestResponse, slot)
                .await
        },
        async {
            // B starts once the emulator runs A, so A holds the reserved concurrency.
            let mut running = false;
            for _ in 0..300 {
                running = h.stats("one-at-a-time").await["in_flight"] == 1;
                if running {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(running, "A never started");
            let slot = invoker.gate().acquire().await;
            invoker
                .invoke("{}".into(), Invocation::RequestResponse, slot)
                .await
        }
    );
    assert!(a.is_ok());
    match b {
        Err(InvokeFailure::Throttled {
            reason, message, ..
        }) => {
            assert_eq!(reason, "ReservedFunctionConcurrentInvocationLimitExceeded");
            assert_eq!(message, "Rate Exceeded.");
        }
        other => panic!("expected a throttle, got {other:?}"),
    }
}

#[tokio::test]
async fn the_admin_listener_reports_routes() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    let body: Value = common::get_json(
        &h.http,
        &format!("http://{}/admin/routes", h.running.admin_addr),
    )
    .await;
    assert_eq!(body["routes"][0]["name"], "records");
    assert_eq!(body["routes"][0]["queue_depth"], 0);
}

#[tokio::test]
async fn raw_socket_pipelining_gets_one_response_per_request() {
    // Two requests on one keep-alive connection: each gets exactly one response, in order.
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    let mut socket = tokio::net::TcpStream::connect(h.running.addr)
        .await
        .unwrap();
    let one = "POST /records HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\n1";
    socket
        .write_all(format!("{one}{one}").as_bytes())
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen)
        .matches("HTTP/1.1 200")
        .count()
        < 2
    {
        let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        String::from_utf8_lossy(&seen).matches("HTTP/1.1").count(),
        2
    );
}

#[tokio::test]
async fn every_answer_carries_a_request_id_the_callers_own_when_it_sent_one() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    let mine = h
        .http
        .post(h.url("/records"))
        .header("x-request-id", "trace-42")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(mine.status(), 200);
    assert_eq!(mine.headers()["x-request-id"], "trace-42");
    let mut seen = std::collections::HashSet::new();
    for path in ["/records", "/records", "/healthz", "/nowhere"] {
        let response = h.post(path, "1").await;
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(parts.len(), 3, "prefix-connection-request: {id}");
        assert_eq!(parts[0].len(), 8, "{id}");
        assert!(
            parts.iter().all(|p| u64::from_str_radix(p, 16).is_ok()),
            "{id}"
        );
        assert!(seen.insert(id), "request ids are unique");
    }
}

#[tokio::test]
async fn pipelined_requests_on_one_connection_are_answered_in_order() {
    let h = Harness::start(&config_toml(ECHO, &route("records", "echo", ""))).await;
    let mut stream = tokio::net::TcpStream::connect(h.running.addr)
        .await
        .unwrap();
    let mut requests = String::new();
    for n in 0..3 {
        let body = format!("{{\"n\":{n}}}");
        requests.push_str(&format!(
            "POST /records HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ));
    }
    requests.push_str("GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    stream.write_all(requests.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_string(&mut answer),
    )
    .await
    .expect("the server closes after the last request")
    .unwrap();
    let at = |needle: &str| {
        answer
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} in {answer}"))
    };
    assert!(at(r#""body":{"n":0}"#) < at(r#""body":{"n":1}"#));
    assert!(at(r#""body":{"n":1}"#) < at(r#""body":{"n":2}"#));
    assert!(at(r#""body":{"n":2}"#) < at(r#"{"status":"ok"}"#));
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 4, "{answer}");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_head_is_disconnected() {
    let h = Harness::start(
        &config_toml(ECHO, &route("records", "echo", ""))
            .replace("[server]\n", "[server]\nheader_read_timeout = \"300ms\"\n"),
    )
    .await;
    let mut slow = tokio::net::TcpStream::connect(h.running.addr)
        .await
        .unwrap();
    slow.write_all(b"POST /records HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the connection is closed instead of waiting for the head forever"
    );
    assert!(
        !String::from_utf8_lossy(&rest).contains("200 OK"),
        "the half-sent request is never answered as if complete"
    );
    // A client that sends its head in time is served as usual.
    let response = h.post("/records", "1").await;
    assert_eq!(response.status(), 200);
}
