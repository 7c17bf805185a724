//! The one place where the data plane's outcomes become HTTP responses: which status each
//! kind of answer has ([`Answer`]), which answer each refusal or failure is
//! ([`RequestError`]), the JSON bodies, and the `Retry-After` / `RateLimit-Policy` /
//! `RateLimit` headers of the HTTP contract. The admin listener's own refusals
//! ([`AdminError`]) are mapped here too, and so are the Lambda Invoke API door's answers
//! ([`lambda_error`], [`lambda_result`], [`LambdaRefusal`]): the same outcomes in Lambda's
//! statuses, error types and bodies.
//!
//! The request path returns what went wrong as a [`RequestError`] value and this module
//! alone decides what the caller sees (the shape of linkerd2-proxy's `errors/respond.rs`).
//! The per-route request counters keep one slot per [`Answer`], so an answer added here is
//! counted without a second list to keep in step.
//!
//! A record's body is the same whichever door it came through: [`record_answer`] gives the
//! answer and JSON body of a record's outcome, which is the whole response of a `/records`
//! request and one entry of a bulk answer. A bulk line under an `Idempotency-Key` is
//! stored as the response `/records` would give ([`snapshot`]); [`snapshot_answer`] and
//! [`replayed_body`] turn that back into its entry.
//!
//! Responses are plain `http` types whose [`Body`] is, but for a streamed bulk answer, one
//! [`Full`] buffer: each body is built once (a shed's on the stack, then copied once) and
//! handed to hyper without another copy or a boxed body.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::{header, HeaderName, HeaderValue, StatusCode};
use http_body_util::Full;
use hyper::body::{Frame, SizeHint};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::coalesce::{Delivered, RecordError};
use crate::idempotency::{self, KeyError, Refusal, Snapshot};
use crate::invoke::InvokeFailure;
use crate::limit::{Admitted, Quota, Rejected, Scope};
use crate::quota::ceil_secs;
use crate::usage::UsageState;

/// A response as sluicegate writes it.
pub type Response = http::Response<Body>;

