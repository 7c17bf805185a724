//! Black-box tests of the Lambda emulator over a real socket, driven by the real
//! `aws-sdk-lambda` client: if the SDK parses and classifies these answers, so will the
//! proxy's invoker.

use std::time::Duration;

use aws_sdk_lambda::operation::get_function_configuration::GetFunctionConfigurationError;
use aws_sdk_lambda::operation::invoke::{InvokeError, InvokeOutput};
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::{InvocationType, ThrottleReason};
use serde_json::{json, Value};
use sluicegate::emulator::{
    self, EmulatorConfig, FailureMode, FunctionConfig, Handler, ResponseShape, RunningEmulator,
    Stats,
};
use tokio::net::TcpListener;

async fn start(functions: Vec<FunctionConfig>) -> (RunningEmulator, aws_sdk_lambda::Client) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let cfg = EmulatorConfig {
        functions,
        ..EmulatorConfig::default()
    };
    cfg.validate().expect("test config is valid");
    let lambda = emulator::spawn(cfg, listener)
        .await
        .expect("emulator starts");
    let addr = lambda.local_addr;
    let conf = aws_sdk_lambda::Config::builder()
        .behavior_version(aws_sdk_lambda::config::BehaviorVersion::latest())
        .region(aws_sdk_lambda::config::Region::new("us-east-1"))
        .endpoint_url(format!("http://{addr}"))
        .credentials_provider(aws_sdk_lambda::config::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .retry_config(aws_sdk_lambda::config::retry::RetryConfig::disabled())
        .build();
    (lambda, aws_sdk_lambda::Client::from_conf(conf))
}

/// A fast function: tests stay in the tens of milliseconds.
fn function(name: &str) -> FunctionConfig {
    FunctionConfig {
        latency: Duration::from_millis(5),
        ..FunctionConfig::new(name)
    }
}

fn envelope(bodies: &[Value]) -> Vec<u8> {
    let records: Vec<Value> = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| json!({"id": format!("r{}", i + 1), "key": "k", "body": body}))
        .collect();
    serde_json::to_vec(&json!({ "records": records })).expect("serializes")
}

async fn invoke(client: &aws_sdk_lambda::Client, name: &str, payload: Vec<u8>) -> InvokeOutput {
    client
        .invoke()
        .function_name(name)
        .payload(Blob::new(payload))
        .send()
        .await
        .expect("invoke succeeds")
}

async fn invoke_err(
    client: &aws_sdk_lambda::Client,
    name: &str,
    kind: InvocationType,
    payload: Vec<u8>,
) -> InvokeError {
    client
        .invoke()
        .function_name(name)
        .invocation_type(kind)
        .payload(Blob::new(payload))
        .send()
        .await
        .expect_err("invoke is refused")
        .into_service_error()
}

fn payload_json(output: &InvokeOutput) -> Value {
    serde_json::from_slice(output.payload().expect("a payload").as_ref()).expect("payload is JSON")
}

async fn stats_over_http(lambda: &RunningEmulator) -> Stats {
    let url = format!("{}/emulator/stats", lambda.endpoint_url());
    reqwest::get(url)
        .await
        .expect("stats endpoint answers")
        .json()
        .await
        .expect("stats are JSON")
}

#[tokio::test]
async fn echoes_a_batch_envelope_record_by_record() {
    let (_lambda, client) = start(vec![function("echo")]).await;
    let output = invoke(
        &client,
        "echo",
        envelope(&[json!({"n": 1}), json!([1, 2]), json!("three")]),
    )
    .await;
    assert_eq!(output.status_code(), 200);
    assert_eq!(output.function_error(), None);
    assert_eq!(output.executed_version(), Some("$LATEST"));
    assert_eq!(
        payload_json(&output),
        json!({"results": [
            {"id": "r1", "status": "success", "body": {"n": 1}},
            {"id": "r2", "status": "success", "body": [1, 2]},
            {"id": "r3", "status": "success", "body": "three"},
        ]})
    );
}

#[tokio::test]
async fn echoes_any_other_payload_byte_for_byte() {
    let (_lambda, client) = start(vec![function("echo")]).await;
    let raw = b"{ \"spaced\" : [1,  2.50] }".to_vec();
    let output = invoke(&client, "echo", raw.clone()).await;
    assert_eq!(output.payload().expect("payload").as_ref(), raw.as_slice());
}

