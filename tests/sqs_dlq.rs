//! Dead letters to SQS, against a real SQS-compatible server: moto's server (PyPI
//! `moto[server]`, installed by `scripts/test`), started on a free loopback port by the test.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{config_toml, free_port, Harness};
use serde_json::Value;

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

#[tokio::test]
async fn exhausted_records_are_dead_lettered_to_sqs() {
    let port = free_port();
    let _moto = start_moto(port);
    let endpoint = format!("http://127.0.0.1:{port}");
    let sqs = sqs_client(&endpoint).await;
    // moto takes a moment to start (a Python process); poll, bounded.
    let started = Instant::now();
    let queue_url = loop {
        match sqs.create_queue().queue_name("sluicegate-dlq").send().await {
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