/// A data-plane response body: the whole body in one buffer, or the lines of a streamed
/// bulk answer, each sent as soon as it is ready.
pub enum Body {
    /// The whole body at once (every answer but a streamed bulk one).
    Full(Full<Bytes>),
    /// One chunk per item, in order; the body ends with the stream.
    Lines(Pin<Box<dyn Stream<Item = Bytes> + Send>>),
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Self {
        Body::Full(Full::new(bytes))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(full) => Pin::new(full).poll_frame(cx),
            Body::Lines(lines) => lines
                .as_mut()
                .poll_next(cx)
                .map(|line| line.map(|line| Ok(Frame::data(line)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(full) => full.is_end_stream(),
            Body::Lines(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(full) => full.size_hint(),
            Body::Lines(_) => SizeHint::default(),
        }
    }
}

/// The wait a `503` (or an upstream `429`) asks for when nothing better is known.
const DEFAULT_WAIT: Duration = Duration::from_secs(1);

/// Why a request is shed with 429.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedScope {
    /// An admission layer refused: the key's plan, the route's or the global limit, or the
    /// key's usage quota.
    Limit(Scope),
    /// The route's queue is full (`max_pending` records waiting for a batch).
    Queue,
    /// The function's invoke rate (or Lambda itself, with a 429) refused the batch.
    Upstream,
}

impl ShedScope {
    /// Every scope, in the order of the counter slots.
    pub const ALL: [ShedScope; 6] = [
        ShedScope::Limit(Scope::Key),
        ShedScope::Limit(Scope::Route),
        ShedScope::Limit(Scope::Global),
        ShedScope::Queue,
        ShedScope::Upstream,
        ShedScope::Limit(Scope::Quota),
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
    /// `415`: a bulk request's `Content-Type` names a charset or parameter that makes its
    /// body unreadable as NDJSON.
    UnsupportedMediaType,
    /// `409`: a request with the same `Idempotency-Key` is in flight on another replica.
    Conflict,
}

impl Answer {
    /// Every answer, in the order of the counter slots (`records.rs`).
    pub const ALL: [Answer; 21] = [
        Answer::Success,
        Answer::Accepted,
        Answer::FunctionFailed,
        Answer::Shed(ShedScope::ALL[0]),
        Answer::Shed(ShedScope::ALL[1]),
        Answer::Shed(ShedScope::ALL[2]),
        Answer::Shed(ShedScope::ALL[3]),
        Answer::Shed(ShedScope::ALL[4]),
        Answer::Shed(ShedScope::ALL[5]),
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
        Answer::UnsupportedMediaType,
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
            Answer::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
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
    /// For a usage-quota refusal: the quota and the key's count (its policy instead of
    /// `policy`).
    pub usage: Option<UsageState>,
}

impl From<Rejected> for Shed {
    fn from(rejected: Rejected) -> Self {
        Shed {
            scope: ShedScope::Limit(rejected.scope),
            wait: rejected.wait,
            policy: Some(rejected.quota),
            usage: rejected.usage,
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
    /// A bulk request's body is larger than `server.max_bulk_bytes` (`max`).
    #[error("the body is larger than server.max_bulk_bytes ({max} bytes)")]
    BulkTooLarge {
        /// `server.max_bulk_bytes`.
        max: usize,
    },
    /// A bulk request holds more records than `server.max_bulk_records` (`max`).
    #[error("the body holds more than server.max_bulk_records ({max}) records")]
    TooManyRecords {
        /// `server.max_bulk_records`.
        max: usize,
    },
    /// A bulk request's `Content-Type` cannot be read as NDJSON (a charset other than
    /// UTF-8, a malformed parameter).
    #[error("{reason}")]
    UnsupportedMediaType {
        /// What is wrong with the content type, as the body's `message`.
        reason: String,
    },
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
            RequestError::Shed(shed) if shed.scope == ShedScope::Limit(Scope::Quota) => {
                (Answer::Shed(shed.scope), "quota_exceeded")
            }
            RequestError::Shed(shed) => (Answer::Shed(shed.scope), "rate_limited"),
            RequestError::BulkTooLarge { .. } | RequestError::TooManyRecords { .. } => {
                (Answer::TooLarge, "payload_too_large")
            }
            RequestError::UnsupportedMediaType { .. } => {
                (Answer::UnsupportedMediaType, "unsupported_media_type")
            }
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
    pub fn shed(&self) -> Option<Shed> {
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
                usage: None,
            }),
            RequestError::Record {
                error: RecordError::Invoke(InvokeFailure::Throttled { retry_after, .. }),
                policies,
                ..
            } => Some(Shed {
                scope: ShedScope::Upstream,
                wait: retry_after.unwrap_or(DEFAULT_WAIT),
                policy: Some(policies.upstream),
                usage: None,
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

    /// The response the caller gets: [`body`](Self::body) and the headers its status
    /// calls for.
    pub fn into_response(self) -> Response {
        if let Some(shed) = self.shed() {
            return shed_response(shed);
        }
        let (answer, body) = self.body();
        let mut response = json_response(answer.status(), body);
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

    /// Which answer this is and its JSON body: the body rules of every failure, whether it
    /// is a whole response or one entry of a bulk answer.
    pub fn body(&self) -> (Answer, Bytes) {
        if let Some(shed) = self.shed() {
            return (Answer::Shed(shed.scope), shed_body(&shed));
        }
        let (answer, code) = self.classify();
        let body = match self {
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
                serde_json::to_vec(&body).expect("plain struct serializes")
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
                serde_json::to_vec(&body).expect("plain struct serializes")
            }
            _ => error_body(code, self.to_string()),
        };
        (answer, body.into())
    }
}

/// A record's answer, whichever door it came through: the status it has and its JSON body
/// (the function's result, or why there is none). The single-record response and a bulk
/// answer's entry are both this body.
pub fn record_answer(outcome: &Result<(Arc<str>, Delivered), RequestError>) -> (Answer, Bytes) {
    match outcome {
        Ok((id, delivered)) => delivered_body(id, delivered),
        Err(error) => error.body(),
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
    /// A request body the endpoint cannot use; the message says what is wrong.
    #[error("{0}")]
    BadBody(String),
    /// The key has no usage quota (its plan, or `limits.default`, sets none).
    #[error("key {0:?} has no usage quota")]
    NoUsageQuota(String),
    /// The Redis backend did not take a change; this process applied it locally.
    #[error("{0}")]
    BackendUnavailable(&'static str),
}

impl AdminError {
    /// The response the admin client gets.
    pub fn into_response(self) -> Response {
        let (status, code) = match &self {
            AdminError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AdminError::NoMetrics => (StatusCode::NOT_FOUND, "not_found"),
            AdminError::InvalidConfig(_) => (StatusCode::BAD_REQUEST, "invalid_config"),
            AdminError::BadBody(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            AdminError::NoUsageQuota(_) => (StatusCode::NOT_FOUND, "not_found"),
            AdminError::BackendUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
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
    let mut response = Response::new(Body::from(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `{"error": code, "message": message}` with `status`.
fn error(status: StatusCode, code: &str, message: String) -> Response {
    json_response(status, error_body(code, message))
}

/// `{"error": code, "message": message}`.
fn error_body(code: &str, message: String) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        error: &'a str,
        message: String,
    }
    serde_json::to_vec(&Body {
        error: code,
        message,
    })
    .expect("plain struct serializes")
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
    let mut response = json_response(Answer::Shed(shed.scope).status(), shed_body(&shed));
    // The counters read the scope from here: the body is already serialized. The shed
    // itself rides along for a bulk entry built from this response's idempotency snapshot
    // (the bulk answer's `Retry-After` is that of the record that must wait longest).
    response.extensions_mut().insert(shed.scope);
    response.extensions_mut().insert(shed);
    add_shed_headers(&mut response, shed);
    response
}

/// A shed's body: `{"error":"rate_limited","scope":<name>,"retry_after_ms":<ms>}`, written
/// by hand (this runs for every shed request: scope names are fixed identifiers, no
/// escaping), or a usage-quota refusal's `quota_exceeded` body.
fn shed_body(shed: &Shed) -> Bytes {
    if let Some(usage) = &shed.usage {
        return quota_body(shed.scope, shed.wait, usage);
    }
    let Shed { scope, wait, .. } = *shed;
    let mut digits = itoa::Buffer::new();
    let mut body = StackText::new();
    body.push(br#"{"error":"rate_limited","scope":""#);
    body.push(scope.as_str().as_bytes());
    body.push(br#"","retry_after_ms":"#);
    body.push(digits.format(retry_after_ms(wait)).as_bytes());
    body.push(b"}");
    Bytes::copy_from_slice(body.as_bytes())
}

/// Sets a shed's `Retry-After` (whole seconds, rounded up) and its scope's
/// `RateLimit-Policy` and `RateLimit` fields on `response`: a `429`'s own headers, and a
/// bulk answer's for the record that must wait longest.
pub fn add_shed_headers(response: &mut Response, shed: Shed) {
    let name = shed.scope.as_str();
    let secs = retry_after_secs(shed.wait);
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    if let Some(usage) = &shed.usage {
        headers.insert(RATELIMIT_POLICY, quota_policy_field(usage));
        headers.insert(RATELIMIT, field(name, [(b'r', usage.left()), (b't', secs)]));
        return;
    }
    if let Some(quota) = shed.policy {
        headers.insert(RATELIMIT_POLICY, policy_field(name, quota));
    }
    headers.insert(RATELIMIT, field(name, [(b'r', 0), (b't', secs)]));
}

/// The body of `429 quota_exceeded`: the key used its usage quota for this period. Its
/// `Retry-After` runs to the next period's start and its `RateLimit*` fields describe the
/// quota (`"quota";q=<limit>;w=<period seconds>`, `"quota";r=0;t=<seconds to reset>`): see
/// [`add_shed_headers`].
fn quota_body(scope: ShedScope, wait: Duration, usage: &UsageState) -> Bytes {
    #[derive(Serialize)]
    struct Body {
        error: &'static str,
        scope: &'static str,
        retry_after_ms: u64,
        limit: u64,
        used: u64,
        period: &'static str,
        message: String,
    }
    let body = Body {
        error: "quota_exceeded",
        scope: scope.as_str(),
        retry_after_ms: retry_after_ms(wait),
        limit: usage.quota.limit,
        used: usage.used,
        period: usage.quota.period.as_str(),
        message: format!(
            "usage quota of {} requests per {} used up; the next period starts in {} s",
            usage.quota.limit,
            usage.quota.period.as_str(),
            retry_after_secs(wait)
        ),
    };
    serde_json::to_vec(&body)
        .expect("plain struct serializes")
        .into()
}

fn quota_policy_field(usage: &UsageState) -> HeaderValue {
    field(
        Scope::Quota.as_str(),
        [(b'q', usage.quota.limit), (b'w', usage.period_secs)],
    )
}

/// Two structured-field items as one list (`a, b`).
fn list(first: HeaderValue, second: HeaderValue) -> HeaderValue {
    let mut text = StackText::new();
    text.push(first.as_bytes());
    text.push(b", ");
    text.push(second.as_bytes());
    HeaderValue::from_bytes(text.as_bytes()).expect("two valid header values and a comma")
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
/// a later stage already described its own scope (a queue or upstream `429`). A key with a
/// usage quota gets its item too, after the key layer's:
/// `"key";r=<tokens>;t=<s>, "quota";r=<left>;t=<seconds to the next period>`.
pub fn add_admitted_headers(response: &mut Response, admitted: &Admitted) {
    if response.headers().contains_key(RATELIMIT) {
        return;
    }
    let mut policy = policy_field("key", admitted.quota);
    let mut state = field(
        "key",
        [
            (b'r', u64::from(admitted.remaining)),
            (b't', ceil_secs(admitted.reset)),
        ],
    );
    if let Some(usage) = &admitted.usage {
        policy = list(policy, quota_policy_field(usage));
        state = list(
            state,
            field(
                Scope::Quota.as_str(),
                [(b'r', usage.left()), (b't', ceil_secs(usage.reset))],
            ),
        );
    }
    let headers = response.headers_mut();
    headers.insert(RATELIMIT_POLICY, policy);
    headers.insert(RATELIMIT, state);
}

/// A bulk request's answer: `200` with `{"failed":<n>,"results":[<entry>,…]}`, one entry
/// per record in order (see [`bulk_entry`]); `failed` counts the entries that are not `2xx`.
/// `answers[i]` is the answer whose body is `bodies[i]`.
pub fn bulk_answer(answers: &[Answer], bodies: &[Bytes]) -> Response {
    let failed = answers.iter().filter(|a| !a.status().is_success()).count();
    let mut digits = itoa::Buffer::new();
    let size = bodies.iter().map(|b| b.len() + 20).sum::<usize>() + 32;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(br#"{"failed":"#);
    out.extend_from_slice(digits.format(failed).as_bytes());
    out.extend_from_slice(br#","results":["#);
    for (i, (answer, body)) in answers.iter().zip(bodies).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        bulk_entry(&mut out, *answer, body);
    }
    out.extend_from_slice(b"]}");
    json_response(StatusCode::OK, out)
}

/// A streamed bulk answer: `200` with `application/x-ndjson`, one entry (see
/// [`bulk_entry`]) per line, each sent once it and every record before it are answered.
pub fn bulk_lines(lines: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    let mut response = Response::new(Body::Lines(Box::pin(lines)));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// One line of a streamed bulk answer: the entry and a newline.
pub fn bulk_line(answer: Answer, body: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(body.len() + 20);
    bulk_entry(&mut line, answer, body);
    line.push(b'\n');
    line.into()
}

/// Appends a bulk entry to `out`: the record's body (a JSON object, as [`record_answer`]
/// writes it) with `"http_status":<the status it would have had alone>` as its first field.
pub fn bulk_entry(out: &mut Vec<u8>, answer: Answer, body: &[u8]) {
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(br#"{"http_status":"#);
    out.extend_from_slice(digits.format(answer.status().as_u16()).as_bytes());
    // Every record body is an object: `{` and at least one field, so the rest follows a
    // comma. Anything else would be a bug here, kept valid JSON all the same.
    match body.strip_prefix(b"{") {
        Some(rest) if rest.starts_with(b"}") => out.extend_from_slice(rest),
        Some(rest) => {
            out.push(b',');
            out.extend_from_slice(rest);
        }
        None => {
            debug_assert!(false, "a record body is a JSON object");
            out.push(b'}');
        }
    }
}

/// A record's result from the function.
pub fn delivered(id: &str, delivered: Delivered) -> Response {
    let (answer, body) = delivered_body(id, &delivered);
    json_response(answer.status(), body)
}

/// A record's result from the function: its answer and JSON body.
fn delivered_body(id: &str, delivered: &Delivered) -> (Answer, Bytes) {
    #[derive(Serialize)]
    struct Body<'a> {
        id: &'a str,
        status: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        body: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a RawValue>,
    }
    let (answer, body) = match delivered {
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
    (
        answer,
        serde_json::to_vec(&body)
            .expect("raw values serialize")
            .into(),
    )
}

// The Lambda Invoke API's answers (`lambda_api`): Lambda's own status codes, error types
// and bodies, so an AWS SDK client pointed at the sidecar parses and retries them as it
// would Lambda's. Each carries its [`Answer`] in its extensions: the route's counters count
// an Invoke API call under the `/records` answer it corresponds to, whatever Lambda's
// status for it is (an unknown outcome is a `504` there, a `200` here).

const X_AMZN_ERROR_TYPE: HeaderName = HeaderName::from_static("x-amzn-errortype");
const X_AMZ_FUNCTION_ERROR: HeaderName = HeaderName::from_static("x-amz-function-error");

/// A refusal of the Lambda Invoke API door before a call becomes a record: Lambda's own
/// request errors. Its `Display` is the body's `message`.
#[derive(Debug, thiserror::Error)]
pub enum LambdaRefusal {
    /// No configured route invokes the function (`arn` as Lambda would name it).
    #[error("Function not found: {arn}")]
    FunctionNotFound {
        /// The function's ARN.
        arn: String,
    },
    /// Not `POST .../functions/{FunctionName}/invocations`: sluicegate serves only Invoke.
    #[error("Unknown operation")]
    UnknownOperation,
    /// An `X-Amz-Invocation-Type` that is not `RequestResponse`, `Event` or `DryRun`.
    #[error("1 validation error detected: Value '{value}' at 'invocationType' failed to satisfy constraint: Member must satisfy enum value set: [Event, RequestResponse, DryRun]")]
    InvalidInvocationType {
        /// The header's value, as sent.
        value: String,
    },
    /// A parameter Lambda would refuse (a function name that is none, a qualifier that
    /// contradicts the name's), or a call the route cannot serve; the text says which.
    #[error("{0}")]
    InvalidParameter(String),
    /// The `Authorization` header is not a SigV4 credential (`identity.source =
    /// "aws_access_key"`).
    #[error("{0}")]
    IncompleteSignature(String),
}

impl LambdaRefusal {
    /// The response the Invoke API caller gets: Lambda's status, `x-amzn-ErrorType` and body.
    pub fn into_response(self) -> Response {
        let (status, error_type, answer) = match &self {
            LambdaRefusal::FunctionNotFound { .. } => (
                StatusCode::NOT_FOUND,
                "ResourceNotFoundException",
                Answer::NotFound,
            ),
            LambdaRefusal::UnknownOperation => (
                StatusCode::NOT_FOUND,
                "UnknownOperationException",
                Answer::NotFound,
            ),
            LambdaRefusal::InvalidInvocationType { .. } | LambdaRefusal::InvalidParameter(_) => (
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
                Answer::BadRequest,
            ),
            LambdaRefusal::IncompleteSignature(_) => (
                StatusCode::BAD_REQUEST,
                "IncompleteSignatureException",
                Answer::BadRequest,
            ),
        };
        // `ResourceNotFoundException`'s model member is `Message`, capitalised, as Lambda
        // sends it (the emulator's answer is the same).
        let message_key = match self {
            LambdaRefusal::FunctionNotFound { .. } => "Message",
            _ => "message",
        };
        let body = serde_json::json!({"Type": "User", message_key: self.to_string()});
        aws_error(status, error_type, &body, answer)
    }
}

/// Lambda's error answer: `status`, `x-amzn-ErrorType`, a JSON body; `answer` for the
/// route's counters.
fn aws_error(
    status: StatusCode,
    error_type: &'static str,
    body: &serde_json::Value,
    answer: Answer,
) -> Response {
    let mut response = json_response(
        status,
        serde_json::to_vec(body).expect("a JSON value serializes"),
    );
    response.extensions_mut().insert(answer);
    response
        .headers_mut()
        .insert(X_AMZN_ERROR_TYPE, HeaderValue::from_static(error_type));
    response
}

/// A `200` whose payload is a function error, as Lambda answers an invoke whose function
/// failed: `X-Amz-Function-Error` (`Unhandled` unless the function said otherwise) and the
/// error as the payload. SDKs return it as a result, never retry it.
fn function_error_response(kind: &str, payload: impl Into<Bytes>, answer: Answer) -> Response {
    let mut response = json_response(StatusCode::OK, payload);
    response.extensions_mut().insert(answer);
    let kind = HeaderValue::from_str(kind).unwrap_or(HeaderValue::from_static("Unhandled"));
    response.headers_mut().insert(X_AMZ_FUNCTION_ERROR, kind);
    response
}

/// The Lambda `Reason` of an Invoke API call's `429`, by the limit that refused it: the
/// key's own bucket and its usage quota are the caller's rate (`CallerRateLimitExceeded`;
/// Lambda has no usage quota of its own, and its `Retry-After` says when the next period
/// starts); the route's, a
/// function's invoke rate (`FunctionInvocationRateLimitExceeded`); the global layer, the
/// account-wide limit (`ConcurrentInvocationLimitExceeded`); a full queue, the function's
/// capacity (`ReservedFunctionConcurrentInvocationLimitExceeded`); Lambda's own throttle,
/// the reason Lambda gave.
fn throttle_reason(error: &RequestError, scope: ShedScope) -> &str {
    match (scope, error) {
        (ShedScope::Limit(Scope::Key | Scope::Quota), _) => "CallerRateLimitExceeded",
        (ShedScope::Limit(Scope::Route), _) => "FunctionInvocationRateLimitExceeded",
        (ShedScope::Limit(Scope::Global), _) => "ConcurrentInvocationLimitExceeded",
        (ShedScope::Queue, _) => "ReservedFunctionConcurrentInvocationLimitExceeded",
        (
            ShedScope::Upstream,
            RequestError::Record {
                error: RecordError::Invoke(InvokeFailure::Throttled { reason, .. }),
                ..
            },
        ) => reason,
        (ShedScope::Upstream, _) => "CallerRateLimitExceeded",
    }
}

/// What an Invoke API caller is told when its call got no result: Lambda's error shape for
/// each [`RequestError`], from the same classification as the `/records` answer.
///
/// - a shed: `429 TooManyRequestsException` with a `Reason` ([`throttle_reason`]),
///   `retryAfterSeconds` and `Retry-After`;
/// - nothing ran (Lambda unavailable or throttled past the retries, a failed worker,
///   shutdown, Lambda refusing the sidecar's invoke): `500 ServiceException`, which SDKs
///   retry — correct, as nothing ran;
/// - the function may have run the call, or may still (an unknown outcome, the caller's
///   deadline, a response without this record's result): never a status an SDK retries on
///   its own (standard retry mode retries 500/502/503/504 and throttles), but a `200` with
///   `X-Amz-Function-Error: Unhandled` and a `Sluicegate.*` `errorType`, as Lambda answers
///   a function that timed out;
/// - the function failed the invoke: its error, as Lambda returns it.
pub fn lambda_error(error: RequestError) -> Response {
    if let Some(shed) = error.shed() {
        let reason = throttle_reason(&error, shed.scope);
        let secs = retry_after_secs(shed.wait);
        let body = serde_json::json!({
            "Type": "User",
            "message": "Rate Exceeded.",
            "Reason": reason,
            "retryAfterSeconds": secs.to_string(),
        });
        let mut response = aws_error(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequestsException",
            &body,
            Answer::Shed(shed.scope),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return response;
    }
    let (answer, code) = error.classify();
    let message = error.to_string();
    let user = |message: String| serde_json::json!({"Type": "User", "message": message});
    let service = |message: String| serde_json::json!({"Type": "Service", "message": message});
    let unhandled = |error_type: &str, message: String| {
        let body = serde_json::json!({"errorType": error_type, "errorMessage": message});
        function_error_response(
            "Unhandled",
            serde_json::to_vec(&body).expect("a JSON value serializes"),
            answer,
        )
    };
    match (&error, answer) {
        (
            RequestError::Record {
                error: RecordError::Function(e),
                ..
            },
            _,
        ) => {
            let body = serde_json::json!({"errorType": e.error_type, "errorMessage": e.message});
            function_error_response(
                &e.kind,
                serde_json::to_vec(&body).expect("a JSON value serializes"),
                answer,
            )
        }
        (_, Answer::Timeout) if code == "outcome_unknown" => unhandled(
            "Sluicegate.OutcomeUnknown",
            format!(
                "{message}. The function may have run the payload; resend it only if the \
                 function is idempotent"
            ),
        ),
        (_, Answer::Timeout) => unhandled(
            "Sluicegate.DeadlineExceeded",
            format!(
                "{message}. The payload may still reach the function; resend it only if the \
                 function is idempotent"
            ),
        ),
        // Kept in the dead-letter sink for redrive: an SDK must not resend it on its own
        // (`ServiceException` would be retried, and the redrive would run it a second time).
        (
            RequestError::Record {
                error: RecordError::DeadLettered { id, .. },
                ..
            },
            _,
        ) => unhandled(
            "Sluicegate.DeadLettered",
            format!(
                "{message}. The payload was kept as dead letter {id} and runs when it is \
                 redriven; resending it would run it twice"
            ),
        ),
        (
            RequestError::Record {
                error:
                    RecordError::Invoke(InvokeFailure::Rejected { .. })
                    | RecordError::Closed
                    | RecordError::WorkerFailed,
                ..
            },
            _,
        )
        | (_, Answer::Unavailable) => {
            let mut response = aws_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ServiceException",
                &service(message),
                answer,
            );
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(error.unavailable_wait())),
            );
            response
        }
        // The function ran (or its batch task did) and left no usable result for the call.
        (_, Answer::BadGateway) => unhandled("Sluicegate.NoResult", message),
        (_, Answer::TooLarge) => aws_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            &user(message),
            answer,
        ),
        (_, Answer::BodyTimeout) => {
            let mut response = aws_error(
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeoutException",
                &user(message),
                answer,
            );
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
        (_, Answer::Unauthorized) => aws_error(
            StatusCode::UNAUTHORIZED,
            "MissingAuthenticationTokenException",
            &user(message),
            answer,
        ),
        (_, Answer::Forbidden) => aws_error(
            StatusCode::FORBIDDEN,
            "UnrecognizedClientException",
            &user("The security token included in the request is invalid.".to_owned()),
            answer,
        ),
        // A duplicate of a call still in flight elsewhere: Lambda's conflict, retry later.
        (_, Answer::Conflict) => {
            let mut response = aws_error(
                StatusCode::CONFLICT,
                "ResourceConflictException",
                &user(message),
                answer,
            );
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(error.unavailable_wait())),
            );
            response
        }
        (_, Answer::UnsupportedMediaType) => aws_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaTypeException",
            &user(message),
            answer,
        ),
        (_, Answer::NotFound | Answer::MethodNotAllowed) => aws_error(
            StatusCode::NOT_FOUND,
            "UnknownOperationException",
            &user(LambdaRefusal::UnknownOperation.to_string()),
            answer,
        ),
        // A body that is not one JSON value, a malformed header; and (not reached: those
        // are no request errors) the answers of a result.
        (
            _,
            Answer::BadRequest
            | Answer::Success
            | Answer::Accepted
            | Answer::FunctionFailed
            | Answer::Shed(_),
        ) => aws_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            &user(message),
            answer,
        ),
    }
}

/// A `RequestResponse` call's result: the function's result for the record as the payload,
/// or — when the function reported the record failed — its error as the payload, with
/// `X-Amz-Function-Error: Unhandled`. (A route that invokes with `Event` gives `202`.)
pub fn lambda_result(delivered: Delivered) -> Response {
    match delivered {
        Delivered::Success { body } => {
            let mut response = json_response(StatusCode::OK, Bytes::from(body.get().to_owned()));
            response.extensions_mut().insert(Answer::Success);
            response
        }
        Delivered::Failed { error } => function_error_response(
            "Unhandled",
            Bytes::from(error.get().to_owned()),
            Answer::FunctionFailed,
        ),
        Delivered::Accepted => lambda_accepted(),
    }
}

/// An `Event` call's answer once its record was delivered: `202`, no payload.
pub fn lambda_accepted() -> Response {
    let mut response = json_response(StatusCode::ACCEPTED, Bytes::new());
    response.extensions_mut().insert(Answer::Accepted);
    response
}

/// A `DryRun` call's answer: `204`, nothing invoked, no token spent. (No [`Answer`]: it is
/// counted under its own status.)
pub fn lambda_dry_run() -> Response {
    let mut response = Response::new(Body::from(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// Whether a record's outcome is kept for replay under its `Idempotency-Key`: every
/// outcome the record may have caused (`200`, `202`, `422`, `502`, `504 outcome_unknown`)
/// or will cause (a `503` whose record the dead-letter sink confirmed: a redrive runs it),
/// and none of those that say it was not processed (sheds, other `503`s, a deadline that
/// passed before any attempt, a record too large to send), so their retry is a real retry.
pub fn keep_for_replay(outcome: &Result<Delivered, RequestError>) -> bool {
    match outcome {
        Ok(_) => true,
        Err(RequestError::Record {
            error: RecordError::DeadLettered { .. },
            ..
        }) => true,
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
    let mut response = Response::new(Body::from(snapshot.body.clone()));
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

/// The answer a snapshot's response stands for (its counter slot and a bulk entry's
/// `http_status`): the status, and for a `429` the shed scope it carries. A snapshot read
/// back from Redis has no extensions, but holds a stored outcome, never a shed.
pub fn snapshot_answer(snapshot: &Snapshot) -> Answer {
    if let Some(answer) = snapshot.extensions.get::<Answer>() {
        return *answer;
    }
    let scope = snapshot.extensions.get::<ShedScope>().copied();
    Answer::ALL
        .into_iter()
        .find(|answer| {
            answer.status() == snapshot.status && (scope.is_none() || answer.scope() == scope)
        })
        // Every response the data plane writes has an [`Answer`]'s status.
        .unwrap_or(Answer::BadGateway)
}

/// The shed a snapshot's response reports, when it is a `429` built on this replica.
pub fn snapshot_shed(snapshot: &Snapshot) -> Option<Shed> {
    snapshot.extensions.get::<Shed>().copied()
}

/// A bulk entry's body for a line answered with another request's outcome (a replay of
/// its stored response, or a join of its record in flight): the record's body with
/// `"replayed":true` as its first field — the entry's `Idempotent-Replayed: true`.
pub fn replayed_body(body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(body.len() + 16);
    out.extend_from_slice(br#"{"replayed":true"#);
    // A record body is a JSON object (see [`bulk_entry`]).
    match body.strip_prefix(b"{") {
        Some(rest) if rest.starts_with(b"}") => out.extend_from_slice(rest),
        Some(rest) => {
            out.push(b',');
            out.extend_from_slice(rest);
        }
        None => {
            debug_assert!(false, "a record body is a JSON object");
            out.push(b'}');
        }
    }
    out.into()
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
    all.extend([
        (
            RequestError::BulkTooLarge { max: 5_242_880 },
            413,
            "payload_too_large",
        ),
        (
            RequestError::TooManyRecords { max: 500 },
            413,
            "payload_too_large",
        ),
        (
            RequestError::UnsupportedMediaType {
                reason: "charset=latin1 is not UTF-8".into(),
            },
            415,
            "unsupported_media_type",
        ),
    ]);
    for scope in ShedScope::ALL {
        let quota = scope == ShedScope::Limit(Scope::Quota);
        let shed = Shed {
            usage: quota.then(|| UsageState {
                quota: crate::usage::UsageQuota {
                    limit: 5,
                    period: crate::usage::Period::Day,
                    offset: 0,
                },
                used: 5,
                period_secs: 86_400,
                reset: Duration::from_millis(300),
            }),
            scope,
            wait: Duration::from_millis(300),
            policy: None,
        };
        let code = if quota {
            "quota_exceeded"
        } else {
            "rate_limited"
        };
        all.push((RequestError::Shed(shed), 429, code));
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
                usage: None,
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

    #[tokio::test]
    async fn lambda_errors_take_lambdas_shapes_and_never_invite_a_retry_of_what_may_have_run() {
        for (error, _, code) in every_request_error() {
            let what = format!("{error:?}");
            let answer = error.answer();
            let rejected = matches!(
                error,
                RequestError::Record {
                    error: RecordError::Invoke(InvokeFailure::Rejected { .. }),
                    ..
                }
            );
            let dead_lettered = matches!(
                error,
                RequestError::Record {
                    error: RecordError::DeadLettered { .. },
                    ..
                }
            );
            let response = lambda_error(error);
            // Counted as the `/records` answer it stands for.
            assert_eq!(
                response.extensions().get::<Answer>(),
                Some(&answer),
                "{what}"
            );
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let error_type = headers
                .get("x-amzn-errortype")
                .map(|v| v.to_str().expect("ASCII").to_owned());
            let function_error = headers.get("x-amz-function-error").cloned();
            let body = body_of(response).await;
            let expected: (u16, Option<&str>) = match code {
                "rate_limited" | "quota_exceeded" => (429, Some("TooManyRequestsException")),
                "outcome_unknown" | "timeout" | "function_error" => (200, None),
                "bad_gateway" if rejected => (500, Some("ServiceException")),
                "bad_gateway" => (200, None),
                "unavailable" if dead_lettered => (200, None),
                "unavailable" => (500, Some("ServiceException")),
                "payload_too_large" => (413, Some("RequestTooLargeException")),
                "bad_request" => (400, Some("InvalidRequestContentException")),
                "unauthorized" => (401, Some("MissingAuthenticationTokenException")),
                "forbidden" => (403, Some("UnrecognizedClientException")),
                "not_found" | "method_not_allowed" => (404, Some("UnknownOperationException")),
                "unsupported_media_type" => (415, Some("UnsupportedMediaTypeException")),
                "idempotency_key_in_flight" => (409, Some("ResourceConflictException")),
                "idempotency_key_reused" => (400, Some("InvalidRequestContentException")),
                "idempotency_store_full" | "idempotency_unavailable" => {
                    (500, Some("ServiceException"))
                }
                "request_timeout" => (408, Some("RequestTimeoutException")),
                other => panic!("no Lambda shape for {other}"),
            };
            assert_eq!((status, error_type.as_deref()), expected, "{what}");
            if status == 200 {
                assert_eq!(function_error.expect("a function error"), "Unhandled");
                let error_type = match code {
                    "unavailable" => "Sluicegate.DeadLettered",
                    "outcome_unknown" => "Sluicegate.OutcomeUnknown",
                    "timeout" => "Sluicegate.DeadlineExceeded",
                    "function_error" => "Runtime.ExitError",
                    _ => "Sluicegate.NoResult",
                };
                assert_eq!(body["errorType"], error_type, "{what}");
                assert!(body["errorMessage"].is_string(), "{what}");
            } else {
                assert!(function_error.is_none(), "{what}");
                assert!(
                    body["Type"].is_string() && body["message"].is_string(),
                    "{what}"
                );
            }
            if code == "outcome_unknown" {
                let message = body["errorMessage"].as_str().expect("a message");
                assert!(message.contains("may have run"), "{message}");
            }
            assert_eq!(
                headers.contains_key("retry-after"),
                matches!(status, 409 | 429 | 500),
                "{what}"
            );
        }
    }

    #[tokio::test]
    async fn a_lambda_throttle_names_the_reason_of_the_refusing_limit() {
        for (scope, reason) in [
            (ShedScope::Limit(Scope::Key), "CallerRateLimitExceeded"),
            (ShedScope::Limit(Scope::Quota), "CallerRateLimitExceeded"),
            (
                ShedScope::Limit(Scope::Route),
                "FunctionInvocationRateLimitExceeded",
            ),
            (
                ShedScope::Limit(Scope::Global),
                "ConcurrentInvocationLimitExceeded",
            ),
            (
                ShedScope::Queue,
                "ReservedFunctionConcurrentInvocationLimitExceeded",
            ),
            (ShedScope::Upstream, "CallerRateLimitExceeded"),
        ] {
            let shed = Shed {
                scope,
                wait: Duration::from_millis(1500),
                policy: None,
                usage: None,
            };
            let response = lambda_error(RequestError::Shed(shed));
            assert_eq!(response.headers()["retry-after"], "2");
            assert_eq!(
                body_of(response).await,
                serde_json::json!({"Type": "User", "message": "Rate Exceeded.",
                    "Reason": reason, "retryAfterSeconds": "2"})
            );
        }
        // Lambda's own throttle keeps Lambda's reason.
        let (throttled, _, _) = every_request_error()
            .into_iter()
            .find(|(e, _, _)| {
                matches!(
                    e,
                    RequestError::Record {
                        error: RecordError::Invoke(InvokeFailure::Throttled { .. }),
                        ..
                    }
                )
            })
            .expect("listed");
        let body = body_of(lambda_error(throttled)).await;
        assert_eq!(body["Reason"], "CallerRateLimitExceeded");
    }

    #[tokio::test]
    async fn lambda_results_are_the_records_payload_or_its_error() {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).expect("valid JSON");
        let success = lambda_result(Delivered::Success {
            body: raw(r#"{"n":1}"#),
        });
        assert_eq!(success.status(), StatusCode::OK);
        assert!(!success.headers().contains_key("x-amz-function-error"));
        assert_eq!(body_of(success).await, serde_json::json!({"n": 1}));
        let failed = lambda_result(Delivered::Failed {
            error: raw(r#"{"errorMessage":"bad"}"#),
        });
        assert_eq!(failed.status(), StatusCode::OK);
        assert_eq!(failed.headers()["x-amz-function-error"], "Unhandled");
        assert_eq!(
            failed.extensions().get::<Answer>(),
            Some(&Answer::FunctionFailed)
        );
        assert_eq!(
            body_of(failed).await,
            serde_json::json!({"errorMessage": "bad"})
        );
        assert_eq!(
            lambda_result(Delivered::Accepted).status(),
            StatusCode::ACCEPTED
        );
        assert_eq!(lambda_dry_run().status(), StatusCode::NO_CONTENT);
    }

    #[tokio::test]
    async fn lambda_refusals_take_lambdas_error_shapes() {
        let not_found = LambdaRefusal::FunctionNotFound {
            arn: "arn:aws:lambda:us-east-1:123456789012:function:nope".into(),
        }
        .into_response();
        assert_eq!(not_found.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            not_found.headers()["x-amzn-errortype"],
            "ResourceNotFoundException"
        );
        assert_eq!(
            body_of(not_found).await,
            serde_json::json!({"Type": "User",
                "Message": "Function not found: arn:aws:lambda:us-east-1:123456789012:function:nope"})
        );
        let bad_type = LambdaRefusal::InvalidInvocationType {
            value: "Later".into(),
        }
        .into_response();
        assert_eq!(bad_type.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            bad_type.headers()["x-amzn-errortype"],
            "InvalidParameterValueException"
        );
        let unknown = LambdaRefusal::UnknownOperation.into_response();
        assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            unknown.headers()["x-amzn-errortype"],
            "UnknownOperationException"
        );
        let signature = LambdaRefusal::IncompleteSignature("no".into()).into_response();
        assert_eq!(signature.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            signature.headers()["x-amzn-errortype"],
            "IncompleteSignatureException"
        );
    }

    fn usage(limit: u64, used: u64, reset: Duration) -> UsageState {
        UsageState {
            quota: crate::usage::UsageQuota {
                limit,
                period: crate::usage::Period::Month,
                offset: 0,
            },
            used,
            period_secs: 30 * 86_400,
            reset,
        }
    }

    #[tokio::test]
    async fn a_quota_refusal_waits_for_the_next_period_and_describes_the_quota() {
        let reset = Duration::from_millis(86_400_000 + 1);
        let response = rejected(Rejected {
            scope: Scope::Quota,
            quota: Quota {
                rate: 10.0,
                burst: 20,
            },
            wait: reset,
            usage: Some(usage(100, 100, reset)),
        });
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = response.headers();
        assert_eq!(h["retry-after"], "86401");
        assert_eq!(h["ratelimit-policy"], "\"quota\";q=100;w=2592000");
        assert_eq!(h["ratelimit"], "\"quota\";r=0;t=86401");
        assert_eq!(
            response.extensions().get::<ShedScope>(),
            Some(&ShedScope::Limit(Scope::Quota))
        );
        assert_eq!(
            body_of(response).await,
            serde_json::json!({
                "error": "quota_exceeded",
                "scope": "quota",
                "retry_after_ms": 86_400_001,
                "limit": 100,
                "used": 100,
                "period": "month",
                "message": "usage quota of 100 requests per month used up; the next period starts in 86401 s",
            })
        );
    }

    #[test]
    fn admitted_responses_carry_the_quota_item_after_the_key_layers() {
        let quota = Quota {
            rate: 10.0,
            burst: 20,
        };
        let mut response = healthy();
        add_admitted_headers(
            &mut response,
            &Admitted {
                quota,
                remaining: 19,
                reset: Duration::from_millis(100),
                usage: Some(usage(100, 37, Duration::from_millis(5_500))),
            },
        );
        let h = response.headers();
        assert_eq!(
            h["ratelimit-policy"],
            "\"key\";q=20;w=2, \"quota\";q=100;w=2592000"
        );
        assert_eq!(h["ratelimit"], "\"key\";r=19;t=1, \"quota\";r=63;t=6");
        let mut plain = healthy();
        add_admitted_headers(
            &mut plain,
            &Admitted {
                quota,
                remaining: 19,
                reset: Duration::from_millis(100),
                usage: None,
            },
        );
        assert_eq!(plain.headers()["ratelimit"], "\"key\";r=19;t=1");
    }

    #[tokio::test]
    async fn a_bulk_entry_is_the_records_own_body_with_its_status_first() {
        let success: Result<(Arc<str>, Delivered), RequestError> = Ok((
            "r7".into(),
            Delivered::Success {
                body: RawValue::from_string(r#"{"n":1}"#.into()).expect("JSON"),
            },
        ));
        let outcomes = [
            success,
            Err(RequestError::Shed(Shed {
                scope: ShedScope::Limit(Scope::Key),
                wait: Duration::from_millis(120),
                policy: None,
                usage: None,
            })),
            Err(RequestError::TooLarge { max: 10 }),
        ];
        let (answers, bodies): (Vec<Answer>, Vec<Bytes>) =
            outcomes.iter().map(record_answer).unzip();
        let response = bulk_answer(&answers, &bodies);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = body_of(response).await;
        assert_eq!(
            body,
            serde_json::json!({"failed": 2, "results": [
                {"http_status": 200, "id": "r7", "status": "success", "body": {"n": 1}},
                {"http_status": 429, "error": "rate_limited", "scope": "key", "retry_after_ms": 120},
                {"http_status": 413, "error": "payload_too_large",
                 "message": "record is larger than server.max_record_bytes (10 bytes)"},
            ]})
        );
        // The entry's body is the one the single-record response has.
        for outcome in outcomes {
            let (answer, bytes) = record_answer(&outcome);
            let alone = match outcome {
                Ok((id, delivered)) => super::delivered(&id, delivered),
                Err(error) => error.into_response(),
            };
            assert_eq!(alone.status(), answer.status());
            let alone = alone.into_body().collect().await.expect("full").to_bytes();
            assert_eq!(alone, bytes);
        }
    }

    #[test]
    fn shed_carries_retry_after_and_ratelimit_fields() {
        let quota = Quota {
            rate: 10.0,
            burst: 20,
        };
        let response = rejected(Rejected {
            usage: None,
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
                matches!(status, 502 | 422 | 200 | 202)
                    || *code == "outcome_unknown"
                    || (*status, *code) == (503, "unavailable"),
                "{status} {code} kept"
            );
        }
        // A confirmed dead letter is kept (a redrive runs it); an unconfirmed one is not.
        assert!(kept.contains(&(503, "unavailable")));
        assert!(every_request_error()
            .into_iter()
            .any(|(error, _, _)| matches!(
                &error,
                RequestError::Record {
                    error: RecordError::NotDeadLettered { .. },
                    ..
                }
            ) && !keep_for_replay(&Err(error))));
        assert!(kept.contains(&(504, "outcome_unknown")));
        assert!(kept.contains(&(502, "function_error")));
        assert!(keep_for_replay(&Ok(Delivered::Accepted)));
        let snap = snapshot(delivered("r1", Delivered::Accepted)).await;
        let replay = from_snapshot(&snap, true);
        assert_eq!(replay.status(), 202);
        assert_eq!(replay.headers()[idempotency::REPLAYED], "true");
        assert_eq!(body_of(replay).await["id"], "r1");
    }

    #[tokio::test]
    async fn a_snapshot_is_an_entry_with_the_answer_and_shed_it_stood_for() {
        // Every request error, as its own response snapshot: the same answer comes back,
        // a shed's scope and wait among it.
        for (error, status, code) in every_request_error() {
            let answer = error.answer();
            let shed = error.shed();
            let snap = snapshot(error.into_response()).await;
            assert_eq!(snapshot_answer(&snap), answer, "{status} {code}");
            assert_eq!(snapshot_shed(&snap), shed, "{status} {code}");
        }
        // Read back from Redis a snapshot has no extensions; what is stored is never a shed.
        for answer in [
            Answer::Success,
            Answer::Accepted,
            Answer::FunctionFailed,
            Answer::BadGateway,
            Answer::Timeout,
        ] {
            let stored = Snapshot {
                status: answer.status(),
                headers: http::HeaderMap::new(),
                extensions: http::Extensions::new(),
                body: Bytes::from_static(b"{}"),
            };
            assert_eq!(snapshot_answer(&stored), answer);
            assert_eq!(snapshot_shed(&stored), None);
        }
    }

    #[test]
    fn a_replayed_entry_says_so_first_and_stays_one_object() {
        assert_eq!(
            &replayed_body(br#"{"id":"r1","status":"success"}"#)[..],
            br#"{"replayed":true,"id":"r1","status":"success"}"#
        );
        assert_eq!(&replayed_body(b"{}")[..], br#"{"replayed":true}"#);
        let mut entry = Vec::new();
        bulk_entry(
            &mut entry,
            Answer::Success,
            &replayed_body(br#"{"id":"r1"}"#),
        );
        assert_eq!(entry, br#"{"http_status":200,"replayed":true,"id":"r1"}"#);
    }
}
