//! Per-batch cost of the invoke path, with the Prometheus recorder installed as `serve` has
//! it:
//!
//! - `batch/{raw,batch_20}`: records submitted to a [`Batcher`] (window flush, so a full
//!   batch leaves at once), the envelope payload built, one invoke through an instant
//!   in-process [`Invoke`] that answers every record, and the answers fanned out to the
//!   callers. No sockets: what is measured is sluicegate's own work per batch.
//! - `invoker/invoke`: one [`Invoker::invoke`] through the real `aws-sdk-lambda` client
//!   against a hyper server on 127.0.0.1 that answers `{}` at once (SDK orchestrator,
//!   signing, HTTP client and pool, classification, metrics).
//!
//! Run: `cargo bench --bench invoke_path` (add `-- --quick` for a short run). Figures go in
//! BENCHMARKS.md; nothing here asserts a speed.

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_main, Criterion, Throughput};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use sluicegate::coalesce::{BatchSpec, Batcher};
use sluicegate::config::{
    CredentialsSource, Envelope, Fairness, Flush, Invocation, LambdaConfig, LambdaTransport,
    RetryConfig,
};
use sluicegate::invoke::{self, Gate, Invoke, InvokeFailure, InvokePermit, Invoked, Invoker};
use tokio::time::Instant;

/// A function that answers at once: every record of a batch succeeds with `{"ok":true}`.
struct Instant0 {
    gate: Gate,
}

impl Invoke for Instant0 {
    fn function(&self) -> &str {
        "bench"
    }

    fn gate(&self) -> &Gate {
        &self.gate
    }

    async fn invoke(
        &self,
        payload: Bytes,
        _invocation: Invocation,
        _slot: InvokePermit,
    ) -> Result<Invoked, InvokeFailure> {
        Ok(Invoked::Response {
            payload: answer(&payload),
            function_error: None,
        })
    }
}

/// The `results` answer to a batch payload, found by scanning for the entries' ids (the
/// bench's bodies never contain `{"id":"`); a raw payload is echoed.
fn answer(payload: &[u8]) -> Bytes {
    const MARK: &[u8] = b"{\"id\":\"";
    if !payload.starts_with(b"{\"records\"") {
        return Bytes::copy_from_slice(payload);
    }
    let mut out = Vec::with_capacity(payload.len());
    out.extend_from_slice(b"{\"results\":[");
    let mut rest = payload;
    let mut first = true;
    while let Some(at) = rest.windows(MARK.len()).position(|w| w == MARK) {
        rest = &rest[at + MARK.len()..];
        let end = rest
            .iter()
            .position(|&b| b == b'"')
            .expect("an id ends with a quote");
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(b"{\"id\":\"");
        out.extend_from_slice(&rest[..end]);
        out.extend_from_slice(b"\",\"status\":\"success\",\"body\":{\"ok\":true}}");
        rest = &rest[end..];
    }
    out.extend_from_slice(b"]}");
    Bytes::from(out)
}

fn spec(envelope: Envelope, max_records: usize) -> BatchSpec {
    BatchSpec {
        route: "records".to_owned(),
        envelope,
        invocation: Invocation::RequestResponse,
        max_records,
        max_bytes: 6 * 1024 * 1024,
        max_wait: Duration::from_secs(1),
        flush: Flush::Window,
        linger: Duration::ZERO,
        max_pending: 10_000,
        max_queued_bytes: usize::MAX,
        fairness: Fairness::PerKey,
        nominal_drain_rate: 1000.0,
        retry: RetryConfig::default(),
        bisect: false,
    }
}

fn batches(c: &mut Criterion) {
    let _ = sluicegate::metrics::install();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("batch");
    for (name, envelope, n) in [("raw", Envelope::Raw, 1), ("batch_20", Envelope::Batch, 20)] {
        let batcher = rt.block_on(async {
            let lambda = Arc::new(Instant0 {
                gate: Gate::concurrency_only(64),
            });
            Batcher::spawn(spec(envelope, n), lambda, None)
        });
        let key: Arc<str> = Arc::from("client-key-0001");
        let bodies: Vec<Box<RawValue>> = (0..n)
            .map(|i| {
                RawValue::from_string(format!(r#"{{"n":{i},"text":"a record of some length"}}"#))
                    .expect("bench JSON")
            })
            .collect();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let tickets: Vec<_> = bodies
                        .iter()
                        .map(|body| {
                            batcher
                                .submit(&key, body, deadline)
                                .expect("the queue takes the record")
                        })
                        .collect();
                    for t in tickets {
                        black_box(t.outcome().await.expect("the record succeeds"));
                    }
                })
            })
        });
    }
    group.finish();
}

/// A hyper server on 127.0.0.1 answering `200 {}` to anything, kept alive.
async fn instant_lambda() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("a local address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"{}"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// One invoke after another against the instant server, through each `lambda.transport`,
/// timed inside the runtime (no `block_on` per iteration).
fn invoker(c: &mut Criterion) {
    let _ = sluicegate::metrics::install();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let url = rt.block_on(instant_lambda());
    let payload = Bytes::from_static(br#"{"records":[{"id":"r1","key":"k","body":{"n":1}}]}"#);
    let mut group = c.benchmark_group("invoker");
    group.throughput(Throughput::Elements(1));
    for (name, transport) in [
        ("invoke_sdk", LambdaTransport::Sdk),
        ("invoke_direct", LambdaTransport::Direct),
    ] {
        let invoker = rt.block_on(async {
            let cfg = LambdaConfig {
                endpoint_url: Some(url.clone()),
                credentials: CredentialsSource::Auto,
                transport,
                ..LambdaConfig::default()
            };
            let client = invoke::build_client(&cfg)
                .await
                .expect("a client for a loopback endpoint");
            Arc::new(
                Invoker::new(&client, "bench".to_owned(), Gate::concurrency_only(1))
                    .expect("an invoker"),
            )
        });
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let invoker = Arc::clone(&invoker);
                let payload = payload.clone();
                rt.block_on(async move {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let slot = invoker.gate().acquire().await;
                        black_box(
                            invoker
                                .invoke(payload.clone(), Invocation::RequestResponse, slot)
                                .await
                                .expect("the instant function answers"),
                        );
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
}

/// `criterion_group!` expanded by hand: that macro's `pub fn` cannot carry a doc comment.
fn benches() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    batches(&mut criterion);
    invoker(&mut criterion);
}
criterion_main!(benches);
