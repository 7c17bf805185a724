//! Operating sluicegate: metrics, live reload, graceful drain under load, JSON logs.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{config_toml, free_port, wait_until_up, Harness, Process};
use serde_json::Value;
use sluicegate::config::Config;
use tokio::time::Instant;

const ECHO: &str = "[[emulator.functions]]\nname = \"echo\"\nlatency = \"2ms\"\n";
const BIN: &str = env!("CARGO_BIN_EXE_sluicegate");

fn route(name: &str, extra: &str) -> String {
    common::route(name, "echo", extra)
}

/// The value of the sample `name{labels}` in a Prometheus text page (labels in any order).
fn sample(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse().ok()).flatten()
        })
}

async fn scrape(h: &Harness) -> String {
    h.http
        .get(format!("http://{}/metrics", h.running.admin_addr))
        .send()
        .await
        .expect("the admin listener answers /metrics")
        .text()
        .await
        .expect("the metrics body is read whole")
}

#[tokio::test]
async fn metrics_are_described_and_move_with_traffic() {
    // Route names are unique to this test: the recorder is process-wide.
    let routes = route(
        "metrics-a",
        "limit = { rate = 0.001, burst = 3 }\nbatch = { max_records = 1 }",
    );
    let h = Harness::start(&config_toml(ECHO, &routes)).await;
    let before = scrape(&h).await;
    for line in [
        "# HELP sluicegate_requests_total",
        "# HELP sluicegate_batch_records",
        "# HELP sluicegate_invoke_duration_seconds",
        "# HELP sluicegate_queue_depth",
        "# HELP sluicegate_invoke_rate_limit",
    ] {
        if line.contains("requests_total")
            || line.contains("batch_records")
            || line.contains("invoke_duration")
        {
            // Described metrics appear once they have a sample; checked after traffic below.
            continue;
        }
        assert!(before.contains(line), "missing {line}:\n{before}");
    }
    for n in 0..5 {
        h.post("/metrics-a", &n.to_string()).await;
    }
    let after = scrape(&h).await;
    for line in [
        "# HELP sluicegate_requests_total",
        "# HELP sluicegate_batch_records",
        "# HELP sluicegate_invoke_duration_seconds",
    ] {
        assert!(after.contains(line), "missing {line}:\n{after}");
    }
    let ok = sample(
        &after,
        "sluicegate_requests_total",
        &[("route", "metrics-a"), ("status", "200")],
    );
    let shed = sample(
        &after,
        "sluicegate_requests_total",
        &[
            ("route", "metrics-a"),
            ("status", "429"),
            ("scope", "route"),
        ],
    );
    assert_eq!(ok, Some(3.0), "{after}");
    assert_eq!(shed, Some(2.0), "{after}");
    assert!(
        sample(
            &after,
            "sluicegate_admission_rejections_total",
            &[("scope", "route")]
        )
        .unwrap_or(0.0)
            >= 2.0
    );
    assert!(
        sample(
            &after,
            "sluicegate_batch_records_count",
            &[("route", "metrics-a")]
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, "sluicegate_queue_depth", &[("route", "metrics-a")]),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &after,
            "sluicegate_invoke_rate_limit",
            &[("function", "echo")]
        ),
        Some(10.0)
    );
}

#[tokio::test]
async fn lambda_throttles_show_by_reason() {
    let functions =
        "[[emulator.functions]]\nname = \"metrics-throttled\"\nreserved_concurrency = 0\n";
    let routes = "[[routes]]\nname = \"metrics-t\"\nfunction = \"metrics-throttled\"\nretry = { max_attempts = 2, base = \"1ms\" }\n";
    let h = Harness::start(&config_toml(functions, routes)).await;
    assert_eq!(h.post("/metrics-t", "1").await.status(), 429);
    let page = scrape(&h).await;
    let labels = [
        ("function", "metrics-throttled"),
        (
            "reason",
            "ReservedFunctionConcurrentInvocationLimitExceeded",
        ),
    ];
    assert_eq!(
        sample(&page, "sluicegate_lambda_throttles_total", &labels),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "sluicegate_retries_total", &labels),
        Some(1.0),
        "{page}"
    );
}