#[tokio::test]
async fn throttles_with_caller_rate_limit_reason_when_quota_spent() {
    let (lambda, client) = start(vec![FunctionConfig {
        // One token per 10s: the quota cannot refill while the test runs.
        invoke_rate: Some(0.1),
        invoke_burst: Some(2),
        ..function("limited")
    }])
    .await;
    invoke(&client, "limited", b"{}".to_vec()).await;
    invoke(&client, "limited", b"{}".to_vec()).await;
    match invoke_err(
        &client,
        "limited",
        InvocationType::RequestResponse,
        b"{}".to_vec(),
    )
    .await
    {
        InvokeError::TooManyRequestsException(e) => {
            assert_eq!(e.reason(), Some(&ThrottleReason::CallerRateLimitExceeded));
            // Whole seconds until the next token, rounded up: 10 minus the time spent so far.
            let retry_after: u64 = e
                .retry_after_seconds()
                .expect("Retry-After")
                .parse()
                .expect("whole seconds");
            assert!((1..=10).contains(&retry_after), "{retry_after}");
            assert_eq!(e.r#type(), Some("User"));
            assert_eq!(e.message(), Some("Rate Exceeded."));
        }
        other => panic!("expected TooManyRequestsException, got {other:?}"),
    }
    // The quota covers asynchronous invokes too.
    match invoke_err(&client, "limited", InvocationType::Event, b"{}".to_vec()).await {
        InvokeError::TooManyRequestsException(e) => {
            assert_eq!(e.reason(), Some(&ThrottleReason::CallerRateLimitExceeded));
        }
        other => panic!("expected TooManyRequestsException, got {other:?}"),
    }
    let stats = &lambda.stats().functions["limited"];
    assert_eq!(stats.invocations, 2);
    assert_eq!(stats.throttles.caller_rate_limit_exceeded, 2);
}

#[tokio::test]
async fn throttles_with_reserved_concurrency_reason_when_no_slot_is_free() {
    let (lambda, client) = start(vec![
        FunctionConfig {
            reserved_concurrency: Some(0),
            ..function("disabled")
        },
        FunctionConfig {
            reserved_concurrency: Some(1),
            latency: Duration::from_millis(300),
            ..function("single")
        },
    ])
    .await;
    match invoke_err(
        &client,
        "disabled",
        InvocationType::RequestResponse,
        b"{}".to_vec(),
    )
    .await
    {
        InvokeError::TooManyRequestsException(e) => {
            assert_eq!(
                e.reason(),
                Some(&ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded)
            );
        }
        other => panic!("expected TooManyRequestsException, got {other:?}"),
    }

    // Hold the only slot of "single", then invoke it again.
    let busy = tokio::spawn({
        let client = client.clone();
        async move { invoke(&client, "single", b"{}".to_vec()).await }
    });
    wait_until(&lambda, |s| s.functions["single"].in_flight == 1).await;
    match invoke_err(
        &client,
        "single",
        InvocationType::RequestResponse,
        b"{}".to_vec(),
    )
    .await
    {
        InvokeError::TooManyRequestsException(e) => {
            assert_eq!(
                e.reason(),
                Some(&ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded)
            );
        }
        other => panic!("expected TooManyRequestsException, got {other:?}"),
    }
    assert_eq!(busy.await.expect("first invoke").status_code(), 200);
    let stats = &lambda.stats().functions["single"];
    assert_eq!(stats.invocations, 1);
    assert_eq!(
        stats
            .throttles
            .reserved_function_concurrent_invocation_limit_exceeded,
        1
    );
    assert_eq!(stats.peak_concurrency, 1);
}

/// Waits for a condition on the emulator's counters (bounded, so a bug fails the test).
async fn wait_until(lambda: &RunningEmulator, condition: impl Fn(&Stats) -> bool) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !condition(&lambda.stats()) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("condition reached within 5s");
}

