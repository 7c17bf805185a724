//! The Lambda REST API over HTTP: routes, the order of Lambda's checks, and error responses
//! in the exact shape AWS sends (so `aws-sdk-lambda` classifies them as it would in
//! production).

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use serde_json::json;

use super::function::{Execution, Function};
use super::handler::Payload;
use super::stats::bump;
use super::{function_arn, request_id, Emulator};
use crate::quota::{ceil_secs, Refusal};

/// Lambda's payload limits, synchronous (and `DryRun`) and asynchronous (`Event`): the ones
/// the proxy's config checks batches against, so the two cannot disagree. (6 MiB and 1 MiB
/// fit in any `usize` the crate builds for.)
const SYNC_PAYLOAD_LIMIT: usize = crate::lambda::SYNC_PAYLOAD_LIMIT as usize;
const ASYNC_PAYLOAD_LIMIT: usize = crate::lambda::ASYNC_PAYLOAD_LIMIT as usize;
/// How much of an oversized body is read (and thrown away) before answering 413. Reading it
/// lets the client finish sending and then read our answer, instead of seeing its write
/// fail with a reset connection; past this much we stop being polite.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

const X_AMZN_REQUEST_ID: HeaderName = HeaderName::from_static("x-amzn-requestid");
const X_AMZN_ERROR_TYPE: HeaderName = HeaderName::from_static("x-amzn-errortype");
const X_AMZ_INVOCATION_TYPE: &str = "x-amz-invocation-type";
const X_AMZ_EXECUTED_VERSION: HeaderName = HeaderName::from_static("x-amz-executed-version");
const X_AMZ_FUNCTION_ERROR: HeaderName = HeaderName::from_static("x-amz-function-error");
const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

pub(crate) fn router(emulator: Emulator) -> Router {
    Router::new()
        .route("/2015-03-31/functions/{name}/invocations", post(invoke))
        .route(
            "/2015-03-31/functions/{name}/configuration",
            get(get_function_configuration),
        )
        .route(
            "/2019-09-30/functions/{name}/concurrency",
            get(get_function_concurrency),
        )
        .route("/emulator/stats", get(stats))
        .fallback(unknown_operation)
        .with_state(emulator)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InvocationType {
    RequestResponse,
    Event,
    DryRun,
}

impl InvocationType {
    fn from_headers(headers: &HeaderMap) -> Result<Self, String> {
        let Some(value) = headers.get(X_AMZ_INVOCATION_TYPE) else {
            return Ok(Self::RequestResponse);
        };
        match value.as_bytes() {
            b"RequestResponse" => Ok(Self::RequestResponse),
            b"Event" => Ok(Self::Event),
            b"DryRun" => Ok(Self::DryRun),
            other => Err(String::from_utf8_lossy(other).into_owned()),
        }
    }

    fn payload_limit(self) -> usize {
        match self {
            Self::Event => ASYNC_PAYLOAD_LIMIT,
            Self::RequestResponse | Self::DryRun => SYNC_PAYLOAD_LIMIT,
        }
    }
}

/// An AWS error response: status, `x-amzn-ErrorType`, JSON body.
struct AwsError {
    status: StatusCode,
    error_type: &'static str,
    body: serde_json::Value,
    retry_after: Option<u64>,
}

impl AwsError {
    fn user(
        status: StatusCode,
        error_type: &'static str,
        message_key: &str,
        message: String,
    ) -> Self {
        Self {
            status,
            error_type,
            body: json!({ "Type": "User", message_key: message }),
            retry_after: None,
        }
    }

    fn function_not_found(name: &str) -> Self {
        // ResourceNotFoundException's model member is `Message`, capitalised, unlike the others.
        Self::user(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            "Message",
            format!("Function not found: {}", function_arn(name)),
        )
    }

    fn too_many_requests(reason: &str, retry_after_secs: u64) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            error_type: "TooManyRequestsException",
            body: json!({
                "Reason": reason,
                "Type": "User",
                "message": "Rate Exceeded.",
                "retryAfterSeconds": retry_after_secs.to_string(),
            }),
            retry_after: Some(retry_after_secs),
        }
    }

    fn into_response(self, request_id: &str) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        let headers = response.headers_mut();
        headers.insert(X_AMZN_ERROR_TYPE, HeaderValue::from_static(self.error_type));
        insert_request_id(headers, request_id);
        if let Some(secs) = self.retry_after {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

fn insert_request_id(headers: &mut HeaderMap, request_id: &str) {
    // A request id is hex digits and dashes, always a valid header value.
    headers.insert(
        X_AMZN_REQUEST_ID,
        HeaderValue::from_str(request_id).expect("request ids are ASCII"),
    );
}

/// Whole seconds to wait, rounded up and at least 1: a client honouring it is never early.
/// A quota that never refills has no honest answer; 1 keeps clients polling.
fn retry_after_secs(refusal: Refusal) -> u64 {
    match refusal {
        Refusal::Wait(wait) => ceil_secs(wait).max(1),
        Refusal::Closed => 1,
    }
}

/// Accepts `arn:aws:lambda:<region>:<account>:function:NAME[:QUALIFIER]`,
/// `<account>:function:NAME[:QUALIFIER]` and `NAME[:QUALIFIER]`, as Lambda does.
fn function_name(path_name: &str) -> &str {
    let parts: Vec<&str> = path_name.split(':').collect();
    match parts.iter().skip(1).position(|p| *p == "function") {
        Some(i) => parts.get(i + 2).copied().unwrap_or(""),
        None => parts[0],
    }
}

enum ReadBody {
    Complete(Bytes),
    TooLarge,
    Failed(String),
}

/// Reads the request body, keeping at most `limit` bytes (see [`DRAIN_LIMIT`]).
async fn read_body(mut body: Body, limit: usize) -> ReadBody {
    let mut kept = BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_trailers) => continue,
            },
            Err(e) => return ReadBody::Failed(e.to_string()),
        };
        total = total.saturating_add(data.len());
        if total > DRAIN_LIMIT {
            return ReadBody::TooLarge;
        }
        if total <= limit {
            kept.extend_from_slice(&data);
        }
    }
    if total > limit {
        ReadBody::TooLarge
    } else {
        ReadBody::Complete(kept.freeze())
    }
}

