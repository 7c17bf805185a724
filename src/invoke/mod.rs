//! Invoking Lambda: the two transports (`lambda.transport`: the direct client in `direct.rs`,
//! or `aws-sdk-lambda`), the per-function gate that keeps invokes inside the function's
//! concurrency, and the one classification of what Lambda answered, which both transports
//! share.
//!
//! One [`Invoker`] exists per function, shared by every route that targets it, so the
//! concurrency cap (`invoke.max_concurrency`, meant to sit at or below the function's
//! reserved concurrency) holds for the function as a whole. The SDK's own retries are
//! off: a retry the proxy cannot see is exactly what collides with reserved concurrency
//! after a read timeout. Retrying, backoff and dead-lettering are decided by the caller of
//! [`Invoker::invoke`] from the [`InvokeFailure`] it returns. The coalescer calls it through
//! the [`Invoke`] trait, which a test can implement without Lambda.
//!
//! | Lambda says | [`InvokeFailure`] | retryable |
//! |---|---|---|
//! | `TooManyRequestsException` (any `Reason`) | `Throttled` | yes, after its Retry-After (at most `retry.cap`) |
//! | `ServiceException`, another 5xx with a Lambda error code, `EC2ThrottledException`, `ResourceNotReadyException`… | `Unavailable` | yes |
//! | a 5xx without a Lambda error code (an intermediary's HTML 502/504) | `OutcomeUnknown` (`UnexplainedServerError`) | only with `retry.retry_timeouts` |
//! | the request was provably never sent: connect refused / reset / timed out (DNS and TLS included), a pooled connection closed before the request started, no credentials to sign it | `Unavailable` | yes |
//! | no answer within `read_timeout` | `OutcomeUnknown` (`ReadTimeout`) | only with `retry.retry_timeouts` (idempotent functions) |
//! | the connection failed once the request may have been sent: closed before the response (`IncompleteMessage`), reset while reading, an unreadable response, any failure not provably before sending | `OutcomeUnknown` (`ConnectionLost`) | only with `retry.retry_timeouts` |
//! | `RequestTooLargeException` | `TooLarge` | split the batch |
//! | a signature refused (`InvalidSignatureException`, `RequestTimeTooSkewed`, `SignatureDoesNotMatch`, `AuthFailure`) while the answer's `Date` shows it was signed more than 4 min off Lambda's clock | `Unavailable` | yes: the next attempt is signed with Lambda's time (both transports learn it from the `Date` of answers that came back within 10 s; the SDK from any) |
//! | `ResourceNotFoundException`, `InvalidRequestContentException`, credentials/permission | `Rejected` | no |
//!
//! The line between `Unavailable` and `OutcomeUnknown` is what the proxy *knows*: Lambda
//! runs a batch as soon as it has read the request, so once the request may have left,
//! silence says nothing about whether the function ran. Retrying then risks running every
//! record twice; only an error that proves the request never left (the SDK error's source
//! chain holds a connect failure, or a request hyper canceled before writing it) is safe
//! to retry. Numbers Lambda sends (a throttle's `Retry-After`) are parsed without trusting
//! them: unparsable, negative or NaN is absent, anything larger is capped at
//! [`MAX_RETRY_AFTER`] here and at the route's `retry.cap` by the retry loop.

mod client;
mod direct;
pub mod discover;
mod gate;
pub mod retry;
mod sigv4;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use aws_sdk_lambda::error::SdkError;
use aws_sdk_lambda::operation::invoke::InvokeError;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvocationType;
use bytes::Bytes;

pub use self::client::{build_client, sdk_config, LambdaClient};
use self::direct::DirectClient;
pub use self::gate::{Gate, GateConfig, InvokePermit, Limits};
use crate::config::Invocation;

/// What an invoke that Lambda accepted returned.
#[derive(Debug)]
pub enum Invoked {
    /// A synchronous invoke ran; `function_error` is `X-Amz-Function-Error` when the
    /// function itself failed (`Unhandled`, `Handled`).
    Response {
        /// The function's response body, as Lambda returned it.
        payload: Bytes,
        /// `X-Amz-Function-Error` (`Unhandled`, `Handled`); `None` when the function
        /// returned normally.
        function_error: Option<String>,
    },
    /// An `Event` invoke was queued by Lambda (202).
    Accepted,
}

