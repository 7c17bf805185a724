//! Row 11: queue memory. A route's queue is bounded in bytes (`queue.max_bytes`) as well as
//! in records, so large records cannot pile up to `max_pending × max_record_bytes`.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::common::{route, Harness};
use crate::fake_config;
use crate::fake_lambda::{Action, FakeLambda, Reply};

/// A record of about 1,000 bytes.
fn record(i: usize) -> String {
    json!({ "n": i, "pad": "x".repeat(980) }).to_string()
}

#[tokio::test]
async fn past_max_bytes_the_queue_sheds_and_takes_records_again_once_drained() {
    // One record per invoke, one invoke at a time, 200 ms each: the queue backs up.
    let fake = FakeLambda::start(|call| {
        Action::ProcessSlowly(Duration::from_millis(200), Reply::echo(call))
    })
    .await;
    let extra = r#"batch = { max_records = 1 }
queue = { max_pending = 10000, max_bytes = "8KiB" }
invoke = { rate = 1000.0, burst = 1000, max_concurrency = 1 }"#;
    let toml = fake_config(&fake, &route("records", "f", extra)).replacen(
        "[server]\n",
        "[server]\nmax_record_bytes = \"2KiB\"\n",
        1,
    );
    let harness = &Harness::start(&toml).await;
    let answers = join_all((0..40).map(|i| async move {
        let response = harness.post("/records", &record(i)).await;
        let status = response.status().as_u16();
        (
            status,
            response.json::<Value>().await.unwrap_or(Value::Null),
        )
    }))
    .await;
    let shed: Vec<&Value> = answers
        .iter()
        .filter(|(status, _)| *status == 429)
        .map(|(_, body)| body)
        .collect();
    let served: Vec<&Value> = answers
        .iter()
        .filter(|(status, _)| *status == 200)
        .map(|(_, body)| body)
        .collect();
    assert_eq!(shed.len() + served.len(), 40, "{answers:?}");
    assert!(shed.iter().all(|body| body["scope"] == "queue"), "{shed:?}");
    // 8 KiB holds 7 records of ~1 KiB; one more can be in flight and one held by the worker,
    // and the record count (10,000) is nowhere near.
    assert!((7..=9).contains(&served.len()), "{} served", served.len());
    assert!(shed.len() >= 31, "{} shed", shed.len());
    for body in &served {
        assert_eq!(fake.processed(body["id"].as_str().unwrap()), 1);
    }
    assert_eq!(fake.processed_summary(), (served.len(), 1));

    // Every queued byte was given back (the admin API says so), and the queue takes a full
    // load again.
    let routes = crate::common::get_json(
        &harness.http,
        &format!("http://{}/admin/routes", harness.running.admin_addr),
    )
    .await;
    assert_eq!(routes["routes"][0]["queue_bytes"], 0, "{routes}");
    let again = join_all((0..7).map(|i| async move {
        harness
            .post("/records", &record(100 + i))
            .await
            .status()
            .as_u16()
    }))
    .await;
    assert_eq!(again, vec![200; 7]);
}
