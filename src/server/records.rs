//! The data plane: `POST <route path>`, `/healthz`, `/readyz`.
//!
//! This is the path every shed request takes, so it is one hand-written hyper service, not
//! a router under a stack of boxed middleware: per request it takes the current app, the
//! request id (the caller's `x-request-id`, or a new one), a debug-level span, looks the
//! path up among the record routes, identifies the caller, and calls the route's stack —
//! [`AdmissionService`] in front of [`RecordService`] — then counts the answer. One
//! allocation for the request's future; a refusal is built without waiting on anything.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::parseable;
use super::respond::{self, ShedScope};
use super::{App, IdentityError, Route, Shared, ANONYMOUS, TIMEOUT_HEADER};
use crate::limit::Rejected;
use crate::limit::{
    Admission, AdmissionLayer, AdmissionService, Admitted, ClientKey, DefaultClock,
};

/// The header that carries the request id, both ways.
pub(super) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A record route's stack: admission (global → route → key), then the record itself.
type Stack = AdmissionService<RecordService, DefaultClock, fn(Rejected) -> Response>;

/// One record route as the data plane dispatches it.
pub(super) struct Endpoint {
    path: String,
    stack: Stack,
    counters: RouteCounters,
}

/// The endpoints of an app's routes, in route order (admission's route indexes).
pub(super) fn endpoints(
    routes: &[Arc<Route>],
    admission: &Arc<Admission<DefaultClock>>,
) -> Vec<Endpoint> {
    let reject: fn(Rejected) -> Response = respond::rejected;
    routes
        .iter()
        .enumerate()
        .map(|(index, route)| {
            let layer = AdmissionLayer::new(Arc::clone(admission), index, reject);
            Endpoint {
                path: route.path.clone(),
                stack: tower::Layer::layer(&layer, RecordService(Arc::clone(route))),
                counters: RouteCounters::new(&route.name),
            }
        })
        .collect()
}

/// The data plane's hyper service, one per connection.
pub(super) struct DataPlane {
    pub(super) shared: Arc<Shared>,
    pub(super) peer: SocketAddr,
    pub(super) ids: ConnectionIds,
}

