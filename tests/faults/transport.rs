//! `lambda.transport = "direct"` answers exactly like the SDK transport: every way Lambda (or
//! the network in front of it) can answer an invoke is played once through an SDK invoker
//! and once through a direct one, and both must come back with the same outcome and leave
//! the same trace at the fake (calls made, records run). The SDK is the reference; where it
//! differs on purpose the row says so and asserts each side.
//!
//! The second half checks the direct transport's SigV4 on the wire: a verifier recomputes
//! each request's signature from what arrived, and the SDK passing the same verifier shows
//! the verifier is right.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4::SigningParams;
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use sluicegate::config::{Invocation, LambdaConfig, LambdaTransport, SYNC_PAYLOAD_LIMIT};
use sluicegate::invoke::{
    build_client, Gate, InvokeFailure, Invoked, Invoker, UnknownCause, MAX_RETRY_AFTER,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::common;
use crate::fake_lambda::{Action, Call, FakeLambda, Reply};

const TRANSPORTS: [LambdaTransport; 2] = [LambdaTransport::Sdk, LambdaTransport::Direct];

/// The batch every row sends: one record, so the fake's processed count is that record's.
const BATCH: &str = r#"{"records":[{"id":"r1","body":{"n":1}}]}"#;

/// The largest answer the direct transport reads (`src/invoke/direct.rs`: Lambda's 6 MB
/// response limit and 64 KiB for the headers of an error body).
const MAX_RESPONSE: usize = SYNC_PAYLOAD_LIMIT as usize + 64 * 1024;

/// An invoke's outcome without its free text: what the retry loop and the responder act on.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Response {
        payload: Bytes,
        function_error: Option<String>,
    },
    Accepted,
    Throttled {
        reason: String,
        retry_after: Option<Duration>,
    },
    TooLarge,
    Rejected {
        kind: String,
    },
    Unavailable,
    Unknown(UnknownCause),
}

impl From<Result<Invoked, InvokeFailure>> for Outcome {
    fn from(result: Result<Invoked, InvokeFailure>) -> Self {
        match result {
            Ok(Invoked::Response {
                payload,
                function_error,
            }) => Outcome::Response {
                payload,
                function_error,
            },
            Ok(Invoked::Accepted) => Outcome::Accepted,
            Err(InvokeFailure::Throttled {
                reason,
                retry_after,
                ..
            }) => Outcome::Throttled {
                reason,
                retry_after,
            },
            Err(InvokeFailure::TooLarge { .. }) => Outcome::TooLarge,
            Err(InvokeFailure::Rejected { kind, .. }) => Outcome::Rejected { kind },
            Err(InvokeFailure::Unavailable { .. }) => Outcome::Unavailable,
            Err(InvokeFailure::OutcomeUnknown { cause, .. }) => Outcome::Unknown(cause),
        }
    }
}

fn lambda_config(endpoint: &str, transport: LambdaTransport) -> LambdaConfig {
    LambdaConfig {
        endpoint_url: Some(endpoint.to_owned()),
        transport,
        connect_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_secs(5),
        ..LambdaConfig::default()
    }
}

async fn invoker(cfg: &LambdaConfig, function: &str) -> Invoker {
    let client = build_client(cfg).await.expect("a Lambda client");
    Invoker::new(&client, function.to_owned(), Gate::concurrency_only(4)).expect("an invoker")
}

/// One invoke attempt through `invoker`, bounded so a transport that never answers fails the
/// test instead of hanging it.
async fn invoke_once(invoker: &Invoker, payload: &'static str, invocation: Invocation) -> Outcome {
    let permit = invoker.gate().acquire().await;
    let attempt = invoker.invoke(Bytes::from_static(payload.as_bytes()), invocation, permit);
    tokio::time::timeout(Duration::from_secs(20), attempt)
        .await
        .expect("the invoke finished within 20s")
        .into()
}

/// What one transport made of one scripted answer.
#[derive(Debug, PartialEq)]
struct Seen {
    outcome: Outcome,
    calls: usize,
    processed: u32,
    /// The `X-Amz-Invocation-Type` of each call the fake saw.
    invocation_types: Vec<String>,
}

/// Plays `script` to a fresh fake through `transport`, once.
async fn play(
    transport: LambdaTransport,
    script: fn(&Call) -> Action,
    invocation: Invocation,
    read_timeout: Duration,
) -> Seen {
    let fake = FakeLambda::start(script).await;
    let cfg = LambdaConfig {
        read_timeout,
        ..lambda_config(&fake.endpoint(), transport)
    };
    let outcome = invoke_once(&invoker(&cfg, "f").await, BATCH, invocation).await;
    let calls = fake.calls();
    Seen {
        outcome,
        calls: calls.len(),
        processed: fake.processed("r1"),
        invocation_types: calls.into_iter().map(|c| c.invocation_type).collect(),
    }
}