/// The longest `Retry-After` kept from a throttle, whatever Lambda sent; the retry loop then
/// caps it at the route's `retry.cap`.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Why an invoke's outcome is unknown: the request may have reached the function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownCause {
    /// No answer within `lambda.read_timeout`.
    ReadTimeout,
    /// The connection failed after the request may have been sent.
    ConnectionLost,
    /// A 5xx that carries no Lambda error code: an intermediary (a proxy, a VPC endpoint, a
    /// load balancer) answered, possibly after forwarding the request.
    UnexplainedServerError,
}

impl std::fmt::Display for UnknownCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UnknownCause::ReadTimeout => "Lambda did not answer within the read timeout",
            UnknownCause::ConnectionLost => {
                "the connection to Lambda failed after the request may have been sent"
            }
            UnknownCause::UnexplainedServerError => {
                "Lambda's endpoint answered a server error that is not Lambda's own"
            }
        })
    }
}

/// Why an invoke did not produce a function result.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum InvokeFailure {
    /// `TooManyRequestsException`: the function, account or burst limit was hit; nothing
    /// ran, so the batch is retried after the wait Lambda asked for.
    #[error("Lambda throttled the invoke: TooManyRequestsException ({reason}): {message}")]
    Throttled {
        /// The exception's `Reason` (`ReservedFunctionConcurrentInvocationLimitExceeded`,
        /// `CallerRateLimitExceeded`, …), or `Unknown` when Lambda sent none.
        reason: String,
        /// Lambda's error message.
        message: String,
        /// The exception's `Retry-After`, parsed without trusting it: `None` when absent
        /// or unparsable, otherwise at most [`MAX_RETRY_AFTER`].
        retry_after: Option<Duration>,
    },
    /// `RequestTooLargeException`: the payload is over Lambda's limit; the caller splits
    /// the batch.
    #[error("the batch is larger than Lambda accepts: {message}")]
    TooLarge {
        /// Lambda's error message.
        message: String,
    },
    /// Lambda refused the request for good (unknown function, bad payload, credentials or
    /// permission, a client misconfiguration): another attempt would fail the same way.
    #[error("Lambda refused the invoke: {kind}: {message}")]
    Rejected {
        /// Lambda's error code (`ResourceNotFoundException`, …), or `ClientConfiguration`
        /// / `RequestConstruction` when the SDK refused before sending.
        kind: String,
        /// What went wrong, from Lambda or the SDK.
        message: String,
    },
    /// Lambda did not take the request; nothing ran, so another attempt is safe.
    #[error("Lambda is unavailable: {message}")]
    Unavailable {
        /// The error code and message, or the connection failure.
        message: String,
    },
    /// The request may have reached the function: it may have run.
    #[error("{cause}; the outcome is unknown and the record may have been processed: {message}")]
    OutcomeUnknown {
        /// A read timeout or a connection lost after the request may have left.
        cause: UnknownCause,
        /// The underlying failure, as text.
        message: String,
    },
}

impl InvokeFailure {
    /// The wait Lambda asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            InvokeFailure::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A short label for logs and metrics.
    pub fn label(&self) -> &str {
        match self {
            InvokeFailure::Throttled { reason, .. } => reason,
            InvokeFailure::TooLarge { .. } => "RequestTooLargeException",
            InvokeFailure::Rejected { kind, .. } => kind,
            InvokeFailure::Unavailable { .. } => "Unavailable",
            InvokeFailure::OutcomeUnknown { cause, .. } => match cause {
                UnknownCause::ReadTimeout => "ReadTimeout",
                UnknownCause::ConnectionLost => "ConnectionLost",
                UnknownCause::UnexplainedServerError => "UnexplainedServerError",
            },
        }
    }

