//! The batch envelope: building the invoke payload and reading the function's answer.
//!
//! Request: `{"records":[{"id":"r1","key":"<client key>","body":<record>}, ...]}`.
//! Accepted answers: `{"results":[{"id","status":"success","body"} | {"id","status":"error","error"}]}`
//! or the SQS-style `{"batchItemFailures":[{"itemIdentifier":"r2"}]}` (the others succeeded,
//! with no body). Anything else, or a record the answer does not mention, is an error for
//! that record's caller — never silence. An answer that names an id the batch does not hold
//! (or an empty one) cannot be attributed, so — as Lambda's event-source mappings treat it —
//! the whole batch failed (`502`, not retried: the function did run it); a record listed
//! twice in `results` has no single result (`502` for that record).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Delivered, Message, RecordError};
use crate::config::Envelope;
use crate::invoke::{InvokeFailure, Invoked};

/// A function error (`X-Amz-Function-Error`), as every record of the batch reports it.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
#[error("the function failed ({kind}): {error_type}: {message}")]
pub struct FunctionError {
    /// `Unhandled` or `Handled`.
    pub kind: String,
    /// The payload's `errorType` (`Unknown` when it has none or is not JSON).
    pub error_type: String,
    /// The payload's `errorMessage`, or its first KiB when it is not JSON.
    pub message: String,
}

impl FunctionError {
    fn parse(kind: String, payload: &[u8]) -> Self {
        #[derive(Deserialize)]
        struct Body {
            #[serde(rename = "errorType")]
            error_type: Option<String>,
            #[serde(rename = "errorMessage")]
            error_message: Option<String>,
        }
        match serde_json::from_slice::<Body>(payload) {
            Ok(body) => FunctionError {
                kind,
                error_type: body.error_type.unwrap_or_else(|| "Unknown".to_owned()),
                message: body.error_message.unwrap_or_default(),
            },
            Err(_) => FunctionError {
                kind,
                error_type: "Unknown".to_owned(),
                message: String::from_utf8_lossy(&payload[..payload.len().min(1024)]).into_owned(),
            },
        }
    }
}

/// One record's envelope entry, `{"id":"r1","key":"k","body":<record>}`, and the slice of
/// it that is the record itself.
pub(super) fn entry(id: &str, key: &str, body: &RawValue) -> (Bytes, Bytes) {
    let body = body.get();
    let mut buf = BytesMut::with_capacity(body.len() + key.len() + id.len() + 32);
    buf.put_slice(b"{\"id\":\"");
    buf.put_slice(id.as_bytes());
    buf.put_slice(b"\",\"key\":");
    let mut writer = buf.writer();
    serde_json::to_writer(&mut writer, key).expect("writing a string into memory cannot fail");
    let mut buf = writer.into_inner();
    buf.put_slice(b",\"body\":");
    let start = buf.len();
    buf.put_slice(body.as_bytes());
    let end = buf.len();
    buf.put_slice(b"}");
    let entry = buf.freeze();
    let record = entry.slice(start..end);
    (entry, record)
}

/// Payload bytes for `entries` under `envelope`.
pub(super) fn payload(envelope: Envelope, batch: &[Message]) -> Bytes {
    match envelope {
        Envelope::Raw => batch.first().map(|m| m.entry.clone()).unwrap_or_default(),
        Envelope::Batch => {
            let len = framed_len(batch.iter().map(|m| m.entry.len()).sum(), batch.len());
            let mut buf = BytesMut::with_capacity(len);
            buf.put_slice(b"{\"records\":[");
            for (i, m) in batch.iter().enumerate() {
                if i > 0 {
                    buf.put_u8(b',');
                }
                buf.put_slice(&m.entry);
            }
            buf.put_slice(b"]}");
            debug_assert_eq!(buf.len(), len);
            buf.freeze()
        }
    }
}

/// Exact payload size of `records` entries totalling `entry_bytes` bytes.
pub(super) fn framed_len(entry_bytes: usize, records: usize) -> usize {
    crate::config::ENVELOPE_FRAME as usize + entry_bytes + records.saturating_sub(1)
}

#[derive(Deserialize)]
struct BatchResponse<'a> {
    #[serde(borrow, default)]
    results: Option<Vec<ResultItem<'a>>>,
    #[serde(rename = "batchItemFailures", default)]
    batch_item_failures: Option<Vec<ItemFailure>>,
}

