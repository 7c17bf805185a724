//! The one place where outcomes become HTTP responses: statuses, JSON bodies and the
//! `Retry-After` / `RateLimit-Policy` / `RateLimit` headers of the HTTP contract.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::coalesce::{Delivered, RecordError};
use crate::invoke::InvokeFailure;
use crate::limit::{ceil_secs, Admitted, Quota, Rejected, Scope};

/// Why a request is shed with 429.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedScope {
    Limit(Scope),
    Queue,
    Upstream,
}

impl ShedScope {
    pub fn as_str(self) -> &'static str {
        match self {
            ShedScope::Limit(scope) => scope.as_str(),
            ShedScope::Queue => "queue",
            ShedScope::Upstream => "upstream",
        }
    }
}

fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `{"error": code, "message": message}` with `status`.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    #[derive(Serialize)]
    struct Body<'a> {
        error: &'a str,
        message: String,
    }
    let body = serde_json::to_vec(&Body {
        error: code,
        message: message.into(),
    })
    .expect("plain struct serializes");
    json_response(status, body)
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
pub fn shed(scope: ShedScope, wait: Duration, policy: Option<Quota>) -> Response {
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
        StatusCode::TOO_MANY_REQUESTS,
        bytes::Bytes::copy_from_slice(body.as_bytes()),
    );
    // The metrics layer reads the scope from here: the body is already serialized.
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

/// A limiter refusal.
pub fn rejected(rejected: Rejected) -> Response {
    shed(
        ShedScope::Limit(rejected.scope),
        rejected.wait,
        Some(rejected.quota),
    )
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

/// `408`: the request's body did not arrive in time. The connection is closed after the
/// answer (`Connection: close`): the rest of the body may still be on its way, and
/// nothing on the connection can be read as a next request.
pub fn body_timeout(waited: Duration) -> Response {
    let mut response = error(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        format!(
            "the request body did not arrive within {} ms",
            waited.as_millis()
        ),
    );
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// `401` for the admin API: no token, or not the right one.
pub fn admin_unauthorized(message: &str) -> Response {
    let mut response = error(StatusCode::UNAUTHORIZED, "unauthorized", message);
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// `503` with `Retry-After`.
pub fn unavailable(message: impl Into<String>, wait: Duration) -> Response {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after_secs(wait)),
    );
    response
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
    let (status, body) = match &delivered {
        Delivered::Success { body } => (
            StatusCode::OK,
            Body {
                id,
                status: "success",
                body: Some(body),
                error: None,
            },
        ),
        Delivered::Failed { error } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Body {
                id,
                status: "error",
                body: None,
                error: Some(error),
            },
        ),
        Delivered::Accepted => (
            StatusCode::ACCEPTED,
            Body {
                id,
                status: "accepted",
                body: None,
                error: None,
            },
        ),
    };
    json_response(
        status,
        serde_json::to_vec(&body).expect("raw values serialize"),
    )
}

/// A record that got no result, by kind.
/// The policies a route's non-admission `429`s report in `RateLimit-Policy`.
#[derive(Clone, Copy, Debug)]
pub struct Policies {
    /// The queue: `q` = `max_pending`, refilled at the measured drain rate.
    pub queue: Quota,
    /// The function's invoke-rate bucket.
    pub upstream: Quota,
}

