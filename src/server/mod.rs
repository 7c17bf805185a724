//! The HTTP side: the data plane (record routes, `/healthz`, `/readyz`), the identity
//! step, the admission layer per route, the admin listener (axum), live reload and
//! graceful drain.
//!
//! Only this module knows HTTP. A record request goes: identity (key from API key / IP /
//! header, `401`/`403` when keys are required) → [`AdmissionLayer`](crate::limit::AdmissionLayer)
//! for its route (global → route → key, `429` on refusal) → body checks (`413`, `400`) →
//! the route's [`Batcher`] → wait for the record's outcome until the caller's deadline
//! (`504`). Every status is produced in [`respond`].
//!
//! Reload (SIGHUP, `POST /admin/reload`): the new config is loaded and validated; if it is
//! invalid the running one stays and the reason is returned. Otherwise a new [`App`] is
//! built — limits, plans, identity, routes and batch settings — and swapped in. Routes whose
//! batching and invoke settings did not change keep their batcher (and queue); every
//! function keeps its one gate, reconfigured in place when its invoke limits changed, so a
//! replaced batcher draining its last batches and its successor share the same permits;
//! bucket state carries over for layers whose quota did not change. Connections stay open:
//! the listener dispatches each request to whichever app is current. Listener addresses,
//! `[lambda]` and `[emulator]` need a restart and are reported as such.
//!
//! Where records go: the embedded emulator only when `lambda.endpoint_url` names it
//! ([`Config::targets_embedded_emulator`]); without `endpoint_url`, real AWS. Start-up logs
//! each route's endpoint (a warning for the emulator); `/readyz` and `/admin/routes` show it.
//!
//! Shutdown (SIGTERM/SIGINT): stop accepting, let in-flight requests finish; when
//! `shutdown_grace` runs out, records not yet sent to Lambda are answered `503`, while
//! invokes already in flight still answer their callers (Lambda may have processed them).
//! Admin connections get `shutdown_grace` too and are then dropped, so no admin client
//! (a half-sent request, an idle keep-alive) holds the process.
//!
//! Slow and hostile clients: a request head must arrive within `header_read_timeout`, a
//! record body within `body_read_timeout` (`408`, connection closed); at most
//! `max_connections` data-plane connections are open (more wait in the backlog), fewer
//! when the open-files limit needs a reserve for everything else.

mod admin;
mod identity;
mod parseable;
mod readiness;
mod records;
pub mod respond;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use self::identity::{client_ip, Identify, IdentityError, ANONYMOUS, MAX_KEY_BYTES};
use self::readiness::Readiness;
use crate::coalesce::{Batcher, Closer};
use crate::config::{Config, RouteConfig};
use crate::emulator::{self, RunningEmulator};
use crate::invoke::discover::{self, Finding};
use crate::invoke::{self, Invoker};
use crate::limit::{Admission, DefaultClock, Plans, RedisBackend};
use crate::pipeline::Pipeline;

/// Header with which a caller shortens (never lengthens) its route's deadline.
pub const TIMEOUT_HEADER: &str = "x-sluicegate-timeout-ms";

/// Why sluicegate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind its address.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener: the data plane, the admin listener or the emulator.
        what: &'static str,
        /// The address it was given.
        addr: SocketAddr,
        /// The operating system's refusal.
        source: std::io::Error,
    },
    /// The routes could not be assembled (a dead-letter sink could not be opened).
    #[error("{0}")]
    Pipeline(std::io::Error),
    /// Discovery found the config does not fit a function, and `lambda.strict` refuses that.
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
    name: String,
    path: String,
    batcher: Batcher,
    invoker: Arc<Invoker>,
    request_timeout: Duration,
    max_record_bytes: usize,
    /// Deepest nesting of arrays and objects a record may have (from `server.max_json_depth`
    /// and the route's envelope).
    max_json_depth: u32,
    body_read_timeout: Duration,
}