/// One entry of `results`. Its `id` and `status` borrow from the payload unless they hold
/// JSON escapes, so reading an answer allocates nothing per record but its body.
#[derive(Deserialize)]
struct ResultItem<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ItemFailure {
    #[serde(rename = "itemIdentifier")]
    item_identifier: String,
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("`null` is JSON")
}

fn owned(raw: Option<&RawValue>) -> Box<RawValue> {
    raw.map(RawValue::to_owned).unwrap_or_else(null)
}

/// Answers every message of a dispatched batch from the invoke's result. Each message is
/// consumed by exactly one `answer`.
pub(super) fn fan_out(
    batch: Vec<Message>,
    result: Result<Invoked, InvokeFailure>,
    envelope: Envelope,
) {
    let (payload, function_error) = match result {
        Err(failure) => {
            for m in batch {
                m.answer(Err(RecordError::Invoke(failure.clone())));
            }
            return;
        }
        Ok(Invoked::Accepted) => {
            for m in batch {
                m.answer(Ok(Delivered::Accepted));
            }
            return;
        }
        Ok(Invoked::Response {
            payload,
            function_error,
        }) => (payload, function_error),
    };
    if let Some(kind) = function_error {
        let error = FunctionError::parse(kind, &payload);
        for m in batch {
            m.answer(Err(RecordError::Function(error.clone())));
        }
        return;
    }
    match envelope {
        Envelope::Raw => {
            let text = if payload.is_empty() {
                "null"
            } else {
                std::str::from_utf8(&payload).unwrap_or("\u{0}")
            };
            let outcome = serde_json::from_str::<Box<RawValue>>(text)
                .map(|body| Delivered::Success { body })
                .map_err(|e| RecordError::MalformedResponse(format!("response is not JSON: {e}")));
            let mut outcome = Some(outcome);
            for m in batch {
                // A raw batch holds exactly one record; any other would get the same error.
                let o = outcome.take().unwrap_or(Err(RecordError::MissingResult));
                m.answer(o);
            }
        }
        Envelope::Batch => fan_out_batch(batch, &payload),
    }
}

fn fan_out_batch(batch: Vec<Message>, payload: &[u8]) {
    let (results, failures) = match serde_json::from_slice::<BatchResponse<'_>>(payload) {
        Ok(BatchResponse {
            results,
            batch_item_failures,
        }) => (results, batch_item_failures),
        Err(e) => {
            return fail_batch(batch, format!("cannot parse the batch response: {e}"));
        }
    };
    match (results, failures) {
        (Some(results), None) => fan_out_results(batch, &results),
        (Some(results), Some(failures)) if failures.is_empty() => fan_out_results(batch, &results),
        (Some(_), Some(_)) => fail_batch(
            batch,
            "the response has both \"results\" and a non-empty \"batchItemFailures\"".to_owned(),
        ),
        (None, Some(failures)) => fan_out_item_failures(batch, &failures),
        (None, None) => fail_batch(
            batch,
            "expected an object with \"results\" or \"batchItemFailures\"".to_owned(),
        ),
    }
}

/// The first of `ids` that is not a record of `batch` (an empty id never is).
fn stranger<'i>(batch: &[Message], mut ids: impl Iterator<Item = &'i str>) -> Option<&'i str> {
    let in_batch: HashSet<&str> = batch.iter().map(|m| &*m.id).collect();
    ids.find(|id| !in_batch.contains(id))
}

/// A response that cannot be attributed record by record fails every record of the batch.
/// Not retried: the function ran the batch (at least partly), and running it again could
/// repeat whatever it did.
fn fail_batch(batch: Vec<Message>, message: String) {
    tracing::warn!(records = batch.len(), reason = %message, "the function's batch response is malformed: failing the whole batch");
    for m in batch {
        m.answer(Err(RecordError::MalformedResponse(message.clone())));
    }
}

/// A response naming a record the batch does not hold (or an empty id) says that *some*
/// record failed without saying which: as Lambda's event-source mappings do, the whole batch
/// is failed rather than any record being told it succeeded.
fn unattributable(batch: Vec<Message>, shape: &str, id: &str) {
    fail_batch(
        batch,
        format!(
            "{shape} names {id:?}, which is not a record of this batch; the whole batch failed"
        ),
    );
}

