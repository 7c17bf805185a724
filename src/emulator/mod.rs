//! A local AWS Lambda emulator: the Invoke REST API, faithful enough that the real
//! `aws-sdk-lambda` client runs against it unchanged (`endpoint_url = "http://<listen>"`).
//!
//! # What it emulates
//!
//! - `POST /2015-03-31/functions/{name}/invocations` with `X-Amz-Invocation-Type`
//!   `RequestResponse` (default), `Event` or `DryRun`. Lambda's checks run in Lambda's order
//!   and fail the way Lambda fails, status, `x-amzn-ErrorType` and JSON body included:
//!   unknown function (404 `ResourceNotFoundException`), payload over 6 MB, or 1 MB for
//!   `Event` (413 `RequestTooLargeException`), payload not JSON (400
//!   `InvalidRequestContentException`), invoke quota spent (429 `TooManyRequestsException`,
//!   `Reason: CallerRateLimitExceeded`, `Retry-After`), reserved concurrency in use (429,
//!   `Reason: ReservedFunctionConcurrentInvocationLimitExceeded`). A run longer than the
//!   function's timeout answers 200 with `X-Amz-Function-Error: Unhandled` and Lambda's
//!   `Task timed out after N.NN seconds` message.
//! - `GET /2015-03-31/functions/{name}/configuration` (GetFunctionConfiguration) and
//!   `GET /2019-09-30/functions/{name}/concurrency` (GetFunctionConcurrency).
//! - Handlers that echo sluicegate batch envelopes and inject failures (every n-th record,
//!   a probability, or a `"poison": true` field), reported per record (`results` or
//!   `batchItemFailures`) or as a crash of the whole invocation.
//!
//! `GET /emulator/stats` (not a Lambda API) returns what the function saw, per function:
//! accepted invocations, records, throttles by reason, errors and peak concurrency. See
//! [`Stats`].
//!
//! # Guarantees
//!
//! - Reserved concurrency is never exceeded, and a concurrency slot is always released:
//!   slots are drop guards held by the run's own task. As in Lambda, a caller that
//!   disconnects does not stop its run, which keeps the slot until it finishes or times out
//!   — so a client retrying after a read timeout meets the throttle it would meet in AWS.
//! - `Event` invokes are accepted at once (202), then wait for a slot and run; they are
//!   never throttled for concurrency, only by the invoke quota.
//! - `Retry-After` is whole seconds, rounded up, at least 1: a client that honours it is
//!   never early for the invoke quota.
//! - All timing goes through `tokio::time`, so `tokio::time::pause()` drives it in tests.
//!
//! # Use
//!
//! `sluicegate emulate` runs [`serve`]; the default config embeds it next to the proxy;
//! tests bind `127.0.0.1:0` and call [`spawn`]:
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use sluicegate::emulator::{self, EmulatorConfig};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let lambda = emulator::spawn(EmulatorConfig::default(), listener).await?;
//! // Point aws-sdk-lambda at lambda.endpoint_url(), invoke "process-records", then:
//! let seen = lambda.stats().functions["process-records"].invocations;
//! # let _ = seen;
//! lambda.shutdown().await
//! # }
//! ```
//!
//! The emulator answers as account `123456789012` in `us-east-1` and ignores credentials,
//! signatures and `Qualifier`.

mod api;
mod config;
mod function;
mod handler;
mod stats;

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub use self::config::{EmulatorConfig, FailureMode, FunctionConfig, Handler, ResponseShape};
pub use self::stats::{FunctionStats, Stats, Throttles};

use self::function::Function;

/// The AWS account id in the ARNs the emulator reports.
pub const ACCOUNT_ID: &str = "123456789012";
/// The region in the ARNs the emulator reports.
pub const REGION: &str = "us-east-1";

/// The ARN of an emulated function, as it appears in responses.
pub fn function_arn(name: &str) -> String {
    format!("arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{name}")
}