/// One row of the parity table.
struct Row {
    name: &'static str,
    script: fn(&Call) -> Action,
    invocation: Invocation,
    read_timeout: Duration,
    /// What the SDK transport gives.
    sdk: Outcome,
    /// What the direct transport gives: the same as `sdk` except where a row says why not.
    direct: Outcome,
    /// How often the fake ran the record (the calls are always exactly one).
    processed: u32,
}

impl Row {
    fn same(
        name: &'static str,
        script: fn(&Call) -> Action,
        outcome: Outcome,
        processed: u32,
    ) -> Row {
        Row {
            name,
            script,
            invocation: Invocation::RequestResponse,
            read_timeout: Duration::from_secs(5),
            sdk: outcome.clone(),
            direct: outcome,
            processed,
        }
    }
}

fn throttled(reason: &str, retry_after: Option<Duration>) -> Outcome {
    Outcome::Throttled {
        reason: reason.to_owned(),
        retry_after,
    }
}

fn rejected(kind: &str) -> Outcome {
    Outcome::Rejected {
        kind: kind.to_owned(),
    }
}

const ECHOED: &str = r#"{"results":[{"body":{"n":1},"id":"r1","status":"success"}]}"#;
const CRASHED: &str = r#"{"errorMessage":"boom","errorType":"Error"}"#;
const RESERVED: &str = "ReservedFunctionConcurrentInvocationLimitExceeded";

