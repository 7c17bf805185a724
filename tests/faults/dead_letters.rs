//! Row 9: a caller is told a `dead_letter_id` only once the sink holds the letter; when the
//! sink cannot take it, the caller hears `503` without an id and the loss is counted.

use std::path::Path;

use futures_util::future::join_all;
use serde_json::Value;

use crate::common::{self, Harness};
use crate::fake_config;
use crate::fake_lambda::{Action, FakeLambda, Reply};

/// A Lambda endpoint that never takes a batch, so every record is dead-lettered after two
/// short attempts.
async fn unavailable_lambda() -> FakeLambda {
    FakeLambda::start(|_| Action::Reply(Reply::service_error(503, "ServiceException"))).await
}

fn dead_lettering_route(name: &str, file: &Path) -> String {
    common::route(
        name,
        "f",
        &format!(
            "retry = {{ max_attempts = 2, base = \"10ms\", cap = \"20ms\", budget = 1.0 }}\ndlq = {{ file = {:?} }}",
            file.display().to_string()
        ),
    )
}

/// The ids in a JSON-lines dead-letter file, read as it is on disk right now.
fn ids_in(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|letter| letter["id"].as_str().map(str::to_owned))
        .collect()
}

async fn metric(h: &Harness, name: &str, route: &str) -> f64 {
    let text = h
        .http
        .get(format!("http://{}/metrics", h.running.admin_addr))
        .send()
        .await
        .expect("the admin listener answers /metrics")
        .text()
        .await
        .expect("the metrics body is read whole");
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(&format!("route=\"{route}\"")))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_dead_letter_id_is_given_only_once_the_letter_is_in_the_file() {
    let fake = unavailable_lambda().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dlq.jsonl");
    let h = Harness::start(&fake_config(
        &fake,
        &dead_lettering_route("dl-confirmed", &file),
    ))
    .await;
    let answers = join_all((0..20).map(|n| {
        let (h, file) = (&h, &file);
        async move {
            // Big records make the write take a while, so a promise made before it shows.
            let record = format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(200_000));
            let response = h.post("/dl-confirmed", &record).await;
            // Read the file the moment the answer arrives: the letter must already be there.
            let on_disk = ids_in(file);
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, body, on_disk)
        }
    }))
    .await;
    for (status, body, on_disk) in &answers {
        assert_eq!(*status, 503, "{body}");
        let id = body["dead_letter_id"].as_str().expect("a dead-letter id");
        assert!(
            on_disk.iter().any(|written| written == id),
            "{id} was promised before it was written"
        );
    }
    assert_eq!(ids_in(&file).len(), 20, "one letter per record");
    let (processed, _) = fake.processed_summary();
    assert_eq!(processed, 0, "the fake never ran a batch");
    assert_eq!(
        metric(&h, "sluicegate_dead_letters_total", "dl-confirmed").await,
        20.0
    );
}

#[tokio::test]
async fn a_sink_that_cannot_write_answers_503_without_an_id_and_counts_the_loss() {
    let fake = unavailable_lambda().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dlq.jsonl");
    let h = Harness::start(&fake_config(
        &fake,
        &dead_lettering_route("dl-broken", &file),
    ))
    .await;
    // The sink opened the file at start-up; now a directory stands where it was, so the
    // writer's reopen (it follows rotation) fails — as a full or unmounted disk would.
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();

    let answers = join_all((0..5).map(|n| {
        let h = &h;
        async move {
            let response = h.post("/dl-broken", &format!(r#"{{"n":{n}}}"#)).await;
            let status = response.status();
            let retry_after = response.headers().get("retry-after").cloned();
            (status, retry_after, response.json::<Value>().await.unwrap())
        }
    }))
    .await;
    for (status, retry_after, body) in &answers {
        assert_eq!(*status, 503, "{body}");
        assert!(retry_after.is_some(), "a 503 carries Retry-After");
        assert!(
            body.get("dead_letter_id").is_none(),
            "no id for a letter that was not written: {body}"
        );
        assert_eq!(body["error"], "unavailable");
    }
    assert_eq!(
        metric(&h, "sluicegate_dead_letter_failures_total", "dl-broken").await,
        5.0
    );
    assert_eq!(
        metric(&h, "sluicegate_dead_letters_total", "dl-broken").await,
        0.0
    );
}