#[tokio::test]
async fn refuses_payloads_over_lambdas_limits_with_request_too_large() {
    let (lambda, client) = start(vec![function("f")]).await;
    let sync_limit = 6 * 1024 * 1024;
    match invoke_err(
        &client,
        "f",
        InvocationType::RequestResponse,
        vec![b' '; sync_limit + 1],
    )
    .await
    {
        InvokeError::RequestTooLargeException(e) => {
            assert_eq!(
                e.message(),
                Some("Request must be smaller than 6291456 bytes for the InvokeFunction operation")
            );
        }
        other => panic!("expected RequestTooLargeException, got {other:?}"),
    }
    match invoke_err(
        &client,
        "f",
        InvocationType::Event,
        vec![b' '; 1024 * 1024 + 1],
    )
    .await
    {
        InvokeError::RequestTooLargeException(e) => {
            assert!(
                e.message().expect("message").contains("1048576 bytes"),
                "{e:?}"
            );
        }
        other => panic!("expected RequestTooLargeException, got {other:?}"),
    }
    // Exactly at the limit is fine (whitespace around a JSON document).
    let mut at_limit = vec![b' '; sync_limit];
    at_limit[0] = b'1';
    assert_eq!(invoke(&client, "f", at_limit).await.status_code(), 200);
    let stats = &lambda.stats().functions["f"];
    assert_eq!((stats.too_large, stats.invocations), (2, 1));
}

