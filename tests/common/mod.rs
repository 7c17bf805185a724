//! Shared harness for black-box tests: a sluicegate with its embedded emulator on free
//! loopback ports, and a plain HTTP client.
#![allow(dead_code)]

use std::net::SocketAddr;

use serde_json::Value;
use sluicegate::config::Config;
use sluicegate::server::Running;

/// A config with generous admission limits, the embedded emulator on a free port, and
/// the given `[[emulator.functions]]` and `[[routes]]` sections.
pub fn config_toml(functions: &str, routes: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[limits]
global = {{ rate = 100000.0, burst = 100000 }}
default = {{ rate = 100000.0, burst = 100000 }}

[emulator]
enabled = true
listen = "127.0.0.1:0"
{functions}
{routes}
"#
    )
}

pub struct Harness {
    pub running: Running,
    pub http: reqwest::Client,
}

impl Harness {
    pub async fn start(toml: &str) -> Harness {
        let config = Config::from_toml(toml).expect("test config is valid");
        Harness::start_config(config).await
    }

    pub async fn start_config(config: Config) -> Harness {
        let running = sluicegate::server::start(config)
            .await
            .expect("sluicegate starts");
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .expect("client builds");
        Harness { running, http }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.addr)
    }

    pub fn emulator(&self) -> SocketAddr {
        self.running
            .emulator_addr
            .expect("the test config embeds the emulator")
    }

    pub async fn post(&self, path: &str, body: &str) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .body(body.to_owned())
            .send()
            .await
            .expect("request is answered")
    }

    /// `/emulator/stats` for one function.
    pub async fn stats(&self, function: &str) -> Value {
        let all: Value = self
            .http
            .get(format!("http://{}/emulator/stats", self.emulator()))
            .send()
            .await
            .expect("stats answered")
            .json()
            .await
            .expect("stats are JSON");
        all["functions"][function].clone()
    }
}

/// A port that was free a moment ago (for processes that must be told a fixed port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}
