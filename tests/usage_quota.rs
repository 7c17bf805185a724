//! Usage-plan quotas over real sockets: the `429 quota_exceeded` contract, counts kept across
//! a restart in the local state file, a corrupt state file moved aside, a reload that changes
//! the limit, and the admin API that shows and sets a key's count.
//!
//! The server reads the system clock. So that no test straddles a period boundary, every
//! quota here is weekly and starts four days after today's weekday: the current period
//! began three days ago and ends in more than three days.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use sluicegate::config::Config;
use sluicegate::usage::{Period, UsageQuota};

use self::common::{config_toml, get_json, Harness};

const ECHO: &str = "[[emulator.functions]]\nname = \"echo\"\nlatency = \"1ms\"\n";

fn now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("the clock is after 1970")
}

/// A weekly quota whose current period began three days ago (see the module docs).
fn weekly(limit: u64) -> UsageQuota {
    let weekday = (now().as_secs() / 86_400 + 4) % 7;
    UsageQuota {
        limit,
        period: Period::Week,
        offset: ((weekday + 4) % 7) as u32,
    }
}

/// One route `/records`, plan `gold` (key `gold-1`) with `quota`, its state in `state`.
fn config(quota: UsageQuota, state: &Path) -> Config {
    let plans = format!(
        "[[plans]]\nname = \"gold\"\nrate = 1000.0\nburst = 1000\nkeys = [\"gold-1\"]\n\
         quota = {{ limit = {}, period = \"week\", offset = {} }}\n",
        quota.limit, quota.offset
    );
    let routes = common::route("records", "echo", "");
    let mut config =
        Config::from_toml(&config_toml(ECHO, &format!("{routes}\n{plans}"))).expect("valid");
    config.limits.quota_state = state.to_path_buf();
    config
}

async fn post(h: &Harness, key: &str) -> reqwest::Response {
    h.http
        .post(h.url("/records"))
        .header("x-api-key", key)
        .body("1")
        .send()
        .await
        .expect("answered")
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers()[name]
        .to_str()
        .expect("ASCII header")
        .to_owned()
}

fn admin(h: &Harness, path: &str) -> String {
    format!("http://{}{path}", h.running.admin_addr)
}

/// The next 200, then a `429 quota_exceeded` whose `Retry-After` is the time to the period's
/// end (within the second the request took) and whose fields describe the quota.
async fn assert_quota_refused(h: &Harness, quota: UsageQuota, used: u64) {
    let before = now();
    let response = post(h, "gold-1").await;
    let after = now();
    assert_eq!(response.status(), 429);
    let window = quota.window(before);
    let retry: u64 = header(&response, "retry-after").parse().expect("seconds");
    let until = |t: Duration| window.until_end(t).as_secs_f64().ceil() as u64;
    assert!(
        (until(after)..=until(before)).contains(&retry),
        "Retry-After {retry} is the time to the period's end"
    );
    assert!(
        retry > 3 * 86_400,
        "the period ends in more than three days"
    );
    assert_eq!(
        header(&response, "ratelimit-policy"),
        format!("\"quota\";q={};w=604800", quota.limit)
    );
    assert_eq!(
        header(&response, "ratelimit"),
        format!("\"quota\";r=0;t={retry}")
    );
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"], "quota_exceeded");
    assert_eq!(body["scope"], "quota");
    assert_eq!(body["limit"], quota.limit);
    assert_eq!(body["used"], used);
    assert_eq!(body["period"], "week");
    let ms = body["retry_after_ms"].as_u64().expect("a number");
    assert!(ms.div_ceil(1000) == retry, "{ms} ms rounds up to {retry} s");
}

#[tokio::test]
async fn a_restart_keeps_what_each_key_used_in_the_local_state_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("data/quota-state.json");
    let quota = weekly(5);

    let h = Harness::start_config(config(quota, &state)).await;
    for left in [4, 3, 2] {
        let response = post(&h, "gold-1").await;
        assert_eq!(response.status(), 200);
        let ratelimit = header(&response, "ratelimit");
        assert!(
            ratelimit.contains(&format!(", \"quota\";r={left};t=")),
            "{ratelimit}"
        );
        assert_eq!(
            header(&response, "ratelimit-policy"),
            "\"key\";q=1000;w=1, \"quota\";q=5;w=604800"
        );
    }
    h.running.shutdown().await;
    let saved: Value =
        serde_json::from_slice(&std::fs::read(&state).expect("saved at shutdown")).expect("JSON");
    assert_eq!(saved["counters"][0]["key"], "gold-1");
    assert_eq!(saved["counters"][0]["used"], 3);

    let h = Harness::start_config(config(quota, &state)).await;
    for _ in 0..2 {
        assert_eq!(post(&h, "gold-1").await.status(), 200);
    }
    assert_quota_refused(&h, quota, 5).await;
    // Keys on no plan have no quota here: no quota item.
    let other = post(&h, "someone").await;
    assert_eq!(other.status(), 200);
    assert!(!header(&other, "ratelimit").contains("quota"));
    h.running.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_state_file_is_moved_aside_and_the_proxy_starts_counting_afresh() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("quota-state.json");
    std::fs::write(&state, b"{\"version\":1,\"counters\":[{\"key\":").expect("written");

    let h = Harness::start_config(config(weekly(5), &state)).await;
    let response = post(&h, "gold-1").await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "ratelimit").contains(", \"quota\";r=4;t="));
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .expect("listed")
        .map(|e| e.expect("entry").file_name().into_string().expect("UTF-8"))
        .filter(|name| name.starts_with("quota-state.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "moved aside once: {aside:?}");
    assert_eq!(
        std::fs::read(dir.path().join(&aside[0])).expect("kept"),
        b"{\"version\":1,\"counters\":[{\"key\":"
    );
    h.running.shutdown().await;
    let saved: Value =
        serde_json::from_slice(&std::fs::read(&state).expect("a new file")).expect("JSON");
    assert_eq!(saved["counters"][0]["used"], 1);
}

#[tokio::test]
async fn a_reload_that_raises_the_limit_keeps_the_used_count() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("quota-state.json");
    let h = Harness::start_config(config(weekly(3), &state)).await;
    for _ in 0..3 {
        assert_eq!(post(&h, "gold-1").await.status(), 200);
    }
    assert_quota_refused(&h, weekly(3), 3).await;

    h.running
        .reload(config(weekly(4), &state))
        .await
        .expect("reloaded");
    let response = post(&h, "gold-1").await;
    assert_eq!(response.status(), 200, "one more under the new limit");
    assert!(header(&response, "ratelimit").contains("\"quota\";r=0;"));
    assert_quota_refused(&h, weekly(4), 4).await;
    h.running.shutdown().await;
}