impl Route {
    fn policies(&self) -> respond::Policies {
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

/// Where the data plane's invokes go, as `/readyz` and `/admin/routes` show it:
/// `"emulator"` (the embedded one), `"aws"` (SDK endpoint resolution: the regional
/// endpoint, or `AWS_ENDPOINT_URL_LAMBDA` when set) or the configured URL (credentials
/// redacted). Fixed for the process: `[lambda]` and `[emulator]` need a restart.
fn endpoint_label(config: &Config, emulator: bool) -> Arc<str> {
    match (&config.lambda.endpoint_url, emulator) {
        (_, true) => "emulator".into(),
        (None, false) => "aws".into(),
        // Any user-info in the URL is not shown.
        (Some(url), false) => crate::config::redact::url(url).into(),
    }
}

/// Everything a request needs; replaced whole on reload.
struct App {
    routes: Vec<Arc<Route>>,
    /// The record routes as the data plane dispatches them (same order as `routes`).
    endpoints: Vec<records::Endpoint>,
    identify: Identify,
    admission: Arc<Admission<DefaultClock>>,
    readiness: Readiness,
    config: Config,
    /// See [`endpoint_label`].
    endpoint: Arc<str>,
}

/// The admission layers of `config`, decided in Redis when `backend` is given (the
/// pipeline's, so admission and invoke gates share one connection and one health state).
/// With a previous admission (reload), bucket state is carried over where the quotas did
/// not change.
fn build_admission(
    config: &Config,
    previous: Option<&Admission<DefaultClock>>,
    backend: Option<RedisBackend>,
) -> Arc<Admission<DefaultClock>> {
    let global = config.limits.global;
    let routes = config
        .routes
        .iter()
        .map(|r| (r.name.clone(), r.limit))
        .collect();
    let plans = Plans::new(
        config.limits.default,
        config
            .plans
            .iter()
            .map(|p| (p.name.clone(), p.quota(), p.keys.clone()))
            .collect(),
    );
    let max_keys = config.limits.max_keys;
    let admission = match previous {
        Some(previous) => previous.reconfigured(global, routes, plans, max_keys),
        None => Admission::new(global, routes, plans, max_keys, DefaultClock::default()),
    };
    Arc::new(admission.with_backend(backend))
}

/// Whether a route's records can keep flowing through the same batcher and gate.
fn same_pipeline(a: &RouteConfig, b: &RouteConfig) -> bool {
    let strip = |r: &RouteConfig| RouteConfig {
        limit: None,
        path: None,
        ..r.clone()
    };
    strip(a) == strip(b)
}

impl App {
    async fn build(
        config: Config,
        client: &aws_sdk_lambda::Client,
        endpoint: Arc<str>,
        previous: Option<&App>,
    ) -> std::io::Result<Arc<App>> {
        // A reload keeps the Redis connection (and its health state) when [limits] did not
        // change how to reach it.
        let backend = crate::pipeline::limit_backend(
            &config.limits,
            previous.and_then(|p| p.admission.backend()),
        )
        .await?;
        // One invoker (and gate) per function for the life of the process: the batchers a
        // reload replaces drain on the same permits as their successors.
        let previous_invokers: Vec<Arc<Invoker>> = previous
            .map(|p| p.routes.iter().map(|r| Arc::clone(&r.invoker)).collect())
            .unwrap_or_default();
        let pipeline =
            Pipeline::build_with(&config, client, true, backend, &previous_invokers).await?;
        let mut routes = Vec::with_capacity(config.routes.len());
        for (handle, cfg) in pipeline.routes.into_iter().zip(&config.routes) {
            let kept = previous.and_then(|p| {
                let (old_cfg, old) = p
                    .config
                    .routes
                    .iter()
                    .zip(&p.routes)
                    .find(|(c, _)| c.name == cfg.name)?;
                same_pipeline(old_cfg, cfg).then(|| (old.batcher.clone(), Arc::clone(&old.invoker)))
            });
            let (batcher, invoker) = kept.unwrap_or((handle.batcher, handle.invoker));
            routes.push(Arc::new(Route {
                name: cfg.name.clone(),
                path: cfg.path(),
                batcher,
                invoker,
                request_timeout: cfg.request_timeout(&config.server),
                max_record_bytes: config.server.max_record_bytes.as_usize(),
                max_json_depth: parseable::record_depth_limit(
                    config.server.max_json_depth,
                    cfg.envelope,
                ),
                body_read_timeout: config.server.body_read_timeout,
            }));
        }
        let admission = build_admission(
            &config,
            previous.map(|p| &*p.admission),
            pipeline.limit_backend.clone(),
        );
        let functions: Vec<String> = config.routes.iter().map(|r| r.function.clone()).collect();
        Ok(Arc::new(App {
            endpoints: records::endpoints(&routes, &admission),
            routes,
            identify: Identify::new(&config.identity),
            admission,
            readiness: Readiness::new(client.clone(), functions, Arc::clone(&endpoint)),
            config,
            endpoint,
        }))
    }
}

/// What the listeners share: the current app, and how to build the next one.
struct Shared {
    /// Read on every request: an `ArcSwap` loads without writing to a lock word that both
    /// cores would fight over.
    app: ArcSwap<App>,
    client: aws_sdk_lambda::Client,
    /// Where reloads read from; `None` when started from an in-memory config.
    source: Option<PathBuf>,
    /// Every batcher ever built, so shutdown can close the ones still draining after a reload.
    closers: parking_lot::Mutex<Vec<Closer>>,
    metrics: Option<PrometheusHandle>,
    /// The embedded emulator's actual URL when it runs, so a reloaded config that names
    /// it keeps pointing at it (see [`Config::targets_embedded_emulator`]).
    emulator_url: Option<String>,
}

/// What a reload did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReloadReport {
    /// Changed settings that only take effect after a restart (they were left as they are).
    pub restart_required: Vec<String>,
}

impl Shared {
    fn app(&self) -> Arc<App> {
        self.app.load_full()
    }