    /// Whether the function may have run the batch although no result came back.
    pub fn may_have_run(&self) -> bool {
        matches!(self, InvokeFailure::OutcomeUnknown { .. })
    }

    /// The same failure with its `Retry-After` no longer than `cap`.
    pub fn with_retry_after_at_most(mut self, cap: Duration) -> Self {
        if let InvokeFailure::Throttled { retry_after, .. } = &mut self {
            *retry_after = retry_after.map(|wait| wait.min(cap));
        }
        self
    }

    /// Whether another attempt may succeed; one whose outcome is unknown only when the
    /// function is idempotent (`retry_timeouts`), since the retry may run it twice.
    pub fn is_retryable(&self, retry_timeouts: bool) -> bool {
        match self {
            InvokeFailure::Throttled { .. } | InvokeFailure::Unavailable { .. } => true,
            InvokeFailure::OutcomeUnknown { .. } => retry_timeouts,
            InvokeFailure::TooLarge { .. } | InvokeFailure::Rejected { .. } => false,
        }
    }
}

/// What the coalescer needs from a function's invoker: its gate, and one invoke attempt.
///
/// The seam between batching and Lambda. [`Invoker`] implements it over either transport;
/// the coalescer's unit tests implement it with a scripted fake, so batching, retries and
/// splitting run under `tokio::time::pause()` without sockets. The coalescer is generic
/// over it (static dispatch: nothing is boxed per invoke beyond what the real invoker does).
pub trait Invoke: Send + Sync + 'static {
    /// The function's name, for logs, metrics and dead letters.
    fn function(&self) -> &str;

    /// The gate a batch must pass (take an [`InvokePermit`]) before [`Invoke::invoke`].
    fn gate(&self) -> &Gate;

    /// Sends one invoke attempt, holding `slot` until it returns, and reports acceptances
    /// and throttles to the gate so its adaptive limits follow Lambda (see
    /// [`Invoker::invoke`]).
    fn invoke(
        &self,
        payload: Bytes,
        invocation: Invocation,
        slot: InvokePermit,
    ) -> impl Future<Output = Result<Invoked, InvokeFailure>> + Send;
}

impl Invoke for Invoker {
    fn function(&self) -> &str {
        Invoker::function(self)
    }

    fn gate(&self) -> &Gate {
        Invoker::gate(self)
    }

    fn invoke(
        &self,
        payload: Bytes,
        invocation: Invocation,
        slot: InvokePermit,
    ) -> impl Future<Output = Result<Invoked, InvokeFailure>> + Send {
        Invoker::invoke(self, payload, invocation, slot)
    }
}

/// Invokes one function within its gate.
pub struct Invoker {
    transport: Transport,
    function: String,
    gate: Gate,
    metrics: OnceLock<InvokeMetrics>,
}

/// The invoker's `sluicegate_invoke_duration_seconds` handles, one per outcome, registered
/// once instead of per invoke (which built the label set, cloned the function name and
/// looked the series up in the recorder's registry every time).
///
/// Registered at the first invoke, not in [`Invoker::new`]: `serve` builds the pipeline
/// before it installs the process-wide recorder, and a handle registered before that is a
/// no-op for good. The first invoke always comes later, once the listener takes records.
struct InvokeMetrics {
    ok: metrics::Histogram,
    function_error: metrics::Histogram,
    error: metrics::Histogram,
}

impl InvokeMetrics {
    fn register(function: &str) -> Self {
        let duration = |outcome: &'static str| metrics::histogram!("sluicegate_invoke_duration_seconds", "function" => function.to_owned(), "outcome" => outcome);
        InvokeMetrics {
            ok: duration("ok"),
            function_error: duration("function_error"),
            error: duration("error"),
        }
    }
}

/// How an [`Invoker`] reaches Lambda (`lambda.transport`).
enum Transport {
    Sdk(aws_sdk_lambda::Client),
    Direct(Arc<DirectClient>, direct::Target),
}