pub fn record_error(id: &str, err: RecordError, policies: &Policies) -> Response {
    match err {
        RecordError::QueueFull { retry_after } => {
            shed(ShedScope::Queue, retry_after, Some(policies.queue))
        }
        RecordError::Closed => unavailable("sluicegate is shutting down", Duration::from_secs(1)),
        // Never sent: retrying is safe, and the restarted worker takes the retry.
        RecordError::WorkerFailed => unavailable(err.to_string(), Duration::from_secs(1)),
        RecordError::TooLarge { .. } => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            err.to_string(),
        ),
        RecordError::Invoke(failure) => invoke_failure(failure, policies),
        RecordError::Function(e) => {
            #[derive(Serialize)]
            struct Body<'a> {
                error: &'a str,
                id: &'a str,
                kind: &'a str,
                error_type: &'a str,
                message: &'a str,
            }
            let body = Body {
                error: "function_error",
                id,
                kind: &e.kind,
                error_type: &e.error_type,
                message: &e.message,
            };
            json_response(
                StatusCode::BAD_GATEWAY,
                serde_json::to_vec(&body).expect("plain struct"),
            )
        }
        RecordError::Expired | RecordError::DeadlineBeforeRetry(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("record {id}: {err}"),
        ),
        RecordError::DeadLettered {
            id: dead_letter_id,
            failure,
        } => {
            #[derive(Serialize)]
            struct Body<'a> {
                error: &'a str,
                id: &'a str,
                dead_letter_id: &'a str,
                message: String,
            }
            // An attempt may have run the record: the letter is kept (marked
            // `possibly_processed`), but the caller must not read this as safe to retry.
            if failure.may_have_run() {
                let body = Body {
                    error: "outcome_unknown",
                    id,
                    dead_letter_id: &dead_letter_id,
                    message: format!(
                        "retries exhausted and the record may have been processed: {failure}"
                    ),
                };
                return json_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    serde_json::to_vec(&body).expect("plain struct"),
                );
            }
            let body = Body {
                error: "unavailable",
                id,
                dead_letter_id: &dead_letter_id,
                message: format!("Lambda did not take the record after retries: {failure}"),
            };
            let mut response = json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::to_vec(&body).expect("plain struct"),
            );
            let wait = failure.retry_after().unwrap_or(Duration::from_secs(1));
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(wait)),
            );
            response
        }
        // The sink did not confirm the letter: no id to give, and the caller must not think
        // the record is kept anywhere.
        RecordError::NotDeadLettered { ref failure, .. } if failure.may_have_run() => error(
            StatusCode::GATEWAY_TIMEOUT,
            "outcome_unknown",
            format!("record {id}: {err}"),
        ),
        RecordError::NotDeadLettered { ref failure, .. } => {
            let wait = failure.retry_after().unwrap_or(Duration::from_secs(1));
            unavailable(format!("record {id}: {err}"), wait)
        }
        RecordError::MalformedResponse(_) | RecordError::MissingResult | RecordError::Lost => {
            error(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                format!("record {id}: {err}"),
            )
        }
    }
}

fn invoke_failure(failure: InvokeFailure, policies: &Policies) -> Response {
    match failure {
        InvokeFailure::Throttled { retry_after, .. } => shed(
            ShedScope::Upstream,
            retry_after.unwrap_or(Duration::from_secs(1)),
            Some(policies.upstream),
        ),
        InvokeFailure::TooLarge { .. } => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            failure.to_string(),
        ),
        InvokeFailure::Rejected { .. } => {
            error(StatusCode::BAD_GATEWAY, "bad_gateway", failure.to_string())
        }
        InvokeFailure::Unavailable { .. } => {
            unavailable(failure.to_string(), Duration::from_secs(1))
        }
        // The request may have reached the function: the caller must not assume it did not.
        InvokeFailure::OutcomeUnknown { .. } => error(
            StatusCode::GATEWAY_TIMEOUT,
            "outcome_unknown",
            failure.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    async fn the_shed_body_is_json_with_the_scope_and_the_exact_wait() {
        let scopes = [
            ShedScope::Limit(Scope::Global),
            ShedScope::Limit(Scope::Route),
            ShedScope::Limit(Scope::Key),
            ShedScope::Queue,
            ShedScope::Upstream,
        ];
        for (scope, wait_us) in scopes.into_iter().zip([1, 999, 1_000, 1_500_001, u32::MAX]) {
            let wait = Duration::from_micros(u64::from(wait_us));
            let response = shed(scope, wait, None);
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
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
        let response = shed(
            ShedScope::Limit(Scope::Key),
            Duration::from_millis(100),
            Some(quota),
        );
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
}
