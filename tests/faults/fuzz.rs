//! Hostile input in bulk: generated requests over real sockets, and generated Lambda answers.
//!
//! - [`generated_requests_are_each_answered_or_closed`]: well over 100,000 requests — valid
//!   records, hostile JSON, hostile headers, broken framing, random bytes — pipelined over
//!   thousands of connections. Every connection ends (answered to the end, or closed by the
//!   server) within a bounded time, no answer is a `500`, and the server serves a good
//!   request afterwards.
//! - [`lambda_answers_never_tell_a_caller_an_untrue_outcome`]: a proptest over what the
//!   Lambda endpoint answers (statuses, error types, absurd `Retry-After`, malformed and
//!   partial batch responses, dropped connections): every caller gets exactly one answer with
//!   a status of the contract, `200` only for a record the function ran, and no record is
//!   run twice (`retry_timeouts = false`) unless a function error made the batch bisect.
//!
//! Both are seeded: set `FUZZ_SEED` to replay a run (the seed is printed).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::common::{route, Harness};
use crate::fake_config;
use crate::fake_lambda::{Action, Call, FakeLambda, Reply};

/// Requests the HTTP fuzz sends at least.
const REQUESTS: usize = 100_000;
/// Connections open at once.
const CONCURRENCY: usize = 64;
/// How long one connection may take to be answered to the end or closed.
const CONNECTION_BOUND: Duration = Duration::from_secs(20);

/// Panics on runtime worker threads (where sluicegate's tasks run) since the hook went in.
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics on tokio worker threads, then reports them as usual. A panicking connection
/// or batch task is invisible to a client (its connection just closes), so the fuzz counts
/// them here.
fn count_panics() -> usize {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|name| name.starts_with("tokio-"))
            {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
    PANICS.load(Ordering::SeqCst)
}

fn seed() -> u64 {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("FUZZ_SEED={seed}");
    seed
}

/// One generated request, and whether the server must read it whole, answer it and keep the
/// connection (`framed`). Any other may be refused from its head and the connection closed
/// (the body was not read, so nothing after it can be framed), or break framing outright.
struct Generated {
    bytes: Vec<u8>,
    framed: bool,
}

const JSON_BODIES: &[&str] = &[
    r#"{"n":1}"#,
    "1",
    "null",
    r#""text""#,
    "[1,2,3]",
    r#"{"a":{"b":{"c":[true,false,null]}}}"#,
    "1e400",
    "-0",
    r#""\u00e9\ud83d\ude00""#,
    r#"{"dup":1,"dup":2}"#,
];

const BAD_BODIES: &[&[u8]] = &[
    b"",
    b"   ",
    b"{",
    b"}",
    b"[1,2",
    b"{\"a\":}",
    b"nul",
    b"\xff\xfe\xfd",
    b"\"\\ud800\"",
    b"\"\\udc00x\"",
    b"{\"a\":1}{\"b\":2}",
    b"\x00\x00\x00",
    b"\"unterminated",
    b"01",
    b"NaN",
];

const PATHS: &[&str] = &[
    "/records",
    "/records/",
    "/nope",
    "/",
    "/records?x=1",
    "/%2e%2e/admin/reload",
    "//records",
    "/healthz",
    "/readyz",
    "/records#frag",
];

const METHODS: &[&str] = &[
    "POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "BREW",
];

/// A hostile but well-framed header, and whether it leaves the request one the server reads
/// whole (`false`: it may be refused from its head alone, before the body is read).
fn hostile_header(rng: &mut StdRng) -> (String, bool) {
    let long = "a".repeat(rng.random_range(1..4000));
    let timeouts = [
        "0",
        "-1",
        "1e30",
        "18446744073709551616",
        "abc",
        "",
        " 5 ",
        "999999999999",
    ];
    let forwarded = ["1.2.3.4, ::1", "garbage", ",,,,", "999.1.1.1"];
    let choices = [
        (
            format!(
                "x-sluicegate-timeout-ms: {}",
                timeouts[rng.random_range(0..timeouts.len())]
            ),
            false,
        ),
        (format!("x-api-key: {long}"), false),
        ("x-api-key: \t".to_owned(), false),
        (
            format!(
                "x-forwarded-for: {}",
                forwarded[rng.random_range(0..forwarded.len())]
            ),
            true,
        ),
        (
            format!("x-request-id: {}", &long[..long.len().min(200)]),
            true,
        ),
        (
            "content-type: application/x-www-form-urlencoded".to_owned(),
            true,
        ),
        ("expect: 100-continue".to_owned(), false),
        ("x-empty:".to_owned(), true),
        (format!("x-many-{}: v", rng.random_range(0..1000)), true),
        ("accept-encoding: gzip, br, zstd".to_owned(), true),
    ];
    choices[rng.random_range(0..choices.len())].clone()
}

