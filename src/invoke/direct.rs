//! `lambda.transport = "direct"`: the Invoke call without the SDK's orchestrator. The request
//! is signed with SigV4 for the SDK's credentials provider (the one `[lambda]` resolves,
//! cached here until shortly before it expires), and sent over one pooled hyper client whose
//! connections stay open between invokes.
//!
//! Everything per function is computed once ([`Target`]: the URI, its text, its fixed part of
//! the canonical request), so an invoke signs only what changes (`sigv4.rs`, checked against
//! `aws-sigv4`'s own signer for every function; a function it does not agree on is signed by
//! `aws-sigv4`) at Lambda's time (its clock, read from the `Date` of its quick answers),
//! sends and reads. What Lambda answers is read
//! the way the SDK reads it — `X-Amzn-ErrorType` (or the body's `__type`/`code`), the body's
//! `message` and `Reason`, the `Retry-After` header — and classified by the one table both
//! transports share ([`super::ServiceFailure`]). A transport failure is sorted the same way
//! too: only an error that proves the request never left is [`InvokeFailure::Unavailable`].
//!
//! The SDK stays for the control plane (discovery, readiness) and for `transport = "sdk"`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SigningInstructions, SigningSettings,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::client::invalid;
use super::sigv4::{KeyCache, Shape};
use super::{
    clock_skew, describe_chain, never_sent, InvokeFailure, Invoked, ServiceFailure, UnknownCause,
};
use crate::config::{Invocation, LambdaConfig, SYNC_PAYLOAD_LIMIT};

const X_AMZ_INVOCATION_TYPE: HeaderName = HeaderName::from_static("x-amz-invocation-type");
const X_AMZ_DATE: HeaderName = HeaderName::from_static("x-amz-date");
const X_AMZ_SECURITY_TOKEN: HeaderName = HeaderName::from_static("x-amz-security-token");
const X_AMZ_FUNCTION_ERROR: HeaderName = HeaderName::from_static("x-amz-function-error");
const X_AMZN_ERROR_TYPE: HeaderName = HeaderName::from_static("x-amzn-errortype");
const OCTET_STREAM: HeaderValue = HeaderValue::from_static("application/octet-stream");
const REQUEST_RESPONSE: HeaderValue = HeaderValue::from_static("RequestResponse");
const EVENT: HeaderValue = HeaderValue::from_static("Event");

/// The largest answer read from Lambda: its 6 MB response limit and room for the headers of
/// an error body. Anything larger is not a Lambda answer, and is read as an unreadable one.
const MAX_RESPONSE: usize = SYNC_PAYLOAD_LIMIT as usize + 64 * 1024;

/// The first instant SigV4's date formatting cannot write (10000-01-01T00:00:00Z).
fn latest_signable() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800)
}

/// Credentials are fetched again this long before they expire.
const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(300);

/// The shortest time between two fetches of credentials that are already close to expiry,
/// so a provider that keeps handing out short-lived ones is not asked on every invoke (never
/// past their expiry, though: expired credentials are not signed with).
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// Credentials without an expiry are fetched again this often, as the SDK's identity cache
/// does, so rotated keys are picked up.
const REFRESH_WITHOUT_EXPIRY: Duration = Duration::from_secs(15 * 60);

/// The longest one fetch of credentials may take (a `credential_process` that hangs); the SDK's
/// identity cache bounds its loads the same way.
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(5);

/// After a failed fetch, invokes fail at once for this long instead of each asking the
/// provider again.
const FAILED_FETCH_HOLD: Duration = Duration::from_secs(1);

/// One process's direct Lambda client: the pooled connections, the endpoint, the region and
/// the cached credentials. Shared by every function's [`super::Invoker`].
pub(super) struct DirectClient {
    http: Client<TimedConnect<HttpsConnector<HttpConnector>>, Full<Bytes>>,
    /// `scheme://authority` of the Lambda endpoint, no trailing `/`.
    base: String,
    /// The endpoint's authority, signed as `host`…
    host: String,
    /// …and sent as it, checked once.
    host_value: HeaderValue,
    region: String,
    settings: SigningSettings,
    credentials: CredentialsCache,
    read_timeout: Duration,
    /// How far Lambda's clock is ahead of ours (ms), from its last answer's `Date`: invokes
    /// are signed with Lambda's time, as the SDK signs them.
    skew_ms: AtomicI64,
}