impl Invoker {
    /// An invoker of `function` (a Lambda function name or ARN) through `client`, each
    /// attempt passing `gate` first. Fails only when the direct client cannot form the
    /// function's Invoke URI.
    pub fn new(client: &LambdaClient, function: String, gate: Gate) -> std::io::Result<Self> {
        let transport = match client.direct() {
            None => Transport::Sdk(client.sdk().clone()),
            Some(direct) => Transport::Direct(Arc::clone(direct), direct.target(&function)?),
        };
        Ok(Invoker {
            transport,
            function,
            gate,
            metrics: OnceLock::new(),
        })
    }

    /// The function this invoker targets, as the routes' `routes[].function` key names it.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// The gate a batch must pass (take an [`InvokePermit`]) before [`Invoker::invoke`].
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Sends one invoke attempt. The slot is held for the whole call and released when it
    /// returns. Throttles and acceptances are reported to the gate (adaptive limits) and to
    /// the metrics.
    pub async fn invoke(
        &self,
        payload: Bytes,
        invocation: Invocation,
        mut slot: InvokePermit,
    ) -> Result<Invoked, InvokeFailure> {
        slot.mark_used();
        let started = tokio::time::Instant::now();
        let result = match &self.transport {
            Transport::Sdk(client) => sdk_invoke(client, &self.function, payload, invocation).await,
            Transport::Direct(client, target) => client.invoke(target, payload, invocation).await,
        };
        drop(slot);
        let metrics = self
            .metrics
            .get_or_init(|| InvokeMetrics::register(&self.function));
        let duration = match &result {
            Ok(Invoked::Response {
                function_error: Some(_),
                ..
            }) => &metrics.function_error,
            Ok(_) => &metrics.ok,
            Err(_) => &metrics.error,
        };
        duration.record(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => self.gate.on_accepted(),
            Err(InvokeFailure::Throttled { reason, .. }) => {
                metrics::counter!("sluicegate_lambda_throttles_total", "function" => self.function.clone(), "reason" => reason.clone())
                    .increment(1);
                self.gate.on_throttle(reason);
            }
            Err(_) => {}
        }
        result
    }
}

/// One invoke attempt through the SDK.
async fn sdk_invoke(
    client: &aws_sdk_lambda::Client,
    function: &str,
    payload: Bytes,
    invocation: Invocation,
) -> Result<Invoked, InvokeFailure> {
    let invocation_type = match invocation {
        Invocation::RequestResponse => InvocationType::RequestResponse,
        Invocation::Event => InvocationType::Event,
    };
    match client
        .invoke()
        .function_name(function)
        .invocation_type(invocation_type)
        .payload(Blob::new(payload))
        .send()
        .await
    {
        Ok(out) if invocation == Invocation::Event => {
            tracing::trace!(status = out.status_code(), "event invoke accepted");
            Ok(Invoked::Accepted)
        }
        Ok(out) => Ok(Invoked::Response {
            function_error: out.function_error,
            payload: out
                .payload
                .map(|blob| Bytes::from(blob.into_inner()))
                .unwrap_or_default(),
        }),
        Err(err) => Err(classify(err)),
    }
}

