//! Shared harness for black-box tests: a sluicegate with its embedded emulator on free
//! loopback ports, and a plain HTTP client.
#![allow(dead_code)]

use std::net::SocketAddr;

use serde_json::Value;
use sluicegate::config::Config;
use sluicegate::server::Running;

/// A config with generous admission limits, the embedded emulator on a free port as the
/// Lambda endpoint (`endpoint_url` names it; port 0 follows the port it got), and the given
/// `[[emulator.functions]]` and `[[routes]]` sections.
pub(crate) fn config_toml(functions: &str, routes: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[limits]
global = {{ rate = 100000.0, burst = 100000 }}
default = {{ rate = 100000.0, burst = 100000 }}

[lambda]
endpoint_url = "http://127.0.0.1:0"

[emulator]
enabled = true
listen = "127.0.0.1:0"
{functions}
{routes}
"#
    )
}

/// A replica whose limits and Idempotency-Keys live in the Redis at `redis_url`, with one
/// route `records` to the function `slow`; `lambda`: `None` embeds the emulator, `Some(addr)` invokes
/// that (the other replica's) emulator, so one emulator counts both replicas' invokes.
pub(crate) fn redis_replica(
    redis_url: &str,
    functions: &str,
    lambda: Option<SocketAddr>,
) -> Config {
    let (emulator, endpoint) = match lambda {
        None => ("enabled = true", "http://127.0.0.1:0".to_owned()),
        Some(addr) => ("enabled = false", format!("http://{addr}")),
    };
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[limits]
backend = "redis"
redis_url = "{url}"
redis_timeout = "2s"
global = {{ rate = 100000.0, burst = 100000 }}
default = {{ rate = 100000.0, burst = 100000 }}

[lambda]
endpoint_url = "{endpoint}"

[emulator]
{emulator}
listen = "127.0.0.1:0"
{functions}

[[routes]]
name = "records"
function = "slow"
"#,
        url = redis_url
    );
    Config::from_toml(&toml).expect("test config is valid")
}

pub(crate) struct Harness {
    pub(crate) running: Running,
    pub(crate) http: reqwest::Client,
}

impl Harness {
    pub(crate) async fn start(toml: &str) -> Harness {
        let config = Config::from_toml(toml).expect("test config is valid");
        Harness::start_config(config).await
    }

    pub(crate) async fn start_config(config: Config) -> Harness {
        let running = sluicegate::server::start(config)
            .await
            .expect("sluicegate starts");
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .expect("client builds");
        Harness { running, http }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.addr)
    }

    pub(crate) fn emulator(&self) -> SocketAddr {
        self.running
            .emulator_addr
            .expect("the test config embeds the emulator")
    }

    pub(crate) async fn post(&self, path: &str, body: &str) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .body(body.to_owned())
            .send()
            .await
            .expect("request is answered")
    }

    /// `/emulator/stats` for one function.
    pub(crate) async fn stats(&self, function: &str) -> Value {
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

    /// Polls the emulator's stats for `function` until `done` holds (at most 10 s).
    pub(crate) async fn stats_when(&self, function: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = tokio::time::Instant::now();
        loop {
            let stats = self.stats(function).await;
            if done(&stats) {
                return stats;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "stats never settled: {stats}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// A port that was free a moment ago (for processes that must be told a fixed port).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// One answered request of a load run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) latency: std::time::Duration,
}

/// Offers `rate` requests per second for `duration` (bounded: `rate × duration` requests
/// at most), each started on schedule whether or not earlier ones were answered, and
/// returns every answer. Requests still unanswered 30 s after the load ends are abandoned.
pub(crate) async fn paced_load(
    http: &reqwest::Client,
    url: &str,
    body: &str,
    rate: f64,
    duration: std::time::Duration,
) -> Vec<Answer> {
    use std::time::Duration;
    use tokio::time::Instant;
    let total = (rate * duration.as_secs_f64()).round() as usize;
    let tick = Duration::from_millis(5);
    let per_tick = rate * tick.as_secs_f64();
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    let mut sent = 0usize;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut owed = 0.0;
    while sent < total && start.elapsed() < duration + Duration::from_secs(1) {
        interval.tick().await;
        owed += per_tick;
        while owed >= 1.0 && sent < total {
            owed -= 1.0;
            sent += 1;
            let request = http.post(url).body(body.to_owned());
            tasks.spawn(async move {
                let begun = Instant::now();
                let status = match request.send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let _ = response.bytes().await;
                        status
                    }
                    Err(_) => 0,
                };
                Answer {
                    status,
                    latency: begun.elapsed(),
                }
            });
        }
    }
    let mut answers = Vec::with_capacity(sent);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(done) = tasks.join_next().await {
            if let Ok(answer) = done {
                answers.push(answer);
            }
        }
    })
    .await;
    answers
}

/// The `q`-quantile of `values` (sorted copy).
pub(crate) fn quantile(values: &[std::time::Duration], q: f64) -> std::time::Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return std::time::Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

/// A `[[routes]]` entry for `function` with extra TOML lines.
pub(crate) fn route(name: &str, function: &str, extra: &str) -> String {
    format!("[[routes]]\nname = \"{name}\"\nfunction = \"{function}\"\n{extra}\n")
}

/// A child process killed when the test ends, however it ends.
pub(crate) struct Process(pub(crate) std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `url` until it answers 200, for at most 20 s (a cold debug binary starts slowly).
pub(crate) async fn wait_until_up(http: &reqwest::Client, url: &str) {
    let start = tokio::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(20) {
        if http.get(url).send().await.is_ok_and(|r| r.status() == 200) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{url} did not come up within 20 s");
}

/// GETs `url` and parses its JSON body (the test fails if either step does).
pub(crate) async fn get_json(http: &reqwest::Client, url: &str) -> serde_json::Value {
    http.get(url)
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("a JSON body")
}