impl hyper::service::Service<Request<Incoming>> for DataPlane {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        // Held for the whole request: an app replaced by a reload lives until the requests
        // it took have been answered.
        let app = self.shared.app();
        let id = match request.headers().get(REQUEST_ID) {
            Some(id) => id.clone(),
            None => {
                let id = self.ids.next();
                request.headers_mut().insert(REQUEST_ID, id.clone());
                id
            }
        };
        // `record` and `batch` are filled in later, so a record can be followed into the
        // batch (and invoke) that carried it. Debug level: nothing inside logs at `info`,
        // and a disabled span costs next to nothing.
        let span = tracing::debug_span!(
            "request",
            method = %request.method(),
            uri = %request.uri(),
            request_id = id.to_str().unwrap_or(""),
            record = tracing::field::Empty,
            batch = tracing::field::Empty,
        );
        let peer = self.peer;
        let started = Instant::now();
        Box::pin(
            async move {
                let mut response = serve(&app, request, peer).await;
                response.headers_mut().insert(REQUEST_ID, id);
                let status = response.status();
                let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
                if status.is_server_error() {
                    // Deadlines, drains, Lambda failures: worth a line at the default level.
                    tracing::warn!(status = status.as_u16(), elapsed_ms, "answered");
                } else {
                    tracing::debug!(status = status.as_u16(), elapsed_ms, "answered");
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}

async fn serve(app: &App, request: Request<Incoming>, peer: SocketAddr) -> Response {
    let path = request.uri().path();
    if let Some(endpoint) = app.endpoints.iter().find(|e| e.path == path) {
        let response = record_route(app, endpoint, request, peer).await;
        endpoint.counters.count(&response);
        return response;
    }
    let readable = matches!(*request.method(), Method::GET | Method::HEAD);
    match path {
        "/healthz" if readable => Json(serde_json::json!({"status": "ok"})).into_response(),
        "/readyz" if readable => match app.readiness.check().await {
            Ok(()) => Json(serde_json::json!({
                "status": "ready",
                "endpoint": app.readiness.endpoint(),
            }))
            .into_response(),
            Err(reason) => {
                respond::unavailable(format!("not ready: {reason}"), Duration::from_secs(1))
            }
        },
        "/healthz" | "/readyz" => method_not_allowed("GET, HEAD"),
        _ => respond::error(StatusCode::NOT_FOUND, "not_found", "no route at this path"),
    }
}

fn method_not_allowed(allow: &'static str) -> Response {
    let mut response = respond::error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this path takes {allow}"),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// Identity, then the route's stack.
async fn record_route(
    app: &App,
    endpoint: &Endpoint,
    mut request: Request<Incoming>,
    peer: SocketAddr,
) -> Response {
    if request.method() != Method::POST {
        return method_not_allowed("POST");
    }
    let key = app
        .identify
        .key(request.headers(), peer, |k| app.admission.is_known_key(k));
    match key {
        Ok(key) => {
            request.extensions_mut().insert(ClientKey(key));
            match endpoint.stack.clone().oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
        Err(IdentityError::Missing) => respond::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("missing API key header {}", app.identify.header()),
        ),
        Err(IdentityError::Unknown) => {
            respond::error(StatusCode::FORBIDDEN, "forbidden", "unknown API key")
        }
        Err(IdentityError::Invalid(message)) => {
            respond::error(StatusCode::BAD_REQUEST, "bad_request", message)
        }
    }
}

/// An admitted record: read, checked, submitted to the route's batcher, and answered with
/// its own outcome (plus the key layer's `RateLimit` fields).
#[derive(Clone)]
pub(super) struct RecordService(Arc<Route>);

impl Service<Request<Incoming>> for RecordService {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Capacity is the batcher's bounded queue, claimed (or refused) at submit.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let route = Arc::clone(&self.0);
        Box::pin(async move {
            let admitted = request.extensions().get::<Admitted>().cloned();
            let mut response = record_response(&route, request).await;
            if let Some(admitted) = admitted {
                respond::add_admitted_headers(&mut response, &admitted);
            }
            Ok(response)
        })
    }
}

/// `sluicegate_requests_total{route,status,scope}` and admission rejections by scope.
///
/// Counter handles are looked up once per (status, scope) and cached per route: the label
/// strings are not rebuilt, and the registry not searched, on every request. The answers
/// the data plane gives have fixed slots, read without a lock (both cores count at once);
/// anything else goes to a short locked list.
pub(super) struct RouteCounters {
    route: Arc<str>,
    slots: [std::sync::OnceLock<Cell>; SLOTS.len()],
    others: parking_lot::RwLock<Vec<((u16, ScopeLabel), Cell)>>,
}

/// The scope label of a response (`None`: not shed).
type ScopeLabel = Option<&'static str>;

/// The (status, scope) pairs with a fixed slot.
const SLOTS: [(u16, ScopeLabel); 15] = [
    (200, None),
    (202, None),
    (422, None),
    (429, Some("key")),
    (429, Some("route")),
    (429, Some("global")),
    (429, Some("queue")),
    (429, Some("upstream")),
    (400, None),
    (401, None),
    (403, None),
    (405, None),
    (413, None),
    (503, None),
    (504, None),
];

#[derive(Clone)]
struct Cell {
    requests: metrics::Counter,
    /// `sluicegate_admission_rejections_total{scope}` for admission refusals.
    rejections: Option<metrics::Counter>,
}

impl RouteCounters {
    fn new(route: &str) -> Self {
        RouteCounters {
            route: route.into(),
            slots: Default::default(),
            others: Default::default(),
        }
    }

    fn count(&self, response: &Response) {
        let scope = response.extensions().get::<ShedScope>().copied();
        let key = (response.status().as_u16(), scope.map(ShedScope::as_str));
        match SLOTS.iter().position(|slot| *slot == key) {
            Some(slot) => self.slots[slot]
                .get_or_init(|| self.cell(key, scope))
                .increment(),
            None => self.other(key, scope).increment(),
        }
    }

    #[cold]
    fn other(&self, key: (u16, ScopeLabel), scope: Option<ShedScope>) -> Cell {
        let known = self
            .others
            .read()
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, cell)| cell.clone());
        known.unwrap_or_else(|| {
            let cell = self.cell(key, scope);
            self.others.write().push((key, cell.clone()));
            cell
        })
    }

    fn cell(&self, key: (u16, ScopeLabel), scope: Option<ShedScope>) -> Cell {
        Cell {
            requests: metrics::counter!(
                "sluicegate_requests_total",
                "route" => self.route.to_string(),
                "status" => key.0.to_string(),
                "scope" => key.1.unwrap_or("none")
            ),
            rejections: match scope {
                Some(ShedScope::Limit(scope)) => Some(metrics::counter!(
                    "sluicegate_admission_rejections_total",
                    "scope" => scope.as_str()
                )),
                _ => None,
            },
        }
    }
}

impl Cell {
    fn increment(&self) {
        self.requests.increment(1);
        if let Some(rejections) = &self.rejections {
            rejections.increment(1);
        }
    }
}

/// Request ids `<process prefix>-<connection>-<request>` in hex: unique, and cheap (no
/// random draw, no formatting machinery, and no counter shared between cores per request).
#[derive(Clone)]
pub(super) struct RequestIds {
    prefix: u32,
    connections: Arc<AtomicU64>,
}

impl RequestIds {
    pub(super) fn new() -> Self {
        RequestIds {
            prefix: rand::random(),
            connections: Arc::new(AtomicU64::new(1)),
        }
    }