/// Maps an SDK error onto the table in the module docs.
pub fn classify(err: SdkError<InvokeError>) -> InvokeFailure {
    match err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            // The SDK signs with the skew it measured itself; this only sorts the refusal. The
            // answer has just arrived: its round trip's midpoint is close enough to now.
            let now = SystemTime::now();
            let headers = service.raw().headers();
            let skew_ms = clock_skew(headers.get("date"), headers.contains_key("age"), now, now);
            let err = service.into_err();
            classify_service(err, status, skew_ms)
        }
        // The SDK's operation/attempt timeouts cut the call wherever it was.
        SdkError::TimeoutError(_) => InvokeFailure::OutcomeUnknown {
            cause: UnknownCause::ReadTimeout,
            message: "operation timed out".to_owned(),
        },
        SdkError::DispatchFailure(failure) => {
            let chain = failure
                .as_connector_error()
                .map(|e| e as &(dyn std::error::Error + 'static));
            if failure.is_user() {
                InvokeFailure::Rejected {
                    kind: "ClientConfiguration".to_owned(),
                    message: describe(&failure),
                }
            } else if chain.is_some_and(never_sent) {
                InvokeFailure::Unavailable {
                    message: describe(&failure),
                }
            } else if failure.is_timeout() {
                InvokeFailure::OutcomeUnknown {
                    cause: UnknownCause::ReadTimeout,
                    message: describe(&failure),
                }
            } else {
                InvokeFailure::OutcomeUnknown {
                    cause: UnknownCause::ConnectionLost,
                    message: describe(&failure),
                }
            }
        }
        // A response arrived but could not be read: the function may well have run.
        SdkError::ResponseError(resp) => InvokeFailure::OutcomeUnknown {
            cause: UnknownCause::ConnectionLost,
            message: format!("unreadable response: {:?}", resp.raw().status()),
        },
        SdkError::ConstructionFailure(failure) => InvokeFailure::Rejected {
            kind: "RequestConstruction".to_owned(),
            message: format!("{failure:?}"),
        },
        // Variants added to the SDK later: nothing proves the request was not sent.
        other => InvokeFailure::OutcomeUnknown {
            cause: UnknownCause::ConnectionLost,
            message: other.to_string(),
        },
    }
}

/// Whether the error chain proves the request never left: the connector failed (connect
/// refused, reset or timed out, DNS, TLS handshake — hyper-util's `is_connect`), hyper
/// canceled the request before writing any of it (a pooled connection that closed first), or
/// there were no credentials to sign it with.
fn never_sent(error: &(dyn std::error::Error + 'static)) -> bool {
    error_chain(error).any(|e| {
        e.downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(hyper_util::client::legacy::Error::is_connect)
            || e.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_canceled)
            || e.is::<aws_credential_types::provider::error::CredentialsError>()
    })
}

/// `error`, then each error after it. An `io::Error`'s `source()` skips its own payload, so
/// after an `io::Error` the next link is the payload (`get_ref`).
fn error_chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |&error| {
        match error.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        }
    })
}

fn describe(failure: &impl std::fmt::Debug) -> String {
    shorten(format!("{failure:?}"))
}

/// An error and its sources as one line, for the direct transport; read as [`describe`]
/// reads the SDK's, so logs and dead letters say the same on both transports.
fn describe_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let text = error_chain(error)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ");
    shorten(text)
}

fn shorten(text: String) -> String {
    if text.contains("Connection refused") || text.contains("ConnectionRefused") {
        "connection refused".to_owned()
    } else {
        text.chars().take(300).collect()
    }
}

/// A throttle's `Retry-After` seconds, without trusting them: unparsable, negative or NaN
/// is no wait at all; anything else, `inf` and `1e300` included, at most [`MAX_RETRY_AFTER`]
/// (so no `Duration` conversion or `Instant` addition downstream can overflow).
pub fn parse_retry_after(text: &str) -> Option<Duration> {
    let secs = text.trim().parse::<f64>().ok()?;
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).map_or(MAX_RETRY_AFTER, |d| d.min(MAX_RETRY_AFTER)))
}

/// Error codes a request signed with a clock far off the service's can be refused with: the
/// SDK's list (`aws-runtime`'s `service_clock_skew`) less `AccessDeniedException`, which Lambda
/// answers for a missing permission (a stale signature is `InvalidSignatureException`,
/// "Signature expired"), so a permission error is never retried as a clock's.
const CLOCK_SKEW_ERROR_CODES: [&str; 4] = [
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "AuthFailure",
    "RequestTimeTooSkewed",
];

/// Past this much skew such a refusal is the clock's fault, not the credentials' (the SDK's
/// threshold).
const SKEW_DETECTION_THRESHOLD_MS: u64 = 4 * 60 * 1000;

/// A round trip longer than this says too little about the service's clock. (The SDK trusts
/// up to 15 minutes; but Lambda dates an answer when it ends, so a long invoke's `Date` is
/// minutes past the midpoint. Refusals and short invokes come back well within this.)
const MAX_TRUSTED_ROUND_TRIP: Duration = Duration::from_secs(10);

