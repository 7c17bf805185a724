//! The HTTP side: the data-plane router (record routes, `/healthz`, `/readyz`), the
//! identity step, the admission layer per route, and the admin listener.
//!
//! Only this module knows HTTP. A record request goes: identity (key from API key / IP /
//! header, `401`/`403` when keys are required) → [`AdmissionLayer`] for its route
//! (global → route → key, `429` on refusal) → body checks (`413`, `400`) → the route's
//! [`Batcher`] → wait for the record's outcome until the caller's deadline (`504`).
//! Every status is produced in [`respond`].

mod identity;
mod readiness;
pub mod respond;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use self::identity::{client_ip, Identify, IdentityError, ANONYMOUS, MAX_KEY_BYTES};
use self::readiness::Readiness;
use crate::coalesce::Batcher;
use crate::config::Config;
use crate::emulator::{self, RunningEmulator};
use crate::invoke::discover::{self, Finding};
use crate::invoke::{self, Invoker};
use crate::limit::{Admission, AdmissionLayer, Admitted, ClientKey, DefaultClock, Plans};
use crate::pipeline::Pipeline;

/// Header with which a caller shortens (never lengthens) its route's deadline.
pub const TIMEOUT_HEADER: &str = "x-sluicegate-timeout-ms";

/// Why sluicegate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Pipeline(std::io::Error),
    #[error("lambda.strict = true and the config does not fit the function:\n{}", .0.iter().map(|f| format!("  - {f}")).collect::<Vec<_>>().join("\n"))]
    Unsafe(Vec<Finding>),
}

/// Start-up discovery: with `lambda.strict` every finding refuses the start; otherwise
/// they are logged as warnings from a background task, so a slow or unreachable control
/// plane never delays serving.
async fn check_fit(config: &Config, client: &aws_sdk_lambda::Client) -> Result<(), StartError> {
    if config.lambda.strict {
        let findings = discover::discover(client, config).await;
        if !findings.is_empty() {
            return Err(StartError::Unsafe(findings));
        }
        return Ok(());
    }
    let (client, config) = (client.clone(), config.clone());
    tokio::spawn(async move {
        for finding in discover::discover(&client, &config).await {
            tracing::warn!(route = %finding.route, "{}", finding.message);
        }
    });
    Ok(())
}

/// One route as the request path sees it.
struct Route {
    batcher: Batcher,
    invoker: Arc<Invoker>,
    request_timeout: Duration,
    max_record_bytes: usize,
}

/// Shared by every request.
struct App {
    routes: Vec<Route>,
    identify: Identify,
    admission: Arc<Admission<DefaultClock>>,
    readiness: Readiness,
    config: Config,
}

/// A running sluicegate: its bound addresses and a way to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The embedded emulator's address, when `[emulator] enabled = true`.
    pub emulator_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    emulator: Option<RunningEmulator>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish, and returns when the listeners closed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        if let Some(emulator) = self.emulator {
            if let Err(e) = emulator.shutdown().await {
                tracing::warn!(error = %e, "emulator did not stop cleanly");
            }
        }
    }

    /// Waits until `signal` resolves, then shuts down.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}

/// Binds the listeners (data plane, admin, and the embedded emulator when enabled) and
/// starts serving. Port 0 anywhere picks a free port; [`Running`] tells which.
pub async fn start(mut config: Config) -> Result<Running, StartError> {
    let mut emulator = None;
    if config.emulator.enabled {
        let addr = config.emulator.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "emulator",
                addr,
                source,
            })?;
        let running = emulator::spawn(config.emulator.clone(), listener)
            .await
            .map_err(|source| StartError::Bind {
                what: "emulator",
                addr,
                source,
            })?;
        // The embedded emulator is the target unless the config points elsewhere; when it
        // was asked for port 0 (tests) the endpoint follows the port it got.
        let configured = format!("http://{addr}");
        if config.lambda.endpoint_url.is_none()
            || config.lambda.endpoint_url.as_deref() == Some(configured.as_str())
        {
            config.lambda.endpoint_url = Some(format!("http://{}", running.local_addr));
        }
        tracing::info!(addr = %running.local_addr, "embedded Lambda emulator listening");
        emulator = Some(running);
    }
    let emulator_addr = emulator.as_ref().map(|e| e.local_addr);

    let client = invoke::build_client(&config.lambda).await;
    let pipeline = Pipeline::build(&config, &client, true)
        .await
        .map_err(StartError::Pipeline)?;
    check_fit(&config, &client).await?;
    let routes = pipeline
        .routes
        .into_iter()
        .zip(&config.routes)
        .map(|(handle, route)| Route {
            batcher: handle.batcher,
            invoker: handle.invoker,
            request_timeout: route.request_timeout(&config.server),
            max_record_bytes: config.server.max_record_bytes.as_usize(),
        })
        .collect();
    let admission = Arc::new(Admission::new(
        config.limits.global,
        config
            .routes
            .iter()
            .map(|r| (r.name.clone(), r.limit))
            .collect(),
        Plans::new(
            config.limits.default,
            config
                .plans
                .iter()
                .map(|p| (p.name.clone(), p.quota(), p.keys.clone()))
                .collect(),
        ),
        config.limits.max_keys,
        DefaultClock::default(),
    ));
    let functions: Vec<String> = config.routes.iter().map(|r| r.function.clone()).collect();
    let app = Arc::new(App {
        routes,
        identify: Identify::new(&config.identity),
        admission: Arc::clone(&admission),
        readiness: Readiness::new(client, functions),
        config,
    });

    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();

    let addr = app.config.server.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            what: "server",
            addr,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| StartError::Bind {
        what: "server",
        addr,
        source,
    })?;
    let admin = app.config.server.admin_listen;
    let admin_listener = TcpListener::bind(admin)
        .await
        .map_err(|source| StartError::Bind {
            what: "admin",
            addr: admin,
            source,
        })?;
    let admin_local = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "admin",
            addr: admin,
            source,
        })?;

    let data = data_router(Arc::clone(&app)).into_make_service_with_connect_info::<SocketAddr>();
    tasks.push(tokio::spawn(serve(listener, data, stopped.clone())));
    tasks.push(tokio::spawn(serve(
        admin_listener,
        admin_router(Arc::clone(&app)).into_make_service(),
        stopped.clone(),
    )));
    tasks.push(tokio::spawn(reclaim_keys(
        admission,
        app.config.limits.reclaim_interval,
        stopped,
    )));
    tracing::info!(addr = %local, admin = %admin_local, "sluicegate listening");
    Ok(Running {
        addr: local,
        admin_addr: admin_local,
        emulator_addr,
        stop,
        tasks,
        emulator,
    })
}