    /// Points the Lambda endpoint at the embedded emulator the way `start` did: only when
    /// the reloaded config names it.
    fn fix_endpoint(&self, config: &mut Config) {
        if let Some(actual) = &self.emulator_url {
            config.retarget_embedded_emulator(actual);
        }
    }

    async fn reload_from_source(&self) -> Result<ReloadReport, String> {
        let Some(path) = &self.source else {
            return Err(
                "sluicegate was started without a config file; nothing to reload".to_owned(),
            );
        };
        let config = Config::load(path).map_err(|e| e.to_string())?;
        self.reload(config).await
    }

    async fn reload(&self, mut config: Config) -> Result<ReloadReport, String> {
        config.validate().map_err(|e| e.to_string())?;
        self.fix_endpoint(&mut config);
        let current = self.app();
        let old = &current.config;
        let mut report = ReloadReport::default();
        if config.server.listen != old.server.listen {
            report.restart_required.push("server.listen".to_owned());
            config.server.listen = old.server.listen;
        }
        if config.server.admin_listen != old.server.admin_listen {
            report
                .restart_required
                .push("server.admin_listen".to_owned());
            config.server.admin_listen = old.server.admin_listen;
        }
        if config.lambda != old.lambda {
            report.restart_required.push("lambda".to_owned());
            config.lambda = old.lambda.clone();
        }
        if config.emulator != old.emulator {
            report.restart_required.push("emulator".to_owned());
            config.emulator = old.emulator.clone();
        }
        let next = App::build(
            config,
            &self.client,
            Arc::clone(&current.endpoint),
            Some(&current),
        )
        .await
        .map_err(|e| e.to_string())?;
        self.closers
            .lock()
            .extend(next.routes.iter().map(|r| r.batcher.closer()));
        self.app.store(next);
        tracing::info!(restart_required = ?report.restart_required, "config reloaded");
        Ok(report)
    }
}

/// A running sluicegate: its bound addresses and a way to reload or stop it.
pub struct Running {
    /// Where the data plane listens (`server.listen`, with the port the OS chose for `:0`).
    pub addr: SocketAddr,
    /// Where the admin listener (`/metrics`, `/admin/*`) listens.
    pub admin_addr: SocketAddr,
    /// The embedded emulator's address, when `[emulator] enabled = true`.
    pub emulator_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    data: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
    emulator: Option<RunningEmulator>,
}

impl Running {
    /// Applies a new config (see the module docs); an invalid one is refused and the
    /// running config stays.
    pub async fn reload(&self, config: Config) -> Result<ReloadReport, String> {
        self.shared.reload(config).await
    }

