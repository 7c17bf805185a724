//! What an emulated function computes: parse the payload, decide which records fail, and
//! build the function's answer. Pure except for the fail-every counter and the random
//! source, both passed in, so every behaviour here is unit-testable without a server.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::config::{FailureMode, FunctionConfig, Handler, ResponseShape};

/// An invoke payload that has been checked to be JSON.
#[derive(Debug)]
pub(crate) enum Payload {
    /// A sluicegate batch envelope, `{"records":[{"id","key","body"}, ...]}`.
    Batch(Vec<Record>),
    /// Any other JSON document, kept byte for byte; it counts as one record.
    Other(Bytes),
}

#[derive(Debug, Deserialize)]
struct Envelope {
    records: Vec<Record>,
}

/// One record of a batch envelope. `key` and unknown fields are accepted and ignored.
#[derive(Debug, Deserialize)]
pub(crate) struct Record {
    id: String,
    #[serde(default = "null")]
    body: Box<RawValue>,
}

fn null() -> Box<RawValue> {
    RawValue::NULL.to_owned()
}

impl Payload {
    /// Parses an invoke payload. An empty payload is `{}`, as in Lambda. The error is the
    /// parser's message, for `InvalidRequestContentException`.
    pub(crate) fn parse(raw: Bytes) -> Result<Self, String> {
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(Payload::Other(Bytes::from_static(b"{}")));
        }
        // Validate the whole document first: a payload that is JSON but not an envelope is
        // still a valid payload.
        serde_json::from_slice::<&RawValue>(&raw).map_err(|e| e.to_string())?;
        Ok(match serde_json::from_slice::<Envelope>(&raw) {
            Ok(envelope) => Payload::Batch(envelope.records),
            Err(_) => Payload::Other(raw),
        })
    }

    /// Each record's bytes as the function is given them: a batch record's `body`, or
    /// the whole payload.
    pub(crate) fn record_bytes(&self) -> impl Iterator<Item = &[u8]> {
        let (records, other) = match self {
            Payload::Batch(records) => (records.as_slice(), None),
            Payload::Other(raw) => (&[][..], Some(&raw[..])),
        };
        records.iter().map(|r| r.body.get().as_bytes()).chain(other)
    }

    /// How many records the function is given.
    pub(crate) fn records(&self) -> u64 {
        match self {
            Payload::Batch(records) => records.len() as u64,
            Payload::Other(_) => 1,
        }
    }
}

/// What the function answered.
#[derive(Debug, PartialEq)]
pub(crate) struct Outcome {
    /// The response payload.
    pub(crate) body: Bytes,
    /// `true` when the function failed as a whole (`X-Amz-Function-Error: Unhandled`).
    pub(crate) unhandled: bool,
    /// How many records failed.
    pub(crate) failed_records: u64,
}

/// A record's verdict: why it failed, if it did.
struct Failure {
    error_type: &'static str,
    /// Completes "record r2 failed (...)" in per-record errors.
    reason: String,
    /// The message when the failure crashes the function.
    crash_message: String,
}

/// Decides record by record, in order. `seen` is the function's lifetime record counter,
/// advanced here by the number of records (one atomic add per invocation, so concurrent
/// invocations get disjoint ranges of record numbers).
struct Judge<'a, R> {
    cfg: &'a FunctionConfig,
    /// 1-based number of the next record, over the function's lifetime.
    next: u64,
    rng: &'a mut R,
}

impl<R: Rng> Judge<'_, R> {
    fn judge(&mut self, label: &str, body: &RawValue) -> Option<Failure> {
        let number = self.next;
        self.next += 1;
        match self.cfg.handler {
            Handler::Echo => None,
            // `checked_rem`: an unvalidated `every = 0` means "never" instead of a panic.
            Handler::FailEvery => {
                (number.checked_rem(u64::from(self.cfg.every)) == Some(0)).then(|| Failure {
                    error_type: "InjectedFailure",
                    reason: format!(
                        "fail_every: record #{number}, every {}th fails",
                        self.cfg.every
                    ),
                    crash_message: format!(
                        "{label} failed: it is record #{number} and every {}th record fails",
                        self.cfg.every
                    ),
                })
            }
            // A comparison rather than `random_bool`, which panics on a ratio outside 0..=1.
            Handler::FailRatio => (self.rng.random::<f64>() < self.cfg.ratio).then(|| Failure {
                error_type: "InjectedFailure",
                reason: format!("fail_ratio {}", self.cfg.ratio),
                crash_message: format!("{label} failed (fail_ratio {})", self.cfg.ratio),
            }),
            Handler::Poison => is_poison(body).then(|| Failure {
                error_type: "PoisonRecord",
                reason: "poison".into(),
                crash_message: format!("{label} is poison"),
            }),
        }
    }
}

