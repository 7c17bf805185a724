//! An example Lambda function behind sluicegate, speaking its batch envelope.
//!
//! sluicegate invokes the function with
//!
//! ```json
//! {"records":[{"id":"r1","key":"<client key>","body":<the client's record>}, ...]}
//! ```
//!
//! and [`handle`] answers in one of the two shapes sluicegate accepts:
//!
//! - [`ResponseShape::Results`]: one result per record,
//!   `{"results":[{"id","status":"success","body"} | {"id","status":"error","error":{"errorType","errorMessage"}}]}`;
//!   sluicegate answers each caller `200` with its `body`, or `422` with its `error`.
//! - [`ResponseShape::BatchItemFailures`]: the SQS-style partial batch response
//!   `{"batchItemFailures":[{"itemIdentifier":"r2"}]}`; the records not listed succeeded
//!   (their callers get `200` with no function body), the listed ones get `422`.
//!
//! Every record is processed on its own: one bad record fails only itself, never the
//! batch. Returning an error from the handler (or panicking) would fail the whole invoke,
//! which sluicegate reports to every caller in the batch as `502` — the right outcome for
//! "the function is broken", the wrong one for "this record is bad".
//!
//! The "processing" is deliberately trivial and visible: an object body comes back with
//! `"processed": true` added, any other JSON value comes back as
//! `{"value": <body>, "processed": true}`; a body with `"poison": true` fails.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The event sluicegate sends: a batch of records.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Batch {
    /// The records, each from one caller.
    pub records: Vec<Record>,
}

/// One record. `id` is sluicegate's (unique within the batch, used to route the result back
/// to its caller); `key` is the client key the request was admitted under; `body` is the
/// client's own JSON.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Record {
    /// sluicegate's id for the record; its result must carry it back.
    pub id: String,
    /// The client key the request was admitted under (empty when not sent).
    #[serde(default)]
    pub key: String,
    /// The client's JSON, as it was posted.
    #[serde(default)]
    pub body: Value,
}

/// Which of the two response shapes the function answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResponseShape {
    /// `{"results":[...]}`: a body for every success, an error for every failure.
    #[default]
    Results,
    /// `{"batchItemFailures":[...]}`: only the failed ids.
    BatchItemFailures,
}

impl ResponseShape {
    /// Environment variable that selects the shape.
    pub const ENV: &'static str = "RESPONSE_SHAPE";

    /// Reads [`Self::ENV`]: unset or `results` → `Results`, `batch_item_failures` →
    /// `BatchItemFailures`. Anything else is an error, so a typo fails the function's
    /// init (visible in its logs) instead of silently answering the other shape.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(Self::ENV) {
            Err(std::env::VarError::NotPresent) => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", Self::ENV)),
            Ok(value) => value.parse(),
        }
    }
}

impl std::str::FromStr for ResponseShape {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "results" => Ok(Self::Results),
            "batch_item_failures" => Ok(Self::BatchItemFailures),
            other => Err(format!(
                "{}={other:?}: expected \"results\" or \"batch_item_failures\"",
                Self::ENV
            )),
        }
    }
}

/// The function's answer, serialized as one of the two accepted shapes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Response {
    /// `{"results":[...]}`.
    Results {
        /// One outcome per record, in the batch's order.
        results: Vec<RecordResult>,
    },
    /// `{"batchItemFailures":[...]}`.
    BatchItemFailures {
        /// The records that failed; every other record succeeded.
        #[serde(rename = "batchItemFailures")]
        batch_item_failures: Vec<ItemFailure>,
    },
}

/// One record's outcome in the `results` shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum RecordResult {
    /// The record was processed; its caller gets `200` with `body`.
    Success {
        /// The record's id from the batch.
        id: String,
        /// What the function made of the record.
        body: Value,
    },
    /// The record failed; its caller gets `422` with `error`.
    Error {
        /// The record's id from the batch.
        id: String,
        /// Why the record failed.
        error: RecordError,
    },
}

/// Lambda's own error object shape, so a record error reads like a function error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordError {
    /// A short machine-readable kind, like an exception's class name.
    #[serde(rename = "errorType")]
    pub error_type: String,
    /// A human-readable explanation for the caller.
    #[serde(rename = "errorMessage")]
    pub error_message: String,
}

/// One failed record in the `batchItemFailures` shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemFailure {
    /// The failed record's id from the batch.
    #[serde(rename = "itemIdentifier")]
    pub item_identifier: String,
}

