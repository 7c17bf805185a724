//! The one place where the data plane's outcomes become HTTP responses: which status each
//! kind of answer has ([`Answer`]), which answer each refusal or failure is
//! ([`RequestError`]), the JSON bodies, and the `Retry-After` / `RateLimit-Policy` /
//! `RateLimit` headers of the HTTP contract. The admin listener's own refusals
//! ([`AdminError`]) are mapped here too.
//!
//! The request path returns what went wrong as a [`RequestError`] value and this module
//! alone decides what the caller sees (the shape of linkerd2-proxy's `errors/respond.rs`).
//! The per-route request counters keep one slot per [`Answer`], so an answer added here is
//! counted without a second list to keep in step.
//!
//! Responses are plain `http` types with a [`Full`] body: each body is built once (a shed's
//! on the stack, then copied once) and handed to hyper without another copy or a boxed body.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::coalesce::{Delivered, RecordError};
use crate::idempotency::{self, KeyError, Refusal, Snapshot};
use crate::invoke::InvokeFailure;
use crate::limit::{Admitted, Quota, Rejected, Scope};
use crate::quota::ceil_secs;

/// A response as sluicegate writes it: the whole body in one buffer.
pub type Response = http::Response<Full<Bytes>>;

/// The wait a `503` (or an upstream `429`) asks for when nothing better is known.
const DEFAULT_WAIT: Duration = Duration::from_secs(1);

/// Why a request is shed with 429.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedScope {
    /// An admission bucket refused: the key's plan, the route's or the global limit.
    Limit(Scope),
    /// The route's queue is full (`max_pending` records waiting for a batch).
    Queue,
    /// The function's invoke rate (or Lambda itself, with a 429) refused the batch.
    Upstream,
}

impl ShedScope {
    /// Every scope, in the order of the counter slots.
    pub const ALL: [ShedScope; 5] = [
        ShedScope::Limit(Scope::Key),
        ShedScope::Limit(Scope::Route),
        ShedScope::Limit(Scope::Global),
        ShedScope::Queue,
        ShedScope::Upstream,
    ];

    /// The scope's name in metric labels and in a `429` body's `message`.
    pub fn as_str(self) -> &'static str {
        match self {
            ShedScope::Limit(scope) => scope.as_str(),
            ShedScope::Queue => "queue",
            ShedScope::Upstream => "upstream",
        }
    }
}

/// Every kind of answer the data plane gives: one row of the README's status table each,
/// with its status and, for a `429`, its scope. (`404` answers a path that is no route,
/// so it never reaches a route's counters; it has a slot all the same.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `200`: the function reported success.
    Success,
    /// `202`: Lambda accepted an `invocation = "event"` batch.
    Accepted,
    /// `422`: the function reported this record failed (or an `Idempotency-Key` was reused
    /// with another body).
    FunctionFailed,
    /// `429`: a limit refused the request.
    Shed(ShedScope),
    /// `400`: the request is not one JSON record, or a header is malformed.
    BadRequest,
    /// `401`: keys are required and the request carries none.
    Unauthorized,
    /// `403`: keys are required and this one is in no plan.
    Forbidden,
    /// `404`: no route at this path.
    NotFound,
    /// `405`: the path takes other methods.
    MethodNotAllowed,
    /// `408`: the body did not arrive in time.
    BodyTimeout,
    /// `413`: the record is larger than a request or an invoke may carry.
    TooLarge,
    /// `502`: the function crashed, or its response has no usable result for the record.
    BadGateway,
    /// `503`: Lambda unavailable after retries, a failed worker, shutdown, not ready.
    Unavailable,
    /// `504`: no result before the caller's deadline, or the outcome is unknown.
    Timeout,
    /// `409`: a request with the same `Idempotency-Key` is in flight on another replica.
    Conflict,
}

impl Answer {
    /// Every answer, in the order of the counter slots (`records.rs`).
    pub const ALL: [Answer; 19] = [
        Answer::Success,
        Answer::Accepted,
        Answer::FunctionFailed,
        Answer::Shed(ShedScope::ALL[0]),
        Answer::Shed(ShedScope::ALL[1]),
        Answer::Shed(ShedScope::ALL[2]),
        Answer::Shed(ShedScope::ALL[3]),
        Answer::Shed(ShedScope::ALL[4]),
        Answer::BadRequest,
        Answer::Unauthorized,
        Answer::Forbidden,
        Answer::NotFound,
        Answer::MethodNotAllowed,
        Answer::BodyTimeout,
        Answer::TooLarge,
        Answer::BadGateway,
        Answer::Unavailable,
        Answer::Timeout,
        Answer::Conflict,
    ];

