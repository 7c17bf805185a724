//! Reloads under load and where records go: one invoke gate per function across reloads
//! (a draining batcher and its replacement share it), and the embedded emulator as the
//! target only when `lambda.endpoint_url` names it.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use sluicegate::config::Config;

use crate::common::{self, config_toml, free_port, get_json, route, Harness, Process};
use crate::fake_lambda::FakeLambda;

const BIN: &str = env!("CARGO_BIN_EXE_sluicegate");

/// A function that runs 300 ms per invoke and throttles past two at once, as Lambda does
/// with reserved concurrency 2.
const SLOW_RESERVED_2: &str = r#"
[[emulator.functions]]
name = "slow"
latency = "300ms"
timeout = "3s"
reserved_concurrency = 2
"#;

fn slow_route(max_records: u32) -> String {
    route(
        "records",
        "slow",
        &format!(
            "batch = {{ max_records = {max_records} }}\n\
             invoke = {{ max_concurrency = 2, rate = 1000.0, burst = 1000 }}\n\
             retry = {{ max_attempts = 1 }}"
        ),
    )
}

/// Posts `n` records at once, each on its own task.
fn post_many(h: &Harness, n: usize, tag: &str) -> tokio::task::JoinSet<u16> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let request = h
            .http
            .post(h.url("/records"))
            .body(format!(r#"{{"tag":"{tag}","i":{i}}}"#));
        set.spawn(async move { request.send().await.map_or(0, |r| r.status().as_u16()) });
    }
    set
}

async fn in_flight(h: &Harness) -> u64 {
    let routes = get_json(
        &h.http,
        &format!("http://{}/admin/routes", h.running.admin_addr),
    )
    .await;
    routes["routes"][0]["invoke"]["in_flight"]
        .as_u64()
        .expect("in_flight is reported")
}