fn rows() -> Vec<Row> {
    vec![
        Row::same(
            "200 echo",
            |call| Action::Process(Reply::echo(call)),
            Outcome::Response {
                payload: Bytes::from_static(ECHOED.as_bytes()),
                function_error: None,
            },
            1,
        ),
        Row::same(
            "200 with X-Amz-Function-Error: Unhandled",
            |_| Action::Process(Reply::function_error("Error", "boom")),
            Outcome::Response {
                payload: Bytes::from_static(CRASHED.as_bytes()),
                function_error: Some("Unhandled".to_owned()),
            },
            1,
        ),
        Row::same(
            "200 with an empty body",
            |_| Action::Process(Reply::new(200, "")),
            Outcome::Response {
                payload: Bytes::new(),
                function_error: None,
            },
            1,
        ),
        Row::same(
            "200 with X-Amz-Function-Error: Handled",
            |_| {
                Action::Process(
                    Reply::json(200, &json!({"errorType": "Error", "errorMessage": "boom"}))
                        .header("X-Amz-Function-Error", "Handled"),
                )
            },
            Outcome::Response {
                payload: Bytes::from_static(CRASHED.as_bytes()),
                function_error: Some("Handled".to_owned()),
            },
            1,
        ),
        Row::same(
            "301 redirect, no body",
            |_| Action::Reply(Reply::new(301, "").header("location", "http://127.0.0.1:1/")),
            rejected("Unknown"),
            0,
        ),
        Row {
            invocation: Invocation::Event,
            ..Row::same(
                "Event answered 202",
                |_| Action::Process(Reply::new(202, "")),
                Outcome::Accepted,
                1,
            )
        },
        Row::same(
            "429 throttle, Reason, Retry-After: 2",
            |_| Action::Reply(Reply::throttle(RESERVED, "2")),
            throttled(RESERVED, Some(Duration::from_secs(2))),
            0,
        ),
        Row::same(
            "429 throttle, Retry-After: 1e300",
            |_| Action::Reply(Reply::throttle("CallerRateLimitExceeded", "1e300")),
            throttled("CallerRateLimitExceeded", Some(MAX_RETRY_AFTER)),
            0,
        ),
        Row::same(
            "429 throttle, Retry-After: NaN",
            |_| Action::Reply(Reply::throttle("CallerRateLimitExceeded", "NaN")),
            throttled("CallerRateLimitExceeded", None),
            0,
        ),
        Row::same(
            "429 throttle, Retry-After: -5",
            |_| Action::Reply(Reply::throttle("CallerRateLimitExceeded", "-5")),
            throttled("CallerRateLimitExceeded", None),
            0,
        ),
        Row::same(
            "429 throttle, body without Reason",
            |_| {
                Action::Reply(
                    Reply::json(429, &json!({"Type": "User", "message": "Rate Exceeded."}))
                        .header("x-amzn-ErrorType", "TooManyRequestsException"),
                )
            },
            throttled("Unknown", None),
            0,
        ),
        Row::same(
            "429 throttle, X-Amzn-ErrorType with a :http://internal.amazon.com/... suffix",
            |_| {
                Action::Reply(
                    Reply::json(429, &json!({"Reason": RESERVED, "message": "Rate Exceeded."}))
                        .header(
                            "x-amzn-ErrorType",
                            "TooManyRequestsException:http://internal.amazon.com/coral/com.amazonaws.lambda/",
                        )
                        .header("retry-after", "3"),
                )
            },
            throttled(RESERVED, Some(Duration::from_secs(3))),
            0,
        ),
        Row::same(
            "429 throttle, no header, body __type com.amazonaws.lambda#TooManyRequestsException",
            |_| {
                Action::Reply(Reply::json(
                    429,
                    &json!({
                        "__type": "com.amazonaws.lambda#TooManyRequestsException",
                        "Reason": "CallerRateLimitExceeded",
                        "message": "slow down",
                    }),
                ))
            },
            throttled("CallerRateLimitExceeded", None),
            0,
        ),
        Row::same(
            "429, no header, body code TooManyRequestsException",
            |_| {
                Action::Reply(Reply::json(
                    429,
                    &json!({"code": "TooManyRequestsException", "message": "slow down"}),
                ))
            },
            throttled("Unknown", None),
            0,
        ),
        Row::same(
            "503, header ServiceException, body __type TooManyRequestsException",
            |_| {
                Action::Reply(
                    Reply::json(
                        503,
                        &json!({"__type": "TooManyRequestsException", "Reason": RESERVED}),
                    )
                    .header("x-amzn-ErrorType", "ServiceException"),
                )
            },
            Outcome::Unavailable,
            0,
        ),
        Row::same(
            "413 RequestTooLargeException",
            |_| Action::Reply(Reply::service_error(413, "RequestTooLargeException")),
            Outcome::TooLarge,
            0,
        ),
        Row::same(
            "500 ServiceException",
            |_| Action::Reply(Reply::service_error(500, "ServiceException")),
            Outcome::Unavailable,
            0,
        ),
        Row::same(
            "502 HTML body, no error header",
            |_| {
                Action::Reply(
                    Reply::new(502, "<html><body>Bad Gateway</body></html>")
                        .header("content-type", "text/html"),
                )
            },
            // Not Lambda's answer: whatever stood in between may have forwarded the request.
            Outcome::Unknown(UnknownCause::UnexplainedServerError),
            0,
        ),
        Row::same(
            "500, no header, JSON body without a type",
            |_| Action::Reply(Reply::json(500, &json!({"message": "internal"}))),
            Outcome::Unknown(UnknownCause::UnexplainedServerError),
            0,
        ),
        Row::same(
            "404 ResourceNotFoundException",
            |_| Action::Reply(Reply::service_error(404, "ResourceNotFoundException")),
            rejected("ResourceNotFoundException"),
            0,
        ),
        Row::same(
            "400 InvalidRequestContentException",
            |_| Action::Reply(Reply::service_error(400, "InvalidRequestContentException")),
            rejected("InvalidRequestContentException"),
            0,
        ),
        Row::same(
            "400 non-JSON body, no error header",
            |_| Action::Reply(Reply::new(400, "bad request, and not JSON")),
            rejected("Unknown"),
            0,
        ),
        Row::same(
            "processed, then the connection dropped",
            |_| Action::ProcessThenDrop,
            Outcome::Unknown(UnknownCause::ConnectionLost),
            1,
        ),
        Row::same(
            "connection dropped without processing",
            |_| Action::Drop,
            Outcome::Unknown(UnknownCause::ConnectionLost),
            0,
        ),
        Row {
            // Long enough that a connect on a loaded machine fits inside it.
            read_timeout: Duration::from_secs(1),
            ..Row::same(
                "no answer, read_timeout = 1s",
                |_| Action::Hang,
                Outcome::Unknown(UnknownCause::ReadTimeout),
                0,
            )
        },
    ]
}