    /// The status of this answer: the one table of status codes.
    pub const fn status(self) -> StatusCode {
        match self {
            Answer::Success => StatusCode::OK,
            Answer::Accepted => StatusCode::ACCEPTED,
            Answer::FunctionFailed => StatusCode::UNPROCESSABLE_ENTITY,
            Answer::Shed(_) => StatusCode::TOO_MANY_REQUESTS,
            Answer::BadRequest => StatusCode::BAD_REQUEST,
            Answer::Unauthorized => StatusCode::UNAUTHORIZED,
            Answer::Forbidden => StatusCode::FORBIDDEN,
            Answer::NotFound => StatusCode::NOT_FOUND,
            Answer::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Answer::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Answer::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Answer::BadGateway => StatusCode::BAD_GATEWAY,
            Answer::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Answer::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Answer::Conflict => StatusCode::CONFLICT,
        }
    }

    /// The scope of a shed (`None` for every other answer).
    pub const fn scope(self) -> Option<ShedScope> {
        match self {
            Answer::Shed(scope) => Some(scope),
            _ => None,
        }
    }
}

/// A refusal by a limit: an admission layer, the route's queue or the function's invoke
/// rate, with the exact wait and the refusing limit's quota (for `RateLimit-Policy`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shed {
    /// Which limit refused, for the metric label and the body's `message`.
    pub scope: ShedScope,
    /// How long until the refusing limit would admit the request (`Retry-After`).
    pub wait: Duration,
    /// The refusing limit's quota for `RateLimit-Policy`; `None` when it has none to report.
    pub policy: Option<Quota>,
}

impl From<Rejected> for Shed {
    fn from(rejected: Rejected) -> Self {
        Shed {
            scope: ShedScope::Limit(rejected.scope),
            wait: rejected.wait,
            policy: Some(rejected.quota),
        }
    }
}

/// The policies a route's non-admission `429`s report in `RateLimit-Policy`.
#[derive(Clone, Copy, Debug)]
pub struct Policies {
    /// The queue: `q` = `max_pending`, refilled at the measured drain rate.
    pub queue: Quota,
    /// The function's invoke-rate bucket.
    pub upstream: Quota,
}

/// Why a data-plane request is not answered with its record's result. Its `Display` is
/// the body's `message`; [`RequestError::answer`] and [`RequestError::code`] say which
/// status and `error` code it is.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request is not one JSON record, or a header is malformed.
    #[error("{reason}")]
    BadRequest {
        /// What is wrong with the request, as the body's `message`.
        reason: String,
    },
    /// Keys are required and the request has none in `header`.
    #[error("missing API key header {header}")]
    Unauthorized {
        /// The header a key is read from.
        header: HeaderName,
    },
    /// Keys are required and this one is in no plan.
    #[error("unknown API key")]
    Forbidden,
    /// No route at this path (and it is not `/healthz` or `/readyz`).
    #[error("no route at this path")]
    NotFound,
    /// The path takes only the methods in `allow` (the `Allow` header's value).
    #[error("this path takes {allow}")]
    MethodNotAllowed {
        /// The path's methods, comma-separated.
        allow: &'static str,
    },
    /// The body did not arrive within `waited`; the connection is closed after the answer.
    #[error("the request body did not arrive within {} ms", waited.as_millis())]
    BodyTimeout {
        /// The body timeout that passed.
        waited: Duration,
    },
    /// The body is larger than `server.max_record_bytes` (`max`).
    #[error("record is larger than server.max_record_bytes ({max} bytes)")]
    TooLarge {
        /// `server.max_record_bytes`.
        max: usize,
    },
    /// The caller's deadline passed while its record waited for a result.
    #[error("no result for record {record} before the caller's deadline")]
    CallerDeadline {
        /// The id of the record that is still queued or in flight.
        record: Arc<str>,
    },
    /// `/readyz`: a route's function cannot be reached.
    #[error("not ready: {reason}")]
    NotReady {
        /// Which function, and why it cannot be reached.
        reason: String,
    },
    /// A limit refused the request.
    #[error("rate limited ({})", .0.scope.as_str())]
    Shed(Shed),
    /// The record got no result from the function. `record` is its id once it has one
    /// (`None`: refused at submit); `policies` describe the route's queue and invoke rate
    /// for the `429`s this can be.
    #[error("{}", RecordMessage { record: record.as_deref(), error })]
    Record {
        /// The record's id, once it has one.
        record: Option<Arc<str>>,
        /// What happened to the record.
        error: RecordError,
        /// The route's queue and invoke-rate quotas, for a `429`'s `RateLimit-Policy`.
        policies: Policies,
    },
    /// The `Idempotency-Key` header is not a usable key.
    #[error("{0}")]
    InvalidIdempotencyKey(KeyError),
    /// A request with an `Idempotency-Key` that is not served (reused with another body,
    /// in flight elsewhere, or the store cannot take it).
    #[error("{0}")]
    Idempotency(Refusal),
}

/// The `message` of a record's failure: the record's id first where the error says
/// nothing a caller could tell apart from another record's failure.
struct RecordMessage<'a> {
    record: Option<&'a str>,
    error: &'a RecordError,
}