/// One function's Invoke URI, built once, with its fixed part of the signature.
pub(super) struct Target {
    uri: Uri,
    text: String,
    /// `None` when this function's requests are signed by `aws-sigv4`'s general `sign`
    /// (the shape did not agree with it; see `sigv4.rs`).
    shape: Option<Shape>,
}

impl DirectClient {
    /// A client for `endpoint` (as the SDK resolved it) that signs with `credentials` for
    /// `cfg`'s region, within `cfg`'s timeouts. An `https` endpoint needs the system's root
    /// certificates.
    pub(super) fn new(
        cfg: &LambdaConfig,
        endpoint: &str,
        credentials: Option<SharedCredentialsProvider>,
    ) -> std::io::Result<DirectClient> {
        let base = endpoint.trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .map_err(|e| invalid(format!("the Lambda endpoint {base:?} is not a URI: {e}")))?;
        let authority = uri
            .authority()
            .ok_or_else(|| invalid(format!("the Lambda endpoint {base:?} names no host")))?;
        let host = authority.as_str().to_owned();
        let host_value = HeaderValue::from_str(&host)
            .map_err(|e| invalid(format!("the Lambda endpoint {base:?}: {e}")))?;
        let https = uri.scheme_str() == Some("https");
        let credentials = credentials.ok_or_else(|| {
            invalid("lambda.transport = \"direct\" found no AWS credentials provider".to_owned())
        })?;

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = hyper_rustls::HttpsConnectorBuilder::new();
        let tls = if https {
            tls.with_provider_and_native_roots(provider)
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("the Lambda endpoint {base:?} is https, but no usable root certificates were found: {e}"),
                    )
                })?
        } else {
            // A plain-http endpoint (an emulator) never uses TLS; the connector still wants a
            // config, which trusts nothing.
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| invalid(format!("TLS set-up: {e}")))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            tls.with_tls_config(config)
        };
        let connector = TimedConnect {
            inner: tls.https_or_http().enable_http1().wrap_connector(http),
            timeout: cfg.connect_timeout,
        };
        // Idle connections are kept for the next invoke, as the SDK keeps them (90 s, closed
        // in the background by the pool's timer); their number never exceeds the peak of
        // invokes in flight, which the functions' gates bound.
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Ok(DirectClient {
            http,
            base,
            host,
            host_value,
            region: cfg.region.clone(),
            settings: SigningSettings::default(),
            credentials: CredentialsCache::new(credentials),
            read_timeout: cfg.read_timeout,
            skew_ms: AtomicI64::new(0),
        })
    }

    /// The Invoke URI of `function` (a name, partial ARN or ARN, with or without a
    /// qualifier), percent-encoded as the SDK encodes it.
    pub(super) fn target(&self, function: &str) -> std::io::Result<Target> {
        let mut text = String::with_capacity(self.base.len() + function.len() + 40);
        text.push_str(&self.base);
        text.push_str("/2015-03-31/functions/");
        for byte in function.bytes() {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
                text.push(char::from(byte));
            } else {
                text.push('%');
                text.push(char::from(HEX[usize::from(byte >> 4)]));
                text.push(char::from(HEX[usize::from(byte & 0xf)]));
            }
        }
        text.push_str("/invocations");
        let uri: Uri = text
            .parse()
            .map_err(|e| invalid(format!("function {function:?}: {e}")))?;
        let shape = Shape::new(uri.path(), &self.host).filter(|shape| self.agrees(shape, &text));
        if shape.is_none() {
            tracing::debug!(function, "invokes signed by aws-sigv4's general signer");
        }
        Ok(Target { uri, text, shape })
    }

    /// Whether `shape` signs invokes of `text` exactly as `aws-sigv4` does: a probe payload
    /// at a fixed time, for both invocation types, with and without a session token.
    fn agrees(&self, shape: &Shape, text: &str) -> bool {
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_251_199);
        let payload = br#"{"records":[{"id":"r1","key":"k","body":{"probe":true}}]}"#;
        [None, Some("probe/session+token==")]
            .into_iter()
            .all(|token| {
                let credentials = Credentials::new(
                    "AKIDPROBE",
                    "probe/secret",
                    token.map(str::to_owned),
                    None,
                    "probe",
                );
                let identity = Identity::new(credentials.clone(), None);
                ["RequestResponse", "Event"].into_iter().all(|invocation| {
                    let Ok(reference) =
                        self.reference_signature(text, &identity, invocation, payload, time)
                    else {
                        return false;
                    };
                    let Some(signed) = shape.sign(
                        &credentials,
                        &KeyCache::default(),
                        &self.region,
                        invocation,
                        payload,
                        time,
                    ) else {
                        return false;
                    };
                    let mut theirs: Vec<(&str, &str)> = reference.headers().collect();
                    theirs.sort_unstable();
                    signed.pairs() == theirs
                })
            })
    }

    /// Now by the service's clock: ours shifted by `skew_ms` (the offset its last answer
    /// showed). A shift that would leave the years SigV4's date formatting can write (a
    /// garbage `Date` near 9999) is not applied: the refusal it would earn corrects it.
    fn service_time(skew_ms: i64) -> SystemTime {
        let now = SystemTime::now();
        let shift = Duration::from_millis(skew_ms.unsigned_abs());
        let shifted = if skew_ms >= 0 {
            now.checked_add(shift)
        } else {
            now.checked_sub(shift)
        };
        shifted
            .filter(|t| *t < latest_signable() && *t >= SystemTime::UNIX_EPOCH)
            .unwrap_or(now)
    }

    /// `aws-sigv4`'s signature of an invoke of `text`.
    fn reference_signature(
        &self,
        text: &str,
        identity: &Identity,
        invocation: &str,
        payload: &[u8],
        time: SystemTime,
    ) -> Result<SigningInstructions, InvokeFailure> {
        let params = v4::SigningParams::builder()
            .identity(identity)
            .region(&self.region)
            .name("lambda")
            .time(time)
            .settings(self.settings.clone())
            .build()
            .map_err(|e| signing_failed(&e))?
            .into();
        let headers = [
            ("host", self.host.as_str()),
            ("content-type", "application/octet-stream"),
            ("x-amz-invocation-type", invocation),
        ];
        let signable = SignableRequest::new(
            "POST",
            text,
            headers.into_iter(),
            SignableBody::Bytes(payload),
        )
        .map_err(|e| signing_failed(&e))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| signing_failed(&e))?
            .into_parts();
        Ok(instructions)
    }

    /// One signed Invoke of `target`, read to the end within `lambda.read_timeout`.
    pub(super) async fn invoke(
        &self,
        target: &Target,
        payload: Bytes,
        invocation: Invocation,
    ) -> Result<Invoked, InvokeFailure> {
        // The offset this request is signed with, to tell afterwards how far off it was.
        let applied_ms = self.skew_ms.load(Ordering::Relaxed);
        let request = self.signed(target, payload, invocation, applied_ms).await?;
        let sent = SystemTime::now();
        let answer = tokio::time::timeout(self.read_timeout, async {
            let response = self.http.request(request).await.map_err(|e| {
                if never_sent(&e) {
                    InvokeFailure::Unavailable {
                        message: describe_chain(&e),
                    }
                } else {
                    InvokeFailure::OutcomeUnknown {
                        cause: UnknownCause::ConnectionLost,
                        message: describe_chain(&e),
                    }
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| InvokeFailure::OutcomeUnknown {
                    cause: UnknownCause::ConnectionLost,
                    message: format!("unreadable response ({}): {e}", parts.status),
                })?
                .to_bytes();
            Ok((parts, body))
        })
        .await;
        let (parts, body) = match answer {
            Ok(answer) => answer?,
            Err(_) => {
                return Err(InvokeFailure::OutcomeUnknown {
                    cause: UnknownCause::ReadTimeout,
                    message: format!("no answer within {:?}", self.read_timeout),
                })
            }
        };
        // Every answer refreshes the service clock's offset, as the SDK's interceptor does, so
        // a skewed clock costs one refused attempt, not every invoke.
        let skew_ms = clock_skew(
            parts
                .headers
                .get(http::header::DATE)
                .and_then(|v| v.to_str().ok()),
            parts.headers.contains_key(http::header::AGE),
            sent,
            SystemTime::now(),
        );
        if let Some(ms) = skew_ms {
            self.skew_ms.store(ms, Ordering::Relaxed);
        }
        if parts.status.is_success() {
            return Ok(match invocation {
                Invocation::Event => Invoked::Accepted,
                Invocation::RequestResponse => Invoked::Response {
                    function_error: parts
                        .headers
                        .get(X_AMZ_FUNCTION_ERROR)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
                    payload: body,
                },
            });
        }
        let mut failure = read_error(parts.status.as_u16(), &parts.headers, &body);
        // How far the time this request was signed with was off Lambda's: a refusal is the
        // clock's only when that is large, not when our clock alone is (the offset was applied).
        failure.skew_ms = skew_ms.map(|ms| ms.saturating_sub(applied_ms));
        Err(failure.classify())
    }

    /// The request for an invoke of `target`, signed at our time shifted by `skew_ms` (see
    /// [`DirectClient::service_time`]).
    async fn signed(
        &self,
        target: &Target,
        payload: Bytes,
        invocation: Invocation,
        skew_ms: i64,
    ) -> Result<Request<Full<Bytes>>, InvokeFailure> {
        let cached = self.credentials.identity().await?;
        let (invocation_type, invocation_text) = match invocation {
            Invocation::RequestResponse => (REQUEST_RESPONSE, "RequestResponse"),
            Invocation::Event => (EVENT, "Event"),
        };
        let time = Self::service_time(skew_ms);
        let signed = target.shape.as_ref().and_then(|shape| {
            shape.sign(
                &cached.credentials,
                &cached.keys,
                &self.region,
                invocation_text,
                &payload,
                time,
            )
        });
        let reference = match signed {
            Some(_) => None,
            None => Some(self.reference_signature(
                &target.text,
                &cached.identity,
                invocation_text,
                &payload,
                time,
            )?),
        };
        let mut request = Request::new(Full::new(payload));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = target.uri.clone();
        let request_headers = request.headers_mut();
        request_headers.insert(HOST, self.host_value.clone());
        request_headers.insert(CONTENT_TYPE, OCTET_STREAM);
        request_headers.insert(X_AMZ_INVOCATION_TYPE, invocation_type);
        if let Some(signed) = signed {
            request_headers.insert(AUTHORIZATION, signed.authorization);
            request_headers.insert(X_AMZ_DATE, signed.date);
            if let Some(token) = signed.token {
                request_headers.insert(X_AMZ_SECURITY_TOKEN, token);
            }
        }
        if let Some(instructions) = reference {
            instructions.apply_to_request_http1x(&mut request);
        }
        Ok(request)
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// A connector whose whole connect — DNS, TCP and the TLS handshake — fails after
/// `lambda.connect_timeout`, as the SDK's does. (`HttpConnector`'s own timeout bounds the TCP
/// connect alone.) Its failure is a connect error, so the invoke is provably unsent.
#[derive(Clone)]
struct TimedConnect<C> {
    inner: C,
    timeout: Duration,
}

impl<C> tower::Service<Uri> for TimedConnect<C>
where
    C: tower::Service<Uri> + Send,
    C::Future: Send + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = C::Response;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<C::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection to Lambda within {timeout:?}"),
                ))
                    as Box<dyn std::error::Error + Send + Sync>),
            }
        })
    }
}

