//! A scripted Lambda for the coalescer's unit tests: an [`Invoke`] that records every
//! attempt (when, which records, how many bytes) and answers from a script, with no
//! sockets, so worker and delivery run under `tokio::time::pause()`.
//!
//! The gate is a real [`Gate`]: batches wait for its permits and tokens exactly as they do
//! in front of Lambda, on the paused clock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;

use super::{BatchSpec, Batcher, Ticket};
use crate::config::{Envelope, Fairness, Flush, Invocation, Jitter, RetryConfig};
use crate::invoke::{Gate, Invoke, InvokeFailure, InvokePermit, Invoked};

/// One invoke attempt, as the fake saw it.
#[derive(Clone, Debug)]
pub(super) struct Call {
    /// When the attempt started, from the fake's creation.
    pub(super) at: Duration,
    /// The records' ids (`raw` envelope: the record's JSON text instead).
    pub(super) ids: Vec<String>,
    /// The records' bodies as JSON text, in order.
    pub(super) bodies: Vec<String>,
    pub(super) bytes: usize,
    /// What the fake answered: `true` when the function ran the batch (a response).
    pub(super) ran: bool,
}

/// What the fake answers to one attempt.
pub(super) enum Reply {
    /// Every record succeeds with its own body (`results` shape).
    Echo,
    Fail(InvokeFailure),
    /// `X-Amz-Function-Error: Unhandled` for the whole batch.
    FunctionError,
    /// The response payload as given.
    Payload(&'static str),
    /// A panic inside the invoke, after `latency`: a bug in the delivery path.
    Panic,
}

type Answer = Box<dyn FnMut(&Call) -> Reply + Send>;

pub(super) struct ScriptedLambda {
    gate: Gate,
    start: Instant,
    latency: Duration,
    script: Mutex<VecDeque<Reply>>,
    /// Answers once the script has run out.
    otherwise: Mutex<Answer>,
    calls: Mutex<Vec<Call>>,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
}

impl ScriptedLambda {
    /// A function that echoes every record, behind a gate of `concurrency` permits (and
    /// an unbounded rate), answering after `latency`.
    pub(super) fn echo(concurrency: usize, latency: Duration) -> Self {
        Self::new(Gate::concurrency_only(concurrency), latency)
    }

