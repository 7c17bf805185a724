//! The `sluicegate` binary as an operator runs it.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{free_port, wait_until_up, Process};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_sluicegate");

/// A command with no AWS credentials or AWS config reachable, as on a fresh machine.
fn bare_command(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env("HOME", dir)
        .env("AWS_CONFIG_FILE", dir.join("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.join("no-aws-credentials"),
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_REGION")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn port_overrides(cmd: &mut Command) -> (u16, u16) {
    let (listen, admin, emulator) = (free_port(), free_port(), free_port());
    cmd.env("SLUICEGATE_SERVER__LISTEN", format!("127.0.0.1:{listen}"))
        .env(
            "SLUICEGATE_SERVER__ADMIN_LISTEN",
            format!("127.0.0.1:{admin}"),
        )
        .env(
            "SLUICEGATE_EMULATOR__LISTEN",
            format!("127.0.0.1:{emulator}"),
        )
        .env(
            "SLUICEGATE_LAMBDA__ENDPOINT_URL",
            format!("http://127.0.0.1:{emulator}"),
        );
    (listen, emulator)
}

async fn round_trip(listen: u16) {
    let http = reqwest::Client::new();
    wait_until_up(&http, &format!("http://127.0.0.1:{listen}/healthz")).await;
    let response = http
        .post(format!("http://127.0.0.1:{listen}/records"))
        .body(r#"{"n":41}"#)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("the answer is JSON");
    assert_eq!(body["body"]["n"], 41);
}

#[tokio::test]
async fn serve_runs_the_shipped_config_without_aws_credentials() {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = bare_command(home.path());
    cmd.args(["serve", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sluicegate.toml"));
    let (listen, _) = port_overrides(&mut cmd);
    let _child = Process(cmd.spawn().expect("binary starts"));
    round_trip(listen).await;
}

#[tokio::test]
async fn without_a_config_file_the_built_in_default_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = bare_command(dir.path());
    let (listen, _) = port_overrides(&mut cmd);
    let _child = Process(cmd.spawn().expect("binary starts"));
    round_trip(listen).await;
}

#[tokio::test]
async fn emulate_serves_only_the_emulator_section() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let file = dir.path().join("emulator.toml");
    std::fs::write(
        &file,
        format!("[emulator]\nlisten = \"127.0.0.1:{port}\"\n[[emulator.functions]]\nname = \"standalone\"\n"),
    )
    .unwrap();
    let mut cmd = bare_command(dir.path());
    cmd.args(["emulate", "--config"]).arg(&file);
    let _child = Process(cmd.spawn().expect("binary starts"));
    let http = reqwest::Client::new();
    let stats_url = format!("http://127.0.0.1:{port}/emulator/stats");
    wait_until_up(&http, &stats_url).await;
    let stats: Value = common::get_json(&http, &stats_url).await;
    assert_eq!(stats["functions"]["standalone"]["invocations"], 0);
}

#[test]
fn check_config_prints_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = bare_command(dir.path())
        .args(["check-config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sluicegate.toml"))
        .env("SLUICEGATE_ROUTES__0__BATCH__MAX_RECORDS", "7")
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let config = sluicegate::config::Config::from_toml(&printed).expect("printed config is valid");
    assert_eq!(
        config.routes[0].batch.max_records.get(),
        7,
        "environment overrides are applied"
    );
}

#[test]
fn check_config_names_the_offending_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[[routes]]\nname = \"r\"\nfunction = \"f\"\nbatch = { max_records = 0 }\n",
    )
    .unwrap();
    let out = bare_command(dir.path())
        .arg("check-config")
        .arg(&file)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("routes[0].batch.max_records"), "{stderr}");

    std::fs::write(&file, "[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n").unwrap();
    let out = bare_command(dir.path())
        .arg("check-config")
        .arg(&file)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("bogus"), "{stderr}");
}

