//! Keeping Lambda inside its limits, black-box against the emulator: the invoke-rate
//! bucket and concurrency cap, retries with backoff, adaptive limits, batch splitting,
//! bisecting function errors, dead letters and their redrive, start-up discovery.

mod common;

use std::time::Duration;

use common::{config_toml, paced_load, quantile, route, Harness};
use serde_json::Value;
use sluicegate::config::Config;

fn count(answers: &[common::Answer], status: u16) -> usize {
    answers.iter().filter(|a| a.status == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_000_overload_delivers_the_quota_without_throttles_and_sheds_fast() {
    // Lambda: 10 invokes/s, 5 concurrent. sluicegate: just under the quota, 10 per batch
    // (the test shares two cores with its own load generator; 10 keeps it light).
    let functions = r#"
[[emulator.functions]]
name = "quota"
latency = "100ms"
reserved_concurrency = 5
invoke_rate = 10.0
"#;
    let routes = route(
        "records",
        "quota",
        r#"batch = { max_records = 10, max_wait = "50ms", flush = "adaptive" }
queue = { max_pending = 400 }
invoke = { rate = 9.9, burst = 5, max_concurrency = 5 }
request_timeout = "5s""#,
    );
    let h = Harness::start(&config_toml(functions, &routes)).await;
    let capacity = 10.0 * 10.0;
    let url = h.url("/records");

    // 3× overload for 6 s; goodput is measured by Lambda itself over seconds 2 to 6.
    let load = tokio::spawn({
        let http = h.http.clone();
        async move {
            paced_load(
                &http,
                &url,
                r#"{"n":1}"#,
                3.0 * capacity,
                Duration::from_secs(6),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = h.stats("quota").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = h.stats("quota").await;
    let answers = load.await.unwrap();

    let delivered =
        (after["records"].as_u64().unwrap() - before["records"].as_u64().unwrap()) as f64 / 4.0;
    let invocations = after["invocations"].as_u64().unwrap();
    let throttles = after["throttles"]["CallerRateLimitExceeded"]
        .as_u64()
        .unwrap()
        + after["throttles"]["ReservedFunctionConcurrentInvocationLimitExceeded"]
            .as_u64()
            .unwrap();
    let shed: Vec<Duration> = answers
        .iter()
        .filter(|a| a.status == 429)
        .map(|a| a.latency)
        .collect();
    let p99_shed = quantile(&shed, 0.99);
    eprintln!(
        "seed-000: delivered {delivered:.1} records/s of {capacity} ({:.1}%), {invocations} invokes, {throttles} throttled, {} ok, {} shed (p99 {p99_shed:?}), {} timed out",
        100.0 * delivered / capacity,
        count(&answers, 200),
        shed.len(),
        count(&answers, 504),
    );
    assert!(
        delivered >= 0.95 * capacity,
        "delivered {delivered:.1} records/s, below 95% of {capacity}"
    );
    assert!(
        throttles as f64 <= 0.01 * invocations as f64,
        "{throttles} throttles in {invocations} invokes"
    );
    assert!(
        shed.len() > answers.len() / 3,
        "the excess is shed: {} of {}",
        shed.len(),
        answers.len()
    );
    assert_eq!(count(&answers, 504), 0, "nothing is left to time out");
    assert_eq!(count(&answers, 0), 0, "every request is answered");
    // Shedding happens at the door: far below the 5 s the caller would otherwise wait.
    assert!(p99_shed < Duration::from_secs(1), "429 p99 {p99_shed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_limits_tame_an_invoke_rate_set_five_times_too_high() {
    let functions = r#"
[[emulator.functions]]
name = "quota"
latency = "10ms"
invoke_rate = 10.0
"#;
    let routes = route(
        "records",
        "quota",
        r#"batch = { max_records = 1 }
invoke = { rate = 50.0, burst = 1, max_concurrency = 10, adaptive = true }
retry = { max_attempts = 3 }
request_timeout = "5s""#,
    );
    let h = Harness::start(&config_toml(functions, &routes)).await;
    let answers = paced_load(
        &h.http,
        &h.url("/records"),
        "1",
        60.0,
        Duration::from_secs(10),
    )
    .await;
    let stats = h.stats("quota").await;
    let invocations = stats["invocations"].as_u64().unwrap();
    let throttles = stats["throttles"]["CallerRateLimitExceeded"]
        .as_u64()
        .unwrap();
    let admin: Value = common::get_json(
        &h.http,
        &format!("http://{}/admin/routes", h.running.admin_addr),
    )
    .await;
    let rate_now = admin["routes"][0]["invoke"]["rate_limit"].as_f64().unwrap();
    eprintln!(
        "adaptive: {invocations} invokes, {throttles} throttled ({:.1}%), rate now {rate_now:.2}/s, {} ok",
        100.0 * throttles as f64 / (invocations + throttles) as f64,
        count(&answers, 200)
    );
    assert!(
        (throttles as f64) < 0.05 * (invocations + throttles) as f64,
        "{throttles} throttles in {} invoke attempts",
        invocations + throttles
    );
    assert!(
        rate_now <= 12.0,
        "the observable invoke rate came down to the quota: {rate_now}"
    );
    assert!(
        invocations >= 80,
        "the quota is still used: {invocations} invokes in 10 s"
    );
}

#[tokio::test]
async fn a_slow_function_with_reserved_concurrency_one_is_not_retried_into_a_cascade() {
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
    let h = Harness::start(&toml).await;
    let response = h.post("/records", "1").await;
    assert_eq!(
        response.status(),
        504,
        "a read timeout is not retried by default"
    );
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("read timeout"),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = h.stats("slow").await;
    assert_eq!(stats["invocations"], 1, "one attempt only: {stats}");
    assert_eq!(
        stats["throttles"]["ReservedFunctionConcurrentInvocationLimitExceeded"],
        0
    );
}

#[tokio::test]
async fn a_throttled_invoke_is_retried_after_lambdas_retry_after() {
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
    let h = Harness::start(&config_toml(functions, &routes)).await;
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

#[tokio::test]
async fn oversized_batches_are_split_and_a_record_that_never_fits_gets_413() {
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
    let h = Harness::start(&config_toml(functions, &routes)).await;
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
        stats["too_large"].as_u64().unwrap() >= 1,
        "the first batch was refused whole: {stats}"
    );

    let huge = format!("\"{}\"", "y".repeat(150 * 1024));
    let response = h.post("/records", &huge).await;
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "payload_too_large");
}

#[tokio::test]
async fn bisecting_isolates_one_poison_record_in_a_batch_of_twenty() {
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
    let h = Harness::start(&config_toml(functions, &routes)).await;
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
        let body: Value = answer.json().await.unwrap();
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