/// `POST /2015-03-31/functions/{name}/invocations`: parse the request, check the payload,
/// spend the invoke quota, then queue the run (`Event`) or run it within the function's
/// reserved concurrency and answer as Lambda does (`RequestResponse`).
async fn invoke(
    State(emulator): State<Emulator>,
    Path(path_name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = request_id();
    let name = function_name(&path_name);
    match invoke_steps(&emulator, name, &headers, body, &request_id).await {
        Ok(response) => response,
        Err(error) => error.into_response(&request_id),
    }
}

async fn invoke_steps(
    emulator: &Emulator,
    name: &str,
    headers: &HeaderMap,
    body: Body,
    request_id: &str,
) -> Result<Response, AwsError> {
    let kind = invocation_type(headers)?;
    // Read the body before answering anything, so the client is never cut off mid-send.
    let body = read_body(body, kind.payload_limit()).await;
    let function = emulator
        .function(name)
        .ok_or_else(|| AwsError::function_not_found(name))?;
    let payload = checked_payload(&function, kind, body)?;
    if kind == InvocationType::DryRun {
        // DryRun validates parameters and permissions only: no quota, no run.
        bump(&function.counters.dry_runs);
        return Ok(empty(StatusCode::NO_CONTENT, request_id));
    }
    take_invoke_token(&function, name, request_id)?;
    match kind {
        InvocationType::Event => {
            // Lambda queues asynchronous invokes and runs them when it has capacity, so they
            // are never refused for concurrency.
            accept(&function, &payload);
            tokio::spawn(Arc::clone(&function).run_event(payload, emulator.closed()));
            Ok(empty(StatusCode::ACCEPTED, request_id))
        }
        // (DryRun has been answered above.)
        InvocationType::RequestResponse | InvocationType::DryRun => {
            run_sync(function, name, payload, request_id).await
        }
    }
}

/// The `X-Amz-Invocation-Type` header, refused as Lambda refuses an unknown one.
fn invocation_type(headers: &HeaderMap) -> Result<InvocationType, AwsError> {
    InvocationType::from_headers(headers).map_err(|value| {
        let message = format!(
            "1 validation error detected: Value '{value}' at 'invocationType' failed to satisfy constraint: \
             Member must satisfy enum value set: [Event, RequestResponse, DryRun]"
        );
        AwsError::user(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            "message",
            message,
        )
    })
}

/// The payload, within the invocation type's limit (and the function's `max_payload`), and
/// parsed as JSON; each refusal is counted on the function.
fn checked_payload(
    function: &Function,
    kind: InvocationType,
    body: ReadBody,
) -> Result<Payload, AwsError> {
    let counters = &function.counters;
    let limit = function
        .cfg
        .max_payload
        .map_or(kind.payload_limit(), |max| {
            max.as_usize().min(kind.payload_limit())
        });
    let body = match body {
        ReadBody::Complete(raw) if raw.len() > limit => ReadBody::TooLarge,
        other => other,
    };
    let raw = match body {
        ReadBody::Complete(raw) => raw,
        ReadBody::TooLarge => {
            bump(&counters.too_large);
            let message = format!(
                "Request must be smaller than {limit} bytes for the InvokeFunction operation"
            );
            return Err(AwsError::user(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLargeException",
                "message",
                message,
            ));
        }
        ReadBody::Failed(e) => {
            bump(&counters.invalid_payloads);
            let message = format!("Could not read request body: {e}");
            return Err(AwsError::user(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContentException",
                "message",
                message,
            ));
        }
    };
    Payload::parse(raw).map_err(|e| {
        bump(&counters.invalid_payloads);
        let message = format!(
            "Could not parse request body into json: Could not parse payload into json: {e}"
        );
        AwsError::user(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            "message",
            message,
        )
    })
}

/// Spends one token of the function's invoke quota, or refuses with Lambda's throttle.
///
/// The quota is spent before the concurrency check, so an invoke refused for concurrency
/// has still used a token (it did reach Lambda).
fn take_invoke_token(function: &Function, name: &str, request_id: &str) -> Result<(), AwsError> {
    function.take_invoke_token().map_err(|refusal| {
        bump(&function.counters.rate_throttles);
        tracing::debug!(function = name, %request_id, "invoke throttled: CallerRateLimitExceeded");
        AwsError::too_many_requests("CallerRateLimitExceeded", retry_after_secs(refusal))
    })
}

/// A `RequestResponse` invoke: takes a concurrency slot (or is throttled), runs the handler
/// and answers with its result, or with Lambda's answer to a timed-out run.
async fn run_sync(
    function: Arc<Function>,
    name: &str,
    payload: Payload,
    request_id: &str,
) -> Result<Response, AwsError> {
    let Some(slot) = function.try_acquire() else {
        bump(&function.counters.concurrency_throttles);
        tracing::debug!(
            function = name,
            %request_id,
            "invoke throttled: ReservedFunctionConcurrentInvocationLimitExceeded"
        );
        return Err(AwsError::too_many_requests(
            "ReservedFunctionConcurrentInvocationLimitExceeded",
            1,
        ));
    };
    accept(&function, &payload);
    // The run gets its own task: as in Lambda, a caller that disconnects (say, on a read
    // timeout) does not stop the function, which keeps its concurrency slot until it
    // finishes or times out. The slot is a drop guard, so it is released however that task
    // ends.
    let run = tokio::spawn({
        let function = Arc::clone(&function);
        async move { function.execute(slot, payload).await }
    });
    match run.await {
        Ok(execution) => Ok(execution_response(&function, execution, request_id)),
        Err(e) => {
            tracing::error!(function = name, %request_id, error = %e, "emulated run failed");
            Err(AwsError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                error_type: "ServiceException",
                body: json!({ "Type": "Service", "message": "The emulated function run failed." }),
                retry_after: None,
            })
        }
    }
}