impl std::fmt::Display for RecordMessage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = self.record.unwrap_or("-");
        match self.error {
            RecordError::DeadLettered { failure, .. } if failure.may_have_run() => write!(
                f,
                "retries exhausted and the record may have been processed: {failure}"
            ),
            RecordError::DeadLettered { failure, .. } => {
                write!(f, "Lambda did not take the record after retries: {failure}")
            }
            RecordError::Function(e) => f.write_str(&e.message),
            RecordError::QueueFull { .. }
            | RecordError::Closed
            | RecordError::WorkerFailed
            | RecordError::TooLarge { .. }
            | RecordError::Invoke(_) => write!(f, "{}", self.error),
            RecordError::Expired
            | RecordError::DeadlineBeforeRetry(_)
            | RecordError::NotDeadLettered { .. }
            | RecordError::MalformedResponse(_)
            | RecordError::MissingResult
            | RecordError::Lost => write!(f, "record {id}: {}", self.error),
        }
    }
}

impl From<Rejected> for RequestError {
    fn from(rejected: Rejected) -> Self {
        RequestError::Shed(rejected.into())
    }
}

impl RequestError {
    /// Which answer this is: its status, and its scope when it is a shed.
    pub fn answer(&self) -> Answer {
        self.classify().0
    }

    /// The body's `error` field.
    pub fn code(&self) -> &'static str {
        self.classify().1
    }

    /// The one mapping from what went wrong to what the caller is told.
    fn classify(&self) -> (Answer, &'static str) {
        match self {
            RequestError::BadRequest { .. } => (Answer::BadRequest, "bad_request"),
            RequestError::Unauthorized { .. } => (Answer::Unauthorized, "unauthorized"),
            RequestError::Forbidden => (Answer::Forbidden, "forbidden"),
            RequestError::NotFound => (Answer::NotFound, "not_found"),
            RequestError::MethodNotAllowed { .. } => {
                (Answer::MethodNotAllowed, "method_not_allowed")
            }
            RequestError::BodyTimeout { .. } => (Answer::BodyTimeout, "request_timeout"),
            RequestError::TooLarge { .. } => (Answer::TooLarge, "payload_too_large"),
            RequestError::CallerDeadline { .. } => (Answer::Timeout, "timeout"),
            RequestError::NotReady { .. } => (Answer::Unavailable, "unavailable"),
            RequestError::Shed(shed) => (Answer::Shed(shed.scope), "rate_limited"),
            RequestError::Record { error, .. } => classify_record(error),
            RequestError::InvalidIdempotencyKey(_) => (Answer::BadRequest, "bad_request"),
            RequestError::Idempotency(refusal) => match refusal {
                Refusal::Reused => (Answer::FunctionFailed, "idempotency_key_reused"),
                Refusal::InFlightElsewhere => (Answer::Conflict, "idempotency_key_in_flight"),
                Refusal::Full => (Answer::Unavailable, "idempotency_store_full"),
                Refusal::Unavailable => (Answer::Unavailable, "idempotency_unavailable"),
                Refusal::Abandoned => (Answer::Unavailable, "unavailable"),
            },
        }
    }

    /// The limit that refused, when this is a `429`.
    fn shed(&self) -> Option<Shed> {
        match self {
            RequestError::Shed(shed) => Some(*shed),
            RequestError::Record {
                error: RecordError::QueueFull { retry_after },
                policies,
                ..
            } => Some(Shed {
                scope: ShedScope::Queue,
                wait: *retry_after,
                policy: Some(policies.queue),
            }),
            RequestError::Record {
                error: RecordError::Invoke(InvokeFailure::Throttled { retry_after, .. }),
                policies,
                ..
            } => Some(Shed {
                scope: ShedScope::Upstream,
                wait: retry_after.unwrap_or(DEFAULT_WAIT),
                policy: Some(policies.upstream),
            }),
            _ => None,
        }
    }

    /// The `Retry-After` of a `503`: what Lambda asked for, if it did.
    fn unavailable_wait(&self) -> Duration {
        match self {
            RequestError::Record {
                error:
                    RecordError::DeadLettered { failure, .. }
                    | RecordError::NotDeadLettered { failure, .. },
                ..
            } => failure.retry_after().unwrap_or(DEFAULT_WAIT),
            _ => DEFAULT_WAIT,
        }
    }

    /// The response the caller gets.
    pub fn into_response(self) -> Response {
        if let Some(shed) = self.shed() {
            return shed_response(shed);
        }
        let (answer, code) = self.classify();
        let status = answer.status();
        let mut response = match &self {
            RequestError::Record {
                record,
                error: RecordError::Function(e),
                ..
            } => {
                #[derive(Serialize)]
                struct Body<'a> {
                    error: &'a str,
                    id: &'a str,
                    kind: &'a str,
                    error_type: &'a str,
                    message: &'a str,
                }
                let body = Body {
                    error: code,
                    id: record.as_deref().unwrap_or("-"),
                    kind: &e.kind,
                    error_type: &e.error_type,
                    message: &e.message,
                };
                json_response(
                    status,
                    serde_json::to_vec(&body).expect("plain struct serializes"),
                )
            }
            RequestError::Record {
                record,
                error: RecordError::DeadLettered { id: letter, .. },
                ..
            } => {
                // A letter that may have run is kept (marked `possibly_processed`), but the
                // caller must not read the answer as safe to retry: `outcome_unknown`.
                #[derive(Serialize)]
                struct Body<'a> {
                    error: &'a str,
                    id: &'a str,
                    dead_letter_id: &'a str,
                    message: String,
                }
                let body = Body {
                    error: code,
                    id: record.as_deref().unwrap_or("-"),
                    dead_letter_id: letter,
                    message: self.to_string(),
                };
                json_response(
                    status,
                    serde_json::to_vec(&body).expect("plain struct serializes"),
                )
            }
            _ => error(status, code, self.to_string()),
        };
        let headers = response.headers_mut();
        match &self {
            RequestError::MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            // The rest of the body may still be on its way, and nothing on the connection
            // can be read as a next request.
            RequestError::BodyTimeout { .. } => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            // The draft's answer to a duplicate of a request still in flight: retry later.
            _ if answer == Answer::Conflict || answer == Answer::Unavailable => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(self.unavailable_wait())),
                );
            }
            _ => {}
        }
        response
    }
}

