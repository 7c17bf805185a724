//! Invoking Lambda: the `aws-sdk-lambda` client, the per-function gate that keeps invokes
//! inside the function's concurrency, and the classification of what Lambda answered.
//!
//! One [`Invoker`] exists per function, shared by every route that targets it, so the
//! concurrency cap (`invoke.max_concurrency`, meant to sit at or below the function's
//! reserved concurrency) holds for the function as a whole. The SDK's own retries are
//! off: a retry the proxy cannot see is exactly what collides with reserved concurrency
//! after a read timeout. Retrying, backoff and dead-lettering are decided by the caller of
//! [`Invoker::invoke`] from the [`InvokeFailure`] it returns.
//!
//! | Lambda says | [`InvokeFailure`] | retryable |
//! |---|---|---|
//! | `TooManyRequestsException` (any `Reason`) | `Throttled` | yes, after its Retry-After |
//! | `ServiceException`, other 5xx, `EC2ThrottledException`, `ResourceNotReadyException`… | `Unavailable` | yes |
//! | connection refused / reset | `Unavailable` | yes |
//! | no answer within `read_timeout` | `Timeout` | only if the function is idempotent |
//! | `RequestTooLargeException` | `TooLarge` | split the batch |
//! | `ResourceNotFoundException`, `InvalidRequestContentException`, credentials/permission | `Rejected` | no |

mod client;
pub mod discover;
mod gate;
pub mod retry;

use std::time::Duration;

use aws_sdk_lambda::error::SdkError;
use aws_sdk_lambda::operation::invoke::InvokeError;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvocationType;
use bytes::Bytes;

pub use self::client::{build_client, sdk_config};
pub use self::gate::{Gate, GateConfig, Limits, Slot};
use crate::config::Invocation;

/// What an invoke that Lambda accepted returned.
#[derive(Debug)]
pub enum Invoked {
    /// A synchronous invoke ran; `function_error` is `X-Amz-Function-Error` when the
    /// function itself failed (`Unhandled`, `Handled`).
    Response {
        payload: Bytes,
        function_error: Option<String>,
    },
    /// An `Event` invoke was queued by Lambda (202).
    Accepted,
}

/// Why an invoke did not produce a function result.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum InvokeFailure {
    #[error("Lambda throttled the invoke: TooManyRequestsException ({reason}): {message}")]
    Throttled {
        reason: String,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("the batch is larger than Lambda accepts: {message}")]
    TooLarge { message: String },
    #[error("Lambda refused the invoke: {kind}: {message}")]
    Rejected { kind: String, message: String },
    #[error("Lambda is unavailable: {message}")]
    Unavailable { message: String },
    #[error("Lambda did not answer within the read timeout: {message}")]
    Timeout { message: String },
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
            InvokeFailure::Timeout { .. } => "Timeout",
        }
    }

    /// Whether another attempt may succeed (a timeout only when the function is idempotent).
    pub fn is_retryable(&self, retry_timeouts: bool) -> bool {
        match self {
            InvokeFailure::Throttled { .. } | InvokeFailure::Unavailable { .. } => true,
            InvokeFailure::Timeout { .. } => retry_timeouts,
            InvokeFailure::TooLarge { .. } | InvokeFailure::Rejected { .. } => false,
        }
    }
}

/// Invokes one function within its gate.
pub struct Invoker {
    client: aws_sdk_lambda::Client,
    function: String,
    gate: Gate,
}

impl Invoker {
    pub fn new(client: aws_sdk_lambda::Client, function: String, gate: Gate) -> Self {
        Invoker {
            client,
            function,
            gate,
        }
    }

    pub fn function(&self) -> &str {
        &self.function
    }

