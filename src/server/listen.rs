//! The listeners: the data plane's and the admin listener's accept loops (hyper HTTP/1,
//! head/idle timeouts, a connection cap taken before `accept`, back-off when `accept`
//! fails) and the cap itself — `server.max_connections`, lowered to leave the open-files
//! limit a reserve for everything that is not a data-plane connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::records;
use super::reload::Server;
use super::request_id::RequestIds;
use super::StartError;
use crate::config::Config;

/// Serves one accepted connection with `service` on hyper's HTTP/1 server (`head_timeout`
/// for a request's head and for idling between requests, a bounded read buffer), watched by
/// `graceful` so shutdown can drain it, as a task of `connections` so aborting the listener
/// aborts it. `permit` — the connection's place under the cap — is given back when the
/// connection, and its descriptor, is gone.
fn spawn_connection<S>(
    connections: &mut tokio::task::JoinSet<()>,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
    stream: tokio::net::TcpStream,
    service: S,
    head_timeout: Duration,
    permit: tokio::sync::OwnedSemaphorePermit,
) where
    S: hyper::service::HttpService<hyper::body::Incoming> + Send + 'static,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(READ_BUFFER_BYTES)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let connection = graceful.watch(connection);
    // Reap the tasks of connections that have ended, so the set holds only live ones.
    while connections.try_join_next().is_some() {}
    connections.spawn(async move {
        if let Err(e) = connection.await {
            tracing::trace!(error = %e, "connection ended with an error");
        }
        drop(permit);
    });
}

/// Binds `addr` for the listener named `what`; returns the listener and its actual address.
pub(super) async fn bind(
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
pub(super) fn fd_reserve(config: &Config) -> u64 {
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
pub(super) const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// hyper's per-connection read buffer bound (its default is about 400 KiB). It also bounds
/// a request's head; 64 KiB is far above any head a producer sends, and keeps an idle or
/// stalled connection from holding more than this.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits` (Linux); `None` when
/// unlimited or unknown.
pub(super) fn open_files_limit() -> Option<u64> {
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
pub(super) fn connection_cap(configured: u32, open_files: Option<u64>, reserve: u64) -> usize {
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
pub(super) async fn serve_data(
    listener: TcpListener,
    server: Arc<Server>,
    cap: usize,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let ids = RequestIds::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(cap));
    let stop = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stop);
    let mut backing_off = false;
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
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
        let head_timeout = server.app().config.server.header_read_timeout;
        let service = records::DataPlane {
            server: Arc::clone(&server),
            peer,
            ids: ids.connection(),
        };
        spawn_connection(
            &mut connections,
            &graceful,
            stream,
            service,
            head_timeout,
            permit,
        );
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
pub(super) async fn serve_admin(
    listener: TcpListener,
    router: axum::Router,
    head_timeout: Duration,
    grace: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let stop = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
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
        spawn_connection(
            &mut connections,
            &graceful,
            stream,
            service,
            head_timeout,
            permit,
        );
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