async fn serve<M, S>(listener: TcpListener, make: M, mut stopped: watch::Receiver<bool>)
where
    M: for<'a> tower::Service<
            axum::serve::IncomingStream<'a, TcpListener>,
            Error = std::convert::Infallible,
            Response = S,
        > + Send
        + 'static,
    for<'a> <M as tower::Service<axum::serve::IncomingStream<'a, TcpListener>>>::Future: Send,
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let shutdown = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    if let Err(e) = axum::serve(listener, make)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "listener failed");
    }
}

/// Idle (full) buckets carry no information: dropping them keeps memory bounded by the
/// active keys, not by every key ever seen.
async fn reclaim_keys(
    admission: Arc<Admission<DefaultClock>>,
    every: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => admission.reclaim(),
            _ = stopped.wait_for(|stop| *stop) => return,
        }
    }
}

fn data_router(app: Arc<App>) -> Router {
    let mut router = Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz));
    for (index, route) in app.config.routes.iter().enumerate() {
        let layer = AdmissionLayer::new(Arc::clone(&app.admission), index, respond::rejected);
        let handler = post(
            move |state: State<Arc<App>>,
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
        .layer(layer);
        router = router.route(&route.path(), handler);
    }
    router
        .fallback(|| async {
            respond::error(StatusCode::NOT_FOUND, "not_found", "no route at this path")
        })
        .layer(middleware::from_fn_with_state(Arc::clone(&app), identify))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(app)
}

fn admin_router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/admin/routes", get(admin_routes))
        .with_state(app)
}

async fn admin_routes(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let routes: Vec<_> = app
        .config
        .routes
        .iter()
        .zip(&app.routes)
        .map(|(cfg, route)| {
            serde_json::json!({
                "name": cfg.name,
                "path": cfg.path(),
                "function": cfg.function,
                "queue_depth": route.batcher.queue_depth(),
                "max_pending": cfg.queue.max_pending,
                "invoke": {
                    "concurrency_limit": route.invoker.gate().limits().concurrency,
                    "rate_limit": route.invoker.gate().limits().rate,
                    "in_flight": route.invoker.gate().limits().in_flight,
                    "configured_concurrency": route.invoker.gate().config().max_concurrency,
                    "configured_rate": route.invoker.gate().config().rate,
                    "adaptive": route.invoker.gate().config().adaptive,
                },
            })
        })
        .collect();
    Json(serde_json::json!({ "routes": routes, "tracked_keys": app.admission.tracked_keys() }))
}

/// Puts the request's [`ClientKey`] into its extensions, or answers `401`/`403`/`400`.
async fn identify(State(app): State<Arc<App>>, mut request: Request, next: Next) -> Response {
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

async fn readyz(State(app): State<Arc<App>>) -> Response {
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
    State(app): State<Arc<App>>,
    index: usize,
    admitted: Option<Extension<Admitted>>,
    request: Request,
) -> Response {
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
        Err(err) => return respond::record_error("-", err),
    };
    let id = Arc::clone(&ticket.id);
    match tokio::time::timeout_at(deadline, ticket.outcome()).await {
        Ok(Ok(delivered)) => respond::delivered(&id, delivered),
        Ok(Err(err)) => respond::record_error(&id, err),
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

/// Runs sluicegate until `signal` resolves (SIGTERM/SIGINT from `main`).
pub async fn run(config: Config, signal: impl Future<Output = ()>) -> Result<(), StartError> {
    let running = start(config).await?;
    running.run_until(signal).await;
    Ok(())
}
