//! What an invoke's failure means: a request Lambda may have run is an unknown outcome,
//! never retried as if it had not arrived (row 1); absurd numbers from Lambda cannot panic
//! or stall a batch (row 3); the shipped retry settings ride out a short blip (row 12).

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::Value;
use sluicegate::config::{Config, DEFAULT_CONFIG_TOML};
use tokio::time::Instant;

use crate::common::{self, Harness};
use crate::fake_config;
use crate::fake_lambda::{Action, FakeLambda, Reply};

/// POSTs `n` records `{"n": i}` at once and returns each answer's status and body, in order.
async fn post_all(harness: &Harness, n: usize) -> Vec<(u16, Value)> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let request = harness
            .http
            .post(harness.url("/records"))
            .body(format!(r#"{{"n":{i}}}"#));
        tasks.spawn(async move {
            let response = request.send().await.expect("answered");
            let status = response.status().as_u16();
            let body: Value = response.json().await.expect("a JSON body");
            (i, status, body)
        });
    }
    let mut answers = Vec::with_capacity(n);
    while let Some(done) = tasks.join_next().await {
        answers.push(done.expect("request task"));
    }
    answers.sort_by_key(|(i, _, _)| *i);
    answers.into_iter().map(|(_, s, b)| (s, b)).collect()
}

/// Every record id the fake saw, with how often it was processed.
fn processed_counts(fake: &FakeLambda) -> Vec<(String, u32)> {
    let ids: HashSet<String> = fake.calls().iter().flat_map(|c| c.ids()).collect();
    let mut counts: Vec<(String, u32)> = ids
        .into_iter()
        .map(|id| {
            let n = fake.processed(&id);
            (id, n)
        })
        .collect();
    counts.sort();
    counts
}