#[test]
fn serve_refuses_an_invalid_config_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[[routes]]\nname = \"r\"\nfunction = \"f\"\n[lambda]\nread_timeout = \"soon\"\n",
    )
    .unwrap();
    let out = bare_command(dir.path())
        .args(["serve", "--config"])
        .arg(&file)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("lambda.read_timeout"), "{stderr}");
}

#[test]
fn check_config_discover_reports_what_does_not_fit_the_function() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tight.toml");
    std::fs::write(
        &file,
        r#"
[lambda]
endpoint_url = "http://127.0.0.1:0"
read_timeout = "2s"
connect_timeout = "1s"
[[routes]]
name = "records"
function = "f"
invoke = { max_concurrency = 8 }
[emulator]
enabled = true
listen = "127.0.0.1:0"
[[emulator.functions]]
name = "f"
timeout = "10s"
reserved_concurrency = 4
"#,
    )
    .unwrap();
    let out = bare_command(dir.path())
        .args(["check-config", "--discover"])
        .arg(&file)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        out.status.success(),
        "findings are warnings unless strict: {stderr}"
    );
    assert!(
        stderr.contains("lambda.read_timeout (2s) is not above f's timeout (10s)"),
        "{stderr}"
    );
    assert!(stderr.contains("reserved concurrency (4)"), "{stderr}");

    let strict = std::fs::read_to_string(&file)
        .unwrap()
        .replace("[lambda]", "[lambda]\nstrict = true");
    std::fs::write(&file, strict).unwrap();
    let out = bare_command(dir.path())
        .args(["check-config", "--discover"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "strict turns findings into a failure"
    );
}