    /// Reloads from the config file sluicegate was started with.
    pub async fn reload_from_file(&self) -> Result<ReloadReport, String> {
        self.shared.reload_from_source().await
    }

    /// Stops accepting and drains: in-flight requests finish; after `shutdown_grace`,
    /// records not yet sent to Lambda are answered `503`, and invokes in flight still
    /// answer their callers (bounded by `lambda.read_timeout`).
    pub async fn shutdown(mut self) {
        let config = self.shared.app().config.clone();
        let _ = self.stop.send(true);
        if tokio::time::timeout(config.server.shutdown_grace, &mut self.data)
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over: answering records not yet sent with 503");
            for closer in self.shared.closers.lock().iter() {
                closer.close();
            }
            let bound = config.lambda.read_timeout + Duration::from_secs(5);
            if tokio::time::timeout(bound, &mut self.data).await.is_err() {
                tracing::error!(
                    "requests still open after the grace period and the read timeout; closing them"
                );
                self.data.abort();
            }
        }
        for task in self.tasks {
            let _ = task.await;
        }
        if let Some(emulator) = self.emulator {
            if let Err(e) = emulator.shutdown().await {
                tracing::warn!(error = %e, "emulator did not stop cleanly");
            }
        }
        tracing::info!("stopped");
    }
}

/// [`start_with_source`] without a config file to reload from.
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with_source(config, None).await
}

/// Binds the listeners (data plane, admin, and the embedded emulator when enabled) and
/// starts serving. Port 0 anywhere picks a free port; [`Running`] tells which. `source`
/// is the file reloads read.
pub async fn start_with_source(
    mut config: Config,
    source: Option<PathBuf>,
) -> Result<Running, StartError> {
    let mut emulator = None;
    let mut emulator_url = None;
    let mut targets_emulator = false;
    if config.emulator.enabled {
        let addr = config.emulator.listen;
        let bind_error = |source| StartError::Bind {
            what: "emulator",
            addr,
            source,
        };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let running = emulator::spawn(config.emulator.clone(), listener)
            .await
            .map_err(bind_error)?;
        // The embedded emulator is the target only when `endpoint_url` names it; when it
        // was asked for port 0 (tests) the endpoint follows the port it got.
        let actual = running.endpoint_url();
        targets_emulator = config.retarget_embedded_emulator(&actual);
        tracing::info!(addr = %running.local_addr, "embedded Lambda emulator listening");
        emulator_url = Some(actual);
        emulator = Some(running);
    }
    let emulator_addr = emulator.as_ref().map(|e| e.local_addr);
    let endpoint = endpoint_label(&config, targets_emulator);
    log_endpoints(&config, &endpoint, targets_emulator);

    let client = invoke::build_client(&config.lambda).await;
    check_fit(&config, &client).await?;
    let app = App::build(config, &client, endpoint, None)
        .await
        .map_err(StartError::Pipeline)?;
    let closers = app.routes.iter().map(|r| r.batcher.closer()).collect();
    let shared = Arc::new(Shared {
        app: ArcSwap::new(Arc::clone(&app)),
        client,
        source,
        closers: parking_lot::Mutex::new(closers),
        metrics: crate::metrics::install(),
        emulator_url,
    });

    let (stop, stopped) = watch::channel(false);
    let server = &app.config.server;
    let (listener, local) = bind("server", server.listen).await?;
    let (admin_listener, admin_local) = bind("admin", server.admin_listen).await?;

    let cap = connection_cap(
        server.max_connections,
        open_files_limit(),
        fd_reserve(&app.config),
    );
    let data = tokio::spawn(serve_data(
        listener,
        Arc::clone(&shared),
        cap,
        stopped.clone(),
    ));
    let admin_router = admin::router(Arc::clone(&shared), !admin_local.ip().is_loopback());
    let tasks = vec![
        tokio::spawn(serve_admin(
            admin_listener,
            admin_router,
            server.header_read_timeout.min(ADMIN_HEAD_TIMEOUT),
            server.shutdown_grace,
            stopped.clone(),
        )),
        tokio::spawn(reclaim_keys(
            Arc::clone(&shared),
            app.config.limits.reclaim_interval,
            stopped,
        )),
    ];
    tracing::info!(addr = %local, admin = %admin_local, "sluicegate listening");
    Ok(Running {
        addr: local,
        admin_addr: admin_local,
        emulator_addr,
        shared,
        stop,
        data,
        tasks,
        emulator,
    })
}

