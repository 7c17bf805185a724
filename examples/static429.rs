//! The ceiling for the load tests: a bare HTTP/1 server that answers every request
//! `429 Too Many Requests` with `retry-after: 1` and a small JSON body, the same shape
//! sluicegate sends when it sheds. It does no admission work at all, so its throughput
//! is the most any shedding proxy can reach on this machine with the same HTTP stack
//! (axum over hyper 1 on tokio, as sluicegate uses).
//!
//! It reads each request's body to the end before answering, as a real proxy must, so
//! that keep-alive connections stay in sync and the comparison is fair.
//!
//! ```sh
//! cargo run --release --example static429 -- 127.0.0.1:18429
//! ```
//!
//! Used by `loadtest/run.sh shed`; stops on SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;

use axum::body::Bytes;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;

const BODY: &str = r#"{"error":"rate_limited","scope":"key","retry_after_ms":1000}"#;

/// Every request ends here. Taking `Bytes` makes axum read the whole body first.
async fn shed(_body: Bytes) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [
            (header::RETRY_AFTER, HeaderValue::from_static("1")),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ],
        BODY,
    )
        .into_response()
}

async fn shutdown_signal() {
    let ctrl_c = async {
        // If the handler cannot be installed, wait for SIGTERM only.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: static429 ADDR   (e.g. 127.0.0.1:18429)");
        return ExitCode::FAILURE;
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("error: bad address {addr:?}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("error: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let app = Router::new().fallback(shed);
    eprintln!("static429 listening on {addr}");
    match axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