/// How far the service's clock is ahead of ours (milliseconds, negative when behind), from an
/// answer's `Date` header, measured as the SDK measures it: against the midpoint of the
/// request's round trip (`sent` → `received`). `None` without a readable `Date`, for an answer
/// from a cache (an `Age` header), or after a round trip too long to tell.
fn clock_skew(
    date: Option<&str>,
    age: bool,
    sent: SystemTime,
    received: SystemTime,
) -> Option<i64> {
    if age {
        return None;
    }
    let server = httpdate::parse_http_date(date?.trim()).ok()?;
    let elapsed = received.duration_since(sent).unwrap_or_default();
    if elapsed > MAX_TRUSTED_ROUND_TRIP {
        return None;
    }
    let midpoint = sent + elapsed / 2;
    let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    Some(match server.duration_since(midpoint) {
        Ok(ahead) => millis(ahead),
        Err(behind) => -millis(behind.duration()),
    })
}

fn classify_service(err: InvokeError, status: u16, skew_ms: Option<i64>) -> InvokeFailure {
    use aws_sdk_lambda::error::ProvideErrorMetadata;
    let (reason, retry_after) = match &err {
        InvokeError::TooManyRequestsException(e) => (
            e.reason().map(|r| r.as_str().to_owned()),
            e.retry_after_seconds().map(str::to_owned),
        ),
        _ => (None, None),
    };
    ServiceFailure {
        status,
        code: err.code().unwrap_or("Unknown").to_owned(),
        message: err.message().unwrap_or_default().to_owned(),
        reason,
        retry_after,
        skew_ms,
    }
    .classify()
}

/// An error answer from Lambda, as either transport read it: the HTTP status, the error code
/// (`TooManyRequestsException`, …), its message, a throttle's `Reason` and `Retry-After`.
#[derive(Debug)]
struct ServiceFailure {
    status: u16,
    code: String,
    message: String,
    reason: Option<String>,
    retry_after: Option<String>,
    /// How far the time the request was signed with was off the service's, from the answer's
    /// `Date` ([`clock_skew`]): the direct transport knows the offset it applied; for the SDK's
    /// requests (which it shifts by its own measure) this is our clock's offset, as the SDK's
    /// own retry classifier judges it.
    skew_ms: Option<i64>,
}