/// Lambda's answer to a finished run: the handler's result, marked `Unhandled` when the
/// function failed or timed out.
fn execution_response(function: &Function, execution: Execution, request_id: &str) -> Response {
    match execution {
        Execution::Finished(outcome) => invoke_response(
            outcome.body,
            outcome.unhandled.then_some("Unhandled"),
            request_id,
        ),
        Execution::TimedOut => {
            let message = format!(
                "{} {request_id} Task timed out after {:.2} seconds",
                humantime::format_rfc3339_millis(SystemTime::now()),
                function.cfg.timeout.as_secs_f64()
            );
            let body = serde_json::to_vec(&json!({ "errorMessage": message }))
                .expect("a JSON object of one string serializes");
            invoke_response(Bytes::from(body), Some("Unhandled"), request_id)
        }
    }
}

/// Counts an invoke Lambda has accepted.
fn accept(function: &Function, payload: &Payload) {
    bump(&function.counters.invocations);
    function
        .counters
        .records
        .fetch_add(payload.records(), std::sync::atomic::Ordering::Relaxed);
}

fn empty(status: StatusCode, request_id: &str) -> Response {
    let mut response = status.into_response();
    insert_request_id(response.headers_mut(), request_id);
    response
}

fn invoke_response(
    body: Bytes,
    function_error: Option<&'static str>,
    request_id: &str,
) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, APPLICATION_JSON);
    headers.insert(X_AMZ_EXECUTED_VERSION, HeaderValue::from_static("$LATEST"));
    if let Some(error) = function_error {
        headers.insert(X_AMZ_FUNCTION_ERROR, HeaderValue::from_static(error));
    }
    insert_request_id(headers, request_id);
    response
}

