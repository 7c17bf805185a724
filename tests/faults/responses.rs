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