/// One line per route saying where its records go; a warning when that is the embedded
/// emulator, so nobody mistakes its echoes for production.
fn log_endpoints(config: &Config, endpoint: &str, emulator: bool) {
    for route in &config.routes {
        if emulator {
            tracing::warn!(
                route = %route.name,
                function = %route.function,
                endpoint = config.lambda.endpoint_url.as_deref().unwrap_or_default(),
                "records go to the embedded emulator, not AWS"
            );
        } else {
            tracing::info!(
                route = %route.name,
                function = %route.function,
                endpoint,
                region = %config.lambda.region,
                "records go to Lambda"
            );
        }
    }
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| StartError::Bind { what, addr, source })?;
    Ok((listener, local))
}

/// File descriptors kept free for what is not a data-plane connection and not counted
/// elsewhere: Redis connections, the dead-letter file, the emulator, logs. Without a
/// reserve, clients that hold connections open can take every descriptor and lock out the
/// admin port and the invokes that would answer them.
const FD_RESERVE: u64 = 256;

/// Descriptors the data plane must leave free: [`FD_RESERVE`], the admin listener's
/// connections, and one Lambda connection per invoke a route may have in flight.
fn fd_reserve(config: &Config) -> u64 {
    let invokes: u64 = config
        .routes
        .iter()
        .map(|r| u64::from(r.invoke.max_concurrency.get()))
        .sum();
    FD_RESERVE + ADMIN_MAX_CONNECTIONS as u64 + invokes
}

/// Admin connections open at once: scrapes and operators, never many.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The longest an admin client may take to send a request's head, or stay idle between
/// requests.
const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// hyper's per-connection read buffer bound (its default is about 400 KiB). It also bounds
/// a request's head; 64 KiB is far above any head a producer sends, and keeps an idle or
/// stalled connection from holding more than this.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits` (Linux); `None` when
/// unlimited or unknown.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `server.max_connections`, lowered (and logged) when the open-files limit cannot hold
/// that many connections plus `reserve` ([`fd_reserve`]); a small limit keeps at least
/// half for the reserve.
fn connection_cap(configured: u32, open_files: Option<u64>, reserve: u64) -> usize {
    let configured = u64::from(configured);
    let Some(limit) = open_files else {
        return configured as usize;
    };
    let room = if limit > 2 * reserve {
        limit - reserve
    } else {
        (limit / 2).max(1)
    };
    if room < configured {
        tracing::warn!(
            max_connections = configured,
            open_files_limit = limit,
            effective = room,
            "server.max_connections lowered to fit the open-files limit (raise `ulimit -n` for more)"
        );
        room as usize
    } else {
        configured as usize
    }
}

/// The data plane's accept loop. Each request goes to whichever app is current, so a
/// reload never drops a connection. On stop: no more accepts, each connection finishes the
/// request it is in and closes; returns when all are closed.
///
/// Connections are served by hyper's HTTP/1 server directly (keep-alive, pipelining,
/// `TCP_NODELAY`, `server.header_read_timeout` for a request's head — which also closes a
/// keep-alive connection idle that long — so a slow client cannot hold a connection
/// forever; a record's body has `server.body_read_timeout`). Connection tasks live in a
/// `JoinSet`: if this task is aborted (shutdown ran out of time), they are aborted with it.
///
/// At most `cap` connections are open: the loop takes a permit *before* accepting, so at
/// the cap new connections wait in the kernel's backlog (and see the server as slow, not
/// broken) instead of being accepted and dropped in a spin. When `accept` itself fails for
/// lack of descriptors, the loop backs off instead of retrying at once.
async fn serve_data(
    listener: TcpListener,
    shared: Arc<Shared>,
    cap: usize,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let ids = records::RequestIds::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    let stop = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stop);
    let mut backing_off = false;
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = &mut stop => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning, and
                    // say so once per episode rather than ten times a second.
                    if !backing_off {
                        tracing::warn!(error = %e, "accept failed; backing off");
                        backing_off = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = &mut stop => break,
                    }
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        backing_off = false;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        // Read per connection, so a reload applies to the connections after it.
        let head_timeout = shared.app().config.server.header_read_timeout;
        let service = records::DataPlane {
            shared: Arc::clone(&shared),
            peer,
            ids: ids.connection(),
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(head_timeout)
            .max_buf_size(READ_BUFFER_BYTES)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::trace!(error = %e, "connection ended with an error");
            }
            // The slot frees when the connection (and its descriptor) is gone.
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Accept errors that concern one connection only (the peer gave up before it was
/// accepted): the listener is fine, so accept the next one at once.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::Interrupted
    )
}