fn is_poison(body: &RawValue) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        poison: Option<serde_json::Value>,
    }
    matches!(
        serde_json::from_str::<Probe>(body.get()),
        Ok(Probe {
            poison: Some(serde_json::Value::Bool(true))
        })
    )
}

/// An `errorType`/`errorMessage` pair, the shape Lambda runtimes use for errors.
#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "errorType")]
    error_type: &'a str,
    #[serde(rename = "errorMessage")]
    error_message: &'a str,
}

#[derive(Serialize)]
struct Results<'a> {
    results: Vec<RecordResult<'a>>,
}

#[derive(Serialize)]
struct RecordResult<'a> {
    id: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody<'a>>,
}

#[derive(Serialize)]
struct BatchItemFailures<'a> {
    #[serde(rename = "batchItemFailures")]
    batch_item_failures: Vec<ItemIdentifier<'a>>,
}

#[derive(Serialize)]
struct ItemIdentifier<'a> {
    #[serde(rename = "itemIdentifier")]
    item_identifier: &'a str,
}

fn to_json(value: &impl Serialize) -> Bytes {
    // Serializing these plain structs (strings and already-valid raw JSON) cannot fail.
    Bytes::from(serde_json::to_vec(value).expect("response structs serialize to JSON"))
}

fn crash(failure: &Failure) -> Outcome {
    Outcome {
        body: to_json(&ErrorBody {
            error_type: failure.error_type,
            error_message: &failure.crash_message,
        }),
        unhandled: true,
        failed_records: 1,
    }
}