    pub(super) fn new(gate: Gate, latency: Duration) -> Self {
        ScriptedLambda {
            gate,
            start: Instant::now(),
            latency,
            script: Mutex::new(VecDeque::new()),
            otherwise: Mutex::new(Box::new(|_| Reply::Echo)),
            calls: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// Answers the first attempts with `replies`, in order; later ones as before.
    pub(super) fn script(self, replies: impl IntoIterator<Item = Reply>) -> Self {
        self.script.lock().expect("test lock").extend(replies);
        self
    }

    /// Answers each attempt (once the script has run out) with `answer(call)`.
    pub(super) fn answer(self, answer: impl FnMut(&Call) -> Reply + Send + 'static) -> Self {
        *self.otherwise.lock().expect("test lock") = Box::new(answer);
        self
    }

    pub(super) fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("test lock").clone()
    }

    /// The most attempts that were in flight at once.
    pub(super) fn peak_concurrency(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    fn decode(payload: &[u8]) -> (Vec<String>, Vec<String>) {
        let value: Value = serde_json::from_slice(payload).expect("the payload is JSON");
        match value.get("records").and_then(Value::as_array) {
            Some(records) => records
                .iter()
                .map(|r| {
                    (
                        r["id"].as_str().expect("id").to_owned(),
                        r["body"].to_string(),
                    )
                })
                .unzip(),
            None => (vec![value.to_string()], vec![value.to_string()]),
        }
    }
}

impl Invoke for ScriptedLambda {
    fn function(&self) -> &str {
        "scripted"
    }

    fn gate(&self) -> &Gate {
        &self.gate
    }

    async fn invoke(
        &self,
        payload: Bytes,
        invocation: Invocation,
        mut slot: InvokePermit,
    ) -> Result<Invoked, InvokeFailure> {
        slot.mark_used();
        let (ids, bodies) = Self::decode(&payload);
        let mut call = Call {
            at: Instant::now() - self.start,
            ids,
            bodies,
            bytes: payload.len(),
            ran: false,
        };
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let reply = {
            let scripted = self.script.lock().expect("test lock").pop_front();
            scripted.unwrap_or_else(|| (self.otherwise.lock().expect("test lock"))(&call))
        };
        tokio::time::sleep(self.latency).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        drop(slot);
        if matches!(reply, Reply::Panic) {
            panic!("scripted panic inside an invoke of {:?}", call.bodies);
        }
        let result = match reply {
            Reply::Fail(failure) => Err(failure),
            _ if invocation == Invocation::Event => Ok(Invoked::Accepted),
            Reply::Echo => {
                let results: Vec<Value> = call
                    .ids
                    .iter()
                    .zip(&call.bodies)
                    .map(|(id, body)| {
                        let body: Value = serde_json::from_str(body).expect("body is JSON");
                        serde_json::json!({"id": id, "status": "success", "body": body})
                    })
                    .collect();
                Ok(Invoked::Response {
                    payload: serde_json::json!({ "results": results }).to_string().into(),
                    function_error: None,
                })
            }
            Reply::Panic => unreachable!("panicked above"),
            Reply::FunctionError => Ok(Invoked::Response {
                payload: Bytes::from_static(
                    br#"{"errorType":"Poison","errorMessage":"a record is poison"}"#,
                ),
                function_error: Some("Unhandled".to_owned()),
            }),
            Reply::Payload(text) => Ok(Invoked::Response {
                payload: Bytes::from_static(text.as_bytes()),
                function_error: None,
            }),
        };
        call.ran = result.is_ok();
        // As the real invoker does: the gate's adaptive limits learn from every answer.
        match &result {
            Ok(_) => self.gate.on_accepted(),
            Err(InvokeFailure::Throttled { reason, .. }) => self.gate.on_throttle(reason),
            Err(_) => {}
        }
        self.calls.lock().expect("test lock").push(call);
        result
    }
}

/// A throttle with Lambda's `Retry-After`.
pub(super) fn throttled(retry_after: Option<Duration>) -> InvokeFailure {
    InvokeFailure::Throttled {
        reason: "CallerRateLimitExceeded".to_owned(),
        message: "Rate Exceeded.".to_owned(),
        retry_after,
    }
}

pub(super) fn unavailable() -> InvokeFailure {
    InvokeFailure::Unavailable {
        message: "ServiceException: try again".to_owned(),
    }
}

/// A route spec for tests: batches of up to `max_records`, a 50 ms window, adaptive flush,
/// a per-key fair queue, and retries whose backoff is exactly `base × 2^(n-1)` (no jitter), capped at 10 s.
pub(super) fn spec(max_records: usize) -> BatchSpec {
    BatchSpec {
        route: "test".to_owned(),
        envelope: Envelope::Batch,
        invocation: Invocation::RequestResponse,
        max_records,
        max_bytes: 6 * 1024 * 1024,
        max_wait: Duration::from_millis(50),
        flush: Flush::Adaptive,
        linger: Duration::ZERO,
        max_pending: 1000,
        max_queued_bytes: usize::MAX,
        fairness: Fairness::PerKey,
        nominal_drain_rate: 1000.0,
        retry: RetryConfig {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
            jitter: Jitter::Ratio(0.0),
            ..RetryConfig::default()
        },
        bisect: false,
    }
}

/// Starts a batcher over `lambda`, which the test keeps to read its calls.
pub(super) fn start(spec: BatchSpec, lambda: ScriptedLambda) -> (Batcher, Arc<ScriptedLambda>) {
    let lambda = Arc::new(lambda);
    (Batcher::spawn(spec, Arc::clone(&lambda), None), lambda)
}

/// Submits `body` (JSON text) for key `k`, with a caller deadline `deadline` from now.
pub(super) fn submit(batcher: &Batcher, body: &str, deadline: Duration) -> Ticket {
    let raw = serde_json::value::RawValue::from_string(body.to_owned()).expect("test JSON");
    let key: Arc<str> = Arc::from("k");
    batcher
        .submit(&key, &raw, Instant::now() + deadline)
        .expect("the queue takes the record")
}
