//! Faults and hostile input: each test stands for one way the world breaks — a Lambda
//! endpoint that drops, hangs, throttles with absurd numbers or answers garbage; clients
//! that stall or send malformed requests; reloads and signals under load — and checks that
//! every caller still hears the true outcome of its record, exactly once.
//!
//! The Lambda side is [`fake_lambda::FakeLambda`], a scriptable endpoint that the real
//! `aws-sdk-lambda` client talks to, counting how often each record was processed.

#[path = "../common/mod.rs"]
mod common;
mod fake_lambda;

mod connections;
mod dead_letters;
mod fuzz;
mod invoke_faults;
mod queue;
mod reload;
mod responses;
mod transport;

use fake_lambda::FakeLambda;

/// A loopback address whose listener never accepts and whose backlog is full: the kernel drops
/// further SYNs, so a connect to it hangs until the client's connect timeout — before any byte
/// was sent. The address stays so while the value lives.
pub struct Blackhole {
    /// The address to connect to.
    pub addr: std::net::SocketAddr,
    _listener: tokio::net::TcpListener,
    _fillers: Vec<tokio::net::TcpStream>,
}

impl Blackhole {
    /// Binds the listener and fills its backlog.
    pub async fn start() -> Blackhole {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(0).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(stream)) = tokio::time::timeout(
                std::time::Duration::from_millis(200),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                fillers.push(stream);
            }
        }
        Blackhole {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }
}

/// A sluicegate config (no emulator) whose Lambda is `fake`, with generous admission limits
/// and the given `[[routes]]` (and any other sections) appended.
pub fn fake_config(fake: &FakeLambda, rest: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[limits]
global = {{ rate = 100000.0, burst = 100000 }}
default = {{ rate = 100000.0, burst = 100000 }}

[lambda]
endpoint_url = "{endpoint}"
connect_timeout = "1s"
read_timeout = "5s"

[emulator]
enabled = false

{rest}
"#,
        endpoint = fake.endpoint()
    )
}

/// The harness itself: a record through sluicegate reaches the fake, is counted once, and
/// comes back as the caller's answer.
#[tokio::test]
async fn the_fake_lambda_runs_and_counts_each_record() {
    let fake = FakeLambda::echo().await;
    let toml = fake_config(&fake, &common::route("records", "f", ""));
    let harness = common::Harness::start(&toml).await;
    let response = harness.post("/records", r#"{"n":1}"#).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["body"], serde_json::json!({"n": 1}));
    let id = body["id"].as_str().unwrap();
    assert_eq!(fake.processed(id), 1);
    assert_eq!(fake.calls().len(), 1);
}