/// Runs the function's handler over `payload`.
pub(crate) fn run(
    cfg: &FunctionConfig,
    seen: &AtomicU64,
    rng: &mut impl Rng,
    payload: &Payload,
) -> Outcome {
    // Relaxed is enough: the counter only hands out record numbers; nothing else is
    // published through it.
    let first = seen.fetch_add(payload.records(), Ordering::Relaxed) + 1;
    let mut judge = Judge {
        cfg,
        next: first,
        rng,
    };
    let records = match payload {
        Payload::Other(raw) => {
            let parsed: Option<&RawValue> = serde_json::from_slice(raw).ok();
            let failure = parsed.and_then(|body| judge.judge("payload", body));
            return match failure {
                // Outside the envelope there is nowhere to report a record error: the
                // function throws.
                Some(failure) => crash(&failure),
                None => Outcome {
                    body: raw.clone(),
                    unhandled: false,
                    failed_records: 0,
                },
            };
        }
        Payload::Batch(records) => records,
    };

    let verdicts: Vec<Option<Failure>> = records
        .iter()
        .map(|r| judge.judge(&format!("record {}", r.id), &r.body))
        .collect();
    let failed_records = verdicts.iter().filter(|v| v.is_some()).count() as u64;

    if cfg.failure == FailureMode::Crash {
        if let Some(first_failure) = verdicts.iter().flatten().next() {
            return Outcome {
                failed_records,
                ..crash(first_failure)
            };
        }
    }

    let body = match cfg.response {
        ResponseShape::Results => {
            let messages: Vec<Option<String>> = records
                .iter()
                .zip(&verdicts)
                .map(|(r, v)| {
                    v.as_ref()
                        .map(|f| format!("record {} failed ({})", r.id, f.reason))
                })
                .collect();
            let results = records
                .iter()
                .zip(&messages)
                .map(|(r, message)| match message {
                    None => RecordResult {
                        id: &r.id,
                        status: "success",
                        body: Some(&r.body),
                        error: None,
                    },
                    Some(message) => RecordResult {
                        id: &r.id,
                        status: "error",
                        body: None,
                        error: Some(ErrorBody {
                            error_type: "RecordFailed",
                            error_message: message,
                        }),
                    },
                })
                .collect();
            to_json(&Results { results })
        }
        ResponseShape::BatchItemFailures => to_json(&BatchItemFailures {
            batch_item_failures: records
                .iter()
                .zip(&verdicts)
                .filter(|(_, v)| v.is_some())
                .map(|(r, _)| ItemIdentifier {
                    item_identifier: &r.id,
                })
                .collect(),
        }),
    };
    Outcome {
        body,
        unhandled: false,
        failed_records,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use serde_json::{json, Value};

    fn function(handler: Handler) -> FunctionConfig {
        FunctionConfig {
            handler,
            ..FunctionConfig::new("f")
        }
    }

    fn run_json(cfg: &FunctionConfig, seen: &AtomicU64, payload: &str) -> (Value, bool, u64) {
        let payload = Payload::parse(Bytes::copy_from_slice(payload.as_bytes()))
            .expect("test payload is JSON");
        let outcome = run(cfg, seen, &mut StdRng::seed_from_u64(7), &payload);
        let body = serde_json::from_slice(&outcome.body).expect("handler answers JSON");
        (body, outcome.unhandled, outcome.failed_records)
    }

    fn batch(bodies: &[Value]) -> String {
        let records: Vec<Value> = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| json!({"id": format!("r{}", i + 1), "key": "k", "body": body}))
            .collect();
        json!({ "records": records }).to_string()
    }

    #[test]
    fn echo_answers_each_record_with_its_body() {
        let (body, unhandled, failed) = run_json(
            &function(Handler::Echo),
            &AtomicU64::new(0),
            &batch(&[json!({"a": 1}), json!("two")]),
        );
        assert_eq!(
            body,
            json!({"results": [
                {"id": "r1", "status": "success", "body": {"a": 1}},
                {"id": "r2", "status": "success", "body": "two"},
            ]})
        );
        assert!(!unhandled);
        assert_eq!(failed, 0);
    }

    #[test]
    fn echo_returns_other_payloads_byte_for_byte() {
        let raw = "{ \"b\" : [1, 2.50],\n \"a\": null }";
        let payload = Payload::parse(Bytes::from_static(raw.as_bytes())).expect("JSON");
        assert_eq!(payload.records(), 1);
        let outcome = run(
            &function(Handler::Echo),
            &AtomicU64::new(0),
            &mut rand::rng(),
            &payload,
        );
        assert_eq!(outcome.body, raw.as_bytes());
    }

    #[test]
    fn empty_payload_is_an_empty_object_and_garbage_is_refused() {
        let payload = Payload::parse(Bytes::new()).expect("empty is allowed");
        let outcome = run(
            &function(Handler::Echo),
            &AtomicU64::new(0),
            &mut rand::rng(),
            &payload,
        );
        assert_eq!(outcome.body, "{}".as_bytes());
        let err = Payload::parse(Bytes::from_static(b"{not json")).unwrap_err();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn records_without_an_id_make_the_payload_a_plain_document() {
        let payload =
            Payload::parse(Bytes::from_static(br#"{"records":[{"body":1}]}"#)).expect("JSON");
        assert!(matches!(payload, Payload::Other(_)));
    }

    #[test]
    fn fail_every_counts_records_across_invocations() {
        let cfg = FunctionConfig {
            every: 3,
            ..function(Handler::FailEvery)
        };
        let seen = AtomicU64::new(0);
        let (body, _, failed) = run_json(&cfg, &seen, &batch(&[json!(1), json!(2)]));
        assert_eq!(failed, 0);
        assert!(body["results"]
            .as_array()
            .expect("results")
            .iter()
            .all(|r| r["status"] == "success"));
        // Records 3..=7: #3 and #6 fail, which are r1 and r4 of this batch.
        let (body, unhandled, failed) = run_json(
            &cfg,
            &seen,
            &batch(&[json!(3), json!(4), json!(5), json!(6), json!(7)]),
        );
        assert!(!unhandled);
        assert_eq!(failed, 2);
        let statuses: Vec<&str> = body["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| r["status"].as_str().expect("status"))
            .collect();
        assert_eq!(
            statuses,
            ["error", "success", "success", "error", "success"]
        );
        assert_eq!(body["results"][0]["error"]["errorType"], "RecordFailed");
        assert_eq!(seen.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn poison_records_fail_with_a_per_record_error() {
        let cfg = function(Handler::Poison);
        let (body, unhandled, failed) = run_json(
            &cfg,
            &AtomicU64::new(0),
            &batch(&[
                json!({"poison": false}),
                json!({"poison": true, "x": 1}),
                json!("poison"),
            ]),
        );
        assert!(!unhandled);
        assert_eq!(failed, 1);
        assert_eq!(
            body["results"][1],
            json!({"id": "r2", "status": "error", "error": {"errorType": "RecordFailed", "errorMessage": "record r2 failed (poison)"}})
        );
        assert_eq!(body["results"][0]["status"], "success");
        assert_eq!(body["results"][2]["body"], "poison");
    }

    #[test]
    fn batch_item_failures_lists_only_failed_ids() {
        let cfg = FunctionConfig {
            response: ResponseShape::BatchItemFailures,
            ..function(Handler::Poison)
        };
        let (body, unhandled, _) = run_json(
            &cfg,
            &AtomicU64::new(0),
            &batch(&[json!({}), json!({"poison": true}), json!({"poison": true})]),
        );
        assert!(!unhandled);
        assert_eq!(
            body,
            json!({"batchItemFailures": [{"itemIdentifier": "r2"}, {"itemIdentifier": "r3"}]})
        );
        let (body, _, _) = run_json(&cfg, &AtomicU64::new(0), &batch(&[json!({})]));
        assert_eq!(body, json!({"batchItemFailures": []}));
    }

    #[test]
    fn crash_mode_fails_the_whole_invocation_on_the_first_bad_record() {
        let cfg = FunctionConfig {
            failure: FailureMode::Crash,
            ..function(Handler::Poison)
        };
        let (body, unhandled, failed) = run_json(
            &cfg,
            &AtomicU64::new(0),
            &batch(&[json!({}), json!({"poison": true}), json!({"poison": true})]),
        );
        assert!(unhandled);
        assert_eq!(failed, 2);
        assert_eq!(
            body,
            json!({"errorType": "PoisonRecord", "errorMessage": "record r2 is poison"})
        );
        let (_, unhandled, _) = run_json(&cfg, &AtomicU64::new(0), &batch(&[json!({})]));
        assert!(!unhandled, "a clean batch does not crash");
    }

    #[test]
    fn a_failing_plain_payload_is_unhandled_even_in_record_mode() {
        let (body, unhandled, failed) = run_json(
            &function(Handler::Poison),
            &AtomicU64::new(0),
            r#"{"poison":true}"#,
        );
        assert!(unhandled);
        assert_eq!(failed, 1);
        assert_eq!(body["errorType"], "PoisonRecord");
        let cfg = FunctionConfig {
            every: 1,
            ..function(Handler::FailEvery)
        };
        let (body, unhandled, _) = run_json(&cfg, &AtomicU64::new(0), "[1,2,3]");
        assert!(unhandled);
        assert_eq!(body["errorType"], "InjectedFailure");
    }

    #[test]
    fn fail_ratio_is_all_or_nothing_at_the_extremes_and_near_the_ratio_between() {
        let seen = AtomicU64::new(0);
        let bodies: Vec<Value> = (0..1000).map(|i| json!(i)).collect();
        let all = batch(&bodies);
        let never = FunctionConfig {
            ratio: 0.0,
            ..function(Handler::FailRatio)
        };
        assert_eq!(run_json(&never, &seen, &all).2, 0);
        let always = FunctionConfig {
            ratio: 1.0,
            ..function(Handler::FailRatio)
        };
        assert_eq!(run_json(&always, &seen, &all).2, 1000);
        // Seeded, so this is a fixed draw, not a flaky statistical check.
        let quarter = FunctionConfig {
            ratio: 0.25,
            ..function(Handler::FailRatio)
        };
        let failed = run_json(&quarter, &seen, &all).2;
        assert!(
            (180..=320).contains(&failed),
            "{failed} of 1000 failed at ratio 0.25"
        );
    }
}