#[tokio::test]
async fn both_transports_classify_every_scripted_answer_the_same_way() {
    let mut mismatches = Vec::new();
    for row in rows() {
        let invocation_type = match row.invocation {
            Invocation::RequestResponse => "RequestResponse",
            Invocation::Event => "Event",
        };
        for (transport, expected) in TRANSPORTS.into_iter().zip([&row.sdk, &row.direct]) {
            let seen = play(transport, row.script, row.invocation, row.read_timeout).await;
            eprintln!("{:<85} {transport:?}: {:?}", row.name, seen.outcome);
            let want = Seen {
                outcome: expected.clone(),
                calls: 1,
                processed: row.processed,
                invocation_types: vec![invocation_type.to_owned()],
            };
            if seen != want {
                mismatches.push(format!(
                    "{} via {transport:?}:\n  got  {seen:?}\n  want {want:?}",
                    row.name
                ));
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[tokio::test]
async fn an_answer_past_lambdas_response_limit_is_read_by_the_sdk_and_refused_by_direct() {
    // Exactly at the direct transport's limit: both read it.
    for transport in TRANSPORTS {
        let seen = play(
            transport,
            |_| Action::Process(Reply::new(200, vec![b'x'; MAX_RESPONSE])),
            Invocation::RequestResponse,
            Duration::from_secs(5),
        )
        .await;
        assert!(
            matches!(&seen.outcome, Outcome::Response { payload, function_error: None } if payload.len() == MAX_RESPONSE),
            "{transport:?}: an answer of exactly {MAX_RESPONSE} bytes was not read whole"
        );
        assert_eq!((seen.calls, seen.processed), (1, 1), "{transport:?}");
    }
    // One byte more. The SDK reads any length into memory; the direct transport stops at its
    // limit and, since the function ran, reports the outcome as unknown rather than guess.
    let sdk = play(
        LambdaTransport::Sdk,
        |_| Action::Process(Reply::new(200, vec![b'x'; MAX_RESPONSE + 1])),
        Invocation::RequestResponse,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        matches!(&sdk.outcome, Outcome::Response { payload, function_error: None } if payload.len() == MAX_RESPONSE + 1),
        "the SDK reads an oversized answer whole"
    );
    assert_eq!((sdk.calls, sdk.processed), (1, 1));
    let direct = play(
        LambdaTransport::Direct,
        |_| Action::Process(Reply::new(200, vec![b'x'; MAX_RESPONSE + 1])),
        Invocation::RequestResponse,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        direct.outcome,
        Outcome::Unknown(UnknownCause::ConnectionLost)
    );
    assert_eq!((direct.calls, direct.processed), (1, 1));
}

#[tokio::test]
async fn a_refused_connection_is_unavailable_on_both_transports() {
    // A port that was free a moment ago: nothing listens, the connect is refused.
    let nobody = format!("http://127.0.0.1:{}", common::free_port());
    for transport in TRANSPORTS {
        let invoker = invoker(&lambda_config(&nobody, transport), "f").await;
        let outcome = invoke_once(&invoker, BATCH, Invocation::RequestResponse).await;
        assert_eq!(outcome, Outcome::Unavailable, "{transport:?}");
    }
}

#[tokio::test]
async fn a_connect_timeout_is_unavailable_on_both_transports() {
    let blackhole = crate::Blackhole::start().await;
    let addr = blackhole.addr;
    for transport in TRANSPORTS {
        let cfg = LambdaConfig {
            connect_timeout: Duration::from_millis(300),
            ..lambda_config(&format!("http://{addr}"), transport)
        };
        let invoker = invoker(&cfg, "f").await;
        let started = tokio::time::Instant::now();
        let outcome = invoke_once(&invoker, BATCH, Invocation::RequestResponse).await;
        let took = started.elapsed();
        assert_eq!(outcome, Outcome::Unavailable, "{transport:?}");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "{transport:?}: the connect gave up after {took:?}, not at connect_timeout"
        );
    }
    drop(blackhole);
}

#[tokio::test]
async fn a_connection_the_server_closes_with_connection_close_is_not_reused() {
    for transport in TRANSPORTS {
        let fake = FakeLambda::start(|call| {
            let reply = Reply::echo(call);
            Action::Process(if call.n == 0 {
                reply.header("connection", "close")
            } else {
                reply
            })
        })
        .await;
        let invoker = invoker(&lambda_config(&fake.endpoint(), transport), "f").await;
        for attempt in 0..2 {
            let outcome = invoke_once(&invoker, BATCH, Invocation::RequestResponse).await;
            assert_eq!(
                outcome,
                Outcome::Response {
                    payload: Bytes::from_static(ECHOED.as_bytes()),
                    function_error: None,
                },
                "{transport:?}, invoke {attempt}"
            );
        }
        assert_eq!(fake.calls().len(), 2, "{transport:?}");
        assert_eq!(fake.processed("r1"), 2, "{transport:?}");
    }
}

/// A Lambda endpoint that answers each connection's first request with a keep-alive `200`
/// (no `connection: close`) and then, after the connection has been idle for `idle` (none on
/// even-numbered connections, so both an immediate and a later close are played), closes it,
/// as a load balancer dropping idle connections does. It sends each connection's number once
/// that connection is closed.
async fn closes_idle_connections(idle: Duration) -> (SocketAddr, mpsc::UnboundedReceiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (closed, closes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let closed = closed.clone();
            tokio::spawn(async move {
                if read_request(&mut stream).await.is_some() {
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-amzn-requestid: 0\r\n\r\n{ECHOED}",
                        ECHOED.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    if n % 2 == 1 {
                        tokio::time::sleep(idle).await;
                    }
                    let _ = stream.shutdown().await;
                }
                drop(stream);
                let _ = closed.send(n);
            });
        }
    });
    (addr, closes)
}

/// Reads one HTTP/1.1 request (head, then a `content-length` body); `None` when the peer
/// closes first or sends more than 64 KiB.
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return Some(buf);
            }
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn a_pooled_connection_closed_while_idle_is_never_an_unknown_outcome() {
    // One thread: the client's connection task runs between the close and the next invoke
    // or after the invoke queued its request, never in the middle of taking it, so every
    // round plays "the server closed the pooled connection before the invoke began".
    const ROUNDS: usize = 50;
    for transport in TRANSPORTS {
        let (addr, mut closes) = closes_idle_connections(Duration::from_millis(5)).await;
        let invoker = invoker(&lambda_config(&format!("http://{addr}"), transport), "f").await;
        for round in 0..ROUNDS {
            let outcome = invoke_once(&invoker, BATCH, Invocation::RequestResponse).await;
            assert_eq!(
                outcome,
                Outcome::Response {
                    payload: Bytes::from_static(ECHOED.as_bytes()),
                    function_error: None,
                },
                "{transport:?}, round {round}"
            );
            // The server has closed the connection the client just pooled; the next invoke
            // must notice and open another.
            let closed = tokio::time::timeout(Duration::from_secs(5), closes.recv())
                .await
                .expect("the server closed the connection");
            assert_eq!(
                closed,
                Some(round),
                "{transport:?}: one connection per invoke"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_racing_the_next_invoke_is_at_worst_an_unknown_outcome() {
    // Two threads: the connection task may be reading the server's close on one while the
    // next invoke takes the same pooled connection on the other. hyper then fails the request
    // as `IncompleteMessage` ("connection closed before message completed") without saying
    // whether any of it was written, so neither transport may call it safe to retry: the
    // only outcomes allowed are the answer and an unknown outcome, never `Unavailable`.
    const ROUNDS: usize = 200;
    for transport in TRANSPORTS {
        let (addr, mut closes) = closes_idle_connections(Duration::from_millis(5)).await;
        let invoker = invoker(&lambda_config(&format!("http://{addr}"), transport), "f").await;
        let mut lost = 0;
        for round in 0..ROUNDS {
            match invoke_once(&invoker, BATCH, Invocation::RequestResponse).await {
                Outcome::Response { payload, .. } if payload == ECHOED.as_bytes() => {
                    tokio::time::timeout(Duration::from_secs(5), closes.recv())
                        .await
                        .expect("the server closed the connection");
                }
                Outcome::Unknown(UnknownCause::ConnectionLost) => lost += 1,
                other => panic!("{transport:?}, round {round}: {other:?}"),
            }
        }
        eprintln!("{transport:?}: {lost} of {ROUNDS} invokes met the close and were unknown");
        assert!(lost < ROUNDS, "{transport:?}: no invoke got through");
    }
}

/// The placeholder keys a loopback endpoint gets with `credentials = "auto"` (`src/aws.rs`).
const PLACEHOLDER_KEY: &str = "sluicegate-emulator";

/// The region the SigV4 checks configure, not the default one, so a signer that ignored
/// `lambda.region` would fail them.
const REGION: &str = "eu-west-1";

/// One request as the verifier received it, and what it made of its signature.
#[derive(Debug)]
struct Received {
    path: String,
    headers: http::HeaderMap,
    /// The `authorization` header recomputed from what arrived; `Err` says what was missing.
    recomputed: Result<String, String>,
}

impl Received {
    fn verified(&self) -> bool {
        let sent = self
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        matches!((&self.recomputed, sent), (Ok(ours), Some(theirs)) if ours == theirs)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A Lambda endpoint that checks every request's SigV4 signature and answers as Lambda
/// would (`200 {}` or, for `Event`, `202`).
async fn sigv4_verifier() -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let addr = serve_loopback(move |request| verify(request, Arc::clone(&record))).await;
    (addr, seen)
}

/// Serves HTTP/1 on a free loopback port for the rest of the test, answering each request
/// with `answer(request)`.
async fn serve_loopback<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<hyper::Response<Full<Bytes>>, hyper::Error>>
        + Send
        + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(stream),
                        hyper::service::service_fn(answer),
                    )
                    .await;
            });
        }
    });
    addr
}