#[tokio::test]
async fn dlq_redrive_replays_a_file_and_reports_what_succeeded() {
    let dir = tempfile::tempdir().unwrap();
    let emulator_port = free_port();
    let emulator_file = dir.path().join("emulator.toml");
    std::fs::write(
        &emulator_file,
        format!("[emulator]\nlisten = \"127.0.0.1:{emulator_port}\"\n[[emulator.functions]]\nname = \"f\"\nlatency = \"1ms\"\n"),
    )
    .unwrap();
    let _emulator = Process(
        bare_command(dir.path())
            .args(["emulate", "--config"])
            .arg(&emulator_file)
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    wait_until_up(
        &http,
        &format!("http://127.0.0.1:{emulator_port}/emulator/stats"),
    )
    .await;

    let config = dir.path().join("sluicegate.toml");
    std::fs::write(
        &config,
        format!("[lambda]\nendpoint_url = \"http://127.0.0.1:{emulator_port}\"\n[[routes]]\nname = \"records\"\nfunction = \"f\"\n"),
    )
    .unwrap();
    let letters = dir.path().join("dead.jsonl");
    let letter = |id: &str, route: &str| {
        format!(
            r#"{{"id":"{id}","route":"{route}","function":"f","key":"k","record":{{"n":1}},"error":"x","error_kind":"Unavailable","attempts":5,"first_attempt_at":"2026-01-01T00:00:00.000Z","last_attempt_at":"2026-01-01T00:00:01.000Z"}}"#
        )
    };
    std::fs::write(
        &letters,
        format!(
            "{}\n{}\n{}\n",
            letter("a", "records"),
            letter("b", "records"),
            letter("c", "gone")
        ),
    )
    .unwrap();
    let out = bare_command(dir.path())
        .args(["dlq", "redrive", "--config"])
        .arg(&config)
        .arg("--from")
        .arg(&letters)
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "one letter names a route that no longer exists"
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let file = &report["redrive"][0];
    assert_eq!(
        (
            file["total"].as_u64(),
            file["succeeded"].as_u64(),
            file["failed"].as_u64()
        ),
        (Some(3), Some(2), Some(1))
    );
    let left = sluicegate::dlq::read_letters(&letters).unwrap().letters;
    assert_eq!(left.len(), 1, "what failed again is written back");
    assert_eq!(left[0].id, "c");
    assert_eq!(
        left[0].attempts, 5,
        "a letter for a missing route was not attempted"
    );
    assert!(
        left[0].error.contains("no route named"),
        "{}",
        left[0].error
    );
    let stats: Value = common::get_json(
        &http,
        &format!("http://127.0.0.1:{emulator_port}/emulator/stats"),
    )
    .await;
    assert_eq!(stats["functions"]["f"]["records"], 2);
}

/// A dead letter for route `route` as a JSON line.
fn letter_line(id: &str, route: &str) -> String {
    format!(
        r#"{{"id":"{id}","route":"{route}","function":"f","key":"k","record":{{"n":1}},"error":"x","error_kind":"Unavailable","attempts":5,"first_attempt_at":"2026-01-01T00:00:00.000Z","last_attempt_at":"2026-01-01T00:00:01.000Z"}}"#
    )
}

/// `sluicegate emulate` with one function `f` of the given latency, on a free port.
async fn emulator(dir: &Path, latency: &str) -> (Process, u16) {
    let port = free_port();
    let file = dir.join("emulator.toml");
    std::fs::write(
        &file,
        format!("[emulator]\nlisten = \"127.0.0.1:{port}\"\n[[emulator.functions]]\nname = \"f\"\nlatency = \"{latency}\"\n"),
    )
    .expect("the emulator config is written");
    let process = Process(
        bare_command(dir)
            .args(["emulate", "--config"])
            .arg(&file)
            .spawn()
            .expect("the binary starts"),
    );
    wait_until_up(
        &reqwest::Client::new(),
        &format!("http://127.0.0.1:{port}/emulator/stats"),
    )
    .await;
    (process, port)
}

fn route_config(dir: &Path, emulator_port: u16) -> std::path::PathBuf {
    let config = dir.join("sluicegate.toml");
    std::fs::write(
        &config,
        format!("[lambda]\nendpoint_url = \"http://127.0.0.1:{emulator_port}\"\n[[routes]]\nname = \"records\"\nfunction = \"f\"\ninvoke = {{ rate = 5.0, burst = 5, max_concurrency = 2 }}\n"),
    )
    .expect("the route config is written");
    config
}

#[test]
fn dlq_inspect_counts_the_good_letters_and_reports_a_torn_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluicegate.toml");
    std::fs::write(
        &config,
        "[[routes]]\nname = \"records\"\nfunction = \"f\"\n",
    )
    .unwrap();
    let letters = dir.path().join("dead.jsonl");
    let torn = &letter_line("c", "records")[..50];
    std::fs::write(
        &letters,
        format!(
            "{}\n{}\n{torn}",
            letter_line("a", "records"),
            letter_line("b", "records")
        ),
    )
    .unwrap();
    let out = bare_command(dir.path())
        .args(["dlq", "inspect", "--config"])
        .arg(&config)
        .arg("--from")
        .arg(&letters)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["total"], 2);
    assert_eq!(report["by_route_and_error"][0]["count"], 2);
    assert_eq!(report["skipped_lines"], 1);
    assert_eq!(report["skipped"][0]["line"], 3);
    assert!(stderr.contains("line 3"), "said on stderr too: {stderr}");
}