fn signing_failed(e: &dyn std::fmt::Display) -> InvokeFailure {
    InvokeFailure::Rejected {
        kind: "RequestConstruction".to_owned(),
        message: format!("could not sign the invoke: {e}"),
    }
}

/// Reads a non-2xx answer as the SDK's REST-JSON protocol does: the error code from
/// `X-Amzn-ErrorType` (or the body's `__type`/`code`) without its namespace or URL suffix,
/// the message and `Reason` from the body, the wait from `Retry-After`.
fn read_error(status: u16, headers: &http::HeaderMap, body: &[u8]) -> ServiceFailure {
    // Any body at all: what is not a JSON object, or lacks a field, reads as absent.
    let parsed: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let field = |names: &[&str]| {
        names
            .iter()
            .find_map(|name| parsed.get(*name).and_then(serde_json::Value::as_str))
            .map(str::to_owned)
    };
    let kind = headers
        .get(X_AMZN_ERROR_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| field(&["code", "__type"]))
        .map(|code| sanitize_code(&code).to_owned())
        .unwrap_or_else(|| "Unknown".to_owned());
    ServiceFailure {
        status,
        code: kind,
        message: field(&["message", "Message", "errorMessage"]).unwrap_or_default(),
        reason: field(&["Reason"]),
        retry_after: headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        // Measured by the caller, which knows when the request was sent.
        skew_ms: None,
    }
}