async fn verify(
    request: hyper::Request<hyper::body::Incoming>,
    record: Arc<Mutex<Vec<Received>>>,
) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    // The path exactly as it arrived (still percent-encoded), not as a router would decode it.
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let recomputed = recompute(parts.method.as_str(), &path, &parts.headers, &body);
    let event = parts
        .headers
        .get("x-amz-invocation-type")
        .is_some_and(|v| v == "Event");
    record
        .lock()
        .expect("no holder of the verifier's lock panics")
        .push(Received {
            path,
            headers: parts.headers,
            recomputed,
        });
    let (status, answer) = if event { (202, "") } else { (200, "{}") };
    Ok(hyper::Response::builder()
        .status(status)
        .header("x-amzn-requestid", "0")
        .body(Full::new(Bytes::from_static(answer.as_bytes())))
        .expect("a valid response"))
}

/// The `authorization` header SigV4 gives for what arrived: the same method, path, body,
/// time (`x-amz-date`) and the headers `SignedHeaders` names, signed for `lambda` in
/// [`REGION`] with the placeholder keys.
fn recompute(
    method: &str,
    path: &str,
    headers: &http::HeaderMap,
    body: &[u8],
) -> Result<String, String> {
    let text = |name: &str| {
        headers
            .get(name)
            .ok_or_else(|| format!("no {name} header"))?
            .to_str()
            .map_err(|e| format!("{name}: {e}"))
    };
    let authorization = text("authorization")?;
    let signed: Vec<&str> = authorization
        .split("SignedHeaders=")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .ok_or("no SignedHeaders in authorization")?
        .split(';')
        .collect();
    let mut pairs = Vec::new();
    for name in &signed {
        for value in headers.get_all(*name) {
            let value = value.to_str().map_err(|e| format!("{name}: {e}"))?;
            pairs.push((*name, value));
        }
        if !headers.contains_key(*name) {
            return Err(format!("signed header {name} did not arrive"));
        }
    }
    let time = amz_date_time(text("x-amz-date")?)?;
    let identity = Identity::new(
        Credentials::new(PLACEHOLDER_KEY, PLACEHOLDER_KEY, None, None, "verifier"),
        None,
    );
    let params = SigningParams::builder()
        .identity(&identity)
        .region(REGION)
        .name("lambda")
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let uri = format!("http://{}{path}", text("host")?);
    let signable = SignableRequest::new(method, uri, pairs.into_iter(), SignableBody::Bytes(body))
        .map_err(|e| e.to_string())?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    let authorization = instructions
        .headers()
        .find(|(name, _)| *name == "authorization")
        .map(|(_, value)| value.to_owned());
    authorization.ok_or_else(|| "the signer gave no authorization".to_owned())
}

