//! Dead letters to SQS, against a real SQS-compatible server: moto's server (PyPI
//! `moto[server]`, installed by `scripts/test`), started on a free loopback port by the test.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{config_toml, free_port, Harness};
use serde_json::Value;
use tokio::time::Instant;

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto(port: u16) -> Moto {
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .or_else(|_| {
            Command::new("python3")
                .args([
                    "-m",
                    "moto.server",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .expect("moto's server is installed: pip install 'moto[server]' (scripts/test does this)");
    Moto(child)
}

async fn sqs_client(endpoint: &str) -> aws_sdk_sqs::Client {
    let lambda = sluicegate::config::LambdaConfig {
        endpoint_url: Some(endpoint.to_owned()),
        ..Default::default()
    };
    aws_sdk_sqs::Client::new(&sluicegate::invoke::sdk_config(&lambda).await)
}

/// moto on a free port with one queue `name`: the server, a client and the queue's URL.
async fn moto_queue(name: &str) -> (Moto, aws_sdk_sqs::Client, String) {
    let port = free_port();
    let moto = start_moto(port);
    let endpoint = format!("http://127.0.0.1:{port}");
    let sqs = sqs_client(&endpoint).await;
    // moto takes a moment to start (a Python process); poll, bounded.
    let started = Instant::now();
    let queue_url = loop {
        match sqs.create_queue().queue_name(name).send().await {
            Ok(out) => {
                break out
                    .queue_url()
                    .expect("CreateQueue returns a URL")
                    .to_owned()
            }
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!(
                "moto did not come up: {}",
                aws_sdk_sqs::error::DisplayErrorContext(e)
            ),
        }
    };
    (moto, sqs, queue_url)
}

/// Every message body in the queue, received until `expected` arrived (bounded).
async fn receive_all(sqs: &aws_sdk_sqs::Client, queue_url: &str, expected: usize) -> Vec<Value> {
    let started = Instant::now();
    let mut letters = Vec::new();
    while letters.len() < expected {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "only {} of {expected} dead letters arrived in SQS",
            letters.len()
        );
        let out = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("moto answers ReceiveMessage");
        for message in out.messages() {
            let body = message.body().expect("an SQS message has a body");
            letters.push(serde_json::from_str(body).expect("a dead letter is JSON"));
        }
    }
    letters
}

/// A config whose function is always throttled, so every record is dead-lettered to `dlq`.
fn always_dead_lettered(dlq: &str) -> String {
    let functions = "[[emulator.functions]]\nname = \"off\"\nreserved_concurrency = 0\n";
    let routes = format!(
        "[[routes]]\nname = \"records\"\nfunction = \"off\"\nretry = {{ max_attempts = 1 }}\nbatch = {{ max_wait = \"200ms\", flush = \"window\" }}\ndlq = {dlq}\n"
    );
    config_toml(functions, &routes)
}

async fn post_all(h: &Harness, bodies: Vec<String>) -> Vec<(u16, Value)> {
    futures_util::future::join_all(bodies.into_iter().map(|body| async move {
        let response = h.post("/records", &body).await;
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("every answer is a JSON body");
        (status, body)
    }))
    .await
}

async fn metric(h: &Harness, name: &str, labels: &str) -> f64 {
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
        .filter(|line| line.starts_with(name) && line.contains(labels))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn exhausted_records_are_dead_lettered_to_sqs() {
    let (_moto, sqs, queue_url) = moto_queue("sluicegate-dlq").await;

    let functions = "[[emulator.functions]]\nname = \"off\"\nreserved_concurrency = 0\n";
    let routes = format!(
        "[[routes]]\nname = \"records\"\nfunction = \"off\"\nretry = {{ max_attempts = 1 }}\ndlq = {{ sqs_queue_url = {queue_url:?} }}\n"
    );
    let h = Harness::start(&config_toml(functions, &routes)).await;
    let response = h
        .http
        .post(h.url("/records"))
        .header("x-api-key", "team-a")
        .body(r#"{"order":7}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    let id = body["dead_letter_id"].as_str().unwrap().to_owned();

    let started = Instant::now();
    let message = loop {
        let out = sqs
            .receive_message()
            .queue_url(&queue_url)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        if let Some(message) = out.messages().first() {
            break message.body().unwrap().to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no dead letter arrived in SQS"
        );
    };
    let letter: Value = serde_json::from_str(&message).unwrap();
    assert_eq!(letter["id"], id.as_str());
    assert_eq!(letter["route"], "records");
    assert_eq!(letter["function"], "off");
    assert_eq!(letter["key"], "team-a");
    assert_eq!(letter["record"]["order"], 7);
    assert_eq!(letter["attempts"], 1);
    assert_eq!(
        letter["error_kind"],
        "ReservedFunctionConcurrentInvocationLimitExceeded"
    );
}

#[tokio::test]
async fn a_queue_that_refuses_gets_503_without_a_dead_letter_id() {
    let (_moto, _sqs, queue_url) = moto_queue("exists").await;
    // Same server, a queue that does not exist: every SendMessageBatch is refused.
    let missing = queue_url.replace("/exists", "/does-not-exist");
    let h = Harness::start(&always_dead_lettered(&format!(
        "{{ sqs_queue_url = {missing:?} }}"
    )))
    .await;
    let answers = post_all(&h, (0..3).map(|n| format!(r#"{{"n":{n}}}"#)).collect()).await;
    for (status, body) in &answers {
        assert_eq!(*status, 503, "{body}");
        assert!(body.get("dead_letter_id").is_none(), "{body}");
    }
    assert_eq!(
        metric(
            &h,
            "sluicegate_dead_letter_failures_total",
            "reason=\"write_error\""
        )
        .await,
        3.0
    );
}

#[tokio::test]
async fn big_letters_go_to_sqs_in_batches_within_its_size_limit() {
    let (_moto, sqs, queue_url) = moto_queue("big-letters").await;
    let h = Harness::start(&always_dead_lettered(&format!(
        "{{ sqs_queue_url = {queue_url:?} }}"
    )))
    .await;
    // Six letters of ~100 KiB: one call of ten entries would carry ~600 KiB.
    let pad = "x".repeat(100 * 1024);
    let bodies = (0..6)
        .map(|n| format!(r#"{{"n":{n},"pad":"{pad}"}}"#))
        .collect();
    let answers = post_all(&h, bodies).await;
    let mut ids: Vec<String> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 503, "{}", body["message"]);
            body["dead_letter_id"]
                .as_str()
                .expect("confirmed")
                .to_owned()
        })
        .collect();
    let mut arrived: Vec<String> = receive_all(&sqs, &queue_url, 6)
        .await
        .iter()
        .map(|letter| letter["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    arrived.sort();
    assert_eq!(ids, arrived);
}

#[tokio::test]
async fn a_letter_too_large_for_sqs_is_a_counted_loss_not_a_promise() {
    let (_moto, _sqs, queue_url) = moto_queue("too-large").await;
    let h = Harness::start(&always_dead_lettered(&format!(
        "{{ sqs_queue_url = {queue_url:?} }}"
    )))
    .await;
    // Within max_record_bytes (256 KiB), but the letter around it is over SQS's limit.
    let pad = "x".repeat(256 * 1024 - 32);
    let answers = post_all(&h, vec![format!(r#"{{"pad":"{pad}"}}"#)]).await;
    assert_eq!(answers[0].0, 503);
    assert!(
        answers[0].1.get("dead_letter_id").is_none(),
        "{}",
        answers[0].1["message"]
    );
    assert_eq!(
        metric(
            &h,
            "sluicegate_dead_letter_failures_total",
            "reason=\"too_large\""
        )
        .await,
        1.0
    );
}