#[tokio::test]
async fn unknown_function_is_resource_not_found() {
    let (_lambda, client) = start(vec![function("f")]).await;
    match invoke_err(
        &client,
        "missing",
        InvocationType::RequestResponse,
        b"{}".to_vec(),
    )
    .await
    {
        InvokeError::ResourceNotFoundException(e) => {
            assert_eq!(
                e.message(),
                Some("Function not found: arn:aws:lambda:us-east-1:123456789012:function:missing")
            );
        }
        other => panic!("expected ResourceNotFoundException, got {other:?}"),
    }
    let err = client
        .get_function_configuration()
        .function_name("missing")
        .send()
        .await
        .expect_err("unknown function")
        .into_service_error();
    assert!(
        matches!(
            err,
            GetFunctionConfigurationError::ResourceNotFoundException(_)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn payload_that_is_not_json_is_invalid_request_content() {
    let (_lambda, client) = start(vec![function("f")]).await;
    match invoke_err(
        &client,
        "f",
        InvocationType::RequestResponse,
        b"{\"unterminated\":".to_vec(),
    )
    .await
    {
        InvokeError::InvalidRequestContentException(e) => {
            assert!(
                e.message()
                    .expect("message")
                    .starts_with("Could not parse request body into json"),
                "{e:?}"
            );
        }
        other => panic!("expected InvalidRequestContentException, got {other:?}"),
    }
}

#[tokio::test]
async fn run_past_the_function_timeout_is_unhandled_task_timed_out() {
    let (lambda, client) = start(vec![FunctionConfig {
        latency: Duration::from_secs(2),
        timeout: Duration::from_millis(50),
        ..function("slow")
    }])
    .await;
    let started = tokio::time::Instant::now();
    let output = invoke(&client, "slow", b"{}".to_vec()).await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "answered at the timeout, not the latency"
    );
    assert_eq!(output.status_code(), 200);
    assert_eq!(output.function_error(), Some("Unhandled"));
    let message = payload_json(&output)["errorMessage"]
        .as_str()
        .expect("errorMessage")
        .to_owned();
    assert!(
        message.ends_with("Task timed out after 0.05 seconds"),
        "{message}"
    );
    let stats = &lambda.stats().functions["slow"];
    assert_eq!((stats.invocations, stats.errors, stats.timeouts), (1, 1, 1));
}

#[tokio::test]
async fn event_is_accepted_with_202_and_dry_run_answers_204() {
    let (lambda, client) = start(vec![FunctionConfig {
        reserved_concurrency: Some(0),
        ..function("f")
    }])
    .await;
    // Reserved concurrency 0 would throttle a synchronous invoke; Lambda queues events.
    let output = client
        .invoke()
        .function_name("f")
        .invocation_type(InvocationType::Event)
        .payload(Blob::new(envelope(&[json!(1), json!(2)])))
        .send()
        .await
        .expect("event accepted");
    assert_eq!(output.status_code(), 202);
    assert!(output.payload().is_none());
    let output = client
        .invoke()
        .function_name("f")
        .invocation_type(InvocationType::DryRun)
        .payload(Blob::new(b"{}".to_vec()))
        .send()
        .await
        .expect("dry run accepted");
    assert_eq!(output.status_code(), 204);
    let stats = &lambda.stats().functions["f"];
    assert_eq!(
        (
            stats.invocations,
            stats.records,
            stats.dry_runs,
            stats.queued_events
        ),
        (1, 2, 1, 1)
    );
}

#[tokio::test]
async fn failed_records_show_as_record_errors_or_batch_item_failures() {
    let (_lambda, client) = start(vec![
        FunctionConfig {
            handler: Handler::Poison,
            ..function("results")
        },
        FunctionConfig {
            handler: Handler::Poison,
            response: ResponseShape::BatchItemFailures,
            ..function("sqs-style")
        },
    ])
    .await;
    let batch = envelope(&[json!({"ok": 1}), json!({"poison": true}), json!({"ok": 3})]);

    let output = invoke(&client, "results", batch.clone()).await;
    assert_eq!(output.function_error(), None);
    let body = payload_json(&output);
    assert_eq!(
        body["results"][0],
        json!({"id": "r1", "status": "success", "body": {"ok": 1}})
    );
    assert_eq!(
        body["results"][1],
        json!({"id": "r2", "status": "error",
               "error": {"errorType": "RecordFailed", "errorMessage": "record r2 failed (poison)"}})
    );
    assert_eq!(body["results"][2]["status"], "success");

    let output = invoke(&client, "sqs-style", batch).await;
    assert_eq!(output.function_error(), None);
    assert_eq!(
        payload_json(&output),
        json!({"batchItemFailures": [{"itemIdentifier": "r2"}]})
    );
    let output = invoke(&client, "sqs-style", envelope(&[json!({"ok": 1})])).await;
    assert_eq!(payload_json(&output), json!({"batchItemFailures": []}));
}

#[tokio::test]
async fn crash_mode_fails_the_whole_invocation_unhandled() {
    let (lambda, client) = start(vec![FunctionConfig {
        handler: Handler::FailEvery,
        every: 3,
        failure: FailureMode::Crash,
        ..function("crashy")
    }])
    .await;
    let clean = invoke(&client, "crashy", envelope(&[json!(1), json!(2)])).await;
    assert_eq!(clean.function_error(), None);
    let crashed = invoke(&client, "crashy", envelope(&[json!(3)])).await;
    assert_eq!(crashed.status_code(), 200);
    assert_eq!(crashed.function_error(), Some("Unhandled"));
    let body = payload_json(&crashed);
    assert_eq!(body["errorType"], "InjectedFailure");
    assert!(
        body["errorMessage"]
            .as_str()
            .expect("errorMessage")
            .contains("record r1"),
        "{body}"
    );
    let stats = &lambda.stats().functions["crashy"];
    assert_eq!(
        (
            stats.invocations,
            stats.records,
            stats.errors,
            stats.record_failures
        ),
        (2, 3, 1, 1)
    );
}

#[tokio::test]
async fn function_configuration_and_concurrency_parse_in_the_sdk() {
    let (_lambda, client) = start(vec![
        FunctionConfig {
            reserved_concurrency: Some(7),
            timeout: Duration::from_millis(2500),
            memory_size: 512,
            ..function("reserved")
        },
        function("open"),
    ])
    .await;
    let cfg = client
        .get_function_configuration()
        .function_name("reserved")
        .send()
        .await
        .expect("configuration");
    assert_eq!(cfg.function_name(), Some("reserved"));
    assert_eq!(
        cfg.function_arn(),
        Some("arn:aws:lambda:us-east-1:123456789012:function:reserved")
    );
    assert_eq!(cfg.timeout(), Some(3), "whole seconds, rounded up");
    assert_eq!(cfg.memory_size(), Some(512));
    assert_eq!(cfg.version(), Some("$LATEST"));
    assert_eq!(cfg.state(), Some(&aws_sdk_lambda::types::State::Active));
    assert_eq!(
        cfg.last_update_status(),
        Some(&aws_sdk_lambda::types::LastUpdateStatus::Successful)
    );
    assert_eq!(
        cfg.package_type(),
        Some(&aws_sdk_lambda::types::PackageType::Zip)
    );
    assert_eq!(
        cfg.runtime(),
        Some(&aws_sdk_lambda::types::Runtime::Providedal2023)
    );

    let reserved = client
        .get_function_concurrency()
        .function_name("reserved")
        .send()
        .await
        .expect("concurrency");
    assert_eq!(reserved.reserved_concurrent_executions(), Some(7));
    let open = client
        .get_function_concurrency()
        .function_name("open")
        .send()
        .await
        .expect("concurrency");
    assert_eq!(open.reserved_concurrent_executions(), None);
}

#[tokio::test]
async fn accepts_a_full_function_arn_as_the_name() {
    let (_lambda, client) = start(vec![function("f")]).await;
    let output = invoke(&client, &emulator::function_arn("f"), b"[1]".to_vec()).await;
    assert_eq!(output.payload().expect("payload").as_ref(), b"[1]");
}

#[tokio::test]
async fn stats_count_exactly_what_was_sent() {
    let (lambda, client) = start(vec![FunctionConfig {
        invoke_rate: Some(0.01),
        invoke_burst: Some(5),
        ..function("counted")
    }])
    .await;
    // 5 accepted (3 sync with 2 records each, 2 events with 1 non-envelope payload each),
    // then 3 refused by the quota, plus a DryRun that neither counts nor spends quota.
    for _ in 0..3 {
        invoke(&client, "counted", envelope(&[json!(1), json!(2)])).await;
    }
    for _ in 0..2 {
        client
            .invoke()
            .function_name("counted")
            .invocation_type(InvocationType::Event)
            .payload(Blob::new(b"{\"solo\":true}".to_vec()))
            .send()
            .await
            .expect("event accepted");
    }
    client
        .invoke()
        .function_name("counted")
        .invocation_type(InvocationType::DryRun)
        .send()
        .await
        .expect("dry run");
    for _ in 0..3 {
        let err = invoke_err(
            &client,
            "counted",
            InvocationType::RequestResponse,
            b"{}".to_vec(),
        )
        .await;
        assert!(
            matches!(err, InvokeError::TooManyRequestsException(_)),
            "{err:?}"
        );
    }
    // Let the two events finish so the snapshot is settled.
    wait_until(&lambda, |s| {
        s.functions["counted"].in_flight == 0 && s.functions["counted"].queued_events == 0
    })
    .await;

    let stats = stats_over_http(&lambda).await;
    assert_eq!(stats, lambda.stats(), "HTTP and in-process stats agree");
    let f = &stats.functions["counted"];
    assert_eq!(f.invocations, 5);
    assert_eq!(f.records, 8);
    assert_eq!(f.throttles.caller_rate_limit_exceeded, 3);
    assert_eq!(
        f.throttles
            .reserved_function_concurrent_invocation_limit_exceeded,
        0
    );
    assert_eq!(f.errors, 0);
    assert_eq!(f.dry_runs, 1);
    assert!(f.peak_concurrency >= 1);

    // The documented field names, as raw JSON.
    let raw: Value = reqwest::get(format!("{}/emulator/stats", lambda.endpoint_url()))
        .await
        .expect("stats")
        .json()
        .await
        .expect("JSON");
    let f = &raw["functions"]["counted"];
    for field in [
        "invocations",
        "records",
        "throttles",
        "errors",
        "peak_concurrency",
    ] {
        assert!(f.get(field).is_some(), "missing {field} in {raw}");
    }
    assert_eq!(f["throttles"]["CallerRateLimitExceeded"], 3);
    assert_eq!(
        f["throttles"]["ReservedFunctionConcurrentInvocationLimitExceeded"],
        0
    );
}

#[tokio::test]
async fn shuts_down_gracefully_after_in_flight_invokes_finish() {
    let (lambda, client) = start(vec![FunctionConfig {
        latency: Duration::from_millis(100),
        ..function("f")
    }])
    .await;
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { invoke(&client, "f", b"{}".to_vec()).await }
    });
    wait_until(&lambda, |s| s.functions["f"].in_flight == 1).await;
    let addr = lambda.local_addr;
    lambda.shutdown().await.expect("clean shutdown");
    assert_eq!(in_flight.await.expect("invoke task").status_code(), 200);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}