#[tokio::test]
async fn both_transports_sign_every_invoke_as_sigv4_recomputes_it_on_the_wire() {
    const ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:orders:live";
    const ENCODED_ARN: &str =
        "arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3Aorders%3Alive";
    // Not ASCII and not JSON: the payload hash covers bytes, whatever they are.
    const PAYLOAD: &str = "{\"records\":[{\"id\":\"r1\",\"body\":\"caf\u{e9} \u{2603}\"}]}";
    let mut paths = Vec::new();
    for transport in TRANSPORTS {
        let (addr, seen) = sigv4_verifier().await;
        let cfg = LambdaConfig {
            region: REGION.to_owned(),
            ..lambda_config(&format!("http://{addr}"), transport)
        };
        let mut sent = Vec::new();
        for function in ["orders", ARN] {
            let invoker = invoker(&cfg, function).await;
            for invocation in [Invocation::RequestResponse, Invocation::Event] {
                let expected = match invocation {
                    Invocation::RequestResponse => Outcome::Response {
                        payload: Bytes::from_static(b"{}"),
                        function_error: None,
                    },
                    Invocation::Event => Outcome::Accepted,
                };
                let outcome = invoke_once(&invoker, PAYLOAD, invocation).await;
                assert_eq!(outcome, expected, "{transport:?} {function} {invocation:?}");
                sent.push(invocation);
            }
        }
        let seen = seen
            .lock()
            .expect("no holder of the verifier's lock panics");
        assert_eq!(seen.len(), 4, "{transport:?}: one request per invoke");
        for (received, invocation) in seen.iter().zip(&sent) {
            assert!(
                received.verified(),
                "{transport:?}: the signature of {} did not verify: sent {:?}, recomputed {:?}",
                received.path,
                received.header("authorization"),
                received.recomputed
            );
            let invocation_type = match invocation {
                Invocation::RequestResponse => "RequestResponse",
                Invocation::Event => "Event",
            };
            assert_eq!(
                received.header("x-amz-invocation-type"),
                Some(invocation_type),
                "{transport:?}"
            );
            let scope = format!("/{REGION}/lambda/aws4_request");
            assert!(
                received.header("authorization").is_some_and(|a| a
                    .starts_with(&format!("AWS4-HMAC-SHA256 Credential={PLACEHOLDER_KEY}/"))
                    && a.contains(&scope)),
                "{transport:?}: {:?}",
                received.header("authorization")
            );
            if transport == LambdaTransport::Direct {
                assert_eq!(received.header("host"), Some(addr.to_string().as_str()));
                assert!(
                    received
                        .header("x-amz-date")
                        .is_some_and(|d| d.len() == 16 && d.ends_with('Z')),
                    "{:?}",
                    received.header("x-amz-date")
                );
                assert_eq!(
                    received.header("content-type"),
                    Some("application/octet-stream")
                );
            }
        }
        // The verifier is not vacuous: another body, or the path as a router decodes it,
        // gives another signature.
        let last = seen.last().expect("four requests");
        let sent = last.header("authorization").map(str::to_owned);
        let decoded = last.path.replace(ENCODED_ARN, ARN);
        for (path, body) in [
            (last.path.as_str(), &b"{}"[..]),
            (&decoded, PAYLOAD.as_bytes()),
        ] {
            let other = recompute("POST", path, &last.headers, body);
            assert!(
                other.is_ok() && other.ok() != sent,
                "{transport:?}: a request to {path} with {} body bytes verified against the signature of another",
                body.len()
            );
        }
        paths.push(seen.iter().map(|r| r.path.clone()).collect::<Vec<_>>());
    }
    let expected: Vec<String> = ["orders", "orders", ENCODED_ARN, ENCODED_ARN]
        .iter()
        .map(|f| format!("/2015-03-31/functions/{f}/invocations"))
        .collect();
    assert_eq!(
        paths,
        [expected.clone(), expected],
        "the same paths on both transports"
    );
}

