//! The data plane: `POST <route path>`, `/healthz`, `/readyz`, and the Lambda Invoke API's
//! paths (`/2015-03-31/functions/...`), handed to `lambda_api`.
//!
//! This is the path every shed request takes, so it is one hand-written hyper service, not
//! a router under a stack of boxed middleware: per request it takes the current app, the
//! request id (the caller's `x-request-id`, or a new one), a debug-level span, looks the
//! path up among the record routes, identifies the caller, and calls the route's stack —
//! [`AdmissionService`] in front of [`RecordService`] — then counts the answer. A bulk
//! request (`Content-Type: application/x-ndjson`) goes to the `bulk` door after identity
//! instead: it admits each of its records itself, and counts them. One allocation for the
//! request's future; a refusal is built without waiting on anything.
//!
//! Reading, checking, submitting and awaiting a record are `intake`'s steps, shared with the
//! other front doors. A request with an `Idempotency-Key` goes through `idempotent::once`
//! after admission (a replay spends the caller's tokens like any request): its key is
//! checked before the body is read, and its record submitted at most once per key. Plain
//! `http` / `hyper` types, no axum: the request path returns what went wrong as a
//! [`RequestError`] and [`respond`] turns it into the response, so no status is chosen here.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderName, Method, Request};
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::app::{App, RouteEntry};
use super::bulk;
use super::counters::RouteCounters;
use super::idempotent;
use super::intake;
use super::lambda_api;
use super::reload::Server;
use super::request_id::ConnectionIds;
use super::respond::{self, RequestError, Response};
use super::{IdentityError, ANONYMOUS};
use crate::coalesce::{Batcher, KeyWeights};
use crate::idempotency::{self, BodyHash, Idempotency};
use crate::invoke::Invoker;
use crate::limit::Rejected;
use crate::limit::{
    Admission, AdmissionLayer, AdmissionService, Admitted, ClientKey, DefaultClock,
};

/// The header that carries the request id, both ways.
pub(super) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A record route's stack: admission (global → route → key), then the record itself.
type Stack = AdmissionService<RecordService, DefaultClock, fn(Rejected) -> Response>;

/// One route as the record path sees it: where its records go and the limits a record is
/// checked against.
pub(super) struct RecordRoute {
    pub(super) name: String,
    pub(super) batcher: Batcher,
    pub(super) invoker: Arc<Invoker>,
    pub(super) request_timeout: Duration,
    pub(super) max_record_bytes: usize,
    /// Deepest nesting of arrays and objects a record may have (from `server.max_json_depth`
    /// and the route's envelope).
    pub(super) max_json_depth: u32,
    pub(super) body_read_timeout: Duration,
    /// Each key's share of a per-key fair queue (its plan's `weight`).
    pub(super) weights: Arc<KeyWeights>,
    /// The server's `Idempotency-Key` store (one for every route; it outlives reloads).
    pub(super) idempotency: Arc<Idempotency>,
}

impl RecordRoute {
    pub(super) fn policies(&self) -> respond::Policies {
        let gate = self.invoker.gate();
        respond::Policies {
            queue: self.batcher.queue_policy(),
            upstream: crate::limit::Quota {
                rate: gate.limits().rate,
                burst: gate.config().burst,
            },
        }
    }
}

/// One record route as the data plane dispatches it.
pub(super) struct Endpoint {
    /// Compared with every request's path: the data plane finds its route by scanning the
    /// app's routes for it.
    path: String,
    stack: Stack,
    /// Shared with a streamed bulk answer, which counts its records as they are answered.
    counters: Arc<RouteCounters>,
}

impl Endpoint {
    /// The endpoint at `path` of the route that is number `index` in admission's route
    /// list (its position in the app's routes).
    pub(super) fn new(
        path: String,
        index: usize,
        route: Arc<RecordRoute>,
        admission: &Arc<Admission<DefaultClock>>,
    ) -> Self {
        let reject: fn(Rejected) -> Response = respond::rejected;
        let layer = AdmissionLayer::new(Arc::clone(admission), index, reject);
        Endpoint {
            path,
            counters: Arc::new(RouteCounters::new(&route.name)),
            stack: tower::Layer::layer(&layer, RecordService(route)),
        }
    }
}

impl Endpoint {
    /// The route's answer counters (shared by every front door to the route).
    pub(super) fn counters(&self) -> &RouteCounters {
        &self.counters
    }
}