fn generate(rng: &mut StdRng) -> Generated {
    let family = rng.random_range(0..67);
    let method = if rng.random_bool(0.85) {
        "POST"
    } else {
        METHODS[rng.random_range(0..METHODS.len())]
    };
    let path = if rng.random_bool(0.8) {
        "/records"
    } else {
        PATHS[rng.random_range(0..PATHS.len())]
    };
    let mut headers: Vec<String> = vec!["host: fuzz".to_owned()];
    let mut read_whole = method == "POST" && path == "/records";
    for _ in 0..rng.random_range(0..4) {
        let (header, benign) = hostile_header(rng);
        headers.push(header);
        read_whole &= benign;
    }
    let body: Vec<u8> = match family {
        // A good record.
        0..=34 => JSON_BODIES[rng.random_range(0..JSON_BODIES.len())]
            .as_bytes()
            .to_vec(),
        // Bodies that are not one JSON record.
        35..=54 => BAD_BODIES[rng.random_range(0..BAD_BODIES.len())].to_vec(),
        // Deep nesting, on either side of serde_json's limit of 128.
        55..=62 => {
            let depth = [127, 128, 129, 200, 5000][rng.random_range(0..5)];
            let mut b = "[".repeat(depth).into_bytes();
            b.extend("]".repeat(depth).as_bytes());
            b
        }
        // Large strings, up to past the record size limit.
        _ => {
            let len = [1000, 200_000, 300_000][rng.random_range(0..3)];
            format!("\"{}\"", "x".repeat(len)).into_bytes()
        }
    };
    // A body past `max_record_bytes` may be refused before it is read.
    read_whole &= body.len() < 256 * 1024;
    let mut text = format!("{method} {path} HTTP/1.1\r\n");
    for h in &headers {
        text.push_str(h);
        text.push_str("\r\n");
    }
    let mut bytes;
    if rng.random_bool(0.15) {
        text.push_str("transfer-encoding: chunked\r\n\r\n");
        bytes = text.into_bytes();
        // Tiny chunks for small bodies; a 200 kB body in 2-byte chunks is 100,000 frames,
        // which a debug build decodes too slowly for the time bound.
        let chunk = if body.len() < 4096 {
            rng.random_range(1..64)
        } else {
            rng.random_range(1024..16384)
        };
        for piece in body.chunks(chunk) {
            bytes.extend(format!("{:x}\r\n", piece.len()).as_bytes());
            bytes.extend(piece);
            bytes.extend(b"\r\n");
        }
        bytes.extend(b"0\r\n\r\n");
    } else {
        text.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        bytes = text.into_bytes();
        bytes.extend(&body);
    }
    Generated {
        bytes,
        framed: read_whole,
    }
}

/// Requests that break HTTP framing; the server may answer `4xx` and close.
fn broken(rng: &mut StdRng) -> Generated {
    let bytes = match rng.random_range(0..10) {
        0 => (0..rng.random_range(1..200)).map(|_| rng.random()).collect(),
        1 => b"POST /records HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n{}\n".to_vec(),
        2 => b"POST /records HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_vec(),
        3 => b"POST /records HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n".to_vec(),
        4 => b"POST /records HTTP/9.9\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}".to_vec(),
        5 => b"POST /records\r\n\r\n".to_vec(),
        6 => format!("POST /{} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n", "r".repeat(70_000)).into_bytes(),
        7 => {
            let mut b = b"POST /records HTTP/1.1\r\nhost: x\r\n".to_vec();
            for i in 0..200 {
                b.extend(format!("x-h{i}: v\r\n").as_bytes());
            }
            b.extend(b"content-length: 2\r\n\r\n{}");
            b
        }
        8 => b"POST /records HTTP/1.1\r\nhost: x\r\ncontent-length: 18446744073709551616\r\n\r\n".to_vec(),
        _ => b"POST /records HTTP/1.1\r\nho st: x\r\ncontent-length: 2\r\n\r\n{}".to_vec(),
    };
    Generated {
        bytes,
        framed: false,
    }
}

