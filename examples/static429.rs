//! The ceiling for the load tests: a bare hyper HTTP/1 server that answers every request
//! `429 Too Many Requests` with `retry-after: 1` and a small JSON body, the same shape
//! sluicegate sends when it sheds. It does no admission work at all, so its throughput
//! is the most any shedding proxy can reach on this machine with the same HTTP stack
//! (hyper 1 on tokio's multi-threaded runtime, one accept loop, `TCP_NODELAY`, as
//! sluicegate's data plane is served).
//!
//! It reads each request's body to the end before answering, as a real proxy must, so
//! that keep-alive connections stay in sync and the comparison is fair.
//!
//! ```sh
//! cargo run --release --example static429 -- 127.0.0.1:18429
//! ```
//!
//! Used by `loadtest/run.sh shed`; stops on SIGINT or SIGTERM.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

const BODY: &str = r#"{"error":"rate_limited","scope":"key","retry_after_ms":1000}"#;

/// Every request ends here, after its body has been read.
async fn shed(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // A broken body changes nothing: the answer is the same.
    let _ = request.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(BODY.as_bytes())));
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let headers = response.headers_mut();
    headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(shed))
                .await;
        });
    }
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
    eprintln!("static429 listening on {addr}");
    tokio::select! {
        () = serve(listener) => ExitCode::FAILURE,
        () = shutdown_signal() => ExitCode::SUCCESS,
    }
}
