//! A scriptable fake Lambda endpoint: speaks just enough of the Invoke REST API for the
//! real `aws-sdk-lambda` client, and does whatever the test's script says with each call —
//! answer garbage, throttle with absurd numbers, process the batch and then drop the
//! connection, or hang. It counts how often each record id was *processed* (seen by the
//! "function" and run), so a duplicate run is visible.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// One invoke as the fake saw it.
#[derive(Clone, Debug)]
pub struct Call {
    /// 0-based, in arrival order.
    pub n: usize,
    pub function: String,
    /// `X-Amz-Invocation-Type` (`RequestResponse` when absent).
    pub invocation_type: String,
    pub payload: Bytes,
    /// The batch envelope's records `(id, body)`; empty for a payload that is not one.
    pub records: Vec<(String, Value)>,
}

impl Call {
    /// The ids of the batch's records.
    pub fn ids(&self) -> Vec<String> {
        self.records.iter().map(|(id, _)| id.clone()).collect()
    }
}

/// An HTTP answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Reply {
    pub fn new(status: u16, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn json(status: u16, body: &Value) -> Reply {
        Reply::new(status, body.to_string()).header("content-type", "application/json")
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The batch answered with every record a success echoing its body.
    pub fn echo(call: &Call) -> Reply {
        let results: Vec<Value> = call
            .records
            .iter()
            .map(|(id, body)| json!({"id": id, "status": "success", "body": body}))
            .collect();
        Reply::json(200, &json!({ "results": results }))
    }

    /// Lambda's `TooManyRequestsException` with `Reason` and a `Retry-After` of the fake's
    /// choosing (any text: the point is to send what Lambda never would).
    pub fn throttle(reason: &str, retry_after: &str) -> Reply {
        Reply::json(
            429,
            &json!({"Reason": reason, "Type": "User", "message": "Rate Exceeded.", "retryAfterSeconds": retry_after}),
        )
        .header("x-amzn-ErrorType", "TooManyRequestsException")
        .header("retry-after", retry_after)
    }

    /// An AWS service error (`ServiceException` and the like).
    pub fn service_error(status: u16, kind: &str) -> Reply {
        Reply::json(
            status,
            &json!({"Type": "Service", "message": "fake failure"}),
        )
        .header("x-amzn-ErrorType", kind)
    }

    /// A function error (`X-Amz-Function-Error: Unhandled`), as a runtime that crashed.
    pub fn function_error(error_type: &str, message: &str) -> Reply {
        Reply::json(
            200,
            &json!({"errorType": error_type, "errorMessage": message}),
        )
        .header("X-Amz-Function-Error", "Unhandled")
    }
}

/// What the fake does with one call.
#[derive(Clone, Debug)]
pub enum Action {
    /// Run the batch (count each record as processed), then answer.
    Process(Reply),
    /// Answer without running anything.
    Reply(Reply),
    /// Run the batch, then close the connection without a response: the request was
    /// delivered and processed, the caller never hears so.
    ProcessThenDrop,
    /// Close the connection without running anything (as a proxy that fails mid-request).
    Drop,
    /// Run the batch, wait this long, then answer (a slow function).
    ProcessSlowly(Duration, Reply),
    /// Never answer (bounded at 5 minutes so nothing outlives a test run).
    Hang,
}

type Script = dyn Fn(&Call) -> Action + Send + Sync;

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    processed: HashMap<String, u32>,
}

/// A running fake. Dropping it stops accepting.
pub struct FakeLambda {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeLambda {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeLambda {
    /// Starts the fake on a free loopback port with `script` deciding every invoke.
    pub async fn start(script: impl Fn(&Call) -> Action + Send + Sync + 'static) -> FakeLambda {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let script: Arc<Script> = Arc::new(script);
        let task = tokio::spawn(accept(listener, Arc::clone(&state), script));
        FakeLambda { addr, state, task }
    }

    /// A fake that runs and echoes every batch.
    pub async fn echo() -> FakeLambda {
        FakeLambda::start(|call| Action::Process(Reply::echo(call))).await
    }

