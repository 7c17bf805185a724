//! A throwaway three-master Redis Cluster on loopback: three `redis-server
//! --cluster-enabled yes` on free ports in a temporary directory, joined by `redis-cli
//! --cluster create` (no replicas), each killed when dropped.
//!
//! Needs Debian's `redis-server` and `redis-cli` (`redis-tools`) on the `PATH`
//! (`scripts/test` installs both).
#![allow(dead_code, clippy::disallowed_methods)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running cluster of three masters; every node is killed (SIGKILL) on drop.
pub(crate) struct RedisCluster {
    nodes: Vec<(u16, Option<Child>)>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl RedisCluster {
    /// Starts three masters and creates the cluster; waits (at most 20 s) until every node
    /// says `cluster_state:ok`.
    // Wall time on purpose: these are blocking waits for other processes.
    pub(crate) fn start() -> RedisCluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(dir.path().join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(dir.path())
                .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server runs (apt-get install redis-server, as scripts/test does)");
            nodes.push((port, Some(child)));
        }
        let cluster = RedisCluster { nodes, _dir: dir };
        for (port, _) in &cluster.nodes {
            cluster.wait_for(*port, "PING", "PONG");
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs (apt-get install redis-tools, as scripts/test does)");
        assert!(
            status.success(),
            "redis-cli --cluster create failed: {status}"
        );
        for (port, _) in &cluster.nodes {
            cluster.wait_for(*port, "CLUSTER INFO", "cluster_state:ok");
        }
        cluster
    }

    /// Runs `command` with redis-cli on `port` until its output contains `expect` (20 s).
    fn wait_for(&self, port: u16, command: &str, expect: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let output = Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(command.split(' '))
                .stdin(Stdio::null())
                .output();
            if let Ok(output) = output {
                if String::from_utf8_lossy(&output.stdout).contains(expect) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {port}: `{command}` did not answer {expect} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The masters' `redis://` URLs, for `limits.redis_cluster`.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(port, _)| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// The port of the master that owns `key`'s slot.
    pub(crate) fn master_of(&self, key: &str) -> u16 {
        let port = self.nodes[0].0;
        let output = Command::new("redis-cli")
            .args(["-c", "-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["CLUSTER", "KEYSLOT", key])
            .output()
            .expect("redis-cli runs");
        let slot: u16 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("a slot number");
        let output = Command::new("redis-cli")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "CLUSTER",
                "NODES",
            ])
            .output()
            .expect("redis-cli runs");
        // One line per node: id, ip:port@cport, flags, master, ping, pong, epoch, link,
        // then its slot ranges ("a-b" or "a").
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(port) = fields
                .get(1)
                .and_then(|a| a.split('@').next())
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            for range in fields.iter().skip(8) {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(start), Ok(end)) = (start.parse::<u16>(), end.parse::<u16>()) {
                    if (start..=end).contains(&slot) {
                        return port;
                    }
                }
            }
        }
        panic!("no master owns slot {slot}: {text}");
    }

    /// Kills the master on `port` (SIGKILL); with no replicas its slots then fail.
    pub(crate) fn kill(&mut self, port: u16) {
        for (p, child) in &mut self.nodes {
            if *p == port {
                if let Some(mut child) = child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