/// A Lambda endpoint whose clock is `offset` ahead of ours (behind when `ahead` is false). It
/// refuses a request whose `x-amz-date` is more than 5 minutes off its own time, as Lambda
/// does (`403 InvalidSignatureException`, "Signature expired"), runs the others (`200 {}`), and
/// puts its time in every answer's `Date`. Keeps each request's `x-amz-date`.
async fn skewed_lambda(offset: Duration, ahead: bool) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    skewed_lambda_behind(offset, ahead, None).await
}

/// [`skewed_lambda`], behind something that answers the first request itself with `200 {}`
/// and a `Date` `lie` ahead of the time (an intermediary with a wrong clock).
async fn skewed_lambda_behind(
    offset: Duration,
    ahead: bool,
    lie: Option<Duration>,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let addr = serve_loopback(move |request: hyper::Request<hyper::body::Incoming>| {
                    let record = Arc::clone(&record);
                    async move {
                        let (parts, body) = request.into_parts();
                        let _ = BodyExt::collect(body).await?;
                        let now = if ahead {
                            SystemTime::now() + offset
                        } else {
                            SystemTime::now() - offset
                        };
                        let signed_at = parts
                            .headers
                            .get("x-amz-date")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let in_time = amz_date_time(&signed_at).is_ok_and(|at| {
                            let off = at.duration_since(now).unwrap_or_else(|e| e.duration());
                            off <= Duration::from_secs(300)
                        });
                        let first = {
                            let mut seen = record.lock().expect("no holder panics");
                            seen.push(signed_at.clone());
                            seen.len() == 1
                        };
                        let lied = lie.filter(|_| first);
                        let response = hyper::Response::builder()
                            .header(
                                "date",
                                httpdate::fmt_http_date(now + lied.unwrap_or_default()),
                            )
                            .header("x-amzn-requestid", "0");
                        let response = if in_time || lied.is_some() {
                            response
                                .status(200)
                                .body(Full::new(Bytes::from_static(b"{}")))
                        } else {
                            response
                                .status(403)
                                .header("x-amzn-errortype", "InvalidSignatureException")
                                .body(Full::new(Bytes::from(format!(
                                    r#"{{"message":"Signature expired: {signed_at} is now earlier than {} ({} - 5 min.)"}}"#,
                                    httpdate::fmt_http_date(now),
                                    httpdate::fmt_http_date(now),
                                ))))
                        };
                        Ok::<_, hyper::Error>(response.expect("a valid response"))
                    }
    })
    .await;
    (addr, seen)
}

