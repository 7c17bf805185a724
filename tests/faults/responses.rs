//! Rows 2 and 4: what comes back from the function, and what goes into a batch.
//!
//! A batch response that names a record the batch does not hold (or an empty id) cannot be
//! attributed: Lambda's own event-source mappings then treat the whole batch as failed, and
//! so must sluicegate — no caller may be told `200` on the strength of such an answer. And a
//! record the function runtime cannot parse must be refused at the edge, before it can
//! poison the batch it would share with other callers' records.

use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::common::{route, Harness};
use crate::fake_config;
use crate::fake_lambda::{Action, FakeLambda, Reply};

/// POSTs `n` records at once and returns each answer's status and body.
async fn post_concurrently(harness: &Harness, n: usize) -> Vec<(u16, Value)> {
    let requests = (0..n).map(|i| async move {
        let response = harness
            .post("/records", &json!({ "n": i }).to_string())
            .await;
        let status = response.status().as_u16();
        (
            status,
            response.json::<Value>().await.unwrap_or(Value::Null),
        )
    });
    join_all(requests).await
}

/// 40 callers whose batches all come back with `batchItemFailures` naming `identifier`.
async fn forty_callers_against_item_failure(identifier: Value) -> (Vec<(u16, Value)>, FakeLambda) {
    let fake = FakeLambda::start(move |_| {
        Action::Process(Reply::json(
            200,
            &json!({ "batchItemFailures": [{ "itemIdentifier": identifier.clone() }] }),
        ))
    })
    .await;
    let toml = fake_config(
        &fake,
        &route(
            "records",
            "f",
            r#"batch = { max_records = 10, max_wait = "20ms", flush = "window" }"#,
        ),
    );
    let harness = Harness::start(&toml).await;
    let answers = post_concurrently(&harness, 40).await;
    (answers, fake)
}