#[tokio::test]
async fn reload_changes_a_limit_live_and_a_bad_reload_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sluicegate.toml");
    let tight = config_toml(ECHO, &route("records", ""))
        .replace("[limits]\n", "[limits]\nmax_keys = 1000\n");
    let tight = tight.replace(
        "default = { rate = 100000.0, burst = 100000 }",
        "default = { rate = 0.001, burst = 2 }",
    );
    std::fs::write(&file, &tight).unwrap();
    let config = Config::load(&file).unwrap();
    let running = sluicegate::server::start_with_source(config, Some(file.clone()))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://{}/records", running.addr);
    let admin = format!("http://{}/admin/reload", running.admin_addr);
    let send = |key: &'static str| {
        let http = http.clone();
        let url = url.clone();
        async move {
            http.post(url)
                .header("x-api-key", key)
                .body("1")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // One keep-alive connection across the reload: it must not be dropped.
    assert_eq!(
        (send("a").await, send("a").await, send("a").await),
        (200, 200, 429)
    );

    // An invalid file is refused with the reason, and the running limits stay.
    std::fs::write(&file, tight.replace("burst = 2 }", "burst = -2 }")).unwrap();
    let refused = http.post(&admin).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("limits.default"),
        "{body}"
    );
    assert_eq!(send("b").await, 200);
    assert_eq!(send("b").await, 200);
    assert_eq!(send("b").await, 429, "the old limit still holds");

    // A valid reload that leaves the key quota alone keeps the key's bucket as it was.
    std::fs::write(&file, tight.replace("max_keys = 1000", "max_keys = 2000")).unwrap();
    assert_eq!(http.post(&admin).send().await.unwrap().status(), 200);
    assert_eq!(
        send("b").await,
        429,
        "bucket state survives a reload that did not change its quota"
    );

    // A valid file with a larger burst applies at once, on the same connections.
    std::fs::write(&file, tight.replace("burst = 2 }", "burst = 5 }")).unwrap();
    let applied = http.post(&admin).send().await.unwrap();
    assert_eq!(applied.status(), 200);
    let body: Value = applied.json().await.unwrap();
    assert_eq!(body["restart_required"], serde_json::json!([]));
    let statuses: Vec<u16> = futures_util::future::join_all((0..7).map(|_| send("c"))).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );

    // Changing a listener is reported, not applied.
    let moved = tight.replace("burst = 2 }", "burst = 5 }").replace(
        "listen = \"127.0.0.1:0\"\nadmin_listen",
        "listen = \"127.0.0.1:1\"\nadmin_listen",
    );
    std::fs::write(&file, moved).unwrap();
    let body: Value = http
        .post(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["restart_required"],
        serde_json::json!(["server.listen"])
    );
    assert_eq!(send("d").await, 200, "still serving on the old address");
    running.shutdown().await;
}