/// Which answer a record's failure is, and its `error` code.
fn classify_record(error: &RecordError) -> (Answer, &'static str) {
    match error {
        RecordError::QueueFull { .. } => (Answer::Shed(ShedScope::Queue), "rate_limited"),
        // Never sent: retrying is safe (a failed worker has been restarted).
        RecordError::Closed | RecordError::WorkerFailed => (Answer::Unavailable, "unavailable"),
        RecordError::TooLarge { .. } => (Answer::TooLarge, "payload_too_large"),
        RecordError::Invoke(failure) => match failure {
            InvokeFailure::Throttled { .. } => (Answer::Shed(ShedScope::Upstream), "rate_limited"),
            InvokeFailure::TooLarge { .. } => (Answer::TooLarge, "payload_too_large"),
            InvokeFailure::Rejected { .. } => (Answer::BadGateway, "bad_gateway"),
            InvokeFailure::Unavailable { .. } => (Answer::Unavailable, "unavailable"),
            // The request may have reached the function: the caller must not assume it did not.
            InvokeFailure::OutcomeUnknown { .. } => (Answer::Timeout, "outcome_unknown"),
        },
        RecordError::Function(_) => (Answer::BadGateway, "function_error"),
        // An earlier attempt may have run the record: not merely a deadline.
        RecordError::DeadlineBeforeRetry(failure) if failure.may_have_run() => {
            (Answer::Timeout, "outcome_unknown")
        }
        RecordError::Expired | RecordError::DeadlineBeforeRetry(_) => (Answer::Timeout, "timeout"),
        // Retries are exhausted whether or not the sink kept a letter; a sink that did not
        // confirm gives no id, and the caller must not think the record is kept anywhere.
        RecordError::DeadLettered { failure, .. }
        | RecordError::NotDeadLettered { failure, .. }
            if failure.may_have_run() =>
        {
            (Answer::Timeout, "outcome_unknown")
        }
        RecordError::DeadLettered { .. } | RecordError::NotDeadLettered { .. } => {
            (Answer::Unavailable, "unavailable")
        }
        RecordError::MalformedResponse(_) | RecordError::MissingResult | RecordError::Lost => {
            (Answer::BadGateway, "bad_gateway")
        }
    }
}

/// The admin listener's own refusals (its answers are not counted per route).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No token, or not the right one; `WWW-Authenticate: Bearer` tells the scheme.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// `/metrics` without an installed recorder.
    #[error("no metrics recorder is installed")]
    NoMetrics,
    /// A reload refused the new config; the running one stays.
    #[error("{0}")]
    InvalidConfig(String),
}