/// A Lambda-style request id: a random UUID (version 4 layout).
pub(crate) fn request_id() -> String {
    let n: u128 = rand::random();
    // Set the version (4) and variant (10xx) bits so it reads as a v4 UUID.
    let n = (n & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let hex = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The emulated functions and their state. Cheap to clone: clones share the state.
#[derive(Clone, Debug)]
pub struct Emulator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: EmulatorConfig,
    functions: BTreeMap<String, Arc<Function>>,
    /// Set to `true` on shutdown; queued `Event` invokes give up waiting for a slot.
    closed: watch::Sender<bool>,
}

impl Emulator {
    /// Builds the functions of `cfg`, which should have passed [`EmulatorConfig::validate`]
    /// (if a name repeats anyway, the first definition wins).
    pub fn new(cfg: EmulatorConfig) -> Self {
        let mut functions = BTreeMap::new();
        for f in &cfg.functions {
            functions
                .entry(f.name.clone())
                .or_insert_with(|| Arc::new(Function::new(f.clone())));
        }
        let (closed, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                config: cfg,
                functions,
                closed,
            }),
        }
    }

    /// The config the emulator was built from.
    pub fn config(&self) -> &EmulatorConfig {
        &self.inner.config
    }

    /// Every route: the Lambda API and `GET /emulator/stats`.
    pub fn router(&self) -> axum::Router {
        api::router(self.clone())
    }

    /// What each function has seen so far (the body of `GET /emulator/stats`).
    pub fn stats(&self) -> Stats {
        Stats {
            functions: self
                .inner
                .functions
                .iter()
                .map(|(name, f)| (name.clone(), f.stats()))
                .collect(),
        }
    }

    /// Drops `Event` invokes still waiting for a concurrency slot. Runs already started
    /// finish on their own (each within its function's timeout).
    pub fn close(&self) {
        self.inner.closed.send_replace(true);
    }

    fn function(&self, name: &str) -> Option<Arc<Function>> {
        self.inner.functions.get(name).cloned()
    }

    fn closed(&self) -> watch::Receiver<bool> {
        self.inner.closed.subscribe()
    }
}

/// An emulator serving on a socket in a background task. Dropping it stops the server
/// abruptly; [`RunningEmulator::shutdown`] stops it gracefully.
#[derive(Debug)]
pub struct RunningEmulator {
    /// The address the emulator listens on.
    pub local_addr: SocketAddr,
    emulator: Emulator,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl RunningEmulator {
    /// `http://<local_addr>`, for `aws-sdk-lambda`'s `endpoint_url`.
    pub fn endpoint_url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// What each function has seen so far.
    pub fn stats(&self) -> Stats {
        self.emulator.stats()
    }

    /// The emulator being served.
    pub fn emulator(&self) -> &Emulator {
        &self.emulator
    }

    /// Stops accepting connections, waits for in-flight responses, and returns the server's
    /// result.
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            // The server task may already have ended; then there is nobody to tell.
            let _ = tx.send(());
        }
        let result = match self.task.take() {
            Some(task) => task.await.unwrap_or_else(|e| Err(io::Error::other(e))),
            None => Ok(()),
        };
        self.emulator.close();
        result
    }
}

impl Drop for RunningEmulator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.emulator.close();
    }
}

/// Serves the emulator of `cfg` on `listener` in a background task.
pub async fn spawn(cfg: EmulatorConfig, listener: TcpListener) -> io::Result<RunningEmulator> {
    let local_addr = listener.local_addr()?;
    let emulator = Emulator::new(cfg);
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(run(emulator.clone(), listener, async move {
        // A dropped sender also means stop.
        let _ = rx.await;
    }));
    Ok(RunningEmulator {
        local_addr,
        emulator,
        shutdown: Some(tx),
        task: Some(task),
    })
}

/// Binds `cfg.listen` and serves the emulator until `shutdown` completes, then waits for
/// in-flight responses. This is `sluicegate emulate`.
pub async fn serve(
    cfg: EmulatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let listener = TcpListener::bind(cfg.listen).await?;
    let emulator = Emulator::new(cfg);
    let result = run(emulator.clone(), listener, shutdown).await;
    emulator.close();
    result
}

async fn run(
    emulator: Emulator,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    use axum::serve::ListenerExt;

    let local_addr = listener.local_addr()?;
    let functions: Vec<&str> = emulator
        .inner
        .functions
        .keys()
        .map(String::as_str)
        .collect();
    tracing::info!(%local_addr, ?functions, "lambda emulator listening");
    // Responses are small and latency is what is being measured: don't let Nagle's
    // algorithm hold them back.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, emulator.router())
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_look_like_v4_uuids() {
        let id = request_id();
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(request_id(), id);
    }

    #[test]
    fn first_definition_of_a_repeated_name_wins() {
        let cfg = EmulatorConfig {
            functions: vec![
                FunctionConfig {
                    memory_size: 256,
                    ..FunctionConfig::new("f")
                },
                FunctionConfig::new("f"),
            ],
            ..EmulatorConfig::default()
        };
        let emulator = Emulator::new(cfg);
        assert_eq!(emulator.function("f").map(|f| f.cfg.memory_size), Some(256));
        assert_eq!(emulator.stats().functions.len(), 1);
    }
}