#[tokio::test]
async fn admin_config_redacts_secrets() {
    let mut toml = config_toml(ECHO, &route("records", ""));
    toml = toml.replace(
        "[limits]\n",
        "[limits]\nredis_url = \"redis://user:hunter2@127.0.0.1:6379\"\n",
    );
    let h = Harness::start(&toml).await;
    let text = h
        .http
        .get(format!("http://{}/admin/config", h.running.admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("hunter2"), "{text}");
    let config: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(config["limits"]["redis_url"], "redis://***@127.0.0.1:6379");
    assert_eq!(config["routes"][0]["name"], "records");
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill(1) runs");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_everything_lambda_processed() {
    let dir = tempfile::tempdir().unwrap();
    let (emulator_port, listen, admin) = (free_port(), free_port(), free_port());
    // The emulator runs as its own process so its stats survive sluicegate's exit.
    let emulator_file = dir.path().join("emulator.toml");
    std::fs::write(
        &emulator_file,
        format!("[emulator]\nlisten = \"127.0.0.1:{emulator_port}\"\n[[emulator.functions]]\nname = \"slow\"\nlatency = \"400ms\"\n"),
    )
    .unwrap();
    let _emulator = Process(
        Command::new(BIN)
            .args(["emulate", "--config"])
            .arg(&emulator_file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let config = dir.path().join("sluicegate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
shutdown_grace = "1500ms"
[limits]
default = {{ rate = 10000.0, burst = 10000 }}
[lambda]
endpoint_url = "http://127.0.0.1:{emulator_port}"
[[routes]]
name = "records"
function = "slow"
batch = {{ max_records = 5 }}
invoke = {{ max_concurrency = 2, rate = 1000.0, burst = 1000 }}
"#
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .env("SLUICEGATE_LOG", "info,sluicegate=debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let mut child = Process(child);
    let http = reqwest::Client::new();
    wait_until_up(&http, &format!("http://127.0.0.1:{listen}/healthz")).await;

    // 60 records; the function takes 400 ms for at most 2 batches of 5 at a time, so most
    // are still queued when SIGTERM arrives. Lambda's share is answered, the rest gets 503.
    let requests: Vec<_> = (0..60)
        .map(|n| {
            let request = http
                .post(format!("http://127.0.0.1:{listen}/records"))
                .body(format!(r#"{{"n":{n}}}"#));
            tokio::spawn(async move {
                match request.send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                }
            })
        })
        .collect();
    // SIGTERM once most records wait in the queue: at most 2 × 5 are in flight and 5 held,
    // and the 1.5 s grace can dispatch at most three more rounds of 2 × 5 — so records are
    // left unsent whatever the machine's speed.
    let routes = format!("http://127.0.0.1:{admin}/admin/routes");
    let start = Instant::now();
    loop {
        let body: Value = common::get_json(&http, &routes).await;
        if body["routes"][0]["queue_depth"].as_u64().unwrap_or(0) >= 40 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the records never queued: {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(child.0.id(), "TERM");
    let mut statuses = Vec::new();
    for r in requests {
        statuses.push(r.await.unwrap());
    }
    let exit = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");

    let ok = statuses.iter().filter(|s| **s == 200).count();
    let unavailable = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(
        ok + unavailable,
        60,
        "every request got an answer, 200 or 503: {statuses:?}"
    );
    assert!(
        unavailable > 0,
        "the grace period ran out with records still queued"
    );
    let stats: Value = common::get_json(
        &http,
        &format!("http://127.0.0.1:{emulator_port}/emulator/stats"),
    )
    .await;
    assert_eq!(
        stats["functions"]["slow"]["records"].as_u64().unwrap() as usize,
        ok,
        "every record Lambda processed reached its caller"
    );

    let logs = logs.join().unwrap();
    let json: Vec<Value> = logs
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        !json.is_empty() && json.len() == logs.len(),
        "every log line is JSON: {logs:?}"
    );
    assert!(
        json.iter().any(|l| l["span"]["batch"]
            .as_str()
            .is_some_and(|b| b.starts_with('b'))),
        "request spans carry their batch id"
    );
    let warned_503s = json
        .iter()
        .filter(|l| l["level"] == "WARN" && l["fields"]["status"] == 503)
        .count();
    assert_eq!(
        warned_503s, unavailable,
        "each 5xx answer is logged at warn: {logs:?}"
    );
}

#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port(), free_port());
    let config = dir.path().join("sluicegate.toml");
    let text = |burst: u32| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n[limits]\ndefault = {{ rate = 0.001, burst = {burst} }}\n[lambda]\nendpoint_url = \"http://127.0.0.1:0\"\n[emulator]\nenabled = true\nlisten = \"127.0.0.1:0\"\n{ECHO}\n{}",
            route("records", "")
        )
    };
    std::fs::write(&config, text(1)).unwrap();
    let child = Process(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    wait_until_up(&http, &format!("http://127.0.0.1:{listen}/healthz")).await;
    let post = |key: &'static str| {
        let http = http.clone();
        async move {
            http.post(format!("http://127.0.0.1:{listen}/records"))
                .header("x-api-key", key)
                .body("1")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!((post("a").await, post("a").await), (200, 429));
    std::fs::write(&config, text(3)).unwrap();
    signal(child.0.id(), "HUP");
    // The reload is applied asynchronously; poll the admin view of the key, bounded.
    let start = Instant::now();
    loop {
        let body: Value =
            common::get_json(&http, &format!("http://127.0.0.1:{admin}/admin/config")).await;
        if body["limits"]["default"]["burst"] == 3 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        (
            post("b").await,
            post("b").await,
            post("b").await,
            post("b").await
        ),
        (200, 200, 200, 429)
    );
}