impl AdminError {
    /// The response the admin client gets.
    pub fn into_response(self) -> Response {
        let (status, code) = match &self {
            AdminError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AdminError::NoMetrics => (StatusCode::NOT_FOUND, "not_found"),
            AdminError::InvalidConfig(_) => (StatusCode::BAD_REQUEST, "invalid_config"),
        };
        let mut response = error(status, code, self.to_string());
        if let AdminError::Unauthorized(_) = self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `{"error": code, "message": message}` with `status`.
fn error(status: StatusCode, code: &str, message: String) -> Response {
    #[derive(Serialize)]
    struct Body<'a> {
        error: &'a str,
        message: String,
    }
    let body = serde_json::to_vec(&Body {
        error: code,
        message,
    })
    .expect("plain struct serializes");
    json_response(status, body)
}

/// `/healthz`: `200` while the process serves.
pub fn healthy() -> Response {
    json_response(
        StatusCode::OK,
        serde_json::to_vec(&serde_json::json!({"status": "ok"})).expect("a JSON value"),
    )
}

/// `/readyz` when every route's function answers; `endpoint` is where they were asked.
pub fn ready(endpoint: &str) -> Response {
    json_response(
        StatusCode::OK,
        serde_json::to_vec(&serde_json::json!({"status": "ready", "endpoint": endpoint}))
            .expect("a JSON value"),
    )
}

/// Whole seconds for `Retry-After` and the RateLimit fields: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    ceil_secs(wait).max(1)
}

/// Milliseconds for `retry_after_ms`: rounded up, so waiting that long is never early.
pub fn retry_after_ms(wait: Duration) -> u64 {
    let ms = wait.as_millis() as u64;
    ms + u64::from(wait.as_nanos() % 1_000_000 > 0)
}

/// A structured field such as `"key";q=10;w=1`: the scope, then `;name=value` pairs.
/// Written by hand: this runs for every shed request.
fn field(scope: &str, pairs: [(u8, u64); 2]) -> HeaderValue {
    let mut text = StackText::new();
    text.push(b"\"");
    text.push(scope.as_bytes());
    text.push(b"\"");
    let mut digits = itoa::Buffer::new();
    for (name, value) in pairs {
        text.push(&[b';', name, b'=']);
        text.push(digits.format(value).as_bytes());
    }
    HeaderValue::from_bytes(text.as_bytes()).expect("scope names and digits are valid header text")
}

/// A short text built on the stack, then copied once into the allocation that keeps it
/// (instead of a growable buffer plus a second allocation to share it).
struct StackText {
    bytes: [u8; 128],
    len: usize,
}

impl StackText {
    fn new() -> Self {
        StackText {
            bytes: [0; 128],
            len: 0,
        }
    }