fn ok_json(body: serde_json::Value, request_id: &str) -> Response {
    let mut response = (StatusCode::OK, Json(body)).into_response();
    insert_request_id(response.headers_mut(), request_id);
    response
}

/// Lambda's `LastModified` format: `2024-05-01T12:00:00.000+0000`.
fn last_modified(t: SystemTime) -> String {
    let utc = humantime::format_rfc3339_millis(t).to_string();
    match utc.strip_suffix('Z') {
        Some(local) => format!("{local}+0000"),
        None => utc,
    }
}

async fn get_function_configuration(
    State(emulator): State<Emulator>,
    Path(path_name): Path<String>,
) -> Response {
    let request_id = request_id();
    let name = function_name(&path_name);
    let Some(function) = emulator.function(name) else {
        return AwsError::function_not_found(name).into_response(&request_id);
    };
    let cfg = &function.cfg;
    let body = json!({
        "FunctionName": cfg.name,
        "FunctionArn": function_arn(&cfg.name),
        "Runtime": "provided.al2023",
        "Role": format!("arn:aws:iam::{}:role/sluicegate-emulator", super::ACCOUNT_ID),
        "Handler": cfg.handler.as_str(),
        "CodeSize": 1024,
        "Description": format!("sluicegate emulator: {} handler", cfg.handler.as_str()),
        // Lambda reports whole seconds; the config may hold fractions, which round up.
        "Timeout": ceil_secs(cfg.timeout),
        "MemorySize": cfg.memory_size,
        "LastModified": last_modified(function.created),
        "CodeSha256": "c2x1aWNlZ2F0ZS1lbXVsYXRvcg==",
        "Version": "$LATEST",
        "TracingConfig": { "Mode": "PassThrough" },
        "RevisionId": function.revision_id,
        "State": "Active",
        "LastUpdateStatus": "Successful",
        "PackageType": "Zip",
        "Architectures": ["x86_64"],
        "EphemeralStorage": { "Size": 512 },
        "LoggingConfig": { "LogFormat": "Text", "LogGroup": format!("/aws/lambda/{}", cfg.name) },
    });
    ok_json(body, &request_id)
}

async fn get_function_concurrency(
    State(emulator): State<Emulator>,
    Path(path_name): Path<String>,
) -> Response {
    let request_id = request_id();
    let name = function_name(&path_name);
    let Some(function) = emulator.function(name) else {
        return AwsError::function_not_found(name).into_response(&request_id);
    };
    let body = match function.cfg.reserved_concurrency {
        Some(n) => json!({ "ReservedConcurrentExecutions": n }),
        None => json!({}),
    };
    ok_json(body, &request_id)
}

async fn stats(State(emulator): State<Emulator>) -> Json<super::Stats> {
    Json(emulator.stats())
}