impl ServiceFailure {
    /// The one table (module docs) both transports classify Lambda's errors by.
    fn classify(self) -> InvokeFailure {
        let ServiceFailure {
            status,
            code,
            message,
            reason,
            retry_after,
            skew_ms,
        } = self;
        match code.as_str() {
            // Refused for the signature's time, before anything ran; the next attempt is signed
            // with the service's time (the SDK corrects its own, the direct transport likewise).
            code if CLOCK_SKEW_ERROR_CODES.contains(&code)
                && skew_ms.is_some_and(|ms| ms.unsigned_abs() > SKEW_DETECTION_THRESHOLD_MS) =>
            {
                InvokeFailure::Unavailable {
                    message: format!(
                        "{code}: {message} (the request was signed {} s off Lambda's clock; \
                         the next attempt is signed with Lambda's time)",
                        skew_ms.unwrap_or_default() / 1000
                    ),
                }
            }
            "TooManyRequestsException" => InvokeFailure::Throttled {
                reason: reason.unwrap_or_else(|| "Unknown".to_owned()),
                retry_after: retry_after.as_deref().and_then(parse_retry_after),
                message,
            },
            "RequestTooLargeException" => InvokeFailure::TooLarge { message },
            "ServiceException"
            | "EC2ThrottledException"
            | "ResourceNotReadyException"
            | "ResourceConflictException"
            | "SnapStartNotReadyException"
            | "SnapStartTimeoutException"
            | "ENILimitReachedException"
            | "SubnetIPAddressLimitReachedException" => InvokeFailure::Unavailable {
                message: format!("{code}: {message}"),
            },
            // No Lambda error code: not Lambda's refusal but whatever stood in between, which
            // may have forwarded the request before failing.
            "Unknown" if status >= 500 => InvokeFailure::OutcomeUnknown {
                cause: UnknownCause::UnexplainedServerError,
                message: format!("HTTP {status} without a Lambda error code: {message}"),
            },
            _ if status >= 500 => InvokeFailure::Unavailable {
                message: format!("{code}: {message}"),
            },
            _ => InvokeFailure::Rejected {
                kind: code,
                message,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn retry_after_from_lambda_is_parsed_without_trusting_it() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        for absurd in ["1e300", "1e19", "inf", "+inf", "1e9"] {
            assert_eq!(parse_retry_after(absurd), Some(MAX_RETRY_AFTER), "{absurd}");
        }
        for unusable in ["NaN", "-5", "-inf", "soon", "", "1s"] {
            assert_eq!(parse_retry_after(unusable), None, "{unusable}");
        }
    }

    #[test]
    fn a_throttles_retry_after_is_capped_but_other_failures_are_untouched() {
        let throttled = InvokeFailure::Throttled {
            reason: "CallerRateLimitExceeded".into(),
            message: String::new(),
            retry_after: Some(MAX_RETRY_AFTER),
        };
        let capped = throttled.with_retry_after_at_most(Duration::from_secs(10));
        assert_eq!(capped.retry_after(), Some(Duration::from_secs(10)));
        let lost = InvokeFailure::OutcomeUnknown {
            cause: UnknownCause::ConnectionLost,
            message: "x".into(),
        };
        assert_eq!(lost.clone().with_retry_after_at_most(Duration::ZERO), lost);
        assert!(lost.may_have_run());
        assert!(!lost.is_retryable(false) && lost.is_retryable(true));
    }

    #[test]
    fn invoke_durations_are_recorded_per_function_and_outcome_through_handles_registered_once() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let metrics = InvokeMetrics::register("fn-a");
            metrics.ok.record(0.1);
            metrics.ok.record(0.2);
            metrics.function_error.record(0.3);
            metrics.error.record(1.0);
        });
        let text = handle.render();
        for (outcome, count) in [("ok", 2), ("function_error", 1), ("error", 1)] {
            let line = format!(
                "sluicegate_invoke_duration_seconds_count{{function=\"fn-a\",outcome=\"{outcome}\"}} {count}"
            );
            assert!(text.contains(&line), "missing {line}:\n{text}");
        }
    }

    #[tokio::test]
    async fn an_sdk_invoke_without_credentials_was_never_sent_as_on_the_direct_transport() {
        use aws_credential_types::provider::error::CredentialsError;
        use aws_credential_types::provider::{future, ProvideCredentials};

        #[derive(Debug)]
        struct NoCredentials;
        impl ProvideCredentials for NoCredentials {
            fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
            where
                Self: 'a,
            {
                future::ProvideCredentials::ready(Err(CredentialsError::not_loaded("none here")))
            }
        }
        let config = aws_sdk_lambda::Config::builder()
            .behavior_version(aws_sdk_lambda::config::BehaviorVersion::latest())
            .region(aws_sdk_lambda::config::Region::new("eu-west-1"))
            .endpoint_url("http://127.0.0.1:9")
            .credentials_provider(NoCredentials)
            .retry_config(aws_sdk_lambda::config::retry::RetryConfig::disabled())
            .build();
        let client = aws_sdk_lambda::Client::from_conf(config);
        let failure = sdk_invoke(
            &client,
            "orders",
            Bytes::from_static(b"{}"),
            Invocation::RequestResponse,
        )
        .await
        .expect_err("no credentials");
        assert!(
            matches!(failure, InvokeFailure::Unavailable { .. }),
            "{failure:?}"
        );
    }

    proptest! {
        #[test]
        fn any_retry_after_text_parses_to_a_bounded_wait_or_none(text in ".{0,40}", secs: f64) {
            for t in [text, secs.to_string(), format!("{secs:e}")] {
                if let Some(wait) = parse_retry_after(&t) {
                    prop_assert!(wait <= MAX_RETRY_AFTER);
                }
            }
        }
    }
}
