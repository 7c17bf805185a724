//! The HTTP side: the data plane (record routes, `/healthz`, `/readyz`), the identity
//! step, the admission layer per route, the admin listener (axum), live reload and
//! graceful drain.
//!
//! Only this module knows HTTP. A record request goes: identity (key from API key / IP /
//! header, `401`/`403` when keys are required) → [`AdmissionLayer`](crate::limit::AdmissionLayer)
//! for its route (global → route → key, `429` on refusal) → body checks (`413`, `400`) →
//! the route's [`Batcher`](crate::coalesce::Batcher) → wait for the record's outcome until
//! the caller's deadline (`504`). Every status is produced in [`respond`]. A request with
//! `Content-Type: application/x-ndjson` is a bulk request (`bulk`): after identity, each of
//! its records is admitted, checked and submitted on its own, and the answer lists every
//! record's outcome.
//!
//! Reload (SIGHUP, `POST /admin/reload`): the new config is loaded and validated; if it is
//! invalid the running one stays and the reason is returned. Otherwise a new `App` is
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
//! Usage-quota counts (local backend): read from `limits.quota_state` at start when some
//! key has a quota, written by a background task at most once a second while they change,
//! and once more at shutdown after the last request was answered.
//!
//! Slow and hostile clients: a request head must arrive within `header_read_timeout`, a
//! record body within `body_read_timeout` (`408`, connection closed); at most
//! `max_connections` data-plane connections are open (more wait in the backlog), fewer
//! when the open-files limit needs a reserve for everything else.
//!
//! Layout: this file starts ([`start`]), runs ([`run`]) and stops ([`Running::shutdown`])
//! the server; `app` builds an `App` (one list of route entries) from a config;
//! `reload` holds the shared state and applies reloads; `listen` has the accept loops and
//! the connection cap; `records` is the data plane's request path (with `counters` and
//! `request_id`), `lambda_api` the Lambda Invoke API door and `bulk` the NDJSON bulk door on the same listener (Lambda's
//! paths, statuses and error shapes over the same record steps), `admin` the admin router, `identity` the client key, `readiness`
//! `/readyz`, and [`respond`] every status.

mod admin;
mod app;
mod bulk;
mod counters;
mod idempotent;
mod identity;
mod intake;
mod lambda_api;
mod listen;
mod parseable;
mod readiness;
mod records;
mod reload;
mod request_id;
pub mod respond;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::app::App;
use self::identity::IdentityError;
pub use self::identity::{client_ip, Identify, ANONYMOUS, MAX_KEY_BYTES};
use self::listen::{
    bind, connection_cap, fd_reserve, open_files_limit, serve_admin, serve_data, ADMIN_HEAD_TIMEOUT,
};
pub use self::reload::ReloadReport;
use self::reload::Server;
use crate::config::Config;
use crate::emulator::RunningEmulator;
use crate::invoke;
use crate::invoke::discover::{self, Finding};

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

/// A running sluicegate: its bound addresses and a way to reload or stop it.
pub struct Running {
    /// Where the data plane listens (`server.listen`, with the port the OS chose for `:0`).
    pub addr: SocketAddr,
    /// Where the admin listener (`/metrics`, `/admin/*`) listens.
    pub admin_addr: SocketAddr,
    /// The embedded emulator's address, when `[emulator] enabled = true`.
    pub emulator_addr: Option<SocketAddr>,
    server: Arc<Server>,
    stop: watch::Sender<bool>,
    data: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
    /// Tells the usage-quota saver that the data plane has drained.
    drained: watch::Sender<bool>,
    usage: JoinHandle<()>,
    emulator: Option<RunningEmulator>,
}

impl Running {
    /// Applies a new config (see the module docs); an invalid one is refused and the
    /// running config stays.
    pub async fn reload(&self, config: Config) -> Result<ReloadReport, String> {
        self.server.reload(config).await
    }

    /// Reloads from the config file sluicegate was started with.
    pub async fn reload_from_file(&self) -> Result<ReloadReport, String> {
        self.server.reload_from_source().await
    }