fn fan_out_results(batch: Vec<Message>, results: &[ResultItem<'_>]) {
    // The usual answer lists every record once, in the batch's order. Record ids are unique
    // in the process (`r<n>`), so a positional match means no id is a stranger and none is
    // listed twice: each record has exactly the result at its index, as the maps below
    // would find, without building them.
    if results.len() == batch.len() && results.iter().zip(&batch).all(|(r, m)| *r.id == *m.id) {
        for (m, item) in batch.into_iter().zip(results) {
            m.answer(result_outcome(item));
        }
        return;
    }
    if let Some(id) = stranger(&batch, results.iter().map(|r| &*r.id)) {
        return unattributable(batch, "\"results\"", id);
    }
    // Each id with its result and how often the response lists it: a record listed twice
    // has no single result to report.
    let mut by_id: HashMap<&str, (&ResultItem<'_>, usize)> = HashMap::with_capacity(results.len());
    for item in results {
        by_id.entry(&*item.id).or_insert((item, 0)).1 += 1;
    }
    for m in batch {
        let outcome = match by_id.get(&*m.id) {
            None => Err(RecordError::MissingResult),
            Some((_, times)) if *times > 1 => Err(RecordError::MalformedResponse(format!(
                "the response lists record {} {times} times (twice or more); its result is ambiguous",
                m.id
            ))),
            Some((item, _)) => result_outcome(item),
        };
        m.answer(outcome);
    }
}

/// The outcome a record's one entry in `results` gives it.
fn result_outcome(item: &ResultItem<'_>) -> super::Outcome {
    match &*item.status {
        "success" => Ok(Delivered::Success {
            body: owned(item.body),
        }),
        "error" => Ok(Delivered::Failed {
            error: owned(item.error),
        }),
        other => Err(RecordError::MalformedResponse(format!(
            "result {} has status {other:?}; expected \"success\" or \"error\"",
            item.id
        ))),
    }
}

fn fan_out_item_failures(batch: Vec<Message>, failures: &[ItemFailure]) {
    let ids = failures.iter().map(|f| f.item_identifier.as_str());
    if let Some(id) = stranger(&batch, ids) {
        return unattributable(batch, "\"batchItemFailures\"", id);
    }
    let failed: HashSet<&str> = failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    for m in batch {
        let outcome = if failed.contains(&*m.id) {
            let error = serde_json::json!({
                "errorType": "BatchItemFailure",
                "errorMessage": format!("the function reported record {} in batchItemFailures", m.id),
            });
            Ok(Delivered::Failed {
                error: serde_json::value::to_raw_value(&error).expect("a json! value serializes"),
            })
        } else {
            Ok(Delivered::Success { body: null() })
        };
        m.answer(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::oneshot;
    use tokio::time::Instant;

    fn message(id: &str, body: &str) -> (Message, oneshot::Receiver<super::super::Outcome>) {
        let (reply, rx) = oneshot::channel();
        let raw = RawValue::from_string(body.to_owned()).unwrap();
        let (entry, record) = entry(id, "key-1", &raw);
        assert_eq!(&record[..], body.as_bytes());
        let m = Message {
            id: Arc::from(id),
            key: Arc::from("key-1"),
            entry,
            body: record,
            enqueued: Instant::now(),
            deadline: Instant::now() + std::time::Duration::from_secs(5),
            reply,
            span: tracing::Span::none(),
            charge: super::super::Charge {
                queue: Arc::default(),
                bytes: 0,
            },
        };
        (m, rx)
    }

    #[tokio::test]
    async fn a_caller_past_its_deadline_is_told_so_not_left_to_find_its_result_lost() {
        let (mut expired, rx_expired) = message("r1", "1");
        let (fresh, mut rx_fresh) = message("r2", "2");
        let (mut gone, rx_gone) = message("r3", "3");
        expired.deadline = Instant::now();
        gone.deadline = Instant::now();
        drop(rx_gone);
        let mut batch = vec![expired, fresh, gone];
        Message::prune_gone(&mut batch, Instant::now());
        assert_eq!(batch.len(), 1);
        assert_eq!(&*batch[0].id, "r2");
        assert!(matches!(rx_expired.await, Ok(Err(RecordError::Expired))));
        assert!(
            rx_fresh.try_recv().is_err(),
            "the fresh record is not answered"
        );
    }

    #[test]
    fn payload_is_the_documented_envelope_with_exact_length() {
        let (a, _ra) = message("r1", r#"{"n":1}"#);
        let (b, _rb) = message("r2", r#""two""#);
        let batch = vec![a, b];
        let payload = payload(Envelope::Batch, &batch);
        let value: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"records":[{"id":"r1","key":"key-1","body":{"n":1}},{"id":"r2","key":"key-1","body":"two"}]})
        );
        let entries: usize = batch.iter().map(|m| m.entry.len()).sum();
        assert_eq!(payload.len(), framed_len(entries, 2));
    }

    #[test]
    fn keys_are_json_escaped_in_entries() {
        let raw = RawValue::from_string("1".to_owned()).unwrap();
        let (e, _) = entry("r9", "a\"b\\c", &raw);
        let value: serde_json::Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(value["key"], "a\"b\\c");
    }

    #[tokio::test]
    async fn results_shape_answers_each_record_and_flags_missing_ones() {
        let (a, ra) = message("r1", "1");
        let (b, rb) = message("r2", "2");
        let (c, rc) = message("r3", "3");
        let response = br#"{"results":[{"id":"r2","status":"error","error":{"why":"bad"}},{"id":"r1","status":"success","body":{"ok":1}}]}"#;
        fan_out(
            vec![a, b, c],
            Ok(Invoked::Response {
                payload: Bytes::from_static(response),
                function_error: None,
            }),
            Envelope::Batch,
        );
        match ra.await.unwrap() {
            Ok(Delivered::Success { body }) => assert_eq!(body.get(), r#"{"ok":1}"#),
            other => panic!("r1: {other:?}"),
        }
        match rb.await.unwrap() {
            Ok(Delivered::Failed { error }) => assert_eq!(error.get(), r#"{"why":"bad"}"#),
            other => panic!("r2: {other:?}"),
        }
        assert!(matches!(rc.await.unwrap(), Err(RecordError::MissingResult)));
    }

    #[tokio::test]
    async fn results_in_batch_order_answer_each_record_as_results_in_any_order_do() {
        let in_order = r#"{"results":[{"id":"r1","status":"success","body":{"n":1}},{"id":"r2","status":"error","error":{"why":"bad"}}]}"#;
        let reversed = r#"{"results":[{"id":"r2","status":"error","error":{"why":"bad"}},{"id":"r1","status":"success","body":{"n":1}}]}"#;
        let escaped = r#"{"results":[{"id":"\u00721","status":"succ\u0065ss","body":{"n":1}},{"id":"r2","status":"error","error":{"why":"bad"}}]}"#;
        for response in [in_order, reversed, escaped] {
            match answers_to(response).await {
                [Ok(Delivered::Success { body }), Ok(Delivered::Failed { error })] => {
                    assert_eq!(body.get(), r#"{"n":1}"#, "{response}");
                    assert_eq!(error.get(), r#"{"why":"bad"}"#, "{response}");
                }
                other => panic!("{response}: {other:?}"),
            }
        }
        let bad_status =
            r#"{"results":[{"id":"r1","status":"done"},{"id":"r2","status":"success"}]}"#;
        assert!(matches!(
            answers_to(bad_status).await,
            [
                Err(RecordError::MalformedResponse(_)),
                Ok(Delivered::Success { .. })
            ]
        ));
    }

    #[tokio::test]
    async fn batch_item_failures_shape_marks_only_listed_records_failed() {
        let (a, ra) = message("r1", "1");
        let (b, rb) = message("r2", "2");
        let response = br#"{"batchItemFailures":[{"itemIdentifier":"r2"}]}"#;
        fan_out(
            vec![a, b],
            Ok(Invoked::Response {
                payload: Bytes::from_static(response),
                function_error: None,
            }),
            Envelope::Batch,
        );
        assert!(matches!(ra.await.unwrap(), Ok(Delivered::Success { .. })));
        assert!(matches!(rb.await.unwrap(), Ok(Delivered::Failed { .. })));
    }

    /// Answers a batch of `r1`, `r2` with `response` and returns both outcomes.
    async fn answers_to(response: &str) -> [super::super::Outcome; 2] {
        let (a, ra) = message("r1", "1");
        let (b, rb) = message("r2", "2");
        fan_out(
            vec![a, b],
            Ok(Invoked::Response {
                payload: Bytes::copy_from_slice(response.as_bytes()),
                function_error: None,
            }),
            Envelope::Batch,
        );
        [ra.await.unwrap(), rb.await.unwrap()]
    }

    #[tokio::test]
    async fn unattributable_responses_fail_the_whole_batch() {
        for (response, naming) in [
            (r#"{"batchItemFailures":[{"itemIdentifier":""}]}"#, r#""""#),
            (
                r#"{"batchItemFailures":[{"itemIdentifier":"r2"},{"itemIdentifier":"r7"}]}"#,
                r#""r7""#,
            ),
            (
                r#"{"results":[{"id":"r1","status":"success"},{"id":"r2","status":"success"},{"id":"r9","status":"error"}]}"#,
                r#""r9""#,
            ),
            (
                r#"{"results":[{"id":"r1","status":"success"},{"id":"r2","status":"success"}],"batchItemFailures":[{"itemIdentifier":"r1"}]}"#,
                "both",
            ),
            (
                r#"{"batchItemFailures":[{"itemIdentifier":null}]}"#,
                "parse",
            ),
            (r#"{"batchItemFailures":[{}]}"#, "parse"),
            (r#"{"batchItemFailures":["r1"]}"#, "parse"),
            (r#"{"results":[{"id":"r1","status":"success"},7]}"#, "parse"),
        ] {
            for outcome in answers_to(response).await {
                match outcome {
                    Err(RecordError::MalformedResponse(m)) => {
                        assert!(m.contains(naming), "{response}: {m}")
                    }
                    other => panic!("{response}: {other:?}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn a_record_listed_twice_has_no_result_and_the_others_keep_theirs() {
        let [r1, r2] = answers_to(
            r#"{"results":[{"id":"r1","status":"success"},{"id":"r2","status":"success"},{"id":"r1","status":"error"}]}"#,
        )
        .await;
        assert!(
            matches!(r1, Err(RecordError::MalformedResponse(_))),
            "{r1:?}"
        );
        assert!(matches!(r2, Ok(Delivered::Success { .. })), "{r2:?}");
        // Empty item failures beside results add nothing; repeated failures are one failure.
        let [r1, r2] = answers_to(
            r#"{"results":[{"id":"r1","status":"success"},{"id":"r2","status":"success"}],"batchItemFailures":[]}"#,
        )
        .await;
        assert!(matches!(
            (r1, r2),
            (Ok(Delivered::Success { .. }), Ok(Delivered::Success { .. }))
        ));
        let [r1, r2] = answers_to(
            r#"{"batchItemFailures":[{"itemIdentifier":"r2"},{"itemIdentifier":"r2"}]}"#,
        )
        .await;
        assert!(matches!(
            (r1, r2),
            (Ok(Delivered::Success { .. }), Ok(Delivered::Failed { .. }))
        ));
    }

    #[tokio::test]
    async fn garbled_responses_answer_every_caller_with_an_error() {
        for response in [
            &b"not json"[..],
            b"{\"something\":1}",
            b"[1,2]",
            b"{\"results\":[{\"id\":\"r1\",\"status\":\"meh\"}]}",
        ] {
            let (a, ra) = message("r1", "1");
            fan_out(
                vec![a],
                Ok(Invoked::Response {
                    payload: Bytes::copy_from_slice(response),
                    function_error: None,
                }),
                Envelope::Batch,
            );
            assert!(
                matches!(ra.await.unwrap(), Err(RecordError::MalformedResponse(_))),
                "{response:?}"
            );
        }
    }

    #[tokio::test]
    async fn function_errors_reach_every_caller_with_the_message() {
        let (a, ra) = message("r1", "1");
        let (b, rb) = message("r2", "2");
        let response = br#"{"errorType":"Runtime.ExitError","errorMessage":"boom"}"#;
        fan_out(
            vec![a, b],
            Ok(Invoked::Response {
                payload: Bytes::from_static(response),
                function_error: Some("Unhandled".into()),
            }),
            Envelope::Batch,
        );
        for rx in [ra, rb] {
            match rx.await.unwrap() {
                Err(RecordError::Function(e)) => {
                    assert_eq!(e.message, "boom");
                    assert_eq!(e.error_type, "Runtime.ExitError");
                    assert_eq!(e.kind, "Unhandled");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn raw_envelope_returns_the_payload_as_the_result() {
        let (a, ra) = message("r1", r#"{"n":41}"#);
        fan_out(
            vec![a],
            Ok(Invoked::Response {
                payload: Bytes::from_static(b"{\"n\":42}"),
                function_error: None,
            }),
            Envelope::Raw,
        );
        match ra.await.unwrap() {
            Ok(Delivered::Success { body }) => assert_eq!(body.get(), r#"{"n":42}"#),
            other => panic!("{other:?}"),
        }
    }
}