    /// The gate a batch must pass (take a [`Slot`]) before [`Invoker::invoke`].
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
        mut slot: Slot,
    ) -> Result<Invoked, InvokeFailure> {
        slot.mark_used();
        let invocation_type = match invocation {
            Invocation::RequestResponse => InvocationType::RequestResponse,
            Invocation::Event => InvocationType::Event,
        };
        let started = tokio::time::Instant::now();
        let result = self
            .client
            .invoke()
            .function_name(&self.function)
            .invocation_type(invocation_type)
            .payload(Blob::new(payload))
            .send()
            .await;
        drop(slot);
        let outcome = match &result {
            Ok(out) if out.function_error().is_some() => "function_error",
            Ok(_) => "ok",
            Err(_) => "error",
        };
        metrics::histogram!("sluicegate_invoke_duration_seconds", "function" => self.function.clone(), "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        let result = match result {
            Ok(out) if invocation == Invocation::Event => {
                tracing::trace!(status = out.status_code(), "event invoke accepted");
                Ok(Invoked::Accepted)
            }
            Ok(out) => Ok(Invoked::Response {
                function_error: out.function_error().map(str::to_owned),
                payload: out
                    .payload
                    .map(|blob| Bytes::from(blob.into_inner()))
                    .unwrap_or_default(),
            }),
            Err(err) => Err(classify(err)),
        };
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

/// Maps an SDK error onto the table in the module docs.
pub fn classify(err: SdkError<InvokeError>) -> InvokeFailure {
    match err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let err = service.into_err();
            classify_service(err, status)
        }
        SdkError::TimeoutError(_) => InvokeFailure::Timeout {
            message: "operation timed out".to_owned(),
        },
        SdkError::DispatchFailure(failure) => {
            if failure.is_timeout() {
                InvokeFailure::Timeout {
                    message: format!("{failure:?}"),
                }
            } else if failure.is_user() {
                InvokeFailure::Rejected {
                    kind: "ClientConfiguration".to_owned(),
                    message: describe(&failure),
                }
            } else {
                InvokeFailure::Unavailable {
                    message: describe(&failure),
                }
            }
        }
        SdkError::ResponseError(resp) => InvokeFailure::Unavailable {
            message: format!("unreadable response: {:?}", resp.raw().status()),
        },
        SdkError::ConstructionFailure(failure) => InvokeFailure::Rejected {
            kind: "RequestConstruction".to_owned(),
            message: format!("{failure:?}"),
        },
        other => InvokeFailure::Unavailable {
            message: other.to_string(),
        },
    }
}

fn describe(failure: &impl std::fmt::Debug) -> String {
    let text = format!("{failure:?}");
    if text.contains("Connection refused") || text.contains("ConnectionRefused") {
        "connection refused".to_owned()
    } else {
        text.chars().take(300).collect()
    }
}

fn classify_service(err: InvokeError, status: u16) -> InvokeFailure {
    use aws_sdk_lambda::error::ProvideErrorMetadata;
    let kind = err.code().unwrap_or("Unknown").to_owned();
    let message = err.message().unwrap_or_default().to_owned();
    match err {
        InvokeError::TooManyRequestsException(e) => InvokeFailure::Throttled {
            reason: e
                .reason()
                .map(|r| r.as_str().to_owned())
                .unwrap_or_else(|| "Unknown".to_owned()),
            retry_after: e
                .retry_after_seconds()
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64),
            message,
        },
        InvokeError::RequestTooLargeException(_) => InvokeFailure::TooLarge { message },
        InvokeError::ServiceException(_)
        | InvokeError::Ec2ThrottledException(_)
        | InvokeError::ResourceNotReadyException(_)
        | InvokeError::ResourceConflictException(_)
        | InvokeError::SnapStartNotReadyException(_)
        | InvokeError::SnapStartTimeoutException(_)
        | InvokeError::EniLimitReachedException(_)
        | InvokeError::SubnetIpAddressLimitReachedException(_) => InvokeFailure::Unavailable {
            message: format!("{kind}: {message}"),
        },
        _ if status >= 500 => InvokeFailure::Unavailable {
            message: format!("{kind}: {message}"),
        },
        _ => InvokeFailure::Rejected { kind, message },
    }
}