    /// Stops accepting and drains: in-flight requests finish; after `shutdown_grace`,
    /// records not yet sent to Lambda are answered `503`, and invokes in flight still
    /// answer their callers (bounded by `lambda.read_timeout`).
    pub async fn shutdown(mut self) {
        let config = self.server.app().config.clone();
        let _ = self.stop.send(true);
        if tokio::time::timeout(config.server.shutdown_grace, &mut self.data)
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over: answering records not yet sent with 503");
            for closer in self.server.closers.lock().iter() {
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
        let _ = self.drained.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let _ = self.usage.await;
        // Every request is answered (or abandoned) by now: nothing counts after this save.
        save_usage(&self.server).await;
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
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(bind_error)?;
        // The embedded emulator is the target only when `endpoint_url` names it; when it
        // was asked for port 0 (tests) the endpoint follows the port it got.
        let embedded = crate::aws::start_embedded_emulator(&mut config, listener)
            .await
            .map_err(bind_error)?;
        tracing::info!(addr = %embedded.running.local_addr, "embedded Lambda emulator listening");
        targets_emulator = embedded.targeted;
        emulator_url = Some(embedded.url);
        emulator = Some(embedded.running);
    }
    let emulator_addr = emulator.as_ref().map(|e| e.local_addr);
    let endpoint = endpoint_label(&config, targets_emulator);
    log_endpoints(&config, &endpoint, targets_emulator);

    let client = invoke::build_client(&config.lambda)
        .await
        .map_err(StartError::Pipeline)?;
    check_fit(&config, client.sdk()).await?;
    let app = App::build(config, &client, endpoint, None)
        .await
        .map_err(StartError::Pipeline)?;
    // With Redis the counts live there; the local counters only follow them.
    if app.admission.has_usage_quotas() && app.admission.backend().is_none() {
        let path = app.config.limits.quota_state.clone();
        let counters = Arc::clone(app.admission.usage_counters());
        let now = app.admission.wall_clock().now();
        // Start-up, before serving: blocking here delays nothing but the start.
        tokio::task::spawn_blocking(move || counters.load(&path, now))
            .await
            .map_err(|e| StartError::Pipeline(std::io::Error::other(e)))?;
    }
    let closers = app.routes.iter().map(|r| r.batcher().closer()).collect();
    let server = Arc::new(Server {
        app: ArcSwap::new(Arc::clone(&app)),
        client,
        source,
        closers: parking_lot::Mutex::new(closers),
        metrics: crate::metrics::install(),
        emulator_url,
    });

    let (stop, stopped) = watch::channel(false);
    let settings = &app.config.server;
    let (listener, local) = bind("server", settings.listen).await?;
    let (admin_listener, admin_local) = bind("admin", settings.admin_listen).await?;

    let cap = connection_cap(
        settings.max_connections,
        open_files_limit(),
        fd_reserve(&app.config),
    );
    let data = tokio::spawn(serve_data(
        listener,
        Arc::clone(&server),
        cap,
        stopped.clone(),
    ));
    let admin_router = admin::router(Arc::clone(&server), !admin_local.ip().is_loopback());
    let tasks = vec![
        tokio::spawn(serve_admin(
            admin_listener,
            admin_router,
            settings.header_read_timeout.min(ADMIN_HEAD_TIMEOUT),
            settings.shutdown_grace,
            stopped.clone(),
        )),
        tokio::spawn(reclaim_keys(
            Arc::clone(&server),
            app.config.limits.reclaim_interval,
            stopped.clone(),
        )),
    ];
    // Saves go on while requests drain: stopped only once the data plane has finished.
    let (drained, drained_rx) = watch::channel(false);
    let usage = tokio::spawn(persist_usage(Arc::clone(&server), drained_rx));
    tracing::info!(addr = %local, admin = %admin_local, "sluicegate listening");
    Ok(Running {
        addr: local,
        admin_addr: admin_local,
        emulator_addr,
        server,
        stop,
        data,
        tasks,
        drained,
        usage,
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

/// Idle (full) buckets carry no information: dropping them keeps memory bounded by the
/// active keys, not by every key ever seen.
async fn reclaim_keys(server: Arc<Server>, every: Duration, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => server.app().admission.reclaim(),
            _ = stopped.wait_for(|stop| *stop) => return,
        }
    }
}

/// How often changed usage-quota counters are written to `limits.quota_state`.
const USAGE_SAVE_EVERY: Duration = Duration::from_secs(1);

/// Writes changed usage-quota counters at most once a second, so a crash loses at most
/// about a second of counts — also while requests drain at shutdown (`stopped` turns once the
/// data plane has finished); the final save is [`Running::shutdown`]'s.
async fn persist_usage(server: Arc<Server>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(USAGE_SAVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The save runs outside `select!`: the stop signal's guard must not live across it.
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        save_usage(&server).await;
    }
}

/// Saves the usage counters when they changed, off the async runtime (file I/O and fsync).
/// With the Redis backend Redis holds the counts and nothing is written; a failure is
/// logged and retried at the next save.
async fn save_usage(server: &Server) {
    let app = server.app();
    let counters = Arc::clone(app.admission.usage_counters());
    if !counters.is_dirty() || app.admission.backend().is_some() {
        return;
    }
    let path = app.config.limits.quota_state.clone();
    let now = app.admission.wall_clock().now();
    let saved = tokio::task::spawn_blocking(move || {
        let saved = counters.save(&path, now);
        (path, saved)
    })
    .await;
    match saved {
        Ok((_, Ok(()))) => {}
        Ok((path, Err(error))) => tracing::error!(
            path = %path.display(),
            %error,
            "could not save usage-quota counters; retrying in a second"
        ),
        Err(error) => tracing::error!(%error, "usage-quota save task failed"),
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