    /// The ids of one new connection's requests.
    pub(super) fn connection(&self) -> ConnectionIds {
        ConnectionIds {
            prefix: self.prefix,
            connection: self.connections.fetch_add(1, Ordering::Relaxed),
            next: AtomicU64::new(1),
        }
    }
}

/// [`RequestIds`] for one connection. Its requests are answered one after another, so the
/// sequence is only ever touched by the core serving it.
pub(super) struct ConnectionIds {
    prefix: u32,
    connection: u64,
    next: AtomicU64,
}

impl ConnectionIds {
    fn next(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut text = [0u8; 8 + 1 + 16 + 1 + 16];
        let mut len = hex(u64::from(self.prefix), 8, &mut text);
        for part in [self.connection, n] {
            text[len] = b'-';
            len += 1;
            len += hex(part, 1, &mut text[len..]);
        }
        HeaderValue::from_bytes(&text[..len]).expect("hex digits are a valid header value")
    }
}

/// Writes `n` in lower-case hex, at least `min_digits` long; returns the digits written.
fn hex(n: u64, min_digits: usize, out: &mut [u8]) -> usize {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits = (16 - n.leading_zeros() as usize / 4).max(min_digits);
    for (i, byte) in out[..digits].iter_mut().enumerate() {
        *byte = DIGITS[((n >> (4 * (digits - 1 - i))) & 0xf) as usize];
    }
    digits
}

/// The caller's deadline: the route's, shortened by `x-sluicegate-timeout-ms`.
fn deadline(headers: &HeaderMap, route_timeout: Duration) -> Result<Instant, String> {
    let timeout = match headers.get(TIMEOUT_HEADER) {
        None => route_timeout,
        Some(value) => {
            let ms = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|ms| *ms > 0)
                .ok_or_else(|| {
                    format!("{TIMEOUT_HEADER} must be a positive integer number of milliseconds")
                })?;
            route_timeout.min(Duration::from_millis(ms))
        }
    };
    Ok(Instant::now() + timeout)
}

/// Why a body could not be read.
enum BodyError {
    TooLarge,
    Read(hyper::Error),
}

/// Reads a body of at most `max` bytes into one buffer.
///
/// Each frame is copied out and dropped at once. Collecting the frames instead keeps every
/// one of them — and, through it, the part of hyper's read buffer it points into — until
/// the body ends: a body sent as one-byte chunks then held roughly 50 bytes of bookkeeping
/// and framing per byte of record. Here a body costs its bytes, at most `max`, and the
/// buffer grows by doubling but never past `max`.
async fn read_body(
    mut body: Incoming,
    declared: Option<u64>,
    max: usize,
) -> Result<bytes::Bytes, BodyError> {
    let initial = declared.map_or(8 * 1024, |len| usize::try_from(len).unwrap_or(max));
    let mut buffer = Vec::with_capacity(initial.min(max));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        let Ok(data) = frame.into_data() else {
            // Trailers carry nothing a record needs.
            continue;
        };
        let needed = buffer.len() + data.len();
        if needed > max {
            return Err(BodyError::TooLarge);
        }
        if needed > buffer.capacity() {
            let grown = needed.max(buffer.capacity() * 2).min(max);
            buffer.reserve_exact(grown - buffer.len());
        }
        buffer.extend_from_slice(&data);
    }
    Ok(buffer.into())
}