    /// Panics past 128 bytes: only fixed identifiers and integers are written here.
    fn push(&mut self, part: &[u8]) {
        self.bytes[self.len..self.len + part.len()].copy_from_slice(part);
        self.len += part.len();
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// `429` with the body and headers of the HTTP contract.
fn shed_response(shed: Shed) -> Response {
    let Shed {
        scope,
        wait,
        policy,
    } = shed;
    let name = scope.as_str();
    // `{"error":"rate_limited","scope":<name>,"retry_after_ms":<ms>}`, written by hand
    // (this runs for every shed request): scope names are fixed identifiers, no escaping.
    let mut digits = itoa::Buffer::new();
    let mut body = StackText::new();
    body.push(br#"{"error":"rate_limited","scope":""#);
    body.push(name.as_bytes());
    body.push(br#"","retry_after_ms":"#);
    body.push(digits.format(retry_after_ms(wait)).as_bytes());
    body.push(b"}");
    let mut response = json_response(
        Answer::Shed(scope).status(),
        Bytes::copy_from_slice(body.as_bytes()),
    );
    // The counters read the scope from here: the body is already serialized.
    response.extensions_mut().insert(scope);
    let secs = retry_after_secs(wait);
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    if let Some(quota) = policy {
        headers.insert(RATELIMIT_POLICY, policy_field(name, quota));
    }
    headers.insert(RATELIMIT, field(name, [(b'r', 0), (b't', secs)]));
    response
}

const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

fn policy_field(scope: &str, quota: Quota) -> HeaderValue {
    field(
        scope,
        [
            (b'q', u64::from(quota.burst)),
            (b'w', ceil_secs(quota.refill_time()).max(1)),
        ],
    )
}

/// A limiter refusal: the admission layer's answer.
pub fn rejected(rejected: Rejected) -> Response {
    RequestError::from(rejected).into_response()
}

/// Adds the key layer's `RateLimit-Policy` and `RateLimit` to an admitted response, unless
/// a later stage already described its own scope (a queue or upstream `429`).
pub fn add_admitted_headers(response: &mut Response, admitted: &Admitted) {
    if response.headers().contains_key(RATELIMIT) {
        return;
    }
    let headers = response.headers_mut();
    headers.insert(RATELIMIT_POLICY, policy_field("key", admitted.quota));
    headers.insert(
        RATELIMIT,
        field(
            "key",
            [
                (b'r', u64::from(admitted.remaining)),
                (b't', ceil_secs(admitted.reset)),
            ],
        ),
    );
}

/// A record's result from the function.
pub fn delivered(id: &str, delivered: Delivered) -> Response {
    #[derive(Serialize)]
    struct Body<'a> {
        id: &'a str,
        status: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        body: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a RawValue>,
    }
    let (answer, body) = match &delivered {
        Delivered::Success { body } => (
            Answer::Success,
            Body {
                id,
                status: "success",
                body: Some(body),
                error: None,
            },
        ),
        Delivered::Failed { error } => (
            Answer::FunctionFailed,
            Body {
                id,
                status: "error",
                body: None,
                error: Some(error),
            },
        ),
        Delivered::Accepted => (
            Answer::Accepted,
            Body {
                id,
                status: "accepted",
                body: None,
                error: None,
            },
        ),
    };
    json_response(
        answer.status(),
        serde_json::to_vec(&body).expect("raw values serialize"),
    )
}

/// Whether a record's outcome is kept for replay under its `Idempotency-Key`: every
/// outcome the record may have caused (`200`, `202`, `422`, `502`, `504 outcome_unknown`),
/// and none of those that say it was not processed (sheds, `503`s, a deadline that passed
/// before any attempt, a record too large to send), so their retry is a real retry.
pub fn keep_for_replay(outcome: &Result<Delivered, RequestError>) -> bool {
    match outcome {
        Ok(_) => true,
        Err(error) => {
            let (answer, code) = error.classify();
            matches!(
                answer,
                Answer::Success | Answer::Accepted | Answer::FunctionFailed | Answer::BadGateway
            ) || code == "outcome_unknown"
        }
    }
}

/// A response as kept for idempotent replay.
pub async fn snapshot(response: Response) -> Snapshot {
    use http_body_util::BodyExt;
    let (parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    Snapshot {
        status: parts.status,
        headers: parts.headers,
        extensions: parts.extensions,
        body,
    }
}

/// The response a snapshot stands for; `replayed` marks it `Idempotent-Replayed: true`
/// (it is another request's outcome: a replay or a join).
pub fn from_snapshot(snapshot: &Snapshot, replayed: bool) -> Response {
    let mut response = Response::new(Full::new(snapshot.body.clone()));
    *response.status_mut() = snapshot.status;
    *response.headers_mut() = snapshot.headers.clone();
    *response.extensions_mut() = snapshot.extensions.clone();
    if replayed {
        response
            .headers_mut()
            .insert(idempotency::REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

/// One of every request error (every record failure among them), with the status and
/// `error` code the README documents for it.
#[cfg(test)]
pub(super) fn every_request_error() -> Vec<(RequestError, u16, &'static str)> {
    use crate::coalesce::FunctionError;
    use crate::dlq::SinkError;
    use crate::invoke::UnknownCause;

    let throttled = InvokeFailure::Throttled {
        reason: "CallerRateLimitExceeded".into(),
        message: "Rate Exceeded.".into(),
        retry_after: Some(Duration::from_millis(2500)),
    };
    let unavailable = InvokeFailure::Unavailable {
        message: "connection refused".into(),
    };
    let unknown = InvokeFailure::OutcomeUnknown {
        cause: UnknownCause::ReadTimeout,
        message: "no answer".into(),
    };
    let record = |error: RecordError| RequestError::Record {
        record: Some("r1".into()),
        error,
        policies: Policies {
            queue: Quota {
                rate: 40.0,
                burst: 100,
            },
            upstream: Quota {
                rate: 10.0,
                burst: 10,
            },
        },
    };
    let mut all = vec![
        (
            RequestError::BadRequest {
                reason: "the body is not valid JSON".into(),
            },
            400,
            "bad_request",
        ),
        (
            RequestError::Unauthorized {
                header: HeaderName::from_static("x-api-key"),
            },
            401,
            "unauthorized",
        ),
        (RequestError::Forbidden, 403, "forbidden"),
        (RequestError::NotFound, 404, "not_found"),
        (
            RequestError::MethodNotAllowed { allow: "POST" },
            405,
            "method_not_allowed",
        ),
        (
            RequestError::BodyTimeout {
                waited: Duration::from_secs(10),
            },
            408,
            "request_timeout",
        ),
        (
            RequestError::TooLarge { max: 262_144 },
            413,
            "payload_too_large",
        ),
        (
            RequestError::CallerDeadline {
                record: "r1".into(),
            },
            504,
            "timeout",
        ),
        (
            RequestError::NotReady {
                reason: "Lambda unreachable".into(),
            },
            503,
            "unavailable",
        ),
        (
            record(RecordError::QueueFull {
                retry_after: Duration::from_millis(1500),
            }),
            429,
            "rate_limited",
        ),
        (record(RecordError::Closed), 503, "unavailable"),
        (record(RecordError::WorkerFailed), 503, "unavailable"),
        (
            record(RecordError::TooLarge {
                size: 7_000_000,
                limit: 6_291_456,
            }),
            413,
            "payload_too_large",
        ),
        (
            record(RecordError::Invoke(throttled.clone())),
            429,
            "rate_limited",
        ),
        (
            record(RecordError::Invoke(InvokeFailure::TooLarge {
                message: "payload too large".into(),
            })),
            413,
            "payload_too_large",
        ),
        (
            record(RecordError::Invoke(InvokeFailure::Rejected {
                kind: "InvalidParameterValueException".into(),
                message: "no".into(),
            })),
            502,
            "bad_gateway",
        ),
        (
            record(RecordError::Invoke(unavailable.clone())),
            503,
            "unavailable",
        ),
        (
            record(RecordError::Invoke(unknown.clone())),
            504,
            "outcome_unknown",
        ),
        (
            record(RecordError::Function(FunctionError {
                kind: "Unhandled".into(),
                error_type: "Runtime.ExitError".into(),
                message: "exited".into(),
            })),
            502,
            "function_error",
        ),
        (
            record(RecordError::MalformedResponse("not JSON".into())),
            502,
            "bad_gateway",
        ),
        (record(RecordError::MissingResult), 502, "bad_gateway"),
        (record(RecordError::Lost), 502, "bad_gateway"),
        (record(RecordError::Expired), 504, "timeout"),
        (
            record(RecordError::DeadlineBeforeRetry(throttled.clone())),
            504,
            "timeout",
        ),
        (
            record(RecordError::DeadlineBeforeRetry(unknown.clone())),
            504,
            "outcome_unknown",
        ),
        (
            record(RecordError::DeadLettered {
                id: "dl-1".into(),
                failure: throttled.clone(),
            }),
            503,
            "unavailable",
        ),
        (
            record(RecordError::DeadLettered {
                id: "dl-2".into(),
                failure: unknown.clone(),
            }),
            504,
            "outcome_unknown",
        ),
        (
            record(RecordError::NotDeadLettered {
                failure: unavailable,
                sink: SinkError::Timeout,
            }),
            503,
            "unavailable",
        ),
        (
            record(RecordError::NotDeadLettered {
                failure: unknown,
                sink: SinkError::Stopped,
            }),
            504,
            "outcome_unknown",
        ),
        (
            RequestError::InvalidIdempotencyKey(KeyError::TooLong { len: 300 }),
            400,
            "bad_request",
        ),
        (
            RequestError::Idempotency(Refusal::Reused),
            422,
            "idempotency_key_reused",
        ),
        (
            RequestError::Idempotency(Refusal::InFlightElsewhere),
            409,
            "idempotency_key_in_flight",
        ),
        (
            RequestError::Idempotency(Refusal::Full),
            503,
            "idempotency_store_full",
        ),
        (
            RequestError::Idempotency(Refusal::Unavailable),
            503,
            "idempotency_unavailable",
        ),
        (
            RequestError::Idempotency(Refusal::Abandoned),
            503,
            "unavailable",
        ),
    ];
    for scope in ShedScope::ALL {
        let shed = Shed {
            scope,
            wait: Duration::from_millis(300),
            policy: None,
        };
        all.push((RequestError::Shed(shed), 429, "rate_limited"));
    }
    all
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn body_of(response: Response) -> serde_json::Value {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("a full body cannot fail")
            .to_bytes();
        serde_json::from_slice(&bytes).expect("every body is JSON")
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_ms(Duration::from_micros(1500)), 2);
        assert_eq!(retry_after_ms(Duration::from_millis(7)), 7);
    }

    #[tokio::test]
    async fn each_request_error_maps_to_its_documented_status_and_code() {
        for (error, status, code) in every_request_error() {
            let what = format!("{error:?}");
            let answer = error.answer();
            assert_eq!(answer.status().as_u16(), status, "{what}");
            assert_eq!(error.code(), code, "{what}");
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status, "{what}");
            assert_eq!(
                response.extensions().get::<ShedScope>().copied(),
                answer.scope(),
                "{what}"
            );
            assert_eq!(response.headers()["content-type"], "application/json");
            assert_eq!(body_of(response).await["error"], code, "{what}");
        }
    }

    #[test]
    fn every_409_429_and_503_carries_retry_after() {
        for (error, status, _) in every_request_error() {
            let what = format!("{error:?}");
            let response = error.into_response();
            let has_retry_after = response.headers().contains_key(header::RETRY_AFTER);
            assert_eq!(has_retry_after, matches!(status, 409 | 429 | 503), "{what}");
        }
    }

    #[test]
    fn a_dead_letter_keeps_lambdas_wait_in_retry_after() {
        let (error, _, _) = every_request_error()
            .into_iter()
            .find(|(e, _, _)| {
                matches!(
                    e,
                    RequestError::Record {
                        error: RecordError::DeadLettered { .. },
                        ..
                    }
                )
            })
            .expect("listed");
        assert_eq!(error.into_response().headers()["retry-after"], "3");
    }

    #[test]
    fn method_not_allowed_names_the_allowed_methods() {
        let response = RequestError::MethodNotAllowed { allow: "GET, HEAD" }.into_response();
        assert_eq!(response.headers()["allow"], "GET, HEAD");
    }

    #[test]
    fn a_body_timeout_closes_the_connection() {
        let response = RequestError::BodyTimeout {
            waited: Duration::from_millis(1500),
        }
        .into_response();
        assert_eq!(response.headers()["connection"], "close");
    }

    #[tokio::test]
    async fn record_failures_name_the_record_and_dead_letters_give_their_id() {
        for (error, _, _) in every_request_error() {
            let (function, letter) = match &error {
                RequestError::Record { error, .. } => (
                    matches!(error, RecordError::Function(_)),
                    matches!(error, RecordError::DeadLettered { .. }),
                ),
                _ => continue,
            };
            let body = body_of(error.into_response()).await;
            if function || letter {
                assert_eq!(body["id"], "r1", "{body}");
            }
            if letter {
                assert!(body["dead_letter_id"].is_string(), "{body}");
            }
        }
    }

    #[tokio::test]
    async fn admin_errors_map_to_their_statuses() {
        let unauthorized = AdminError::Unauthorized("no token").into_response();
        assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(unauthorized.headers()["www-authenticate"], "Bearer");
        assert_eq!(
            body_of(unauthorized).await,
            serde_json::json!({"error": "unauthorized", "message": "no token"})
        );
        let no_metrics = AdminError::NoMetrics.into_response();
        assert_eq!(no_metrics.status(), StatusCode::NOT_FOUND);
        assert_eq!(body_of(no_metrics).await["error"], "not_found");
        let invalid = AdminError::InvalidConfig("bad key".into()).into_response();
        assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);
        assert_eq!(body_of(invalid).await["error"], "invalid_config");
    }

    #[tokio::test]
    async fn the_shed_body_is_json_with_the_scope_and_the_exact_wait() {
        for (scope, wait_us) in ShedScope::ALL
            .into_iter()
            .zip([1, 999, 1_000, 1_500_001, u32::MAX])
        {
            let wait = Duration::from_micros(u64::from(wait_us));
            let shed = Shed {
                scope,
                wait,
                policy: None,
            };
            let body = body_of(shed_response(shed)).await;
            assert_eq!(
                body,
                serde_json::json!({
                    "error": "rate_limited",
                    "scope": scope.as_str(),
                    "retry_after_ms": retry_after_ms(wait),
                })
            );
        }
    }

    #[test]
    fn shed_carries_retry_after_and_ratelimit_fields() {
        let quota = Quota {
            rate: 10.0,
            burst: 20,
        };
        let response = rejected(Rejected {
            scope: Scope::Key,
            quota,
            wait: Duration::from_millis(100),
        });
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = response.headers();
        assert_eq!(h["retry-after"], "1");
        assert_eq!(h["ratelimit-policy"], "\"key\";q=20;w=2");
        assert_eq!(h["ratelimit"], "\"key\";r=0;t=1");
        assert_eq!(
            response.extensions().get::<ShedScope>(),
            Some(&ShedScope::Limit(Scope::Key))
        );
    }

    #[tokio::test]
    async fn an_idempotency_conflict_is_409_with_retry_after_and_a_reuse_is_422_saying_so() {
        let response = RequestError::Idempotency(Refusal::InFlightElsewhere).into_response();
        assert_eq!(response.status(), 409);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let reused = body_of(RequestError::Idempotency(Refusal::Reused).into_response()).await;
        assert_eq!(reused["error"], "idempotency_key_reused");
        assert!(
            reused["message"]
                .as_str()
                .is_some_and(|m| m.contains("different request body")),
            "{reused}"
        );
    }

    #[tokio::test]
    async fn only_outcomes_the_record_may_have_caused_are_kept_for_replay() {
        let kept: Vec<(u16, &str)> = every_request_error()
            .into_iter()
            .filter(|(error, _, _)| {
                matches!(
                    error,
                    RequestError::Record {
                        record: Some(_),
                        ..
                    }
                )
            })
            .map(|(error, status, code)| (keep_for_replay(&Err(error)), status, code))
            .filter(|(keep, _, _)| *keep)
            .map(|(_, status, code)| (status, code))
            .collect();
        for (status, code) in &kept {
            assert!(
                matches!(status, 502 | 422 | 200 | 202) || *code == "outcome_unknown",
                "{status} {code} kept"
            );
        }
        assert!(kept.contains(&(504, "outcome_unknown")));
        assert!(kept.contains(&(502, "function_error")));
        assert!(keep_for_replay(&Ok(Delivered::Accepted)));
        let snap = snapshot(delivered("r1", Delivered::Accepted)).await;
        let replay = from_snapshot(&snap, true);
        assert_eq!(replay.status(), 202);
        assert_eq!(replay.headers()[idempotency::REPLAYED], "true");
        assert_eq!(body_of(replay).await["id"], "r1");
    }
}