/// `aws.protocoltests.restjson#FooError:http://internal.amazon.com/...` → `FooError`.
fn sanitize_code(code: &str) -> &str {
    let code = code.split(':').next().unwrap_or(code);
    code.rsplit('#').next().unwrap_or(code).trim()
}

/// The credentials an invoke signs with, fetched from the provider when missing or close to
/// expiry; concurrent invokes wait for one fetch instead of each starting their own. A fetch
/// that fails or takes longer than [`CREDENTIALS_TIMEOUT`] keeps the cached credentials in use
/// until they really expire; without usable ones the invoke fails as never sent.
struct CredentialsCache {
    provider: SharedCredentialsProvider,
    current: ArcSwapOption<Cached>,
    /// Held by the one fetch in progress; the last failure, with when it happened.
    refresh: tokio::sync::Mutex<Option<(tokio::time::Instant, String)>>,
}

struct Cached {
    identity: Identity,
    /// The same credentials, as the direct signer reads them…
    credentials: Credentials,
    /// …and their signing key for the current day.
    keys: KeyCache,
    expiry: Option<SystemTime>,
    refresh_after: SystemTime,
}

impl Cached {
    fn usable(&self, now: SystemTime) -> bool {
        self.expiry.is_none_or(|expiry| now < expiry)
    }
}