/// The admin listener's accept loop: the same hyper HTTP/1 server as the data plane, with
/// a head/idle timeout, a small connection cap and the same back-off on `accept` errors.
///
/// On stop it stops accepting and gives open admin requests until `grace` to finish; then
/// the remaining connections (a half-sent request, an idle keep-alive) are dropped, so no
/// admin client can keep the process from exiting.
async fn serve_admin(
    listener: TcpListener,
    router: axum::Router,
    head_timeout: Duration,
    grace: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let stop = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stop);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = &mut stop => break,
                    }
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                tower::ServiceExt::oneshot(router.clone(), request)
            });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(head_timeout)
            .max_buf_size(READ_BUFFER_BYTES)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::trace!(error = %e, "admin connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("admin connections still open after the grace period; closing them");
    }
    // Dropping the set aborts whatever is left.
    drop(connections);
}

/// Idle (full) buckets carry no information: dropping them keeps memory bounded by the
/// active keys, not by every key ever seen.
async fn reclaim_keys(shared: Arc<Shared>, every: Duration, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => shared.app().admission.reclaim(),
            _ = stopped.wait_for(|stop| *stop) => return,
        }
    }
}

/// Runs sluicegate until `shutdown` resolves; each item of `reloads` reloads the config
/// from `source` (SIGHUP in `main`). A failed reload is logged and the running config stays.
pub async fn run(
    config: Config,
    source: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
    mut reloads: tokio::sync::mpsc::Receiver<()>,
) -> Result<(), StartError> {
    let running = start_with_source(config, source).await?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = reloads.recv() => match running.reload_from_file().await {
                Ok(report) => tracing::info!(?report, "reloaded on SIGHUP"),
                Err(e) => tracing::error!(error = %e, "reload refused; the running config stays"),
            },
        }
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{connection_cap, fd_reserve, open_files_limit, ADMIN_MAX_CONNECTIONS, FD_RESERVE};
    use crate::config::Config;

    #[test]
    fn the_connection_cap_leaves_a_reserve_of_descriptors() {
        const R: u64 = FD_RESERVE;
        assert_eq!(connection_cap(10_000, None, R), 10_000);
        assert_eq!(connection_cap(10_000, Some(1 << 20), R), 10_000);
        assert_eq!(connection_cap(10_000, Some(4096), R), (4096 - R) as usize);
        // A small limit keeps half for everything else.
        assert_eq!(connection_cap(10_000, Some(512), R), 256);
        assert_eq!(connection_cap(10_000, Some(100), R), 50);
        assert_eq!(connection_cap(20, Some(100), R), 20);
        assert_eq!(connection_cap(10_000, Some(1), R), 1);
    }

    #[test]
    fn the_reserve_counts_every_invoke_a_route_may_have_in_flight() {
        let config = Config::from_toml(
            "[[routes]]\nname = \"a\"\nfunction = \"f\"\ninvoke = { max_concurrency = 1000 }\n\
             [[routes]]\nname = \"b\"\nfunction = \"g\"\ninvoke = { max_concurrency = 30 }\n",
        )
        .expect("valid");
        let reserve = fd_reserve(&config);
        assert_eq!(reserve, FD_RESERVE + ADMIN_MAX_CONNECTIONS as u64 + 1030);
        // `ulimit -n 4096` with 1000 invokes in flight: the data plane gets what is left.
        assert_eq!(
            connection_cap(10_000, Some(4096), reserve),
            (4096 - reserve) as usize
        );
    }

    #[test]
    fn the_open_files_limit_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(open_files_limit().is_some_and(|n| n > 0));
        }
    }
}
