//! Admission control over real sockets: API Gateway token-bucket semantics per key,
//! layers (global → route → key), plans, identity, and the 429 headers.

mod common;

use std::time::Duration;

use common::Harness;
use serde_json::Value;
use tokio::time::Instant;

const ECHO: &str = "[[emulator.functions]]\nname = \"echo\"\nlatency = \"1ms\"\n";

/// A config whose admission layers are the given TOML lines (under `[limits]` and the route).
fn config(limits: &str, identity: &str, route_extra: &str, plans: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[identity]
{identity}

[limits]
{limits}

{plans}

[lambda]
endpoint_url = "http://127.0.0.1:0"

[emulator]
enabled = true
listen = "127.0.0.1:0"
{ECHO}

[[routes]]
name = "records"
function = "echo"
batch = {{ max_records = 50, max_wait = "5ms" }}
invoke = {{ rate = 10000.0, burst = 10000, max_concurrency = 50 }}
{route_extra}
"#
    )
}

struct Burst {
    statuses: Vec<(u16, reqwest::header::HeaderMap, Value)>,
    elapsed: Duration,
}

impl Burst {
    fn admitted(&self) -> usize {
        self.statuses.iter().filter(|(s, _, _)| *s == 200).count()
    }

    fn shed(&self) -> impl Iterator<Item = &(u16, reqwest::header::HeaderMap, Value)> {
        self.statuses.iter().filter(|(s, _, _)| *s == 429)
    }
}

/// Sends `n` requests for `key` at once (each on its own connection) and records answers.
async fn burst(h: &Harness, key: &str, n: usize) -> Burst {
    let started = Instant::now();
    let requests = (0..n).map(|i| {
        let request = h
            .http
            .post(h.url("/records"))
            .header("x-api-key", key)
            .body(format!("{i}"));
        async move {
            let response = request.send().await.expect("answered");
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, headers, body)
        }
    });
    let statuses = futures_util::future::join_all(requests).await;
    Burst {
        statuses,
        elapsed: started.elapsed(),
    }
}

#[tokio::test]
async fn a_burst_admits_burst_plus_refill_and_sheds_the_rest_with_exact_headers() {
    let (rate, burst_size) = (20.0, 10);
    let h = Harness::start(&config(
        &format!("default = {{ rate = {rate}, burst = {burst_size} }}"),
        "",
        "",
        "",
    ))
    .await;
    let b = burst(&h, "alpha", 100).await;
    let refill = rate * b.elapsed.as_secs_f64();
    let admitted = b.admitted() as f64;
    assert!(
        admitted >= burst_size as f64 - 1.0 && admitted <= burst_size as f64 + refill + 1.0,
        "admitted {admitted} of 100 in {:?}; expected {burst_size} + {refill:.1} ± 1",
        b.elapsed
    );
    assert_eq!(
        b.admitted() + b.shed().count(),
        100,
        "every other answer is 429"
    );
    for (_, headers, body) in b.shed() {
        let retry_after: u64 = headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .expect("integer Retry-After");
        assert!(retry_after >= 1);
        assert_eq!(headers["ratelimit-policy"], "\"key\";q=10;w=1");
        assert!(headers["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"key\";r=0;t="));
        assert_eq!(body["scope"], "key");
        let ms = body["retry_after_ms"].as_u64().unwrap();
        assert!(
            (1..=50).contains(&ms),
            "one token at 20/s is at most 50 ms away: {ms}"
        );
    }

    // A second key is unaffected.
    let other = burst(&h, "beta", 5).await;
    assert_eq!(other.admitted(), 5);

    // Refill after an idle period is `refill_follows_the_clock_and_never_passes_burst`,
    // on the paused clock.
}

/// The key layer against the clock, paused: a burst admits exactly `burst`, refill adds
/// exactly `rate × t`, an idle bucket is full again and never fuller than `burst`, and a
/// refusal's wait is exact. (Over sockets the same layer is
/// `a_burst_admits_burst_plus_refill_and_sheds_the_rest_with_exact_headers`.)
#[tokio::test(start_paused = true)]
async fn refill_follows_the_clock_and_never_passes_burst() {
    use sluicegate::limit::{Admission, Plans, Quota, TokioClock};
    let quota = Quota {
        rate: 20.0,
        burst: 10,
    };
    let admission = Admission::new(
        None,
        vec![("records".into(), None)],
        Plans::new(quota, vec![]),
        1000,
        TokioClock,
    );
    let admitted = |n: usize| {
        (0..n)
            .filter(|_| admission.check(0, "alpha").is_ok())
            .count()
    };

    assert_eq!(admitted(100), 10, "the bucket starts full: burst at once");
    let refused = admission
        .check(0, "alpha")
        .expect_err("the bucket is empty");
    assert_eq!(refused.wait, Duration::from_millis(50), "one token at 20/s");

    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(admitted(100), 10, "500 ms at 20/s refills 10 tokens");

    tokio::time::advance(Duration::from_millis(25)).await;
    assert_eq!(admitted(100), 0, "half a token is no token");
    tokio::time::advance(Duration::from_millis(25)).await;
    assert_eq!(admitted(100), 1);

    // 700 ms idle would refill 14 tokens: the bucket holds `burst`, never more.
    tokio::time::advance(Duration::from_millis(700)).await;
    assert_eq!(
        admitted(40),
        10,
        "after idle: full again, never fuller than burst"
    );
    assert_eq!(admitted(5), 0, "and empty again after it");
    assert_eq!(
        (0..5)
            .filter(|_| admission.check(0, "beta").is_ok())
            .count(),
        5,
        "another key has its own full bucket"
    );
}

