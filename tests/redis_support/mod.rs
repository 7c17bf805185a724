//! A throwaway `redis-server` for tests and benchmarks: started on a free loopback port with
//! persistence off, killed when dropped. Shared by the library's unit tests
//! (`src/limit/redis_tests.rs`), `tests/redis_*.rs` and `benches/redis_*.rs` via `#[path]`.
//!
//! It needs Debian's `redis-server` on the `PATH` (`scripts/test` installs it); without it the
//! tests fail with a message that says so rather than pass without testing anything.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`; killed (SIGKILL) on drop.
pub(crate) struct RedisServer {
    child: Option<Child>,
    port: u16,
}

impl RedisServer {
    /// Starts a server on a free port.
    pub(crate) fn start() -> RedisServer {
        let mut last = String::new();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            match RedisServer::try_start(port) {
                Ok(server) => return server,
                // Someone took the port between our probe and the server's bind: retry.
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    /// Starts a server on `port` (e.g. to restart one that was killed).
    // Wall time on purpose: this waits on another process from blocking code that may run
    // outside any tokio runtime, or inside a paused one whose clock would never reach the
    // deadline.
    #[allow(clippy::disallowed_methods)]
    pub(crate) fn start_on(port: u16) -> RedisServer {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match RedisServer::try_start(port) {
                Ok(server) => return server,
                // The killed server's socket may linger for a moment.
                Err(e) if Instant::now() > deadline => {
                    panic!("redis-server did not start on {port}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    // Wall time on purpose, as in `start_on`: the deadline bounds a blocking wait for
    // another process.
    #[allow(clippy::disallowed_methods)]
    fn try_start(port: u16) -> Result<RedisServer, String> {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run redis-server ({e}); install Debian's redis-server \
                     (`apt-get install redis-server`, as scripts/test does)"
                )
            })?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("redis-server exited at start-up: {status}"));
            }
            if ping(port) {
                return Ok(RedisServer {
                    child: Some(child),
                    port,
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("redis-server did not answer PING within 5 s".to_owned());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The loopback port it listens on.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Its `redis://` URL, for `limits.redis_url`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: no goodbye to its clients) and waits until it is gone.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis answers `PING` on `port`.
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}