/// The statuses of the HTTP/1.1 responses in `bytes`, read off their status lines (bodies
/// carry no `HTTP/1.1 ` prefix: they are JSON or empty).
fn statuses(bytes: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(bytes);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

struct ConnectionResult {
    statuses: Vec<u16>,
    /// The sentinel at the end was answered: everything before it was too.
    answered_to_the_end: bool,
    timed_out: bool,
}

const SENTINEL: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\n\r\n";

async fn run_connection(addr: std::net::SocketAddr, requests: Vec<Generated>) -> ConnectionResult {
    let mut bytes: Vec<u8> = requests
        .iter()
        .flat_map(|r| r.bytes.iter().copied())
        .collect();
    bytes.extend(SENTINEL);
    let deadline = tokio::time::Instant::now() + CONNECTION_BOUND;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = stream.split();
    let mut received = Vec::new();
    let mut timed_out = false;
    // Written while reading: a server that answers (and closes) before taking every byte
    // must not deadlock the writer.
    let writer = async {
        let _ = tokio::time::timeout_at(deadline, write.write_all(&bytes)).await;
    };
    let reader = async {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, read.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
                Err(_) => {
                    timed_out = true;
                    break;
                }
            }
        }
    };
    tokio::join!(writer, reader);
    if timed_out {
        if let Ok(dir) = std::env::var("FUZZ_DUMP") {
            let n = rand::random::<u32>();
            let _ = std::fs::write(format!("{dir}/hung-{n}.bin"), &bytes);
            let _ = std::fs::write(format!("{dir}/hung-{n}.out"), &received);
        }
    }
    let text = String::from_utf8_lossy(&received);
    ConnectionResult {
        answered_to_the_end: text.ends_with(r#"{"status":"ok"}"#),
        statuses: statuses(&received),
        timed_out,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_are_each_answered_or_closed() {
    let fake = FakeLambda::echo().await;
    let toml = fake_config(
        &fake,
        &format!(
            "{}\n{}",
            route(
                "records",
                "f",
                r#"batch = { max_records = 50, max_wait = "2ms", flush = "window" }
invoke = { rate = 100000.0, burst = 100000, max_concurrency = 32 }
queue = { max_pending = 100000 }"#
            ),
            ""
        ),
    )
    .replace(
        "admin_listen = \"127.0.0.1:0\"",
        "admin_listen = \"127.0.0.1:0\"\nheader_read_timeout = \"2s\"\nmax_record_bytes = \"256KiB\"",
    );
    let panics = count_panics();
    let harness = Harness::start(&toml).await;
    let addr = harness.running.addr;
    let mut rng = StdRng::seed_from_u64(seed());

    let started = Instant::now();
    let sent = Arc::new(AtomicUsize::new(0));
    let problems = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut connections = 0usize;
    let mut generated = 0usize;
    while generated < REQUESTS {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the fuzz run is bounded at 10 minutes"
        );
        // Mostly well-framed requests; some connections end in one that breaks framing
        // (the server may answer it and close, so nothing is queued behind it).
        let n = rng.random_range(1..60);
        let mut requests: Vec<Generated> = (0..n).map(|_| generate(&mut rng)).collect();
        if rng.random_bool(0.3) {
            requests.push(broken(&mut rng));
        }
        generated += requests.len();
        connections += 1;
        let framed = requests.iter().all(|r| r.framed);
        let count = requests.len();
        let (sent, problems) = (Arc::clone(&sent), Arc::clone(&problems));
        while tasks.len() >= CONCURRENCY {
            tasks.join_next().await;
        }
        tasks.spawn(async move {
            let heads: Vec<String> = requests
                .iter()
                .map(|r| String::from_utf8_lossy(&r.bytes[..r.bytes.len().min(100)]).into_owned())
                .collect();
            let result = run_connection(addr, requests).await;
            sent.fetch_add(count, Ordering::Relaxed);
            let mut problems = problems.lock().unwrap();
            if result.timed_out {
                problems.push(format!("a connection of {count} requests neither finished nor closed within {CONNECTION_BOUND:?}: {heads:?}"));
            }
            // 500: a bug; 502 from an echo function: a record the function's runtime could
            // not parse was let through and failed its batch-mates.
            if let Some(status) = result
                .statuses
                .iter()
                .find(|s| matches!(**s, 500 | 502) || **s < 100)
            {
                problems.push(format!("answered {status}"));
            }
            if framed && !result.answered_to_the_end {
                problems.push(format!(
                    "{count} well-framed requests: the connection closed after {} answers {:?}: {heads:?}",
                    result.statuses.len(), result.statuses
                ));
            }
            if framed && result.answered_to_the_end && result.statuses.len() != count + 1 {
                problems.push(format!(
                    "{count} well-framed requests + sentinel got {} answers",
                    result.statuses.len()
                ));
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let sent = sent.load(Ordering::Relaxed);
    let problems = problems.lock().unwrap().clone();
    eprintln!(
        "{sent} requests over {connections} connections in {:.1} s; {} records reached Lambda",
        elapsed.as_secs_f64(),
        fake.processed_summary().0
    );
    assert!(sent >= REQUESTS, "only {sent} requests were sent");
    assert!(
        problems.is_empty(),
        "{} problems, first: {:?}",
        problems.len(),
        &problems[..problems.len().min(3)]
    );
    let (_, most) = fake.processed_summary();
    assert_eq!(most, 1, "a record reached Lambda twice");
    assert_eq!(count_panics(), panics, "a task of the server panicked");

    // Still serving, on both listeners.
    let good = harness.post("/records", r#"{"after":"fuzz"}"#).await;
    assert_eq!(good.status(), 200);
    let metrics = harness
        .http
        .get(format!("http://{}/metrics", harness.running.admin_addr))
        .send()
        .await
        .expect("admin answers");
    assert_eq!(metrics.status(), 200);
}

/// What the fake Lambda does with one call, decided before the call's record ids are known.
#[derive(Clone, Debug)]
enum Plan {
    /// Runs the batch and answers 200 with a body built from the call.
    Ran(Body, Option<&'static str>),
    /// Runs the batch and drops the connection.
    RanThenDropped,
    /// Drops the connection without running anything.
    Dropped,
    /// Throttles without running anything.
    Throttled(&'static str, &'static str),
    /// Another error status without running anything.
    Failed(u16, &'static str),
}

#[derive(Clone, Debug)]
enum Body {
    Echo,
    /// Results for only every `k`th record.
    Partial(usize),
    /// Every record's result twice, the second one an error.
    Duplicated,
    /// Results whose status is neither success nor error.
    WrongStatus(&'static str),
    /// `batchItemFailures` naming some records of the batch, plus `extra` entries.
    ItemFailures(usize, Vec<Value>),
    /// Any JSON value.
    Json(Value),
    /// Bytes that may not be JSON at all.
    Raw(Vec<u8>),
}

const REASONS: &[&str] = &[
    "CallerRateLimitExceeded",
    "ReservedFunctionConcurrentInvocationLimitExceeded",
    "FunctionInvocationRateLimitExceeded",
    "",
    "SomethingNew",
];

const RETRY_AFTERS: &[&str] = &[
    "0",
    "1",
    "0.001",
    "1e300",
    "1e19",
    "18446744073709551616",
    "-1",
    "NaN",
    "inf",
    "",
    "soon",
];

const ERROR_TYPES: &[&str] = &[
    "ServiceException",
    "ResourceNotFoundException",
    "InvalidRequestContentException",
    "RequestTooLargeException",
    "EC2ThrottledException",
    "ResourceNotReadyException",
    "KMSAccessDeniedException",
    "Garbage",
    "",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[a-z\"\\\\]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::hash_map("[a-zA-Z]{0,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        3 => Just(Body::Echo),
        1 => (2usize..5).prop_map(Body::Partial),
        1 => Just(Body::Duplicated),
        1 => prop::sample::select(vec!["SUCCESS", "", "ok", "failed"]).prop_map(Body::WrongStatus),
        2 => (0usize..4, prop::collection::vec(prop_oneof![
                Just(json!({"itemIdentifier": ""})),
                Just(json!({"itemIdentifier": "r-not-in-batch"})),
                Just(json!({"itemIdentifier": null})),
                Just(json!({"itemIdentifier": 7})),
                Just(json!({})),
                Just(json!("r1")),
            ], 0..2)).prop_map(|(k, extra)| Body::ItemFailures(k, extra)),
        1 => json_value().prop_map(Body::Json),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Body::Raw),
    ]
}

fn plan() -> impl Strategy<Value = Plan> {
    prop_oneof![
        6 => (body(), prop::option::weighted(0.15, prop::sample::select(vec!["Unhandled", "Handled", "x"])))
            .prop_map(|(b, e)| Plan::Ran(b, e)),
        1 => Just(Plan::RanThenDropped),
        1 => Just(Plan::Dropped),
        2 => (prop::sample::select(REASONS), prop::sample::select(RETRY_AFTERS))
            .prop_map(|(r, a)| Plan::Throttled(r, a)),
        2 => (prop::sample::select(vec![400u16, 403, 404, 413, 500, 502, 503, 504]), prop::sample::select(ERROR_TYPES))
            .prop_map(|(s, t)| Plan::Failed(s, t)),
    ]
}

fn materialize(plan: &Plan, call: &Call) -> Action {
    let ids = call.ids();
    match plan {
        Plan::Ran(body, function_error) => {
            let bytes: Vec<u8> = match body {
                Body::Echo => Reply::echo(call).body.to_vec(),
                Body::Partial(k) => {
                    let results: Vec<Value> = ids
                        .iter()
                        .step_by(*k)
                        .map(|id| json!({"id": id, "status": "success", "body": 1}))
                        .collect();
                    json!({ "results": results }).to_string().into_bytes()
                }
                Body::Duplicated => {
                    let results: Vec<Value> = ids
                        .iter()
                        .flat_map(|id| {
                            [
                                json!({"id": id, "status": "success", "body": 1}),
                                json!({"id": id, "status": "error", "error": "second"}),
                            ]
                        })
                        .collect();
                    json!({ "results": results }).to_string().into_bytes()
                }
                Body::WrongStatus(status) => {
                    let results: Vec<Value> = ids
                        .iter()
                        .map(|id| json!({"id": id, "status": status}))
                        .collect();
                    json!({ "results": results }).to_string().into_bytes()
                }
                Body::ItemFailures(k, extra) => {
                    let mut failures: Vec<Value> = ids
                        .iter()
                        .take(*k)
                        .map(|id| json!({ "itemIdentifier": id }))
                        .collect();
                    failures.extend(extra.iter().cloned());
                    json!({ "batchItemFailures": failures })
                        .to_string()
                        .into_bytes()
                }
                Body::Json(v) => v.to_string().into_bytes(),
                Body::Raw(bytes) => bytes.clone(),
            };
            let mut reply = Reply::new(200, bytes);
            if let Some(kind) = function_error {
                reply = reply.header("X-Amz-Function-Error", kind);
            }
            Action::Process(reply)
        }
        Plan::RanThenDropped => Action::ProcessThenDrop,
        Plan::Dropped => Action::Drop,
        Plan::Throttled(reason, after) => Action::Reply(Reply::throttle(reason, after)),
        Plan::Failed(status, kind) => Action::Reply(Reply::service_error(*status, kind)),
    }
}

/// Statuses a caller may hear when Lambda misbehaves.
const CONTRACT: &[u16] = &[200, 413, 422, 429, 502, 503, 504];

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn lambda_answers_never_tell_a_caller_an_untrue_outcome(plans in prop::collection::vec(plan(), 1..6), callers in 1usize..24) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let panics = count_panics();
        runtime.block_on(async move {
            let script_plans = plans.clone();
            let fake = FakeLambda::start(move |call| {
                materialize(&script_plans[call.n % script_plans.len()], call)
            })
            .await;
            let toml = fake_config(
                &fake,
                &route(
                    "records",
                    "f",
                    r#"request_timeout = "8s"
batch = { max_records = 8, max_wait = "5ms", flush = "window" }
retry = { max_attempts = 3, base = "1ms", cap = "20ms", budget = 1.0, retry_timeouts = false }"#,
                ),
            );
            let harness = Harness::start(&toml).await;
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..callers {
                let request = harness
                    .http
                    .post(harness.url("/records"))
                    .body(format!(r#"{{"caller":{i}}}"#));
                tasks.spawn(async move {
                    let response = request.send().await.expect("every caller gets an answer");
                    let status = response.status().as_u16();
                    let body: Value = response.json().await.expect("every answer is JSON");
                    (status, body)
                });
            }
            let mut answers = Vec::new();
            while let Some(done) = tasks.join_next().await {
                answers.push(done.expect("caller task"));
            }
            prop_assert_eq!(answers.len(), callers);
            for (status, body) in &answers {
                prop_assert!(CONTRACT.contains(status), "status {} is outside the contract: {}", status, body);
                if *status == 200 {
                    let id = body["id"].as_str().unwrap_or_default();
                    prop_assert!(fake.processed(id) >= 1, "told success for {} which the function never ran: {}", id, body);
                }
            }
            // A record runs again only when a batch holding it failed with a function error
            // (bisecting re-sends the halves, as Lambda's own BisectBatchOnFunctionError does);
            // never after a lost answer with retry_timeouts = false.
            let mut bisected = std::collections::HashSet::new();
            for call in fake.calls() {
                if matches!(plans[call.n % plans.len()], Plan::Ran(_, Some(_))) {
                    bisected.extend(call.ids());
                }
            }
            for call in fake.calls() {
                for id in call.ids() {
                    let runs = fake.processed(&id);
                    prop_assert!(runs <= 1 || bisected.contains(&id), "record {} ran {} times with retry_timeouts = false (plans {:?})", id, runs, plans);
                }
            }
            Ok(())
        })?;
        prop_assert_eq!(count_panics(), panics, "a task of the server panicked");
    }
}
