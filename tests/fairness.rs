//! Per-key fair queueing over real sockets: a key that floods a route's queue sheds its own
//! records, not a light key's (`queue.fairness = "per_key"`), where a FIFO queue sheds the
//! light key (`"fifo"`, the old behaviour).
//!
//! The function takes one invoke of two records at a time and answers after a second. Key
//! `a` floods: while an invoke is out, the worker holds the next two records waiting for the
//! invoke slot, six fill the queue (`max_pending = 6`) and the rest are refused. Key `b`'s
//! three records are sent just after an invoke started behind a full queue, so they arrive
//! while it is full.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{config_toml, get_json, Harness};
use futures_util::future::join_all;
use serde_json::Value;
use tokio::time::Instant;

/// Key `a`'s concurrent senders: more than the 10 records the route holds at once (2 in
/// flight, 2 held by the worker, 6 queued), so the queue is refilled as soon as it drains.
const SENDERS: usize = 16;

const SLOW: &str = "[[emulator.functions]]\nname = \"slow\"\nlatency = \"1s\"\n";

fn fair_route(name: &str, fairness: &str) -> String {
    common::route(
        name,
        "slow",
        &format!(
            "batch = {{ max_records = 2 }}\n\
             queue = {{ max_pending = 6, fairness = \"{fairness}\" }}\n\
             invoke = {{ rate = 100.0, burst = 10, max_concurrency = 1 }}\n"
        ),
    )
}

/// One answer: status, `Retry-After` and the JSON body.
#[derive(Debug)]
struct Answered {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

async fn post_as(h: &Harness, path: &str, key: &str, body: String) -> Answered {
    let response = h
        .http
        .post(h.url(path))
        .header("x-api-key", key)
        .body(body)
        .send()
        .await
        .expect("the request is answered");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.json().await.expect("a JSON body");
    Answered {
        status,
        retry_after,
        body,
    }
}

/// The route's entry in `/admin/routes`.
async fn route_state(h: &Harness, route: &str) -> Value {
    let url = format!("http://{}/admin/routes", h.running.admin_addr);
    let all = get_json(&h.http, &url).await;
    all["routes"]
        .as_array()
        .and_then(|routes| routes.iter().find(|r| r["name"] == route))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits (at most 10 s) until an invoke starts that was not out before, and the queue is
/// full behind it: from then on, for the second that invoke takes, the worker takes nothing
/// from the queue (it holds the next batch, waiting for the one invoke slot), so a record
/// that arrives finds the queue full.
async fn wait_for_a_fresh_invoke_behind_a_full_queue(h: &Harness, route: &str) {
    let start = Instant::now();
    let before = h.stats("slow").await["invocations"].as_u64().unwrap_or(0);
    loop {
        let invocations = h.stats("slow").await["invocations"].as_u64().unwrap_or(0);
        let state = route_state(h, route).await;
        if invocations > before && state["queue_depth"] == 6 && state["invoke"]["in_flight"] == 1 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no invoke started behind a full queue: {state}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Floods a route with `fairness` from key `a` (sixteen senders, more than the route can
/// hold, each sending again as soon as it is answered) and, once the queue is full behind a
/// fresh invoke, sends key `b`'s three records. Returns the answers of `a` and of `b`, and
/// the metrics page after.
async fn flood(route: &str, fairness: &str) -> (Vec<Answered>, Vec<Answered>, String) {
    let h = Harness::start(&config_toml(SLOW, &fair_route(route, fairness))).await;
    let path = format!("/{route}");
    let done = AtomicBool::new(false);
    let sender = |first: usize| {
        let (h, path, done) = (&h, &path, &done);
        async move {
            let mut answers = Vec::new();
            // Bounded: a few seconds of a debug build's answers.
            for n in (first..).step_by(SENDERS).take(20_000) {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                answers.push(post_as(h, path, "a", format!(r#"{{"a":{n}}}"#)).await);
            }
            answers
        }
    };
    let a = join_all((0..SENDERS).map(sender));
    let b = async {
        wait_for_a_fresh_invoke_behind_a_full_queue(&h, route).await;
        let b = join_all((0..3).map(|n| post_as(&h, &path, "b", format!(r#"{{"b":{n}}}"#)))).await;
        done.store(true, Ordering::Relaxed);
        b
    };
    let (a, b) = tokio::join!(a, b);
    let page = h
        .http
        .get(format!("http://{}/metrics", h.running.admin_addr))
        .send()
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("a text body");
    (a.into_iter().flatten().collect(), b, page)
}

fn is_queue_shed(answer: &Answered) -> bool {
    answer.status == 429
        && answer.body["error"] == "rate_limited"
        && answer.body["scope"] == "queue"
        && answer.body["retry_after_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0)
        && answer
            .retry_after
            .as_deref()
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|secs| secs >= 1)
}

#[tokio::test]
async fn per_key_queue_serves_a_light_key_while_a_flooding_key_sheds_its_own_records() {
    let (a, b, page) = flood("fair-per-key", "per_key").await;
    for (n, answer) in b.iter().enumerate() {
        assert_eq!(answer.status, 200, "b's record {n}: {answer:?}");
        assert_eq!(answer.body["status"], "success");
        assert_eq!(answer.body["body"], serde_json::json!({ "b": n }));
    }
    let shed: Vec<_> = a.iter().filter(|x| x.status != 200).collect();
    assert!(
        shed.iter().all(|x| is_queue_shed(x)),
        "a's records that were not served were shed by the queue: {shed:?}"
    );
    assert!(a.iter().any(|x| x.status == 200) && !shed.is_empty());
    assert!(
        page.contains("sluicegate_queue_displaced_total{route=\"fair-per-key\"} 3"),
        "each of b's records displaced one of a's:\n{page}"
    );
}

#[tokio::test]
async fn fifo_queue_sheds_a_light_key_behind_a_flooding_key() {
    let (a, b, page) = flood("fair-fifo", "fifo").await;
    for (n, answer) in b.iter().enumerate() {
        assert!(is_queue_shed(answer), "b's record {n}: {answer:?}");
    }
    assert!(a.iter().all(|x| x.status == 200 || is_queue_shed(x)));
    assert!(
        !page.contains("sluicegate_queue_displaced_total{route=\"fair-fifo\"}"),
        "a FIFO queue displaces nothing:\n{page}"
    );
}
