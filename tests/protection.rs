//! Keeping Lambda inside its limits, black-box against the emulator: what Lambda's own
//! answers (throttles, 413, function errors, read timeouts) do end to end, dead letters and
//! their redrive, start-up discovery.
//!
//! The coalescer's logic — flush, retries and backoff, splitting, bisecting, deadlines —
//! and the seed-000 overload and adaptive-limit properties are unit-tested on the paused
//! clock in `src/coalesce`; their wall-clock figures come from `loadtest/` (BENCHMARKS.md).

mod common;

use common::{config_toml, route, Harness};
use serde_json::Value;
use sluicegate::config::Config;

/// Runs each named scenario once per `lambda.transport` (`sdk` and `direct`): both transports
/// must pass the same tests against the emulator.
macro_rules! on_both_transports {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test]
                async fn sdk() {
                    super::$scenario("sdk").await
                }

                #[tokio::test]
                async fn direct() {
                    super::$scenario("direct").await
                }
            }
        )*
    };
}

on_both_transports!(
    a_slow_function_with_reserved_concurrency_one_is_not_retried_into_a_cascade,
    a_throttled_invoke_is_retried_after_lambdas_retry_after,
    oversized_batches_are_split_and_a_record_that_never_fits_gets_413,
    bisecting_isolates_one_poison_record_in_a_batch_of_twenty,
    an_event_route_answers_202_once_lambda_has_queued_each_record,
);

/// `toml` with `lambda.transport` set.
fn on_transport(toml: &str, transport: &str) -> String {
    assert!(
        toml.contains("[lambda]\n"),
        "the scenario's config has no [lambda] section to set the transport in"
    );
    toml.replace(
        "[lambda]\n",
        &format!("[lambda]\ntransport = \"{transport}\"\n"),
    )
}

async fn a_slow_function_with_reserved_concurrency_one_is_not_retried_into_a_cascade(
    transport: &str,
) {
    // The function runs 1.5 s; sluicegate stops waiting after 300 ms. Retrying now would
    // collide with the still-running invocation on reserved concurrency 1.
    let functions = r#"
[[emulator.functions]]
name = "slow"
latency = "1500ms"
timeout = "5s"
reserved_concurrency = 1
"#;
    let mut toml = config_toml(
        functions,
        &route("records", "slow", "invoke = { max_concurrency = 1 }"),
    );
    toml = toml.replace("[lambda]\n", "[lambda]\nread_timeout = \"300ms\"\n");
    let h = Harness::start(&on_transport(&toml, transport)).await;
    let response = h.post("/records", "1").await;
    assert_eq!(
        response.status(),
        504,
        "a read timeout is not retried by default"
    );
    let body: Value = response.json().await.expect("a JSON answer");
    assert!(
        body["message"]
            .as_str()
            .expect("a message")
            .contains("read timeout"),
        "{body}"
    );
    // The 504 is the attempt's own answer: were it retried, that retry would have been
    // sent before it. (That an unknown outcome is never retried without
    // `retry.retry_timeouts` is unit-tested in `coalesce::deliver`, on the paused clock.)
    let stats = h.stats("slow").await;
    assert_eq!(stats["invocations"], 1, "one attempt only: {stats}");
    assert_eq!(
        stats["throttles"]["ReservedFunctionConcurrentInvocationLimitExceeded"],
        0
    );
}

async fn a_throttled_invoke_is_retried_after_lambdas_retry_after(transport: &str) {
    let functions = r#"
[[emulator.functions]]
name = "tiny"
latency = "5ms"
invoke_rate = 1.0
invoke_burst = 1
"#;
    let routes = route(
        "records",
        "tiny",
        "batch = { max_records = 1 }\nretry = { base = \"10ms\" }",
    );
    let h = Harness::start(&on_transport(&config_toml(functions, &routes), transport)).await;
    let (a, b) = tokio::join!(h.post("/records", "1"), h.post("/records", "2"));
    assert_eq!(a.status(), 200);
    assert_eq!(
        b.status(),
        200,
        "the throttled record was retried, not failed"
    );
    let stats = h.stats("tiny").await;
    assert_eq!(stats["invocations"], 2);
    assert_eq!(
        stats["throttles"]["CallerRateLimitExceeded"], 1,
        "one throttle, then a retry that waited it out"
    );
}

