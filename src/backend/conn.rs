//! The connection the backend talks through: one Redis, or a Redis Cluster.
//!
//! Both are multiplexed (concurrent calls share sockets and are pipelined) and reconnect by
//! themselves; the cluster client also follows `MOVED`/`ASK` redirections and re-reads the
//! slot map after a failover. The backend sees one [`ConnectionLike`], so the scripts and
//! deadlines are the same for both.

use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::{ClusterClientBuilder, ClusterConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

/// The deadline of one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection to one Redis or to a cluster. Cheap to clone; clones share it.
#[derive(Clone)]
pub(crate) enum Conn {
    /// One Redis (`limits.redis_url`).
    Single(ConnectionManager),
    /// A Redis Cluster (`limits.redis_cluster`).
    Cluster(ClusterConnection),
}

impl Conn {
    /// A connection to the Redis at `url`, made in the background: requests never wait for
    /// it (the backend is down meanwhile).
    pub(crate) fn single(url: &str) -> Result<Conn, RedisError> {
        let client = ::redis::Client::open(url)?;
        // Short, capped backoff, so a restarted Redis is found within about a second; the
        // backend's own deadline on every call replaces the response timeout.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_number_of_retries(4);
        Ok(Conn::Single(ConnectionManager::new_lazy_with_config(
            client, config,
        )?))
    }

    /// A connection to the cluster that `nodes` (any of its masters) belong to, made in the
    /// background like [`single`](Self::single).
    pub(crate) fn cluster(nodes: &[String]) -> Result<Conn, RedisError> {
        // Few, quick retries: a request waits at most the backend's deadline anyway, and a
        // call that misses it is decided by the fallback.
        let client = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .build()?;
        let config = ClusterConfig::new().set_connection_timeout(CONNECT_TIMEOUT);
        Ok(Conn::Cluster(
            client.get_pending_async_connection_with_config(config),
        ))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}