#[tokio::test]
async fn the_admin_api_shows_and_sets_a_keys_usage() {
    let dir = tempfile::tempdir().expect("temp dir");
    let quota = weekly(10);
    let h = Harness::start_config(config(quota, &dir.path().join("state.json"))).await;
    for _ in 0..4 {
        assert_eq!(post(&h, "gold-1").await.status(), 200);
    }
    let shown = get_json(&h.http, &admin(&h, "/admin/keys/gold-1")).await;
    let end = SystemTime::UNIX_EPOCH + Duration::from_secs(quota.window(now()).end);
    assert_eq!(
        shown["quota"],
        json!({
            "limit": 10,
            "period": "week",
            "offset": quota.offset,
            "used": 4,
            "left": 6,
            "reset_at": humantime::format_rfc3339_seconds(end).to_string(),
            "reset_in_secs": shown["quota"]["reset_in_secs"],
        })
    );
    assert_eq!(shown["plan"], "gold");
    let no_quota = get_json(&h.http, &admin(&h, "/admin/keys/someone")).await;
    assert_eq!(no_quota["quota"], Value::Null);

    let set = |body: &'static str, key: &'static str| {
        h.http
            .post(admin(&h, &format!("/admin/keys/{key}/quota")))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let response = set(r#"{"used": 10}"#, "gold-1").await.expect("answered");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(
        (body["quota"]["used"].clone(), body["quota"]["left"].clone()),
        (json!(10), json!(0))
    );
    assert_quota_refused(&h, quota, 10).await;

    // ResetUsage.
    assert_eq!(
        set(r#"{"used": 0}"#, "gold-1")
            .await
            .expect("answered")
            .status(),
        200
    );
    let response = post(&h, "gold-1").await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "ratelimit").contains("\"quota\";r=9;"));

    for bad in [
        r#"{"used": -1}"#,
        r#"{"used": "5"}"#,
        r#"{"use": 5}"#,
        "not json",
    ] {
        let response = set(bad, "gold-1").await.expect("answered");
        assert_eq!(response.status(), 400, "{bad}");
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["error"], "bad_request", "{bad}");
    }
    let response = set(r#"{"used": 1}"#, "someone").await.expect("answered");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["message"], "key \"someone\" has no usage quota");

    // The last request of the period: counted as exhausted, and the key is at its limit.
    assert_eq!(
        set(r#"{"used": 9}"#, "gold-1")
            .await
            .expect("answered")
            .status(),
        200
    );
    let response = post(&h, "gold-1").await;
    assert!(header(&response, "ratelimit").contains("\"quota\";r=0;"));
    assert_quota_refused(&h, quota, 10).await;
    let metrics = h
        .http
        .get(admin(&h, "/metrics"))
        .send()
        .await
        .expect("answered")
        .text()
        .await
        .expect("text");
    // The recorder is process-wide and other tests here exhaust gold keys too: at least one.
    let exhausted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluicegate_quota_exhausted_total{plan=\"gold\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(exhausted.is_some_and(|n| n >= 1.0), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l == "sluicegate_quota_keys_at_limit 1"),
        "{metrics}"
    );
    h.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_saved_while_requests_drain_at_shutdown() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("quota-state.json");
    let slow = "[[emulator.functions]]\nname = \"echo\"\nlatency = \"2500ms\"\n";
    let quota = weekly(5);
    let mut config = config(quota, &state);
    let routes = common::route("records", "echo", "");
    let mut functions = Config::from_toml(&config_toml(slow, &routes)).expect("valid");
    config.emulator.functions = std::mem::take(&mut functions.emulator.functions);
    config.server.shutdown_grace = Duration::from_secs(10);
    let h = Harness::start_config(config).await;
    let request = h
        .http
        .post(h.url("/records"))
        .header("x-api-key", "gold-1")
        .body("1");
    let in_flight = tokio::spawn(async move { request.send().await.expect("answered").status() });
    h.stats_when("echo", |s| s["in_flight"] == 1).await;
    let started = tokio::time::Instant::now();
    // Shutdown begins while the counted request is still running (for ~2.5 s).
    let shutdown = tokio::spawn(h.running.shutdown());
    let saved_at = loop {
        let used = std::fs::read(&state)
            .ok()
            .and_then(|text| serde_json::from_slice::<Value>(&text).ok())
            .and_then(|saved| saved["counters"][0]["used"].as_u64());
        if used == Some(1) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "no save while the request drained"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        !in_flight.is_finished(),
        "saved at {saved_at:?}, during the drain"
    );
    assert_eq!(in_flight.await.expect("answered"), 200);
    shutdown.await.expect("stopped");
}