impl CredentialsCache {
    fn new(provider: SharedCredentialsProvider) -> Self {
        CredentialsCache {
            provider,
            current: ArcSwapOption::empty(),
            refresh: tokio::sync::Mutex::new(None),
        }
    }

    async fn identity(&self) -> Result<Arc<Cached>, InvokeFailure> {
        if let Some(cached) = self.fresh() {
            return Ok(cached);
        }
        let mut last_failure = self.refresh.lock().await;
        if let Some(cached) = self.fresh() {
            return Ok(cached);
        }
        let still_usable = self
            .current
            .load_full()
            .filter(|cached| cached.usable(SystemTime::now()));
        if let Some((at, message)) = last_failure.as_ref() {
            if at.elapsed() < FAILED_FETCH_HOLD {
                return still_usable.ok_or_else(|| no_credentials(message));
            }
        }
        let fetched =
            tokio::time::timeout(CREDENTIALS_TIMEOUT, self.provider.provide_credentials()).await;
        let credentials = match fetched {
            Ok(Ok(credentials)) => credentials,
            Ok(Err(e)) => {
                let message = e.to_string();
                let failure = no_credentials(&message);
                *last_failure = Some((tokio::time::Instant::now(), message));
                return still_usable.ok_or(failure);
            }
            Err(_) => {
                let message = format!(
                    "the credentials provider did not answer within {CREDENTIALS_TIMEOUT:?}"
                );
                let failure = no_credentials(&message);
                *last_failure = Some((tokio::time::Instant::now(), message));
                return still_usable.ok_or(failure);
            }
        };
        *last_failure = None;
        let now = SystemTime::now();
        let expiry = credentials.expiry();
        let refresh_after = match expiry {
            None => now + REFRESH_WITHOUT_EXPIRY,
            Some(expiry) => expiry
                .checked_sub(REFRESH_BEFORE_EXPIRY)
                .unwrap_or(expiry)
                .max(now + MIN_REFRESH_INTERVAL)
                .min(expiry),
        };
        let cached = Arc::new(Cached {
            identity: Identity::new(credentials.clone(), expiry),
            credentials,
            keys: KeyCache::default(),
            expiry,
            refresh_after,
        });
        self.current.store(Some(Arc::clone(&cached)));
        Ok(cached)
    }

    fn fresh(&self) -> Option<Arc<Cached>> {
        self.current
            .load_full()
            .filter(|cached| SystemTime::now() < cached.refresh_after)
    }
}

/// Nothing was sent: another attempt may find credentials.
fn no_credentials(why: &str) -> InvokeFailure {
    InvokeFailure::Unavailable {
        message: format!("no AWS credentials to sign the invoke: {why}"),
    }
}

#[cfg(test)]
#[path = "direct_tests.rs"]
mod tests;