/// Processes every record of `batch` independently and answers in `shape`.
pub fn handle(batch: Batch, shape: ResponseShape) -> Response {
    let outcomes = batch
        .records
        .into_iter()
        .map(|record| (record.id.clone(), process(record)));
    match shape {
        ResponseShape::Results => Response::Results {
            results: outcomes
                .map(|(id, outcome)| match outcome {
                    Ok(body) => RecordResult::Success { id, body },
                    Err(error) => RecordResult::Error { id, error },
                })
                .collect(),
        },
        ResponseShape::BatchItemFailures => Response::BatchItemFailures {
            batch_item_failures: outcomes
                .filter(|(_, outcome)| outcome.is_err())
                .map(|(id, _)| ItemFailure {
                    item_identifier: id,
                })
                .collect(),
        },
    }
}

/// The per-record work. Replace this with the real thing; keep it free of panics so one
/// record cannot take the batch down with it.
fn process(record: Record) -> Result<Value, RecordError> {
    if record.body.get("poison") == Some(&Value::Bool(true)) {
        return Err(RecordError {
            error_type: "PoisonRecord".to_owned(),
            error_message: format!("record {} is marked \"poison\": true", record.id),
        });
    }
    let mut processed = match record.body {
        Value::Object(fields) => fields,
        other => Map::from_iter([("value".to_owned(), other)]),
    };
    processed.insert("processed".to_owned(), Value::Bool(true));
    Ok(Value::Object(processed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn batch(event: Value) -> Batch {
        serde_json::from_value(event).expect("test event is a valid batch")
    }

    fn mixed_batch() -> Batch {
        batch(json!({"records": [
            {"id": "r1", "key": "k1", "body": {"n": 1}},
            {"id": "r2", "key": "k1", "body": {"n": 2, "poison": true}},
            {"id": "r3", "key": "k2", "body": "plain string"},
        ]}))
    }

    #[test]
    fn results_shape_reports_each_record_on_its_own() {
        let response = serde_json::to_value(handle(mixed_batch(), ResponseShape::Results))
            .expect("response serializes");
        assert_eq!(
            response,
            json!({"results": [
                {"id": "r1", "status": "success", "body": {"n": 1, "processed": true}},
                {"id": "r2", "status": "error", "error": {
                    "errorType": "PoisonRecord",
                    "errorMessage": "record r2 is marked \"poison\": true"
                }},
                {"id": "r3", "status": "success", "body": {"value": "plain string", "processed": true}},
            ]})
        );
    }

    #[test]
    fn batch_item_failures_shape_lists_only_failed_ids() {
        let response =
            serde_json::to_value(handle(mixed_batch(), ResponseShape::BatchItemFailures))
                .expect("response serializes");
        assert_eq!(
            response,
            json!({"batchItemFailures": [{"itemIdentifier": "r2"}]})
        );
    }

    #[test]
    fn batch_item_failures_is_empty_when_everything_succeeds() {
        let all_good =
            batch(json!({"records": [{"id": "r1", "key": "k", "body": {"poison": false}}]}));
        let response = serde_json::to_value(handle(all_good, ResponseShape::BatchItemFailures))
            .expect("response serializes");
        // An empty list (not a missing field) is how the SQS shape says "all succeeded".
        assert_eq!(response, json!({"batchItemFailures": []}));
    }

    #[test]
    fn missing_key_and_body_default_instead_of_failing_the_batch() {
        let sparse = batch(json!({"records": [{"id": "r1"}]}));
        let response = serde_json::to_value(handle(sparse, ResponseShape::Results))
            .expect("response serializes");
        assert_eq!(
            response,
            json!({"results": [{"id": "r1", "status": "success", "body": {"value": null, "processed": true}}]})
        );
    }

    #[test]
    fn empty_batch_answers_empty_results() {
        let response = serde_json::to_value(handle(
            batch(json!({"records": []})),
            ResponseShape::Results,
        ))
        .expect("response serializes");
        assert_eq!(response, json!({"results": []}));
    }

    #[test]
    fn response_shape_parses_known_values_and_rejects_typos() {
        assert_eq!("results".parse(), Ok(ResponseShape::Results));
        assert_eq!("".parse(), Ok(ResponseShape::Results));
        assert_eq!(
            "batch_item_failures".parse(),
            Ok(ResponseShape::BatchItemFailures)
        );
        assert!("batchItemFailures".parse::<ResponseShape>().is_err());
    }
}