#[tokio::test]
async fn admitted_responses_carry_the_key_layers_ratelimit_fields() {
    let h = Harness::start(&config("default = { rate = 5.0, burst = 3 }", "", "", "")).await;
    let response = h
        .http
        .post(h.url("/records"))
        .header("x-api-key", "k")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["ratelimit-policy"], "\"key\";q=3;w=1");
    assert_eq!(response.headers()["ratelimit"], "\"key\";r=2;t=1");
}

#[tokio::test]
async fn layers_report_their_own_scope() {
    // Global allows 3, the route 5, keys 100: the global layer refuses first.
    let h = Harness::start(&config(
        "global = { rate = 0.001, burst = 3 }\ndefault = { rate = 100.0, burst = 100 }",
        "",
        "limit = { rate = 0.001, burst = 5 }",
        "",
    ))
    .await;
    let b = burst(&h, "k", 10).await;
    assert_eq!(b.admitted(), 3);
    assert!(b.shed().all(|(_, _, body)| body["scope"] == "global"));

    let h = Harness::start(&config(
        "global = { rate = 1000.0, burst = 1000 }\ndefault = { rate = 100.0, burst = 100 }",
        "",
        "limit = { rate = 0.001, burst = 4 }",
        "",
    ))
    .await;
    let b = burst(&h, "k", 10).await;
    assert_eq!(b.admitted(), 4);
    for (_, headers, body) in b.shed() {
        assert_eq!(body["scope"], "route");
        assert_eq!(headers["ratelimit-policy"], "\"route\";q=4;w=4000");
    }
}

#[tokio::test]
async fn plan_keys_get_their_plans_limits() {
    let plans = "[[plans]]\nname = \"gold\"\nrate = 0.001\nburst = 8\nkeys = [\"gold-key\"]\n";
    let h = Harness::start(&config(
        "default = { rate = 0.001, burst = 2 }",
        "",
        "",
        plans,
    ))
    .await;
    assert_eq!(burst(&h, "gold-key", 12).await.admitted(), 8);
    assert_eq!(burst(&h, "someone-else", 12).await.admitted(), 2);
}

#[tokio::test]
async fn zero_rate_or_zero_burst_rejects_everything_in_that_layer() {
    let h = Harness::start(&config("default = { rate = 0.0, burst = 5 }", "", "", "")).await;
    let b = burst(&h, "k", 3).await;
    assert_eq!(b.admitted(), 0);
    let h = Harness::start(&config("default = { rate = 10.0, burst = 0 }", "", "", "")).await;
    let b = burst(&h, "k", 3).await;
    assert_eq!(b.admitted(), 0);
    for (_, headers, _) in b.shed() {
        assert!(
            headers["retry-after"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                >= 1
        );
    }
}

#[tokio::test]
async fn required_keys_refuse_missing_and_unknown_keys_without_tracking_them() {
    let plans = "[[plans]]\nname = \"p\"\nrate = 100.0\nburst = 100\nkeys = [\"known\"]\n";
    let h = Harness::start(&config(
        "default = { rate = 100.0, burst = 100 }",
        "require_known_key = true",
        "",
        plans,
    ))
    .await;
    let missing = h
        .http
        .post(h.url("/records"))
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
    for i in 0..50 {
        let unknown = h
            .http
            .post(h.url("/records"))
            .header("x-api-key", format!("spray-{i}"))
            .body("1")
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.status(), 403);
    }
    let admin: Value = common::get_json(
        &h.http,
        &format!("http://{}/admin/routes", h.running.admin_addr),
    )
    .await;
    assert_eq!(
        admin["tracked_keys"], 0,
        "refused keys create no limiter state"
    );
    let known = h
        .http
        .post(h.url("/records"))
        .header("x-api-key", "known")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(known.status(), 200);
    // Probes carry no key: the health endpoints are not behind identity.
    let health = h.http.get(h.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let h = Harness::start(&config(
        "default = { rate = 0.001, burst = 1 }",
        "source = \"ip\"",
        "",
        "",
    ))
    .await;
    let first = h
        .http
        .post(h.url("/records"))
        .header("x-forwarded-for", "203.0.113.1")
        .body("1")
        .send()
        .await
        .unwrap();
    let second = h
        .http
        .post(h.url("/records"))
        .header("x-forwarded-for", "203.0.113.2")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(second.status(), 429, "both came from 127.0.0.1: one bucket");
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_is_the_key() {
    let h = Harness::start(&config(
        "default = { rate = 0.001, burst = 1 }",
        "source = \"ip\"\ntrusted_proxies = [\"127.0.0.0/8\"]",
        "",
        "",
    ))
    .await;
    let a = h
        .http
        .post(h.url("/records"))
        .header("x-forwarded-for", "203.0.113.1")
        .body("1")
        .send()
        .await
        .unwrap();
    let b = h
        .http
        .post(h.url("/records"))
        .header("x-forwarded-for", "203.0.113.2")
        .body("1")
        .send()
        .await
        .unwrap();
    let a_again = h
        .http
        .post(h.url("/records"))
        .header("x-forwarded-for", "203.0.113.1")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (
            a.status().as_u16(),
            b.status().as_u16(),
            a_again.status().as_u16()
        ),
        (200, 200, 429)
    );
}