/// The data plane's hyper service, one per connection.
pub(super) struct DataPlane {
    pub(super) server: Arc<Server>,
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
        let app = self.server.app();
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
    if let Some((index, entry)) = app
        .routes
        .iter()
        .enumerate()
        .find(|(_, route)| route.endpoint.path == path)
    {
        let response = record_route(app, index, entry, request, peer)
            .await
            .unwrap_or_else(RequestError::into_response);
        // A bulk answer's records were counted one by one.
        if response.extensions().get::<bulk::Counted>().is_none() {
            entry.endpoint.counters.count(&response);
        }
        return response;
    }
    if lambda_api::is_invoke_path(path) {
        return lambda_api::serve(app, request, peer).await;
    }
    let readable = matches!(*request.method(), Method::GET | Method::HEAD);
    let answer = match path {
        "/healthz" if readable => Ok(respond::healthy()),
        "/readyz" if readable => match app.readiness.check().await {
            Ok(()) => Ok(respond::ready(app.readiness.endpoint())),
            Err(reason) => Err(RequestError::NotReady { reason }),
        },
        "/healthz" | "/readyz" => Err(RequestError::MethodNotAllowed { allow: "GET, HEAD" }),
        _ => Err(RequestError::NotFound),
    };
    answer.unwrap_or_else(RequestError::into_response)
}

/// Identity, then the route's stack — or, for a bulk request, the bulk door, which admits
/// each record itself (a bulk spends one token per record, none for the request).
async fn record_route(
    app: &App,
    index: usize,
    entry: &RouteEntry,
    mut request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response, RequestError> {
    if request.method() != Method::POST {
        return Err(RequestError::MethodNotAllowed { allow: "POST" });
    }
    let key = app
        .identify
        .key(request.headers(), peer, |k| app.admission.is_known_key(k))
        .map_err(|e| match e {
            IdentityError::Missing => RequestError::Unauthorized {
                header: app.identify.header().clone(),
            },
            IdentityError::Unknown => RequestError::Forbidden,
            IdentityError::Invalid(reason) => RequestError::BadRequest { reason },
        })?;
    if bulk::is_bulk(request.headers()) {
        let counters = &entry.endpoint.counters;
        return Ok(bulk::serve(app, index, &entry.record, counters, key, request).await);
    }
    request.extensions_mut().insert(ClientKey(key));
    match entry.endpoint.stack.clone().oneshot(request).await {
        Ok(response) => Ok(response),
        Err(never) => match never {},
    }
}

/// An admitted record: read, checked, submitted to the route's batcher, and answered with
/// its own outcome (plus the key layer's `RateLimit` fields).
#[derive(Clone)]
pub(super) struct RecordService(Arc<RecordRoute>);

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
            let mut response = record_response(&route, request)
                .await
                .unwrap_or_else(RequestError::into_response);
            if let Some(admitted) = admitted {
                respond::add_admitted_headers(&mut response, &admitted);
            }
            Ok(response)
        })
    }
}

// The submit closure returns intake's `RequestError`, held by value (see `intake`).
#[allow(clippy::result_large_err)]
async fn record_response(
    route: &RecordRoute,
    request: Request<Incoming>,
) -> Result<Response, RequestError> {
    let (parts, body) = request.into_parts();
    let deadline = intake::deadline(&parts.headers, route.request_timeout)?;
    // A bad key is refused before the body is read.
    let idempotency_key = if route.idempotency.enabled() {
        idempotency::key_of(&parts.headers).map_err(RequestError::InvalidIdempotencyKey)?
    } else {
        None
    };
    let bytes = intake::read_record_body(route, &parts.headers, body, deadline).await?;
    let record = intake::parse_record(route, &bytes)?;
    let key = parts
        .extensions
        .get::<ClientKey>()
        .map(|k| Arc::clone(&k.0))
        .unwrap_or_else(|| ANONYMOUS.into());
    if let Some(idempotency_key) = idempotency_key {
        // Admission has run: a replay spends the caller's tokens like any request. The
        // body is held until the answer here (its hash is taken before submitting).
        return idempotent::once(
            route,
            &key,
            idempotency_key,
            BodyHash::of(&bytes),
            deadline,
            || intake::submit(route, &key, record, deadline),
            idempotent::render_record,
        )
        .await;
    }
    let ticket = intake::submit(route, &key, record, deadline)?;
    // The queued record is its own copy (its envelope entry): the request body is let go
    // now rather than held until the answer, so a waiting record costs one copy, not two.
    drop(bytes);
    let id = Arc::clone(&ticket.id);
    tracing::Span::current().record("record", &*id);
    let delivered = intake::outcome(route, ticket, deadline).await?;
    Ok(respond::delivered(&id, delivered))
}