    /// The URL to give `lambda.endpoint_url`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state
            .lock()
            .expect("no holder of the fake's state lock panics")
            .calls
            .clone()
    }

    /// How often record `id` was processed.
    pub fn processed(&self, id: &str) -> u32 {
        self.state
            .lock()
            .expect("no holder of the fake's state lock panics")
            .processed
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    /// Distinct records processed, and the largest number of times any one was.
    pub fn processed_summary(&self) -> (usize, u32) {
        let state = self
            .state
            .lock()
            .expect("no holder of the fake's state lock panics");
        let most = state.processed.values().copied().max().unwrap_or(0);
        (state.processed.len(), most)
    }
}

async fn accept(listener: TcpListener, state: Arc<Mutex<State>>, script: Arc<Script>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (state, script) = (Arc::clone(&state), Arc::clone(&script));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                handle(request, Arc::clone(&state), Arc::clone(&script))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// An error from the service makes hyper close the connection without a response.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the script")
    }
}

impl std::error::Error for Dropped {}

async fn handle(
    request: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
    script: Arc<Script>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let path = request.uri().path().to_owned();
    let invocation_type = request
        .headers()
        .get("x-amz-invocation-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("RequestResponse")
        .to_owned();
    let Some(function) = path
        .strip_prefix("/2015-03-31/functions/")
        .and_then(|rest| rest.strip_suffix("/invocations"))
        .map(str::to_owned)
    else {
        // Discovery and readiness probes: Lambda's "not found" shape.
        return Ok(respond(
            Reply::json(404, &json!({"Type": "User", "Message": "not found"}))
                .header("x-amzn-ErrorType", "ResourceNotFoundException"),
        ));
    };
    let payload = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return Err(Dropped),
    };
    // Read as a serde_json-based runtime would (recursion limit 128, envelope included); a
    // body that is JSON but not representable as a `Value` (`1e400`) still counts as run.
    #[derive(serde::Deserialize)]
    struct Envelope {
        records: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        id: String,
        body: Box<serde_json::value::RawValue>,
    }
    let records = serde_json::from_slice::<Envelope>(&payload)
        .map(|envelope| envelope.records)
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            let body = serde_json::from_str(r.body.get()).unwrap_or(Value::Null);
            (r.id, body)
        })
        .collect();
    let call = {
        let mut state = state
            .lock()
            .expect("no holder of the fake's state lock panics");
        let call = Call {
            n: state.calls.len(),
            function,
            invocation_type,
            payload,
            records,
        };
        state.calls.push(call.clone());
        call
    };
    let action = script(&call);
    let process = || {
        let mut state = state
            .lock()
            .expect("no holder of the fake's state lock panics");
        for (id, _) in &call.records {
            *state.processed.entry(id.clone()).or_default() += 1;
        }
    };
    match action {
        Action::Process(reply) => {
            process();
            Ok(respond(reply))
        }
        Action::Reply(reply) => Ok(respond(reply)),
        Action::ProcessThenDrop => {
            process();
            Err(Dropped)
        }
        Action::Drop => Err(Dropped),
        Action::ProcessSlowly(wait, reply) => {
            process();
            tokio::time::sleep(wait).await;
            Ok(respond(reply))
        }
        Action::Hang => {
            tokio::time::sleep(Duration::from_secs(300)).await;
            Err(Dropped)
        }
    }
}

fn respond(reply: Reply) -> Response<Full<Bytes>> {
    let mut response = Response::builder().status(reply.status);
    let mut has_request_id = false;
    for (name, value) in &reply.headers {
        has_request_id |= name.eq_ignore_ascii_case("x-amzn-requestid");
        response = response.header(name, value);
    }
    if !has_request_id {
        response = response.header("x-amzn-RequestId", "00000000-0000-0000-0000-000000000000");
    }
    response
        .body(Full::new(reply.body))
        .expect("the script's reply is a valid response")
}