#[tokio::test]
async fn a_reload_that_changes_batching_keeps_one_gate_per_function() {
    let h = Harness::start(&config_toml(SLOW_RESERVED_2, &slow_route(5))).await;
    let mut before = post_many(&h, 30, "before");
    // Fill the gate: both permits held by invokes of the batcher about to be replaced.
    let start = tokio::time::Instant::now();
    while in_flight(&h).await < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the gate never filled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let changed = Config::from_toml(&config_toml(SLOW_RESERVED_2, &slow_route(4))).unwrap();
    let report = h.running.reload(changed).await.expect("reload accepted");
    assert!(report.restart_required.is_empty(), "{report:?}");
    let mut after = post_many(&h, 30, "after");

    let mut statuses = Vec::new();
    while let Some(status) = before.join_next().await {
        statuses.push(status.unwrap());
    }
    while let Some(status) = after.join_next().await {
        statuses.push(status.unwrap());
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let stats = h.stats("slow").await;
    assert_eq!(
        stats["throttles"]["ReservedFunctionConcurrentInvocationLimitExceeded"], 0,
        "{stats}"
    );
    assert!(
        stats["peak_concurrency"].as_u64().unwrap() <= 2,
        "the draining and the new batcher together stay within max_concurrency: {stats}"
    );
    assert_eq!(stats["records"], 60, "{stats}");
}

#[tokio::test]
async fn a_reload_that_lowers_max_concurrency_applies_to_the_shared_gate() {
    let h = Harness::start(&config_toml(SLOW_RESERVED_2, &slow_route(5))).await;
    let lowered = config_toml(SLOW_RESERVED_2, &slow_route(5)).replace(
        "max_concurrency = 2, rate = 1000.0",
        "max_concurrency = 1, rate = 1000.0",
    );
    h.running
        .reload(Config::from_toml(&lowered).unwrap())
        .await
        .expect("reload accepted");
    let routes = get_json(
        &h.http,
        &format!("http://{}/admin/routes", h.running.admin_addr),
    )
    .await;
    assert_eq!(
        routes["routes"][0]["invoke"]["concurrency_limit"], 1,
        "{routes}"
    );
    let mut load = post_many(&h, 20, "lowered");
    while let Some(status) = load.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let stats = h.stats("slow").await;
    assert_eq!(stats["peak_concurrency"], 1, "{stats}");
}

#[tokio::test]
async fn an_endpoint_url_naming_the_emulator_is_reported_as_the_emulator() {
    let h = Harness::start(&config_toml(SLOW_RESERVED_2, &slow_route(5))).await;
    let admin = format!("http://{}", h.running.admin_addr);
    let routes = get_json(&h.http, &format!("{admin}/admin/routes")).await;
    assert_eq!(routes["routes"][0]["endpoint"], "emulator", "{routes}");
    let ready = get_json(&h.http, &h.url("/readyz")).await;
    assert_eq!(ready["endpoint"], "emulator", "{ready}");
    assert_eq!(h.post("/records", "1").await.status(), 200);
    assert_eq!(h.stats("slow").await["invocations"], 1);
}

/// Without `endpoint_url` the data plane uses the SDK's own endpoint resolution and the
/// default credential chain — real AWS — even with `[emulator] enabled = true`. So that
/// nothing leaves the machine, the child process's "AWS" is the fake, reached through the
/// SDK's standard `AWS_ENDPOINT_URL_LAMBDA` variable (which is what resolution consults).
#[tokio::test]
async fn without_endpoint_url_records_go_to_aws_not_the_embedded_emulator() {
    let fake = FakeLambda::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin, emulator) = (free_port(), free_port(), free_port());
    let file = dir.path().join("sluicegate.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[server]
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
[lambda]
region = "us-east-1"
connect_timeout = "1s"
read_timeout = "5s"
[[routes]]
name = "records"
function = "f"
retry = {{ max_attempts = 1 }}
[emulator]
enabled = true
listen = "127.0.0.1:{emulator}"
[[emulator.functions]]
name = "f"
latency = "1ms"
"#
        ),
    )
    .unwrap();
    let _child = Process(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&file)
            .current_dir(dir.path())
            .env("HOME", dir.path())
            .env("AWS_CONFIG_FILE", dir.path().join("no-aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                dir.path().join("no-aws-credentials"),
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ACCESS_KEY_ID", "x")
            .env("AWS_SECRET_ACCESS_KEY", "x")
            .env("AWS_ENDPOINT_URL_LAMBDA", fake.endpoint())
            .env("AWS_ENDPOINT_URL", fake.endpoint())
            .env_remove("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_REGION")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    common::wait_until_up(&http, &format!("http://127.0.0.1:{listen}/healthz")).await;
    let response = http
        .post(format!("http://127.0.0.1:{listen}/records"))
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(fake.processed(body["id"].as_str().unwrap()), 1);
    let stats = get_json(
        &http,
        &format!("http://127.0.0.1:{emulator}/emulator/stats"),
    )
    .await;
    assert_eq!(stats["functions"]["f"]["invocations"], 0, "{stats}");
    let routes = get_json(&http, &format!("http://127.0.0.1:{admin}/admin/routes")).await;
    assert_eq!(routes["routes"][0]["endpoint"], "aws", "{routes}");
}

#[tokio::test]
async fn a_refused_reload_leaves_the_running_gate_as_it_was() {
    let fake = FakeLambda::echo().await;
    let toml = |extra: &str| {
        crate::fake_config(
            &fake,
            &route(
                "records",
                "f",
                &format!("invoke = {{ max_concurrency = 3, rate = 50.0, burst = 50 }}\n{extra}"),
            ),
        )
    };
    let harness = Harness::start(&toml("")).await;
    // A raised limit together with a dead-letter file that cannot be opened: the reload is
    // refused, and the limit must not have reached the gate on the way.
    let refused = Config::from_toml(
        &toml("dlq = { file = \"/dev/null/no/such/dir/dlq.jsonl\" }").replace(
            "max_concurrency = 3, rate = 50.0",
            "max_concurrency = 40, rate = 500.0",
        ),
    )
    .expect("the config itself is valid");
    assert!(harness.running.reload(refused).await.is_err());
    let routes = get_json(
        &harness.http,
        &format!("http://{}/admin/routes", harness.running.admin_addr),
    )
    .await;
    let invoke = &routes["routes"][0]["invoke"];
    assert_eq!(invoke["concurrency_limit"], 3, "{invoke}");
    assert_eq!(invoke["rate_limit"], 50.0, "{invoke}");
}
