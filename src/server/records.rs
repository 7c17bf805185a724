//! The data plane: `POST <route path>`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::value::RawValue;
use tokio::time::Instant;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use super::respond::{self, ShedScope};
use super::{App, IdentityError, ANONYMOUS, TIMEOUT_HEADER};
use crate::config::Config;
use crate::limit::{Admission, AdmissionLayer, Admitted, ClientKey, DefaultClock};

/// The answer when the app behind a request is gone. The listener holds a strong
/// reference to the app for the whole request, so this is a guard, not a path.
fn gone() -> Response {
    respond::unavailable(
        "the configuration was just reloaded; retry",
        Duration::from_secs(1),
    )
}

/// The data-plane router of one [`App`] (rebuilt on reload). The app is reached through a
/// weak reference: the app owns its router, and a strong one would be a cycle.
pub(super) fn router_for(
    app: Weak<App>,
    config: &Config,
    admission: &Arc<Admission<DefaultClock>>,
) -> Router {
    let mut router = Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz));
    for (index, route) in config.routes.iter().enumerate() {
        let layer = AdmissionLayer::new(Arc::clone(admission), index, respond::rejected);
        let name: Arc<str> = route.name.as_str().into();
        let counters = Arc::new(RouteCounters::default());
        let handler = post(
            move |state: State<Weak<App>>,
                  admitted: Option<Extension<Admitted>>,
                  request: Request| { submit_record(state, index, admitted, request) },
        )
        .fallback(|| async {
            respond::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "records are sent with POST",
            )
        })
        .layer(layer)
        // Outside admission, so shed requests are counted too.
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            count(Arc::clone(&name), Arc::clone(&counters), request, next)
        }));
        router = router.route(&route.path(), handler);
    }
    router
        .fallback(|| async { respond::error(StatusCode::NOT_FOUND, "not_found", "no route at this path") })
        .layer(middleware::from_fn_with_state(app.clone(), identify))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            // `record` and `batch` are filled in later, so a record can be followed into
            // the batch (and invoke) that carried it. Debug level: at `info` a span per
            // request would only cost, as nothing inside it logs at `info`.
            tracing::debug_span!(
                "request",
                method = %request.method(),
                uri = %request.uri(),
                request_id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or(""),
                record = tracing::field::Empty,
                batch = tracing::field::Empty,
            )
        }))
        .layer(SetRequestIdLayer::x_request_id(SequentialRequestId::new()))
        .with_state(app)
}

/// `sluicegate_requests_total{route,status,scope}` and admission rejections by scope.
///
/// Counter handles are looked up once per (status, scope) and cached per route: the label
/// strings are not rebuilt, and the registry not searched, on every request.
#[derive(Default)]
pub(super) struct RouteCounters {
    cells: std::sync::RwLock<std::collections::HashMap<(u16, &'static str), metrics::Counter>>,
}

impl RouteCounters {
    fn get(&self, route: &str, status: u16, scope: &'static str) -> metrics::Counter {
        if let Some(counter) = self
            .cells
            .read()
            .expect("counter cache lock is never poisoned")
            .get(&(status, scope))
        {
            return counter.clone();
        }
        let counter = metrics::counter!(
            "sluicegate_requests_total",
            "route" => route.to_owned(),
            "status" => status.to_string(),
            "scope" => scope
        );
        self.cells
            .write()
            .expect("counter cache lock is never poisoned")
            .insert((status, scope), counter.clone());
        counter
    }
}

async fn count(
    route: Arc<str>,
    counters: Arc<RouteCounters>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    let scope = response.extensions().get::<ShedScope>().copied();
    let scope_label = scope.map_or("none", ShedScope::as_str);
    counters
        .get(&route, response.status().as_u16(), scope_label)
        .increment(1);
    if let Some(ShedScope::Limit(scope)) = scope {
        metrics::counter!("sluicegate_admission_rejections_total", "scope" => scope.as_str())
            .increment(1);
    }
    response
}

/// Request ids `<process prefix>-<sequence>`: unique, and cheap (no random draw per request).
#[derive(Clone)]
struct SequentialRequestId {
    prefix: u32,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl SequentialRequestId {
    fn new() -> Self {
        SequentialRequestId {
            prefix: rand::random(),
            next: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        }
    }
}

impl MakeRequestId for SequentialRequestId {
    fn make_request_id<B>(&mut self, _request: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        axum::http::HeaderValue::from_str(&format!("{:08x}-{n:x}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}

pub(super) async fn identify(
    State(app): State<Weak<App>>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(app) = app.upgrade() else {
        return gone();
    };
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    match app
        .identify
        .key(request.headers(), peer, |k| app.admission.is_known_key(k))
    {
        Ok(key) => {
            request.extensions_mut().insert(ClientKey(key));
            next.run(request).await
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

async fn readyz(State(app): State<Weak<App>>) -> Response {
    let Some(app) = app.upgrade() else {
        return gone();
    };
    match app.readiness.check().await {
        Ok(()) => Json(serde_json::json!({"status": "ready"})).into_response(),
        Err(reason) => respond::unavailable(format!("not ready: {reason}"), Duration::from_secs(1)),
    }
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

async fn submit_record(
    State(app): State<Weak<App>>,
    index: usize,
    admitted: Option<Extension<Admitted>>,
    request: Request,
) -> Response {
    let Some(app) = app.upgrade() else {
        return gone();
    };
    let mut response = record_response(&app, index, request).await;
    if let Some(Extension(admitted)) = admitted {
        respond::add_admitted_headers(&mut response, &admitted);
    }
    response
}

async fn record_response(app: &App, index: usize, request: Request) -> Response {
    let route = &app.routes[index];
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
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > route.max_record_bytes as u64) {
        return too_large();
    }
    let bytes = match axum::body::to_bytes(body, route.max_record_bytes).await {
        Ok(bytes) => bytes,
        Err(e) if is_length_limit(&e) => return too_large(),
        Err(e) => {
            return respond::error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("cannot read the body: {e}"),
            )
        }
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
    let key = parts
        .extensions
        .get::<ClientKey>()
        .map(|k| Arc::clone(&k.0))
        .unwrap_or_else(|| ANONYMOUS.into());
    let ticket = match route.batcher.submit(&key, record, deadline) {
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

fn is_length_limit(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}