fn assert_all_bad_gateway_naming(answers: &[(u16, Value)], naming: &str) {
    assert_eq!(answers.len(), 40);
    for (status, body) in answers {
        assert_eq!(*status, 502, "{body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(naming), "{message}");
    }
}

#[tokio::test]
async fn an_empty_item_identifier_fails_the_whole_batch() {
    let (answers, fake) = forty_callers_against_item_failure(json!("")).await;
    assert_all_bad_gateway_naming(&answers, "\"\"");
    // Processed once each, and never retried: the function did run the batch.
    let (distinct, most) = fake.processed_summary();
    assert_eq!((distinct, most), (40, 1));
}

#[tokio::test]
async fn an_item_identifier_not_in_the_batch_fails_the_whole_batch() {
    let (answers, fake) = forty_callers_against_item_failure(json!("r-not-in-batch")).await;
    assert_all_bad_gateway_naming(&answers, "r-not-in-batch");
    let (distinct, most) = fake.processed_summary();
    assert_eq!((distinct, most), (40, 1));
}

#[tokio::test]
async fn a_null_item_identifier_is_a_malformed_response() {
    let (answers, _fake) = forty_callers_against_item_failure(Value::Null).await;
    assert!(
        answers.iter().all(|(status, _)| *status == 502),
        "{answers:?}"
    );
}

/// A `results` answer that lists an id the batch does not hold cannot be trusted for the
/// others either; a record listed twice has no single result.
#[tokio::test]
async fn results_naming_unknown_or_duplicate_ids_earn_no_success() {
    let fake = FakeLambda::start(|call| {
        let mut results: Vec<Value> = call
            .ids()
            .iter()
            .map(|id| json!({"id": id, "status": "success", "body": 1}))
            .collect();
        if call.n == 0 {
            results.push(json!({"id": "r-stranger", "status": "error", "error": "which one?"}));
        } else {
            let twice = results[0].clone();
            results.push(json!({"id": twice["id"], "status": "error", "error": "no, failed"}));
        }
        Action::Process(Reply::json(200, &json!({ "results": results })))
    })
    .await;
    let toml = fake_config(&fake, &route("records", "f", ""));
    let harness = Harness::start(&toml).await;
    // One record per batch: first an answer with a stranger, then one with a duplicate.
    for naming in ["r-stranger", "twice or more"] {
        let response = harness.post("/records", "1").await;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 502, "{body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(naming), "{message}");
    }
}

/// A runtime that cannot parse the payload it was sent (serde_json's own limits, as a Rust
/// runtime has them) fails the invoke; one that can echoes every record, except that a
/// record `{"poison":true}` crashes it.
async fn strict_runtime() -> FakeLambda {
    FakeLambda::start(|call| {
        if serde_json::from_slice::<Value>(&call.payload).is_err() {
            return Action::Reply(Reply::function_error(
                "Runtime.UnmarshalError",
                "cannot parse the event",
            ));
        }
        if call.records.iter().any(|(_, body)| body["poison"] == true) {
            return Action::Process(Reply::function_error("Poisoned", "bad record"));
        }
        Action::Process(Reply::echo(call))
    })
    .await
}

/// 20 records (one of them `odd`, the others good) sent together so they share one batch.
async fn odd_one_among_nineteen(toml: &str, odd: String) -> (u16, Vec<u16>) {
    let harness = &Harness::start(toml).await;
    let odd = async { harness.post("/records", &odd).await.status().as_u16() };
    let good = join_all((0..19).map(|i| async move {
        let body = json!({ "n": i }).to_string();
        harness.post("/records", &body).await.status().as_u16()
    }));
    tokio::join!(odd, good)
}

const ONE_BATCH: &str = r#"batch = { max_records = 20, max_wait = "300ms", flush = "window" }"#;

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn a_record_nested_too_deep_is_refused_and_its_batch_mates_succeed() {
    let fake = strict_runtime().await;
    // `bisect_on_function_error = false`: the edge alone must keep the batch clean.
    let extra = format!("{ONE_BATCH}\nbisect_on_function_error = false");
    let toml = fake_config(&fake, &route("records", "f", &extra));
    let deep = nested(5_000);
    assert_eq!(deep.len(), 10_000);
    let (odd, good) = odd_one_among_nineteen(&toml, deep).await;
    assert_eq!(odd, 400);
    assert_eq!(good, vec![200; 19]);
    let (distinct, most) = fake.processed_summary();
    assert_eq!((distinct, most), (19, 1));
}

#[tokio::test]
async fn a_lone_surrogate_escape_is_refused_and_its_batch_mates_succeed() {
    let fake = strict_runtime().await;
    let extra = format!("{ONE_BATCH}\nbisect_on_function_error = false");
    let toml = fake_config(&fake, &route("records", "f", &extra));
    let (odd, good) = odd_one_among_nineteen(&toml, r#"{"name":"\ud800"}"#.to_owned()).await;
    assert_eq!(odd, 400);
    assert_eq!(good, vec![200; 19]);
    let harness = Harness::start(&toml).await;
    for lone in [r#""\udc00""#, r#"{"\uDBFF":1}"#, r#"["\ud800\u0041"]"#] {
        let response = harness.post("/records", lone).await;
        assert_eq!(response.status(), 400, "{lone}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["message"].as_str().unwrap().contains("surrogate"),
            "{body}"
        );
    }
    // A proper pair is one character, and welcome.
    let pair = harness.post("/records", r#""\ud83d\ude00""#).await;
    assert_eq!(pair.status(), 200);
}

#[tokio::test]
async fn a_record_as_deep_as_the_runtime_parses_in_its_envelope_is_accepted() {
    let fake = strict_runtime().await;
    let toml = fake_config(&fake, &route("records", "f", "")).replacen(
        "[server]\n",
        "[server]\nmax_json_depth = 32\n",
        1,
    );
    let harness = Harness::start(&toml).await;
    // The batch envelope holds a record 3 levels deep, and a parser with a limit of 32 (as
    // serde_json's 128) refuses a payload that reaches it: a record may nest 28 levels.
    let at_limit = harness.post("/records", &nested(28)).await;
    assert_eq!(at_limit.status(), 200);
    let over = harness.post("/records", &nested(29)).await;
    assert_eq!(over.status(), 400);
    let body: Value = over.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("more than 28 levels deep"), "{message}");
    assert!(message.contains("server.max_json_depth"), "{message}");
    assert_eq!(fake.processed_summary(), (1, 1));
}

/// A record the edge cannot recognise as poison still costs only its own caller: bisecting
/// is on by default.
#[tokio::test]
async fn by_default_a_poison_record_fails_alone() {
    let fake = strict_runtime().await;
    let toml = fake_config(&fake, &route("records", "f", ONE_BATCH));
    let (odd, good) = odd_one_among_nineteen(&toml, r#"{"poison":true}"#.to_owned()).await;
    assert_eq!(odd, 502);
    assert_eq!(good, vec![200; 19]);
}