#[tokio::test]
async fn a_second_redrive_of_a_file_refuses_while_the_first_holds_its_lock() {
    let dir = tempfile::tempdir().unwrap();
    // A slow function keeps the first redrive running while the second one starts.
    let (_emulator, port) = emulator(dir.path(), "2s").await;
    let config = route_config(dir.path(), port);
    let letters = dir.path().join("dead.jsonl");
    let torn = &letter_line("torn", "records")[..30];
    std::fs::write(&letters, format!("{}\n{torn}", letter_line("a", "records"))).unwrap();
    let redrive = || {
        let mut cmd = bare_command(dir.path());
        cmd.args(["dlq", "redrive", "--config"])
            .arg(&config)
            .arg("--from")
            .arg(&letters)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    };
    let first = redrive().spawn().unwrap();
    let lock = dir.path().join("dead.jsonl.lock");
    let started = tokio::time::Instant::now();
    while !lock.exists() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the first redrive never took its lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let second = redrive().output().unwrap();
    assert!(!second.status.success(), "the second redrive must refuse");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("held by another redrive") && stderr.contains(&first.id().to_string()),
        "names the lock's holder: {stderr}"
    );

    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let report: Value = serde_json::from_slice(&first.stdout).unwrap();
    let file = &report["redrive"][0];
    assert_eq!(file["succeeded"], 1);
    assert_eq!(file["skipped_lines"], 1);
    assert_eq!(file["skipped"][0]["line"], 2);
    assert!(!lock.exists(), "the lock file is removed at exit");
    let kept = std::fs::read_to_string(dir.path().join("dead.jsonl.unparsable")).unwrap();
    assert_eq!(kept, format!("{torn}\n"), "the torn line is kept aside");
    let left = sluicegate::dlq::read_letters(&letters).unwrap();
    assert!(left.letters.is_empty() && left.skipped.is_empty());
    let stats: Value = common::get_json(
        &reqwest::Client::new(),
        &format!("http://127.0.0.1:{port}/emulator/stats"),
    )
    .await;
    assert_eq!(
        stats["functions"]["f"]["records"], 1,
        "replayed once, not twice"
    );
}

#[test]
fn dlq_redrive_refuses_limits_above_the_routes() {
    let dir = tempfile::tempdir().unwrap();
    let config = route_config(dir.path(), free_port());
    let letters = dir.path().join("dead.jsonl");
    std::fs::write(&letters, format!("{}\n", letter_line("a", "records"))).unwrap();
    for flags in [["--rate", "6"], ["--concurrency", "3"]] {
        let out = bare_command(dir.path())
            .args(["dlq", "redrive", "--config"])
            .arg(&config)
            .arg("--from")
            .arg(&letters)
            .args(flags)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flags:?} is above the route's");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("may only"), "{flags:?}: {stderr}");
    }
    let left = sluicegate::dlq::read_letters(&letters).unwrap();
    assert_eq!(left.letters.len(), 1, "nothing was replayed");
}

/// Serves the shipped config with `HTTP_PROXY` pointing at a port where nothing listens, plus
/// `extra` environment; answers `POST /records` once and returns its status and the log.
async fn records_through_a_dead_proxy(extra: &[(&str, &str)]) -> (u16, String) {
    let home = tempfile::tempdir().expect("a temporary directory");
    let log = home.path().join("stderr.log");
    let mut cmd = bare_command(home.path());
    cmd.args(["serve", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sluicegate.toml"))
        .env("HTTP_PROXY", format!("http://127.0.0.1:{}", free_port()))
        .env_remove("http_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .stderr(std::fs::File::create(&log).expect("a log file"));
    for (name, value) in extra {
        cmd.env(name, value);
    }
    let (listen, _) = port_overrides(&mut cmd);
    let _child = Process(cmd.spawn().expect("binary starts"));
    let http = reqwest::Client::new();
    wait_until_up(&http, &format!("http://127.0.0.1:{listen}/healthz")).await;
    let response = http
        .post(format!("http://127.0.0.1:{listen}/records"))
        .header("x-sluicegate-timeout-ms", "5000")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .expect("answered");
    let status = response.status().as_u16();
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

#[tokio::test]
async fn behind_a_proxy_the_direct_transport_hands_invokes_to_the_sdk_which_follows_it() {
    // The SDK sends the invoke to the (dead) proxy, so the record cannot reach the emulator:
    // proof that the invoke went through the SDK, which the warning says.
    let (status, log) = records_through_a_dead_proxy(&[]).await;
    assert_ne!(status, 200, "the invoke bypassed the proxy:\n{log}");
    assert!(log.contains("only the SDK"), "{log}");
    // NO_PROXY naming the endpoint: the direct transport goes straight to the emulator.
    let (status, log) = records_through_a_dead_proxy(&[("NO_PROXY", "127.0.0.1")]).await;
    assert_eq!(status, 200, "{log}");
    assert!(!log.contains("only the SDK"), "{log}");
}