/// `20261201T070103Z` as a time (read as `2026-12-01T07:01:03Z`).
fn amz_date_time(date: &str) -> Result<SystemTime, String> {
    let rfc3339 = match date.as_bytes() {
        [y @ .., b'Z'] if y.len() == 15 => format!(
            "{}-{}-{}T{}:{}:{}Z",
            &date[0..4],
            &date[4..6],
            &date[6..8],
            &date[9..11],
            &date[11..13],
            &date[13..15]
        ),
        _ => return Err(format!("x-amz-date {date:?} is not YYYYMMDDTHHMMSSZ")),
    };
    humantime::parse_rfc3339(&rfc3339).map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_clock_an_hour_off_lambdas_costs_both_transports_one_refused_attempt() {
    const HOUR: Duration = Duration::from_secs(3600);
    for ahead in [true, false] {
        for transport in TRANSPORTS {
            let (addr, seen) = skewed_lambda(HOUR, ahead).await;
            let cfg = lambda_config(&format!("http://{addr}"), transport);
            let invoker = invoker(&cfg, "orders").await;
            let first = invoke_once(&invoker, BATCH, Invocation::RequestResponse).await;
            assert_eq!(
                first,
                Outcome::Unavailable,
                "{transport:?} ahead={ahead}: refused before anything ran, so safe to retry"
            );
            // The refusal's `Date` taught the transport Lambda's time.
            let second = invoke_once(&invoker, BATCH, Invocation::RequestResponse).await;
            assert_eq!(
                second,
                Outcome::Response {
                    payload: Bytes::from_static(b"{}"),
                    function_error: None,
                },
                "{transport:?} ahead={ahead}"
            );
            let seen = seen.lock().expect("no holder panics").clone();
            assert_eq!(seen.len(), 2, "{transport:?}: {seen:?}");
            let local = SystemTime::now();
            let signed: Vec<Duration> = seen
                .iter()
                .map(|d| {
                    let at = amz_date_time(d).expect("an x-amz-date");
                    at.duration_since(local).unwrap_or_else(|e| e.duration())
                })
                .collect();
            assert!(
                signed[0] < Duration::from_secs(60) && signed[1] > Duration::from_secs(3500),
                "{transport:?} ahead={ahead}: first signed with our time, then Lambda's: {seen:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_wrong_date_from_an_intermediary_costs_one_refused_attempt() {
    const HOUR: Duration = Duration::from_secs(3600);
    for transport in TRANSPORTS {
        // Lambda's clock is ours; the first answer's `Date` is an hour ahead.
        let (addr, seen) = skewed_lambda_behind(Duration::ZERO, true, Some(HOUR)).await;
        let cfg = lambda_config(&format!("http://{addr}"), transport);
        let invoker = invoker(&cfg, "orders").await;
        let ok = Outcome::Response {
            payload: Bytes::from_static(b"{}"),
            function_error: None,
        };
        assert_eq!(
            invoke_once(&invoker, BATCH, Invocation::RequestResponse).await,
            ok
        );
        // Both transports believed the lie and sign an hour ahead: Lambda refuses.
        let refused = invoke_once(&invoker, BATCH, Invocation::RequestResponse).await;
        match transport {
            // It knows it signed an hour off Lambda's `Date`: the refusal is the clock's.
            LambdaTransport::Direct => assert_eq!(refused, Outcome::Unavailable),
            // Judged, as the SDK judges it, by our clock against Lambda's, which agree: a
            // refused signature, not retried.
            LambdaTransport::Sdk => assert_eq!(
                refused,
                Outcome::Rejected {
                    kind: "InvalidSignatureException".to_owned()
                }
            ),
        }
        // The refusal's `Date` set both right again.
        assert_eq!(
            invoke_once(&invoker, BATCH, Invocation::RequestResponse).await,
            ok,
            "{transport:?}"
        );
        assert_eq!(seen.lock().expect("no holder panics").len(), 3);
    }
}