async fn oversized_batches_are_split_and_a_record_that_never_fits_gets_413(transport: &str) {
    let functions = r#"
[[emulator.functions]]
name = "small-payloads"
latency = "5ms"
max_payload = "100KiB"
"#;
    let routes = route(
        "records",
        "small-payloads",
        r#"batch = { max_records = 10, max_wait = "300ms", flush = "window" }"#,
    );
    let h = Harness::start(&on_transport(&config_toml(functions, &routes), transport)).await;
    let record = format!("\"{}\"", "x".repeat(30 * 1024));
    let bodies = vec![record.clone(); 8];
    let answers =
        futures_util::future::join_all(bodies.iter().map(|b| h.post("/records", b))).await;
    for answer in answers {
        assert_eq!(answer.status(), 200);
    }
    let stats = h.stats("small-payloads").await;
    assert_eq!(stats["records"], 8, "every record delivered once: {stats}");
    assert!(
        stats["too_large"].as_u64().expect("a count") >= 1,
        "the first batch was refused whole: {stats}"
    );

    let huge = format!("\"{}\"", "y".repeat(150 * 1024));
    let response = h.post("/records", &huge).await;
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.expect("a JSON answer");
    assert_eq!(body["error"], "payload_too_large");
}

async fn bisecting_isolates_one_poison_record_in_a_batch_of_twenty(transport: &str) {
    let functions = r#"
[[emulator.functions]]
name = "crashy"
handler = "poison"
failure = "crash"
latency = "5ms"
"#;
    let routes = route(
        "records",
        "crashy",
        r#"batch = { max_records = 20, max_wait = "300ms", flush = "window" }
bisect_on_function_error = true"#,
    );
    let h = Harness::start(&on_transport(&config_toml(functions, &routes), transport)).await;
    let bodies: Vec<String> = (0..20)
        .map(|n| {
            if n == 13 {
                r#"{"poison":true}"#.to_owned()
            } else {
                format!(r#"{{"n":{n}}}"#)
            }
        })
        .collect();
    let answers =
        futures_util::future::join_all(bodies.iter().map(|b| h.post("/records", b))).await;
    for (n, answer) in answers.into_iter().enumerate() {
        let status = answer.status();
        let body: Value = answer.json().await.expect("a JSON answer");
        if n == 13 {
            assert_eq!(status, 502, "{body}");
            assert_eq!(body["error"], "function_error");
        } else {
            assert_eq!(status, 200, "record {n}: {body}");
            assert_eq!(body["body"]["n"], n);
        }
    }
    let stats = h.stats("crashy").await;
    // 20 → 10 → 5 → 3 → 2 → 1: the poison record's path fails at every level.
    assert_eq!(stats["errors"], 6, "{stats}");
}

async fn an_event_route_answers_202_once_lambda_has_queued_each_record(transport: &str) {
    let functions = r#"
[[emulator.functions]]
name = "queued"
latency = "5ms"
"#;
    let routes = route(
        "events",
        "queued",
        "invocation = \"event\"\nbatch = { max_records = 1 }",
    );
    let h = Harness::start(&on_transport(&config_toml(functions, &routes), transport)).await;
    let bodies = ["1", "2", "3"];
    let answers = futures_util::future::join_all(bodies.iter().map(|b| h.post("/events", b))).await;
    for answer in answers {
        assert_eq!(answer.status(), 202);
    }
    let stats = h.stats("queued").await;
    assert_eq!(
        stats["invocations"], 3,
        "one event invoke per record: {stats}"
    );
}

#[tokio::test]
async fn exhausted_retries_are_dead_lettered_then_redriven() {
    let dir = tempfile::tempdir().unwrap();
    let dlq = dir.path().join("dlq.jsonl");
    // Reserved concurrency 0: Lambda throttles every invoke.
    let functions = r#"
[[emulator.functions]]
name = "switched-off"
reserved_concurrency = 0
"#;
    let routes = route(
        "records",
        "switched-off",
        &format!(
            "batch = {{ max_records = 5, max_wait = \"100ms\", flush = \"window\" }}\nretry = {{ max_attempts = 2, base = \"10ms\" }}\ndlq = {{ file = {:?} }}",
            dlq.display().to_string()
        ),
    );
    let h = Harness::start(&config_toml(functions, &routes)).await;
    let mut ids = Vec::new();
    for (n, key) in [(1, "k1"), (2, "k2"), (3, "k3")] {
        let response = h
            .http
            .post(h.url("/records"))
            .header("x-api-key", key)
            .body(format!(r#"{{"n":{n}}}"#))
            .send();
        ids.push(response);
    }
    let responses = futures_util::future::join_all(ids).await;
    let mut dead_letter_ids = Vec::new();
    for response in responses {
        let response = response.unwrap();
        assert_eq!(response.status(), 503);
        assert!(
            response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                >= 1
        );
        let body: Value = response.json().await.unwrap();
        dead_letter_ids.push(
            body["dead_letter_id"]
                .as_str()
                .expect("the caller learns its dead-letter id")
                .to_owned(),
        );
    }
    // A dead-letter id is given only once its letter is fsynced: no wait needed.
    let letters = sluicegate::dlq::read_letters(&dlq).unwrap().letters;
    assert_eq!(letters.len(), 3);
    for letter in &letters {
        assert!(dead_letter_ids.contains(&letter.id));
        assert_eq!(letter.route, "records");
        assert_eq!(letter.function, "switched-off");
        assert_eq!(letter.attempts, 2);
        assert_eq!(
            letter.error_kind,
            "ReservedFunctionConcurrentInvocationLimitExceeded"
        );
        assert!(letter.key.starts_with('k'));
        let record: Value = serde_json::from_str(letter.record.get()).unwrap();
        assert!(record["n"].is_number());
        assert!(letter.first_attempt_at <= letter.last_attempt_at);
    }

    // Redrive against a healthy function of the same name.
    let healthy = config_toml(
        "[[emulator.functions]]\nname = \"switched-off\"\nlatency = \"5ms\"\n",
        &route("records", "switched-off", ""),
    );
    let healthy = Harness::start(&healthy).await;
    let mut config = Config::from_toml(&route("records", "switched-off", "")).unwrap();
    config.lambda.endpoint_url = Some(format!("http://{}", healthy.emulator()));
    let report = sluicegate::redrive::redrive(&config, letters)
        .await
        .unwrap();
    assert_eq!((report.total, report.succeeded, report.failed), (3, 3, 0));
    assert_eq!(healthy.stats("switched-off").await["records"], 3);
}

#[tokio::test]
async fn a_caller_whose_deadline_precedes_the_retry_leaves_the_batch_at_once() {
    let functions = "[[emulator.functions]]\nname = \"off\"\nreserved_concurrency = 0\n";
    let routes = route(
        "records",
        "off",
        "retry = { max_attempts = 5, base = \"2s\", cap = \"2s\", jitter = \"equal\" }",
    );
    let h = Harness::start(&config_toml(functions, &routes)).await;
    let response = h
        .http
        .post(h.url("/records"))
        .header("x-sluicegate-timeout-ms", "800")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("before the next retry"),
        "{body}"
    );
}

#[tokio::test]
async fn strict_mode_refuses_to_start_when_the_config_does_not_fit_the_function() {
    let functions =
        "[[emulator.functions]]\nname = \"f\"\ntimeout = \"3s\"\nreserved_concurrency = 2\n";
    let mut toml = config_toml(
        functions,
        &route("records", "f", "invoke = { max_concurrency = 4 }"),
    );
    toml = toml.replace(
        "[lambda]\n",
        "[lambda]\nstrict = true\nread_timeout = \"2s\"\nconnect_timeout = \"1s\"\n",
    );
    let config = Config::from_toml(&toml).unwrap();
    let err = match sluicegate::server::start(config).await {
        Ok(_) => panic!("strict mode must refuse"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("read_timeout"), "{err}");
    assert!(err.contains("reserved concurrency (2)"), "{err}");
}