async fn record_response(route: &Route, request: Request<Incoming>) -> Response {
    let (parts, body) = request.into_parts();
    let deadline = match deadline(&parts.headers, route.request_timeout) {
        Ok(deadline) => deadline,
        Err(message) => return respond::error(StatusCode::BAD_REQUEST, "bad_request", message),
    };
    let too_large = || {
        respond::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "record is larger than server.max_record_bytes ({} bytes)",
                route.max_record_bytes
            ),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > route.max_record_bytes as u64) {
        return too_large();
    }
    // The body must arrive within `body_read_timeout`, and never after the caller's
    // deadline: a client that stalls mid-body holds a connection and a buffer, nothing more.
    let wait = route
        .body_read_timeout
        .min(deadline.saturating_duration_since(Instant::now()));
    let read = read_body(body, declared, route.max_record_bytes);
    let bytes = match tokio::time::timeout(wait, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(BodyError::TooLarge)) => return too_large(),
        Ok(Err(BodyError::Read(e))) => {
            return respond::error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("cannot read the body: {e}"),
            )
        }
        Err(_elapsed) => return respond::body_timeout(wait),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return respond::error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body is empty; send one JSON record",
        );
    }
    let record: &RawValue = match serde_json::from_slice(&bytes) {
        Ok(record) => record,
        Err(e) => {
            return respond::error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the body is not valid JSON: {e}"),
            )
        }
    };
    if let Err(unparseable) = parseable::check(record.get().as_bytes(), route.max_json_depth) {
        return respond::error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            unparseable.to_string(),
        );
    }
    let key = parts
        .extensions
        .get::<ClientKey>()
        .map(|k| Arc::clone(&k.0))
        .unwrap_or_else(|| ANONYMOUS.into());
    let submitted = route.batcher.submit(&key, record, deadline);
    // The queued record is its own copy (its envelope entry): the request body is let go
    // now rather than held until the answer, so a waiting record costs one copy, not two.
    drop(bytes);
    let ticket = match submitted {
        Ok(ticket) => ticket,
        Err(err) => return respond::record_error("-", err, &route.policies()),
    };
    let id = Arc::clone(&ticket.id);
    tracing::Span::current().record("record", &*id);
    match tokio::time::timeout_at(deadline, ticket.outcome()).await {
        Ok(Ok(delivered)) => respond::delivered(&id, delivered),
        Ok(Err(err)) => respond::record_error(&id, err, &route.policies()),
        Err(_elapsed) => respond::error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("no result for record {id} before the caller's deadline"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_pads_to_the_minimum_and_grows_past_it() {
        let mut out = [0u8; 16];
        let n = hex(0xab, 8, &mut out);
        assert_eq!(&out[..n], b"000000ab");
        let n = hex(0, 1, &mut out);
        assert_eq!(&out[..n], b"0");
        let n = hex(u64::MAX, 1, &mut out);
        assert_eq!(&out[..n], b"ffffffffffffffff");
        let n = hex(0x1_0000_0000, 8, &mut out);
        assert_eq!(&out[..n], b"100000000");
    }

    #[test]
    fn request_ids_are_unique_and_share_the_process_prefix() {
        let ids = RequestIds::new();
        let (one, two) = (ids.connection(), ids.clone().connection());
        let all = [one.next(), one.next(), two.next(), two.next()];
        let all: Vec<&str> = all.iter().map(|id| id.to_str().unwrap()).collect();
        for (i, a) in all.iter().enumerate() {
            let parts: Vec<&str> = a.split('-').collect();
            assert_eq!(parts.len(), 3, "{a}");
            assert_eq!(parts[0].len(), 8, "{a}");
            assert!(
                parts.iter().all(|p| u64::from_str_radix(p, 16).is_ok()),
                "{a}"
            );
            assert_eq!(parts[0], all[0].split('-').next().unwrap());
            assert!(all[i + 1..].iter().all(|b| a != b), "{all:?}");
        }
    }

    #[test]
    fn every_known_answer_has_its_own_counter_slot() {
        let counters = RouteCounters::new("r");
        for (i, (status, scope)) in SLOTS.iter().enumerate() {
            assert!(
                SLOTS[..i].iter().all(|s| s != &(*status, *scope)),
                "slot {i} is listed twice"
            );
        }
        let shed = respond::shed(ShedScope::Queue, Duration::from_secs(1), None);
        counters.count(&shed);
        let queue = SLOTS
            .iter()
            .position(|s| *s == (429, Some("queue")))
            .unwrap();
        assert!(counters.slots[queue].get().is_some());
        counters.count(&respond::error(StatusCode::IM_A_TEAPOT, "x", "y"));
        assert_eq!(counters.others.read().len(), 1);
    }
}
