//! The Lambda Invoke API front door, driven by real SDK clients pointed at the sidecar:
//! `aws-sdk-lambda` here, boto3 through `tests/boto3/invoke.py`.

mod common;

use std::time::Duration;

use aws_sdk_lambda::config::retry::RetryConfig;
use aws_sdk_lambda::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_lambda::operation::invoke::{InvokeError, InvokeOutput};
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::{InvocationType, ThrottleReason};
use common::{route, Harness};
use serde_json::{json, Value};

/// A function of the embedded emulator (echo, 20 ms unless `extra` says otherwise), with
/// the given extra TOML lines.
fn function(name: &str, extra: &str) -> String {
    let latency = if extra.contains("latency") {
        ""
    } else {
        "latency = \"20ms\"\n"
    };
    format!("[[emulator.functions]]\nname = \"{name}\"\n{latency}{extra}\n")
}

/// A config like `common::config_toml`, with `[lambda]` lines and sections of the test's own.
fn config(lambda: &str, functions: &str, rest: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[limits]
global = {{ rate = 100000.0, burst = 100000 }}
default = {{ rate = 100000.0, burst = 100000 }}

[lambda]
endpoint_url = "http://127.0.0.1:0"
{lambda}

[emulator]
enabled = true
listen = "127.0.0.1:0"
{functions}
{rest}
"#
    )
}

/// An SDK client of the sidecar signing with `access_key`; `retry` as the SDK's default
/// (`None`) or as given.
fn client(h: &Harness, access_key: &str, retry: Option<RetryConfig>) -> aws_sdk_lambda::Client {
    let mut conf = aws_sdk_lambda::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(format!("http://{}", h.running.addr))
        .credentials_provider(Credentials::new(
            access_key,
            "placeholder-secret",
            None,
            None,
            "test",
        ));
    if let Some(retry) = retry {
        conf = conf.retry_config(retry);
    }
    aws_sdk_lambda::Client::from_conf(conf.build())
}

async fn invoke(client: &aws_sdk_lambda::Client, function: &str, payload: &Value) -> InvokeOutput {
    client
        .invoke()
        .function_name(function)
        .payload(Blob::new(payload.to_string()))
        .send()
        .await
        .expect("invoke answered with a result")
}