async fn unknown_operation() -> Response {
    AwsError::user(
        StatusCode::NOT_FOUND,
        "UnknownOperationException",
        "message",
        "Unknown operation".into(),
    )
    .into_response(&request_id())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::emulator::{EmulatorConfig, FunctionConfig, Handler};
    use axum::http::Request;
    use serde_json::Value;
    use tower::ServiceExt;

    fn emulator(functions: Vec<FunctionConfig>) -> Emulator {
        Emulator::new(EmulatorConfig {
            functions,
            ..EmulatorConfig::default()
        })
    }

    fn invoke_request(name: &str, kind: Option<&str>, body: impl Into<Body>) -> Request<Body> {
        let mut builder = Request::post(format!("/2015-03-31/functions/{name}/invocations"));
        if let Some(kind) = kind {
            builder = builder.header("X-Amz-Invocation-Type", kind);
        }
        builder.body(body.into()).expect("valid request")
    }

    async fn send(emulator: &Emulator, request: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
        let response = emulator
            .router()
            .oneshot(request)
            .await
            .expect("router is infallible");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("in-memory body").to_bytes();
        (parts.status, parts.headers, body)
    }

    fn json_body(body: &Bytes) -> Value {
        serde_json::from_slice(body).expect("JSON body")
    }

    #[test]
    fn accepts_names_partial_arns_and_full_arns() {
        assert_eq!(function_name("f"), "f");
        assert_eq!(function_name("f:prod"), "f");
        assert_eq!(function_name("my-function:3"), "my-function");
        assert_eq!(function_name("123456789012:function:f"), "f");
        assert_eq!(
            function_name("arn:aws:lambda:us-east-1:123456789012:function:f:$LATEST"),
            "f"
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_at_least_one() {
        assert_eq!(retry_after_secs(Refusal::Wait(Duration::from_millis(1))), 1);
        assert_eq!(
            retry_after_secs(Refusal::Wait(Duration::from_millis(1000))),
            1
        );
        assert_eq!(
            retry_after_secs(Refusal::Wait(Duration::from_millis(1001))),
            2
        );
        assert_eq!(retry_after_secs(Refusal::Wait(Duration::ZERO)), 1);
        assert_eq!(retry_after_secs(Refusal::Closed), 1);
    }

    #[test]
    fn last_modified_uses_lambdas_offset_format() {
        assert_eq!(
            last_modified(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000+0000"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn answers_after_the_latency_with_lambda_headers() {
        let emu = emulator(vec![FunctionConfig::new("f")]);
        let start = tokio::time::Instant::now();
        let (status, headers, body) = send(&emu, invoke_request("f", None, r#"{"x":1}"#)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, r#"{"x":1}"#.as_bytes());
        assert_eq!(headers["x-amz-executed-version"], "$LATEST");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["x-amzn-requestid"].len(), 36);
        assert!(!headers.contains_key("x-amz-function-error"));
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_at_the_function_timeout_with_aws_message() {
        let emu = emulator(vec![FunctionConfig {
            latency: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            ..FunctionConfig::new("slow")
        }]);
        let start = tokio::time::Instant::now();
        let (status, headers, body) = send(&emu, invoke_request("slow", None, "{}")).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-amz-function-error"], "Unhandled");
        let message = json_body(&body)["errorMessage"]
            .as_str()
            .expect("message")
            .to_owned();
        let request_id = headers["x-amzn-requestid"].to_str().expect("ASCII");
        assert!(
            message.ends_with(&format!("{request_id} Task timed out after 2.00 seconds")),
            "{message}"
        );
        assert_eq!(emu.stats().functions["slow"].errors, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refuses_in_lambdas_order_of_checks() {
        let emu = emulator(vec![FunctionConfig {
            invoke_rate: Some(1.0),
            ..FunctionConfig::new("f")
        }]);
        // Unknown function wins over a too-large body.
        let (status, headers, body) =
            send(&emu, invoke_request("nope", None, vec![b' '; 7 << 20])).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(headers["x-amzn-errortype"], "ResourceNotFoundException");
        assert_eq!(
            json_body(&body),
            serde_json::json!({"Type": "User", "Message": "Function not found: arn:aws:lambda:us-east-1:123456789012:function:nope"})
        );
        // Too large wins over not-JSON, and is not an invocation.
        let (status, headers, _) = send(
            &emu,
            invoke_request("f", Some("Event"), vec![b'x'; (1 << 20) + 1]),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(headers["x-amzn-errortype"], "RequestTooLargeException");
        // Not JSON wins over the quota.
        let (status, headers, body) = send(&emu, invoke_request("f", None, "{oops")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            headers["x-amzn-errortype"],
            "InvalidRequestContentException"
        );
        assert!(json_body(&body)["message"]
            .as_str()
            .expect("message")
            .starts_with("Could not parse request body into json"));
        // DryRun spends no quota.
        assert_eq!(
            send(&emu, invoke_request("f", Some("DryRun"), "{}"))
                .await
                .0,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            send(&emu, invoke_request("f", None, "")).await.0,
            StatusCode::OK
        );
        let (status, headers, body) = send(&emu, invoke_request("f", None, "{}")).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(headers["x-amzn-errortype"], "TooManyRequestsException");
        assert_eq!(
            json_body(&body),
            serde_json::json!({"Reason": "CallerRateLimitExceeded", "Type": "User", "message": "Rate Exceeded.", "retryAfterSeconds": "1"})
        );
        let stats = &emu.stats().functions["f"];
        assert_eq!(
            (
                stats.invocations,
                stats.records,
                stats.too_large,
                stats.invalid_payloads
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(
            (stats.dry_runs, stats.throttles.caller_rate_limit_exceeded),
            (1, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sync_invokes_beyond_reserved_concurrency_are_throttled_but_events_queue() {
        let emu = emulator(vec![FunctionConfig {
            reserved_concurrency: Some(1),
            latency: Duration::from_millis(100),
            ..FunctionConfig::new("f")
        }]);
        let first = tokio::spawn({
            let emu = emu.clone();
            async move { send(&emu, invoke_request("f", None, "{}")).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(emu.stats().functions["f"].in_flight, 1);
        let (status, headers, body) = send(&emu, invoke_request("f", None, "{}")).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(
            json_body(&body)["Reason"],
            "ReservedFunctionConcurrentInvocationLimitExceeded"
        );
        let (status, _, body) = send(&emu, invoke_request("f", Some("Event"), r#"{"e":1}"#)).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert!(body.is_empty());
        assert_eq!(first.await.expect("first invoke").0, StatusCode::OK);
        // The queued event runs once the slot is free: 100ms more, then everything is idle.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let stats = &emu.stats().functions["f"];
        assert_eq!(stats.invocations, 2);
        assert_eq!(
            stats
                .throttles
                .reserved_function_concurrent_invocation_limit_exceeded,
            1
        );
        assert_eq!(
            (stats.in_flight, stats.queued_events, stats.peak_concurrency),
            (0, 0, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn caller_that_disconnects_keeps_the_slot_until_the_run_ends() {
        let emu = emulator(vec![FunctionConfig {
            reserved_concurrency: Some(1),
            latency: Duration::from_millis(100),
            ..FunctionConfig::new("f")
        }]);
        let caller = tokio::spawn({
            let emu = emu.clone();
            async move { send(&emu, invoke_request("f", None, "{}")).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(emu.stats().functions["f"].in_flight, 1);
        // The caller gives up (a read timeout, say): as in Lambda the run goes on, so a
        // retry now meets the concurrency limit.
        caller.abort();
        let (status, _, _) = send(&emu, invoke_request("f", None, "{}")).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        // Time is paused: just past the run's latency, its task has certainly finished.
        tokio::time::sleep(Duration::from_millis(101)).await;
        assert_eq!(
            emu.stats().functions["f"].in_flight,
            0,
            "the slot is released when the run ends"
        );
        assert_eq!(
            send(&emu, invoke_request("f", None, "{}")).await.0,
            StatusCode::OK
        );
    }

    #[tokio::test(start_paused = true)]
    async fn crash_answers_unhandled_and_counts_an_error() {
        let emu = emulator(vec![FunctionConfig {
            handler: Handler::Poison,
            failure: crate::emulator::FailureMode::Crash,
            ..FunctionConfig::new("f")
        }]);
        let payload = r#"{"records":[{"id":"r1","key":"k","body":{}},{"id":"r2","key":"k","body":{"poison":true}}]}"#;
        let (status, headers, body) = send(&emu, invoke_request("f", None, payload)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-amz-function-error"], "Unhandled");
        assert_eq!(
            json_body(&body),
            serde_json::json!({"errorType": "PoisonRecord", "errorMessage": "record r2 is poison"})
        );
        let stats = &emu.stats().functions["f"];
        assert_eq!(
            (
                stats.invocations,
                stats.records,
                stats.errors,
                stats.record_failures
            ),
            (1, 2, 1, 1)
        );
    }

    #[tokio::test]
    async fn rejects_an_unknown_invocation_type() {
        let emu = emulator(vec![FunctionConfig::new("f")]);
        let (status, headers, _) = send(&emu, invoke_request("f", Some("Later"), "{}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            headers["x-amzn-errortype"],
            "InvalidParameterValueException"
        );
    }

    #[tokio::test]
    async fn unknown_paths_are_an_aws_style_404() {
        let emu = emulator(vec![]);
        let request = Request::get("/2015-03-31/functions")
            .body(Body::empty())
            .expect("valid request");
        let (status, headers, _) = send(&emu, request).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(headers["x-amzn-errortype"], "UnknownOperationException");
    }
}