/// The dead letters in `path`, once `expected` of them are there (bounded wait: the file
/// sink writes on its own thread after the callers are answered).
async fn letters(path: &std::path::Path, expected: usize) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let letters: Vec<Value> = text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        if letters.len() >= expected || started.elapsed() > Duration::from_secs(10) {
            return letters;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const RECORDS: usize = 20;

#[tokio::test]
async fn a_lost_connection_after_send_is_an_unknown_outcome() {
    let fake = FakeLambda::start(|_| Action::ProcessThenDrop).await;
    let route = common::route(
        "records",
        "f",
        r#"batch = { max_records = 5 }
retry = { max_attempts = 5, base = "10ms", cap = "50ms", retry_timeouts = false }"#,
    );
    let harness = Harness::start(&fake_config(&fake, &route)).await;
    let answers = post_all(&harness, RECORDS).await;
    for (status, body) in &answers {
        assert_eq!(*status, 504, "{body}");
        assert_eq!(body["error"], "outcome_unknown", "{body}");
        let message = body["message"].as_str().expect("a message");
        assert!(message.contains("may have been processed"), "{message}");
    }
    let counts = processed_counts(&fake);
    assert_eq!(counts.len(), RECORDS, "every record reached the function");
    for (id, n) in &counts {
        assert_eq!(*n, 1, "record {id} was processed {n} times");
    }
    let ids_sent: usize = fake.calls().iter().map(|c| c.ids().len()).sum();
    assert_eq!(ids_sent, RECORDS, "no batch was sent twice");
}

#[tokio::test]
async fn a_read_timeout_is_an_unknown_outcome_and_runs_the_record_once() {
    let fake =
        FakeLambda::start(|call| Action::ProcessSlowly(Duration::from_secs(3), Reply::echo(call)))
            .await;
    let route = common::route(
        "records",
        "f",
        r#"retry = { max_attempts = 5, base = "10ms", cap = "50ms", retry_timeouts = false }"#,
    );
    let toml =
        fake_config(&fake, &route).replace(r#"read_timeout = "5s""#, r#"read_timeout = "300ms""#);
    let harness = Harness::start(&toml).await;
    let answers = post_all(&harness, 3).await;
    for (status, body) in &answers {
        assert_eq!(*status, 504, "{body}");
        assert_eq!(body["error"], "outcome_unknown", "{body}");
    }
    for (id, n) in processed_counts(&fake) {
        assert_eq!(n, 1, "record {id} was processed {n} times");
    }
}

#[tokio::test]
async fn an_unknown_outcome_retried_by_choice_is_dead_lettered_as_possibly_processed() {
    let fake = FakeLambda::start(|_| Action::ProcessThenDrop).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dlq.jsonl");
    let route = common::route(
        "records",
        "f",
        &format!(
            r#"batch = {{ max_records = 5 }}
retry = {{ max_attempts = 2, base = "10ms", cap = "50ms", retry_timeouts = true }}
dlq = {{ file = "{}" }}"#,
            path.display()
        ),
    );
    let harness = Harness::start(&fake_config(&fake, &route)).await;
    let answers = post_all(&harness, RECORDS).await;
    // Kept, but not safe to send again: the caller hears the outcome is unknown.
    for (status, body) in &answers {
        assert_eq!(*status, 504, "{body}");
        assert_eq!(body["error"], "outcome_unknown", "{body}");
        assert!(body["dead_letter_id"].is_string(), "{body}");
    }
    for (id, n) in processed_counts(&fake) {
        assert_eq!(n, 2, "record {id}: max_attempts = 2, each attempt ran it");
    }
    let letters = letters(&path, RECORDS).await;
    assert_eq!(letters.len(), RECORDS);
    for letter in &letters {
        assert_eq!(letter["possibly_processed"], true, "{letter}");
        assert_eq!(letter["attempts"], 2, "{letter}");
    }
}

#[tokio::test]
async fn a_batch_that_may_have_run_is_not_reported_as_merely_unavailable() {
    // The first attempt is lost after the function ran; the retry finds Lambda down. The
    // last failure alone says "unavailable", but the record may have been processed.
    let fake = FakeLambda::start(|call| {
        if call.n == 0 {
            Action::ProcessThenDrop
        } else {
            Action::Reply(Reply::service_error(503, "ServiceException"))
        }
    })
    .await;
    let route = common::route(
        "records",
        "f",
        r#"retry = { max_attempts = 3, base = "10ms", cap = "50ms", retry_timeouts = true }"#,
    );
    let harness = Harness::start(&fake_config(&fake, &route)).await;
    let response = harness.post("/records", r#"{"n":1}"#).await;
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"], "outcome_unknown", "{body}");
    assert_eq!(fake.calls().len(), 3, "retried, as retry_timeouts allows");
}

#[tokio::test]
async fn a_dead_letter_that_may_have_run_is_marked_and_answered_as_unknown() {
    // As above, with a dead-letter queue: the letter is kept and says so, and the caller's
    // answer carries its id but does not invite a blind retry.
    let fake = FakeLambda::start(|call| {
        if call.n == 0 {
            Action::ProcessThenDrop
        } else {
            Action::Reply(Reply::service_error(503, "ServiceException"))
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dlq.jsonl");
    let route = common::route(
        "records",
        "f",
        &format!(
            r#"retry = {{ max_attempts = 3, base = "10ms", cap = "50ms", retry_timeouts = true }}
dlq = {{ file = "{}" }}"#,
            path.display()
        ),
    );
    let harness = Harness::start(&fake_config(&fake, &route)).await;
    let response = harness.post("/records", r#"{"n":1}"#).await;
    assert_eq!(response.status(), 504);
    assert!(response.headers().get("retry-after").is_none());
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"], "outcome_unknown", "{body}");
    assert!(body["dead_letter_id"].is_string(), "{body}");
    let letters = letters(&path, 1).await;
    assert_eq!(letters[0]["possibly_processed"], true, "{}", letters[0]);
    assert_eq!(letters[0]["id"], body["dead_letter_id"]);
}

#[tokio::test]
async fn a_refused_connection_is_retried_and_ends_unavailable() {
    let fake = FakeLambda::echo().await;
    let nobody = format!("http://127.0.0.1:{}", common::free_port());
    // The metrics recorder is process-wide: a function name of its own keeps the count ours.
    let route = common::route(
        "records",
        "refused",
        r#"retry = { max_attempts = 3, base = "10ms", cap = "50ms", retry_timeouts = false }"#,
    );
    let toml = fake_config(&fake, &route).replace(&fake.endpoint(), &nobody);
    let harness = Harness::start(&toml).await;
    let response = harness.post("/records", r#"{"n":1}"#).await;
    assert_eq!(
        response.status(),
        503,
        "a request never sent is safe to retry"
    );
    let (retries, metrics) = unavailable_retries(&harness, "refused").await;
    assert_eq!(retries, 2.0, "max_attempts = 3: two retries\n{metrics}");
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn an_absurd_retry_after_from_lambda_is_clamped_to_the_retry_cap() {
    for retry_after in ["1e300", "1e19", "1e9", "inf", "NaN", "-5", "soon"] {
        let fake = FakeLambda::start(move |call| {
            if call.n == 0 {
                Action::Reply(Reply::throttle("CallerRateLimitExceeded", retry_after))
            } else {
                Action::Process(Reply::echo(call))
            }
        })
        .await;
        let route = common::route(
            "records",
            "f",
            r#"retry = { max_attempts = 3, base = "10ms", cap = "300ms" }"#,
        );
        let harness = Harness::start(&fake_config(&fake, &route)).await;
        let started = Instant::now();
        let answers = post_all(&harness, RECORDS).await;
        let took = started.elapsed();
        for (status, body) in &answers {
            assert_eq!(*status, 200, "Retry-After {retry_after}: {body}");
        }
        assert!(
            took < Duration::from_secs(3),
            "Retry-After {retry_after}: the retry waited {took:?}, past retry.cap"
        );
        for (id, n) in processed_counts(&fake) {
            assert_eq!(n, 1, "Retry-After {retry_after}: record {id} ran {n} times");
        }
    }
}

#[tokio::test]
async fn the_shipped_retry_settings_ride_out_a_two_second_blip() {
    // Lambda fails every invoke for 2 s from the first one (as an endpoint that restarts),
    // then works. Several batches are in flight at once, as on a quiet route.
    let first: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let blip = Arc::clone(&first);
    let fake = FakeLambda::start(move |call| {
        let began = *blip.get_or_init(Instant::now);
        if began.elapsed() < Duration::from_secs(2) {
            Action::Reply(Reply::service_error(503, "ServiceException"))
        } else {
            Action::Process(Reply::echo(call))
        }
    })
    .await;
    let shipped = Config::from_toml(DEFAULT_CONFIG_TOML).expect("the shipped config is valid");
    // A generous invoke rate, so that only the retry settings space the attempts out.
    let route = common::route(
        "records",
        "f",
        "batch = { max_records = 5 }\ninvoke = { rate = 1000.0, burst = 1000, max_concurrency = 10 }",
    );
    let mut config =
        Config::from_toml(&fake_config(&fake, &route)).expect("the test config is valid");
    config.routes[0].retry = shipped.routes[0].retry.clone();
    let harness = Harness::start_config(config).await;
    let answers = post_all(&harness, 40).await;
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
    }
    for (id, n) in processed_counts(&fake) {
        assert_eq!(n, 1, "record {id} ran {n} times");
    }
}

#[tokio::test]
async fn a_connect_timeout_is_retried_as_unavailable() {
    let blackhole = crate::Blackhole::start().await;
    let addr = blackhole.addr;
    let fake = FakeLambda::echo().await;
    // The metrics recorder is process-wide: a function name of its own keeps the count ours.
    let route = common::route(
        "records",
        "blackhole",
        r#"retry = { max_attempts = 2, base = "10ms", cap = "50ms", retry_timeouts = false }"#,
    );
    let toml = fake_config(&fake, &route)
        .replace(&fake.endpoint(), &format!("http://{addr}"))
        .replace(r#"connect_timeout = "1s""#, r#"connect_timeout = "300ms""#);
    let harness = Harness::start(&toml).await;
    let response = harness.post("/records", r#"{"n":1}"#).await;
    let status = response.status();
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(status, 503, "a connect that timed out sent nothing: {body}");
    let (retries, metrics) = unavailable_retries(&harness, "blackhole").await;
    assert_eq!(retries, 1.0, "max_attempts = 2: one retry\n{metrics}");
    drop(blackhole);
}

#[tokio::test]
async fn a_caller_leaving_before_a_retry_hears_that_an_earlier_attempt_may_have_run() {
    // Attempt 1 may have run the record (lost after sending); attempt 2 is throttled with a
    // Retry-After past the caller's deadline, so the caller leaves before the retry. The last
    // failure alone says "throttled"; the truth is that the outcome is unknown.
    let fake = FakeLambda::start(|call| {
        if call.n == 0 {
            Action::ProcessThenDrop
        } else {
            Action::Reply(Reply::throttle("CallerRateLimitExceeded", "5"))
        }
    })
    .await;
    let route = common::route(
        "records",
        "f",
        r#"retry = { max_attempts = 5, base = "10ms", cap = "10s", retry_timeouts = true }"#,
    );
    let harness = Harness::start(&fake_config(&fake, &route)).await;
    let response = harness
        .http
        .post(harness.url("/records"))
        .header("x-sluicegate-timeout-ms", "2000")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"], "outcome_unknown", "{body}");
    assert_eq!(fake.calls().len(), 2, "no third attempt past the deadline");
}

/// `sluicegate_retries_total{reason="Unavailable"}` for `function`, and the whole scrape (for
/// assertion messages). The recorder is process-wide: each test names its own function.
async fn unavailable_retries(harness: &Harness, function: &str) -> (f64, String) {
    let metrics = harness
        .http
        .get(format!("http://{}/metrics", harness.running.admin_addr))
        .send()
        .await
        .expect("metrics answered")
        .text()
        .await
        .expect("text");
    let label = format!(r#"function="{function}""#);
    let retries = metrics
        .lines()
        .filter(|l| {
            l.starts_with("sluicegate_retries_total")
                && l.contains(&label)
                && l.contains("Unavailable")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    (retries, metrics)
}