async fn invoke_err(
    client: &aws_sdk_lambda::Client,
    function: &str,
    kind: InvocationType,
) -> InvokeError {
    client
        .invoke()
        .function_name(function)
        .invocation_type(kind)
        .payload(Blob::new(r#"{"n":1}"#))
        .send()
        .await
        .expect_err("invoke is refused")
        .into_service_error()
}

fn payload(output: &InvokeOutput) -> Value {
    serde_json::from_slice(output.payload().expect("a payload").as_ref()).expect("JSON payload")
}

#[tokio::test]
async fn an_sdk_invoke_through_a_raw_route_gets_the_functions_payload() {
    let h = Harness::start(&config(
        "",
        &function("echo", ""),
        &route("direct", "echo", "envelope = \"raw\""),
    ))
    .await;
    let lambda = client(&h, "AKIDRAW", None);
    let output = invoke(&lambda, "echo", &json!({"n": 41, "s": "x"})).await;
    assert_eq!(output.status_code(), 200);
    assert_eq!(output.function_error(), None);
    assert_eq!(output.executed_version(), Some("$LATEST"));
    assert_eq!(payload(&output), json!({"n": 41, "s": "x"}));
    // A full ARN and a qualifier-less `$LATEST` reach the same route.
    let output = invoke(
        &lambda,
        "arn:aws:lambda:us-east-1:123456789012:function:echo",
        &json!([1, 2]),
    )
    .await;
    assert_eq!(payload(&output), json!([1, 2]));
    let output = lambda
        .invoke()
        .function_name("echo")
        .qualifier("$LATEST")
        .payload(Blob::new("\"three\""))
        .send()
        .await
        .expect("invoked");
    assert_eq!(payload(&output), json!("three"));
    let stats = h.stats("echo").await;
    assert_eq!(stats["invocations"], 3, "{stats}");
    assert_eq!(stats["records"], 3, "{stats}");
}

#[tokio::test]
async fn concurrent_sdk_invokes_on_a_batch_route_are_coalesced_and_each_gets_its_own_result() {
    const CALLS: usize = 24;
    let h = Harness::start(&config(
        "",
        &function("batched", "latency = \"100ms\""),
        &route(
            "batched",
            "batched",
            "batch = { max_records = 20, max_wait = \"50ms\" }",
        ),
    ))
    .await;
    let lambda = client(&h, "AKIDBATCH", None);
    let calls = (0..CALLS).map(|n| {
        let lambda = lambda.clone();
        async move {
            let output = invoke(&lambda, "batched", &json!({"n": n})).await;
            (n, output)
        }
    });
    for (n, output) in futures_util::future::join_all(calls).await {
        assert_eq!(output.status_code(), 200);
        assert_eq!(output.function_error(), None);
        assert_eq!(payload(&output), json!({"n": n}), "call {n}");
    }
    let stats = h.stats("batched").await;
    assert_eq!(stats["records"], CALLS, "{stats}");
    let invocations = stats["invocations"].as_u64().expect("a count");
    assert!(invocations < CALLS as u64, "not coalesced: {stats}");
}

#[tokio::test]
async fn a_flooded_access_key_gets_too_many_requests_with_its_reason_and_others_are_served() {
    let h = Harness::start(&config(
        "",
        &function("echo", ""),
        &format!(
            "{}\n[identity]\nsource = \"aws_access_key\"\n\n[[plans]]\nname = \"tiny\"\nrate = 0.01\nburst = 2\nkeys = [\"AKIDFLOOD\"]\n",
            route("records", "echo", "")
        ),
    ))
    .await;
    let flooded = client(&h, "AKIDFLOOD", Some(RetryConfig::disabled()));
    for n in 0..2 {
        let output = invoke(&flooded, "echo", &json!({"n": n})).await;
        assert_eq!(payload(&output), json!({"n": n}));
    }
    match invoke_err(&flooded, "echo", InvocationType::RequestResponse).await {
        InvokeError::TooManyRequestsException(e) => {
            assert_eq!(e.reason(), Some(&ThrottleReason::CallerRateLimitExceeded));
            assert_eq!(e.message(), Some("Rate Exceeded."));
            assert_eq!(e.r#type(), Some("User"));
            // One token every 100 s.
            let wait: u64 = e
                .retry_after_seconds()
                .expect("retryAfterSeconds")
                .parse()
                .expect("whole seconds");
            assert!((1..=100).contains(&wait), "{wait}");
        }
        other => panic!("expected TooManyRequestsException, got {other:?}"),
    }
    let other = client(&h, "AKIDOTHER", Some(RetryConfig::disabled()));
    let output = invoke(&other, "echo", &json!({"other": true})).await;
    assert_eq!(payload(&output), json!({"other": true}));
    assert_eq!(h.stats("echo").await["invocations"], 3);
}

#[tokio::test]
async fn an_unconfigured_function_is_resource_not_found() {
    let h = Harness::start(&config(
        "",
        &function("echo", ""),
        &route("records", "echo", ""),
    ))
    .await;
    let lambda = client(&h, "AKID", Some(RetryConfig::disabled()));
    for (name, arn) in [
        (
            "nope",
            "arn:aws:lambda:us-east-1:123456789012:function:nope",
        ),
        // A qualifier the route does not name is another function version.
        (
            "echo:7",
            "arn:aws:lambda:us-east-1:123456789012:function:echo:7",
        ),
        (
            "arn:aws:lambda:eu-west-1:111122223333:function:nope",
            "arn:aws:lambda:eu-west-1:111122223333:function:nope",
        ),
    ] {
        match invoke_err(&lambda, name, InvocationType::RequestResponse).await {
            InvokeError::ResourceNotFoundException(e) => {
                assert_eq!(
                    e.message(),
                    Some(format!("Function not found: {arn}").as_str())
                );
                assert_eq!(e.r#type(), Some("User"));
            }
            other => panic!("expected ResourceNotFoundException, got {other:?}"),
        }
    }
    assert_eq!(h.stats("echo").await["invocations"], 0);
}

#[tokio::test]
async fn event_invokes_are_accepted_once_delivered() {
    let h = Harness::start(&config(
        "",
        &format!("{}{}", function("sync", ""), function("async", "")),
        &format!(
            "{}{}",
            route("sync", "sync", ""),
            route("async", "async", "invocation = \"event\"")
        ),
    ))
    .await;
    let lambda = client(&h, "AKIDEVENT", Some(RetryConfig::disabled()));
    for function in ["sync", "async"] {
        let output = lambda
            .invoke()
            .function_name(function)
            .invocation_type(InvocationType::Event)
            .payload(Blob::new(r#"{"n":1}"#))
            .send()
            .await
            .expect("accepted");
        assert_eq!(output.status_code(), 202, "{function}");
        assert_eq!(output.payload().map_or(0, |p| p.as_ref().len()), 0);
    }
    assert_eq!(h.stats("sync").await["invocations"], 1);
    assert_eq!(h.stats("async").await["invocations"], 1);
    // An `event` route has no result to give a RequestResponse call.
    match invoke_err(&lambda, "async", InvocationType::RequestResponse).await {
        InvokeError::InvalidParameterValueException(e) => {
            assert!(e
                .message()
                .expect("a message")
                .contains("invocation = \"event\""));
        }
        other => panic!("expected InvalidParameterValueException, got {other:?}"),
    }
    assert_eq!(h.stats("async").await["invocations"], 1);
}

#[tokio::test]
async fn dry_runs_answer_204_without_invoking_or_spending_tokens() {
    let h = Harness::start(&config(
        "",
        &function("echo", ""),
        &format!(
            "{}\n[identity]\nsource = \"aws_access_key\"\n\n[[plans]]\nname = \"one\"\nrate = 0.01\nburst = 1\nkeys = [\"AKIDONE\"]\n",
            route("records", "echo", "")
        ),
    ))
    .await;
    let lambda = client(&h, "AKIDONE", Some(RetryConfig::disabled()));
    for _ in 0..3 {
        let output = lambda
            .invoke()
            .function_name("echo")
            .invocation_type(InvocationType::DryRun)
            .payload(Blob::new(r#"{"n":1}"#))
            .send()
            .await
            .expect("a dry run passes");
        assert_eq!(output.status_code(), 204);
    }
    let stats = h.stats("echo").await;
    assert_eq!(stats["invocations"], 0, "{stats}");
    assert_eq!(stats["dry_runs"], 0, "{stats}");
    // The key's one token is still there.
    let output = invoke(&lambda, "echo", &json!({"n": 2})).await;
    assert_eq!(payload(&output), json!({"n": 2}));
    assert!(matches!(
        invoke_err(&lambda, "echo", InvocationType::RequestResponse).await,
        InvokeError::TooManyRequestsException(_)
    ));
}

#[tokio::test]
async fn a_failed_record_comes_back_as_an_unhandled_function_error() {
    let h = Harness::start(&config(
        "",
        &format!(
            "{}{}",
            function("raw-poison", "handler = \"poison\""),
            function("batch-poison", "handler = \"poison\"")
        ),
        &format!(
            "{}{}",
            route("raw", "raw-poison", "envelope = \"raw\""),
            route("batch", "batch-poison", "")
        ),
    ))
    .await;
    let lambda = client(&h, "AKIDPOISON", None);
    // Raw: the whole invoke failed; its error is the payload.
    let output = invoke(&lambda, "raw-poison", &json!({"poison": true})).await;
    assert_eq!(output.status_code(), 200);
    assert_eq!(output.function_error(), Some("Unhandled"));
    let error = payload(&output);
    assert!(error["errorType"].is_string(), "{error}");
    assert!(
        error["errorMessage"]
            .as_str()
            .expect("a message")
            .contains("poison"),
        "{error}"
    );
    // Batch: the record's own error, next to a record that succeeded.
    let (good_record, bad_record) = (json!({"n": 1}), json!({"poison": true}));
    let (good, bad) = tokio::join!(
        invoke(&lambda, "batch-poison", &good_record),
        invoke(&lambda, "batch-poison", &bad_record),
    );
    assert_eq!(good.function_error(), None);
    assert_eq!(payload(&good), json!({"n": 1}));
    assert_eq!(bad.function_error(), Some("Unhandled"));
    assert!(
        payload(&bad).to_string().contains("poison"),
        "{:?}",
        payload(&bad)
    );
    // One attempt each: the SDK did not resend a function error.
    assert_eq!(h.stats("raw-poison").await["invocations"], 1);
}

/// The outcome-unknown answer of a call the function may have run: the SDK, with its
/// default (standard, 3 attempts) retry config, must not send it again.
#[tokio::test]
async fn an_unknown_outcome_is_not_resent_by_the_sdks_default_retries() {
    let h = Harness::start(&config(
        "read_timeout = \"300ms\"",
        &format!(
            "{}{}",
            function("slow", "latency = \"2s\""),
            function("throttled", "invoke_rate = 0.01\ninvoke_burst = 1")
        ),
        &format!(
            "{}{}",
            route("slow", "slow", "envelope = \"raw\""),
            route(
                "throttled",
                "throttled",
                "envelope = \"raw\"\nretry = { max_attempts = 1 }"
            )
        ),
    ))
    .await;
    let lambda = client(&h, "AKIDSLOW", None);
    let output = invoke(&lambda, "slow", &json!({"n": 1})).await;
    assert_eq!(output.status_code(), 200);
    assert_eq!(output.function_error(), Some("Unhandled"));
    let error = payload(&output);
    assert_eq!(error["errorType"], "Sluicegate.OutcomeUnknown", "{error}");
    assert!(
        error["errorMessage"]
            .as_str()
            .expect("a message")
            .contains("may have run"),
        "{error}"
    );
    assert_eq!(h.stats("slow").await["invocations"], 1);

    // The control: the same client does retry what is safe to retry. The function's one
    // invoke token is spent, then each SDK attempt is throttled by Lambda once.
    invoke(&lambda, "throttled", &json!({"n": 1})).await;
    let refused = lambda
        .invoke()
        .function_name("throttled")
        .payload(Blob::new(r#"{"n":2}"#))
        .send()
        .await
        .expect_err("throttled")
        .into_service_error();
    match refused {
        InvokeError::TooManyRequestsException(e) => {
            assert_eq!(e.reason(), Some(&ThrottleReason::CallerRateLimitExceeded));
        }
        other => panic!("expected TooManyRequestsException, got {other:?}"),
    }
    let stats = h.stats("throttled").await;
    assert_eq!(stats["invocations"], 1, "{stats}");
    assert_eq!(stats["throttles"]["CallerRateLimitExceeded"], 3, "{stats}");
}

#[tokio::test]
async fn a_passed_caller_deadline_is_not_resent_by_the_sdks_default_retries() {
    let h = Harness::start(&config(
        "",
        &function("slow", "latency = \"1s\""),
        &route(
            "slow",
            "slow",
            "envelope = \"raw\"\nrequest_timeout = \"300ms\"",
        ),
    ))
    .await;
    let lambda = client(&h, "AKIDLATE", None);
    let output = invoke(&lambda, "slow", &json!({"n": 1})).await;
    assert_eq!(output.status_code(), 200);
    assert_eq!(output.function_error(), Some("Unhandled"));
    assert_eq!(payload(&output)["errorType"], "Sluicegate.DeadlineExceeded");
    assert_eq!(h.stats("slow").await["invocations"], 1);
}

#[tokio::test]
async fn invoke_api_answers_carry_lambdas_headers_and_refuse_bad_requests_in_lambdas_shapes() {
    let h = Harness::start(&config(
        "",
        &function("echo", ""),
        &format!(
            "{}\n[identity]\nsource = \"aws_access_key\"\nrequire_known_key = true\n\n[[plans]]\nname = \"p\"\nrate = 100.0\nburst = 100\nkeys = [\"AKIDKNOWN\"]\n",
            route("records", "echo:live", "envelope = \"raw\"")
        ),
    ))
    .await;
    let url = h.url("/2015-03-31/functions/echo%3Alive/invocations");
    let signed = "AWS4-HMAC-SHA256 Credential=AKIDKNOWN/20250101/us-east-1/lambda/aws4_request, SignedHeaders=host, Signature=00";
    let send = |auth: Option<&str>, body: &str, path: &str| {
        let mut request = h.http.post(h.url(path)).body(body.to_owned());
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.header("x-request-id", "req-1").send()
    };
    let path = "/2015-03-31/functions/echo%3Alive/invocations";
    let ok = send(Some(signed), r#"{"n":1}"#, path)
        .await
        .expect("answered");
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-amzn-requestid"], "req-1");
    assert_eq!(ok.headers()["x-amz-executed-version"], "live");
    assert_eq!(ok.headers()["content-type"], "application/json");
    assert_eq!(ok.text().await.expect("body"), r#"{"n":1}"#);
    // `?Qualifier=` names the same version.
    let ok = send(
        Some(signed),
        "1",
        "/2015-03-31/functions/echo/invocations?Qualifier=live",
    )
    .await
    .expect("answered");
    assert_eq!(ok.status(), 200);

    let refusals = [
        (None, "{}", path, 401, "MissingAuthenticationTokenException"),
        (
            Some("Bearer abc"),
            "{}",
            path,
            400,
            "IncompleteSignatureException",
        ),
        (
            Some("AWS4-HMAC-SHA256 Credential=AKIDSTRANGER/20250101/us-east-1/lambda/aws4_request, Signature=0"),
            "{}",
            path,
            403,
            "UnrecognizedClientException",
        ),
        (Some(signed), "{not json", path, 400, "InvalidRequestContentException"),
        (
            Some(signed),
            "{}",
            "/2015-03-31/functions/echo:live/invocations?Qualifier=other",
            400,
            "InvalidParameterValueException",
        ),
        (
            Some(signed),
            "{}",
            "/2015-03-31/functions/echo/configuration",
            404,
            "UnknownOperationException",
        ),
    ];
    for (auth, body, path, status, error_type) in refusals {
        let response = send(auth, body, path).await.expect("answered");
        assert_eq!(response.status(), status, "{path} {auth:?} {body}");
        assert_eq!(response.headers()["x-amzn-errortype"], error_type);
        assert_eq!(response.headers()["x-amzn-requestid"], "req-1");
        let body: Value = response.json().await.expect("JSON body");
        assert_eq!(body["Type"], "User", "{body}");
        assert!(body["message"].is_string(), "{body}");
    }
    let large = format!("\"{}\"", "x".repeat(300 * 1024));
    let response = send(Some(signed), &large, path).await.expect("answered");
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.headers()["x-amzn-errortype"],
        "RequestTooLargeException"
    );
    let get = h.http.get(&url).send().await.expect("answered");
    assert_eq!(get.status(), 404);
    assert_eq!(
        get.headers()["x-amzn-errortype"],
        "UnknownOperationException"
    );
    let invalid_type = h
        .http
        .post(&url)
        .header("authorization", signed)
        .header("x-amz-invocation-type", "Later")
        .body("{}")
        .send()
        .await
        .expect("answered");
    assert_eq!(invalid_type.status(), 400);
    assert_eq!(
        invalid_type.json::<Value>().await.expect("JSON")["message"],
        "1 validation error detected: Value 'Later' at 'invocationType' failed to satisfy constraint: Member must satisfy enum value set: [Event, RequestResponse, DryRun]"
    );
    // The same identity on the `/records` door.
    let record = send(Some(signed), "5", "/records").await.expect("answered");
    assert_eq!(record.status(), 200);
    let refused = send(Some("Bearer abc"), "5", "/records")
        .await
        .expect("answered");
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.expect("JSON");
    assert_eq!(body["error"], "bad_request");
    assert!(body["message"]
        .as_str()
        .expect("a message")
        .contains("Signature Version 4"));
    assert_eq!(h.stats("echo").await["invocations"], 3);
}

#[tokio::test]
async fn a_reload_rebuilds_which_functions_the_invoke_api_reaches() {
    let functions = format!("{}{}", function("echo", ""), function("other", ""));
    let h = Harness::start(&config("", &functions, &route("records", "echo", ""))).await;
    let lambda = client(&h, "AKIDRELOAD", Some(RetryConfig::disabled()));
    assert_eq!(payload(&invoke(&lambda, "echo", &json!(1)).await), json!(1));
    let moved = config("", &functions, &route("records", "other", ""));
    h.running
        .reload(sluicegate::config::Config::from_toml(&moved).expect("valid"))
        .await
        .expect("reload accepted");
    assert!(matches!(
        invoke_err(&lambda, "echo", InvocationType::RequestResponse).await,
        InvokeError::ResourceNotFoundException(_)
    ));
    assert_eq!(
        payload(&invoke(&lambda, "other", &json!(2)).await),
        json!(2)
    );
    assert_eq!(h.stats("echo").await["invocations"], 1);
    assert_eq!(h.stats("other").await["invocations"], 1);
}

/// boto3, as a Python service would call Lambda: `tests/boto3/invoke.py` asserts payloads,
/// a throttle's `Reason`, `ResourceNotFoundException` and an `Event` 202 (`scripts/test`
/// installs boto3).
#[tokio::test]
async fn boto3_clients_speak_to_the_invoke_api() {
    let h = Harness::start(&config(
        "",
        &format!("{}{}", function("echo", ""), function("batched", "latency = \"50ms\"")),
        &format!(
            "{}{}\n[identity]\nsource = \"aws_access_key\"\n\n[[plans]]\nname = \"tiny\"\nrate = 0.01\nburst = 2\nkeys = [\"AKIDFLOOD\"]\n",
            route("records", "echo", "envelope = \"raw\""),
            route("batched", "batched", ""),
        ),
    ))
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/boto3/invoke.py");
    let endpoint = format!("http://{}", h.running.addr);
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("python3")
            .arg(script)
            .arg(&endpoint)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the boto3 script finishes within 2 minutes")
    .expect("python3 runs");
    assert!(
        output.status.success(),
        "tests/boto3/invoke.py failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stats = h.stats("batched").await;
    assert_eq!(stats["records"], 8, "{stats}");
}
