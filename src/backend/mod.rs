//! The Redis backend: token buckets shared by every replica (`[limits] backend = "redis"`).
//!
//! Its own module because two limiters use it: admission (`limit`, one script call per
//! request over its layers) and each function's invoke gate (`invoke`, one invoke-rate
//! bucket per function). It speaks the shared token-bucket vocabulary ([`crate::quota`]) and
//! depends on neither of its users.
//!
//! # Semantics
//!
//! One Lua script (`gcra.lua`, loaded once and run with `EVALSHA` through [`Script`])
//! holds the same GCRA as the local engine, in the same integer nanoseconds: period
//! `T = ceil(1e9 / rate)` ns, tolerance `tau = T × (burst − 1)`, state = the bucket's
//! theoretical arrival time. For the same request sequence at the same instants it gives the
//! local engine's decisions, `remaining`, `reset` and `wait`, exactly (a property test in
//! `tests.rs` drives both with one logical clock). One script call checks every bucket
//! of a request in order — global → route → key — atomically, and stops at the first refusal:
//! the buckets before it keep the token they gave, as in API Gateway and as the local engine
//! does, and the refusing bucket is not written. So a request costs **one round trip**
//! whatever the number of layers.
//!
//! - **Time** is the Redis server's (`TIME` inside the script), so replicas' clocks never
//!   matter; `wait` and `reset` are measured from that instant. The reply reaches the replica
//!   a little later, so a client that waits `wait` from receiving its answer waits at least
//!   the exact time: never early.
//! - **Keys** are `<prefix>:g:<T>:<burst>` (global), `<prefix>:r:<T>:<burst>:<route>`,
//!   `<prefix>:k:<T>:<burst>:{<client key>}` and `<prefix>:i:<function>` (invoke rate), where
//!   `<prefix>` is `sluicegate:v1` by default. Admission buckets are named after their quota,
//!   so a changed quota starts a fresh, full bucket — as [`Admission::reconfigured`] does
//!   locally — and replicas briefly running different configs do not misread each other's
//!   state. Invoke buckets are named after the function only, because the adaptive rate
//!   changes their quota continuously; the script caps a bucket's debt at what the quota of
//!   the call allows, so a lowered rate takes effect at once and a raised one does not
//!   inherit a larger debt.
//! - **Memory**: every write sets an expiry at the instant the bucket is full again, when it
//!   is indistinguishable from no key at all. A key therefore lives at most its refill time
//!   (`burst / rate`) after its last admitted request, and a refused request writes nothing:
//!   keys sprayed at the key layer cost at most (rate the upper layers admit) × refill time.
//!   `limits.max_keys` bounds the local engine (the fallback), not Redis.
//! - **Usage quotas**: a key with a usage quota (requests per day, week or month) has a
//!   counter `<prefix>:q:<period><offset>:<period start>:{<client key>}`, checked and
//!   incremented by the key layer's script call — the same round trip — only once every
//!   bucket admitted the request, and expiring (`PEXPIREAT`) at the period's end. Its hash
//!   tag `{<client key>}` is the key bucket's, so in a Redis Cluster both share a slot. The
//!   period is computed by the replica from its own UTC clock.
//!
//! # Concurrency
//!
//! Every replica talks to Redis through one connection (`conn.rs`): with `redis_url` a
//! `ConnectionManager`, a single multiplexed connection that concurrent requests share, so
//! their script calls are written back to back and their replies matched in order —
//! pipelined, not one round trip after another; with `redis_cluster` the cluster client, one
//! multiplexed connection per master, following `MOVED`/`ASK` and failovers. Redis runs each
//! script atomically, so two replicas can never both take a bucket's last token. Both
//! reconnect by themselves after a connection drops.
//!
//! On one node, admission's calls go through a batcher (`batch.rs`): the calls made within
//! one tick of the runtime (at most 256) are sent as one call of `gcra_batch.lua`, which
//! decides each request as `gcra.lua` alone would, in queue order; a batch of one is the
//! `gcra.lua` call itself. Each request still has its own verdict, its own deadline and its
//! own place in the health state. Redis then spends about a third of the CPU per decision
//! (one script call, and one read and one write of each distinct key, per batch).
//!
//! # Redis Cluster
//!
//! A script call may only touch keys of one slot, so on a cluster admission makes one call
//! per layer (the layers' keys hash to different slots: no single hot slot for the global
//! layer). See `limit::admission` for how the layers' calls are ordered and what a refusal
//! gives back.
//!
//! # When Redis fails
//!
//! Every call has a deadline (`limits.redis_timeout`, 50 ms by default). A call that fails or
//! misses it is decided by the `on_backend_error` policy ([`Fallback`]) and counts in
//! `sluicegate_limit_backend_errors_total`, but does not by itself take the backend down:
//! `health.rs` declares it **down** only after `limits.redis_down_after` consecutive failures
//! (3) or an error ratio of one half over a second, and **up** again only after
//! `limits.redis_up_after` consecutive good probes (3, answered within the deadline), so a
//! Redis that is slow now and then does not flap the backend. Each transition moves the
//! `sluicegate_limit_backend_up` gauge and logs one line. While down, no request talks to
//! Redis at all — each one is decided at once by the policy, so none waits on a dead Redis.
//! A background task probes every 250 ms while down. A restarted Redis is empty: its
//! buckets start full, and the script is loaded again on first use (`EVALSHA` falls back to
//! `SCRIPT LOAD`).
//!
//! # The fleet's share while down
//!
//! While up, each replica heartbeats every second (`replicas.lua`: a sorted set
//! `<prefix>:replicas` of replica ids scored by expiry, O(log n)); the count it reads back is
//! the number of live replicas N ([`fleet_share`](RedisBackend::fleet_share), at least
//! `limits.expected_replicas`). The local fallback then gives each replica `rate / N` and
//! `burst / N` of every layer, and the tokens it admits are charged to the shared buckets
//! when Redis answers again (`charge.lua`), so the fleet stays near the configured limits
//! instead of N× them (see `limit::admission` for the bound).
//!
//! [`Admission::reconfigured`]: crate::limit::Admission::reconfigured

mod batch;
mod conn;
mod health;

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ::redis::{Script, ScriptInvocation};
use tokio::sync::watch;

use self::batch::{Batcher, Failure};
use self::conn::Conn;
use self::health::{Health, Transition};
use crate::quota::{Decision, Quota, CLOSED_WAIT};
use crate::usage::{UsageQuota, Window};

/// Which admission layer a bucket belongs to; its letter names the layer in the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LayerKind {
    /// The account/stage bucket (`g`).
    Global,
    /// A route's bucket (`r`).
    Route,
    /// A client key's bucket (`k`), whatever its plan.
    Key,
}

impl LayerKind {
    /// The letter of the key layout in the module docs.
    fn letter(self) -> char {
        match self {
            LayerKind::Global => 'g',
            LayerKind::Route => 'r',
            LayerKind::Key => 'k',
        }
    }
}

/// The script, loaded once per connection and then run by its SHA1 (`EVALSHA`).
const GCRA_LUA: &str = include_str!("gcra.lua");

/// Charges a bucket for tokens taken elsewhere (or gives some back).
const CHARGE_LUA: &str = include_str!("charge.lua");

/// A replica's heartbeat; answers the number of live replicas.
const REPLICAS_LUA: &str = include_str!("replicas.lua");

/// How often a replica heartbeats while the backend is up; a heartbeat lives three times
/// this long, so one late heartbeat does not drop a replica from the count.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Default of `limits.redis_down_after`: consecutive failed calls that take the backend down.
pub const DEFAULT_DOWN_AFTER: u32 = 3;

/// Default of `limits.redis_up_after`: consecutive good probes that bring it back up.
pub const DEFAULT_UP_AFTER: u32 = 3;

/// The key prefix unless [`RedisOptions::prefix`] says otherwise; `v1` names the state
/// encoding, so a future change of it cannot misread old keys.
pub const DEFAULT_PREFIX: &str = "sluicegate:v1";

/// The default deadline of one call to Redis (`limits.redis_timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

/// How often a down backend is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// The deadline of the start-up probe (off the request path, so longer than a call's).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The wait reported for requests refused by [`Fallback::Deny`]: about when the next probes
/// will have told whether Redis is back.
pub const DENY_WAIT: Duration = Duration::from_secs(1);

/// With a logical clock (tests), keys live at least this long: Redis expires them on its own
/// clock, which may run ahead of the logical one.
const LOGICAL_MIN_TTL_MS: u64 = 600_000;

/// What to do while Redis cannot be reached (`limits.on_backend_error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Decide with this replica's local buckets at its share of the configured limits
    /// (`rate / N`, `burst / N`, N the live replicas seen through Redis, at least
    /// `limits.expected_replicas`); what they admit is charged to the shared buckets when
    /// Redis answers again.
    Local,
    /// Admit every request (invoke tokens are granted) until Redis returns.
    Allow,
    /// Refuse every request (`429`, scope `global`, `Retry-After: 1`), and hold invokes back,
    /// until Redis returns.
    Deny,
}

impl Fallback {
    /// The name used in the config and the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Local => "local",
            Fallback::Allow => "allow",
            Fallback::Deny => "deny",
        }
    }
}

/// How to reach Redis and what to do when it cannot be reached.
#[derive(Clone, Debug, PartialEq)]
pub struct RedisOptions {
    /// `redis://[user:password@]host[:port][/db]` (or `rediss://` where TLS is built in).
    pub url: String,
    /// Deadline of one call; past it the backend is down and the fallback decides.
    pub timeout: Duration,
    /// The `on_backend_error` policy.
    pub fallback: Fallback,
    /// Prefix of every key (default [`DEFAULT_PREFIX`]).
    pub prefix: String,
    /// The masters of a Redis Cluster (`limits.redis_cluster`); when not empty, `url` is
    /// not used.
    pub cluster: Vec<String>,
    /// `limits.expected_replicas`: the fewest replicas the fallback's share assumes.
    pub expected_replicas: Option<u32>,
    /// Consecutive failed calls that take the backend down (at least 1).
    pub down_after: u32,
    /// Consecutive good probes that bring it back up (at least 1).
    pub up_after: u32,
}

impl RedisOptions {
    /// Options for `url` with the defaults: 50 ms deadline, local fallback, default prefix,
    /// the default hysteresis, no replica floor.
    pub fn new(url: impl Into<String>) -> Self {
        RedisOptions {
            url: url.into(),
            timeout: DEFAULT_TIMEOUT,
            fallback: Fallback::Local,
            prefix: DEFAULT_PREFIX.to_owned(),
            cluster: Vec::new(),
            expected_replicas: None,
            down_after: DEFAULT_DOWN_AFTER,
            up_after: DEFAULT_UP_AFTER,
        }
    }

    /// Options for the Redis Cluster whose masters include `nodes`, with the defaults.
    pub fn cluster(nodes: Vec<String>) -> Self {
        let url = nodes.first().cloned().unwrap_or_default();
        RedisOptions {
            cluster: nodes,
            ..RedisOptions::new(url)
        }
    }
}

/// The backend could not decide (down, failed, or too slow); the caller applies the
/// [`Fallback`] policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the Redis backend is unavailable")]
pub struct Unavailable;

/// A bucket's GCRA parameters in nanoseconds, as the script takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Gcra {
    /// `T`: nanoseconds per token; 0 for a closed layer.
    pub(crate) period: u64,
    /// `tau = T × (burst − 1)`.
    pub(crate) tau: u64,
}

impl Gcra {
    /// governor's parameters for `quota` (the same rounding as the local engine).
    pub(crate) fn of(quota: Quota) -> Gcra {
        match quota.gcra() {
            Some(q) => {
                let period = (q.replenish_interval().as_nanos() as u64).max(1);
                let tau = period.saturating_mul(u64::from(q.burst_size().get() - 1));
                Gcra { period, tau }
            }
            None => Gcra { period: 0, tau: 0 },
        }
    }
}

/// One bucket of a script call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BucketRef<'a> {
    pub(crate) key: &'a str,
    pub(crate) gcra: Gcra,
}

/// A usage-quota counter checked after the buckets of a script call: at most `limit`
/// requests, the key expiring at `expire_at` (the period's end, since the Unix epoch).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CounterRef<'a> {
    pub(crate) key: &'a str,
    pub(crate) limit: u64,
    pub(crate) expire_at: Duration,
}

/// The script's answer: the deciding bucket (0-based: the refusing one, or the last one when
/// admitted; `buckets.len()` when the usage counter refused) and its decision, and the
/// usage counter's count when the call had one (after this request when admitted).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Verdict {
    pub(crate) bucket: usize,
    pub(crate) decision: Decision,
    pub(crate) used: Option<u64>,
}

/// A connection to the Redis that holds the shared buckets, with its health. Cheap to clone;
/// clones share the connection and the health state.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    script: Script,
    /// Admission calls made together share one script call (single node only; `batch.rs`).
    batcher: Option<Batcher>,
    charge: Script,
    replicas_script: Script,
    options: RedisOptions,
    /// `host:port/db` without credentials, for logs.
    addr: String,
    /// Whether requests use Redis: [`Health::is_up`], copied so the request path reads an
    /// atomic and locks nothing. Written only under the `health` lock. The flag guards no
    /// other memory, so `Relaxed` suffices.
    up: AtomicBool,
    /// The hysteresis. A `std` mutex: held for a few comparisons, never across an await.
    health: Mutex<Health>,
    /// Sends every up/down transition, for tasks that wait for Redis to return.
    up_tx: watch::Sender<bool>,
    /// Live replicas counted by the last heartbeat (0 before the first).
    replicas: AtomicU32,
    /// This replica's id in the heartbeat set.
    id: String,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("addr", &self.inner.addr)
            .field("up", &self.is_up())
            .field("fallback", &self.inner.options.fallback)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Sets up the connection and probes Redis once (for at most a second).
    ///
    /// Fails only for a URL that cannot be used. An unreachable Redis is not an error: the
    /// backend starts down — the fallback policy applies, and a warning says so — and comes up
    /// by itself when Redis answers. Must run inside a Tokio runtime (it spawns the probe).
    pub async fn connect(options: RedisOptions) -> Result<RedisBackend, ::redis::RedisError> {
        let conn = if options.cluster.is_empty() {
            Conn::single(&options.url)?
        } else {
            Conn::cluster(&options.cluster)?
        };
        let addr = if options.cluster.is_empty() {
            crate::redact::url(&options.url)
        } else {
            let nodes: Vec<String> = options
                .cluster
                .iter()
                .map(|n| crate::redact::url(n))
                .collect();
            format!("cluster {}", nodes.join(","))
        };
        let batcher = matches!(conn, Conn::Single(_))
            .then(|| Batcher::spawn(conn.clone(), Script::new(GCRA_LUA), options.timeout));
        let backend = RedisBackend {
            inner: Arc::new(Inner {
                conn,
                script: Script::new(GCRA_LUA),
                batcher,
                charge: Script::new(CHARGE_LUA),
                replicas_script: Script::new(REPLICAS_LUA),
                addr,
                health: Mutex::new(Health::new(options.down_after, options.up_after)),
                options,
                up: AtomicBool::new(false),
                up_tx: watch::Sender::new(false),
                replicas: AtomicU32::new(0),
                id: uuid::Uuid::new_v4().to_string(),
            }),
        };
        metrics::gauge!("sluicegate_limit_backend_up").set(0.0);
        match backend.probe(PROBE_TIMEOUT).await {
            Ok(()) => {
                backend.transition(|health| health.force_up(), "");
                backend.heartbeat().await;
                tracing::info!(
                    redis = %backend.inner.addr,
                    "admission and invoke-rate limits are shared through Redis"
                )
            }
            Err(error) => tracing::warn!(
                redis = %backend.inner.addr,
                %error,
                on_backend_error = backend.fallback().as_str(),
                "Redis is unreachable at start-up: applying on_backend_error until it answers"
            ),
        }
        tokio::spawn(watch_health(Arc::downgrade(&backend.inner)));
        Ok(backend)
    }

    /// Whether this backend talks to a Redis Cluster (`limits.redis_cluster`).
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.conn, Conn::Cluster(_))
    }

    /// N, the share of the configured limits one replica's local fallback gets (`1 / N`):
    /// the live replicas counted through Redis while it was up (this one included), at least
    /// `limits.expected_replicas`, at least 1.
    pub fn fleet_share(&self) -> u32 {
        let seen = self.inner.replicas.load(Ordering::Relaxed);
        seen.max(self.inner.options.expected_replicas.unwrap_or(1))
            .max(1)
    }

    /// Resolves once the backend is up (at once if it is).
    pub(crate) async fn until_up(&self) {
        let mut rx = self.inner.up_tx.subscribe();
        // The sender lives in `inner`, which `self` holds: it cannot close meanwhile.
        let _ = rx.wait_for(|up| *up).await;
    }

    /// Whether requests currently use Redis (false while the fallback policy applies).
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// The `on_backend_error` policy.
    pub fn fallback(&self) -> Fallback {
        self.inner.options.fallback
    }

    /// The options this backend was connected with.
    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }

    /// Key of a layer bucket: `<prefix>:<kind>:<T>:<burst>:<name>` (see the module docs).
    pub(crate) fn layer_key(&self, kind: LayerKind, quota: Quota, name: &str) -> String {
        let gcra = Gcra::of(quota);
        format!(
            "{}:{}:{}:{}:{name}",
            self.inner.options.prefix,
            kind.letter(),
            gcra.period,
            quota.burst
        )
    }

    /// Key of a client key's bucket in a key layer: the layer's [`layer_key`](Self::layer_key)
    /// with the client key in a Redis Cluster hash tag (`{…}`), which the key's usage counter
    /// ([`usage_key`](Self::usage_key)) shares, so both land in one slot.
    pub(crate) fn client_key(layer_key: &str, client: &str) -> String {
        format!("{layer_key}{{{client}}}")
    }

    /// Key of a client key's usage counter in one period:
    /// `<prefix>:q:<period><offset>:<period start>:{<client key>}`. Named after the period
    /// but not the limit, so a reload that changes only the limit keeps the count.
    pub(crate) fn usage_key(&self, client: &str, quota: &UsageQuota, window: Window) -> String {
        format!(
            "{}:q:{}{}:{}:{{{client}}}",
            self.inner.options.prefix,
            quota.period.as_str(),
            quota.offset,
            window.start
        )
    }

    /// The count of a usage counter (0 when it does not exist).
    pub(crate) async fn usage(&self, key: &str) -> Result<u64, Unavailable> {
        let mut conn = self.inner.conn.clone();
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(key);
        let get = cmd.query_async::<Option<u64>>(&mut conn);
        match tokio::time::timeout(self.inner.options.timeout, get).await {
            Ok(Ok(used)) => Ok(used.unwrap_or(0)),
            Ok(Err(e)) => {
                self.failed(e);
                Err(Unavailable)
            }
            Err(_elapsed) => Err(Unavailable),
        }
    }

    /// Sets a usage counter to `used`, expiring at `expire_at` (since the Unix epoch).
    pub(crate) async fn set_usage(
        &self,
        key: &str,
        used: u64,
        expire_at: Duration,
    ) -> Result<(), Unavailable> {
        let mut conn = self.inner.conn.clone();
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(key)
            .arg(used)
            .ignore()
            .cmd("PEXPIREAT")
            .arg(key)
            .arg(expire_at.as_millis() as u64)
            .ignore();
        let set = pipe.query_async::<()>(&mut conn);
        match tokio::time::timeout(self.inner.options.timeout, set).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.failed(e);
                Err(Unavailable)
            }
            Err(_elapsed) => Err(Unavailable),
        }
    }

    /// Key of a function's invoke-rate bucket.
    pub(crate) fn invoke_key(&self, function: &str) -> String {
        format!("{}:i:{function}", self.inner.options.prefix)
    }

    /// Charges the bucket `key` for `tokens` taken elsewhere (the local fallback), or gives
    /// `-tokens` back: one round trip. A charge empties the bucket at most (what is beyond
    /// is forgiven: a bucket holds no debt), a give-back fills it at most.
    ///
    /// `Err` only when nothing was sent (Redis is down). A charge that was sent and then
    /// failed or missed its deadline may have been applied: it is not retried (that could
    /// charge twice) but counted in `sluicegate_limit_backend_uncharged_total`, and it does
    /// not feed the up/down state — a burst of charges after an outage must not take Redis
    /// down again.
    pub(crate) async fn charge(
        &self,
        key: &str,
        gcra: Gcra,
        tokens: i64,
    ) -> Result<(), Unavailable> {
        if !self.is_up() {
            return Err(Unavailable);
        }
        if gcra.period == 0 || tokens == 0 {
            return Ok(());
        }
        let mut call = self.inner.charge.prepare_invoke();
        call.key(key).arg(tokens).arg(gcra.period).arg(gcra.tau);
        let mut conn = self.inner.conn.clone();
        let reply = tokio::time::timeout(
            self.inner.options.timeout,
            call.invoke_async::<i64>(&mut conn),
        )
        .await;
        if !matches!(reply, Ok(Ok(_))) {
            metrics::counter!("sluicegate_limit_backend_uncharged_total")
                .increment(tokens.unsigned_abs());
        }
        Ok(())
    }

    /// Takes a token from the single bucket `key` with `quota`: one round trip.
    ///
    /// The decision is the local engine's for the same bucket (`remaining`, `reset` and
    /// `wait` exact). `Err` when Redis is down, fails or is slower than the deadline: apply
    /// [`fallback`](Self::fallback).
    pub async fn take(&self, key: &str, quota: Quota) -> Result<Decision, Unavailable> {
        let bucket = BucketRef {
            key,
            gcra: Gcra::of(quota),
        };
        Ok(self.eval(&[bucket], None).await?.decision)
    }

    /// Runs the script over `buckets` in order. `now` replaces the server's clock (ns since
    /// the Unix epoch) for tests that drive Redis and the local engine with one logical clock.
    ///
    /// Cancel-safety: dropping the future after the command was written leaves the script
    /// running in Redis; the tokens it takes are then spent for nothing (never an extra
    /// admission).
    pub(crate) async fn eval(
        &self,
        buckets: &[BucketRef<'_>],
        now: Option<Duration>,
    ) -> Result<Verdict, Unavailable> {
        self.eval_counted(buckets, None, now).await
    }

    /// [`eval`](Self::eval), then — only when every bucket admitted — the usage `counter`:
    /// checked and incremented in the same script call (see `gcra.lua`).
    pub(crate) async fn eval_counted(
        &self,
        buckets: &[BucketRef<'_>],
        counter: Option<CounterRef<'_>>,
        now: Option<Duration>,
    ) -> Result<Verdict, Unavailable> {
        if !self.is_up() {
            return Err(Unavailable);
        }
        let call = invocation(&self.inner.script, buckets, counter, now);
        let mut conn = self.inner.conn.clone();
        let reply = tokio::time::timeout(
            self.inner.options.timeout,
            call.invoke_async::<Vec<i64>>(&mut conn),
        )
        .await;
        if matches!(reply, Ok(Ok(_))) {
            self.succeeded();
        }
        match reply {
            Ok(Ok(reply)) => match verdict(&reply, buckets.len(), counter.is_some()) {
                Some(verdict) => Ok(verdict),
                None => {
                    self.failed(format_args!("unexpected script reply {reply:?}"));
                    Err(Unavailable)
                }
            },
            Ok(Err(e)) => {
                self.failed_with(&e);
                Err(Unavailable)
            }
            Err(_elapsed) => {
                self.failed(self.missed_deadline());
                Err(Unavailable)
            }
        }
    }

    /// [`eval_counted`](Self::eval_counted) for admission: on a single node the call is
    /// batched with the others made in the same tick (`batch.rs`) — the same verdict, the
    /// same deadline from now, the same accounting in the health state; on a cluster it is
    /// `eval_counted` itself.
    pub(crate) async fn eval_batched(
        &self,
        buckets: &[BucketRef<'_>],
        counter: Option<CounterRef<'_>>,
        now: Option<Duration>,
    ) -> Result<Verdict, Unavailable> {
        let Some(batcher) = &self.inner.batcher else {
            return self.eval_counted(buckets, counter, now).await;
        };
        if !self.is_up() {
            return Err(Unavailable);
        }
        let reply = batcher.submit(buckets, counter, now);
        match tokio::time::timeout(self.inner.options.timeout, reply).await {
            Ok(Ok(Ok(reply))) => {
                self.succeeded();
                match verdict(&reply, buckets.len(), counter.is_some()) {
                    Some(verdict) => Ok(verdict),
                    None => {
                        self.failed(format_args!("unexpected script reply {reply:?}"));
                        Err(Unavailable)
                    }
                }
            }
            Ok(Ok(Err(failure))) => {
                self.failed_as(&failure);
                Err(Unavailable)
            }
            // The batch's own deadline passed (its callers' too), or its task is gone.
            Ok(Err(_)) | Err(_) => {
                self.failed(self.missed_deadline());
                Err(Unavailable)
            }
        }
    }

    /// Script calls the batcher made and the largest batch (`None` on a cluster).
    #[cfg(test)]
    pub(crate) fn batch_stats(&self) -> Option<(u64, usize)> {
        self.inner
            .batcher
            .as_ref()
            .map(|b| (b.calls(), b.largest()))
    }

    fn missed_deadline(&self) -> String {
        format!(
            "no answer within limits.redis_timeout ({:?})",
            self.inner.options.timeout
        )
    }

    /// Runs the script with no bucket within `timeout`: Redis answers, and the script is
    /// loaded. Says why not otherwise. Changes no state: the caller feeds the outcome to the
    /// hysteresis.
    async fn probe(&self, timeout: Duration) -> Result<(), String> {
        let mut call = self.inner.script.prepare_invoke();
        call.arg("").arg(0u64);
        let mut conn = self.inner.conn.clone();
        let failure =
            match tokio::time::timeout(timeout, call.invoke_async::<::redis::Value>(&mut conn))
                .await
            {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_elapsed) => format!("no answer within {timeout:?}"),
            };
        metrics::counter!("sluicegate_limit_backend_errors_total").increment(1);
        tracing::debug!(redis = %self.inner.addr, error = %failure, "Redis probe failed");
        Err(failure)
    }

    /// Heartbeats this replica and reads the number of live replicas (while up). A failed
    /// heartbeat keeps the last count; it does not count against the backend's health (the
    /// heartbeat set's slot may be the only one failing on a cluster).
    async fn heartbeat(&self) {
        let mut call = self.inner.replicas_script.prepare_invoke();
        let ttl = 3 * HEARTBEAT_EVERY.as_millis() as u64;
        call.key(format!("{}:replicas", self.inner.options.prefix))
            .arg(&self.inner.id)
            .arg(ttl);
        let mut conn = self.inner.conn.clone();
        let timeout = PROBE_TIMEOUT.max(self.inner.options.timeout);
        match tokio::time::timeout(timeout, call.invoke_async::<u32>(&mut conn)).await {
            Ok(Ok(live)) => {
                let before = self.inner.replicas.swap(live, Ordering::Relaxed);
                metrics::gauge!("sluicegate_limit_backend_replicas").set(f64::from(live));
                if before != live {
                    tracing::debug!(redis = %self.inner.addr, live, "live replicas");
                }
            }
            Ok(Err(error)) => tracing::debug!(%error, "Redis heartbeat failed"),
            Err(_elapsed) => tracing::debug!("Redis heartbeat missed its deadline"),
        }
    }

    /// Feeds an outcome to the hysteresis and acts on the transition it makes, once: the
    /// flag, the gauge, the watchers and one log line (`error`: why, when going down).
    fn transition(&self, step: impl FnOnce(&mut Health) -> Transition, error: &str) {
        let transition = {
            let mut health = self
                .inner
                .health
                .lock()
                .expect("health lock never poisoned");
            let transition = step(&mut health);
            self.inner.up.store(health.is_up(), Ordering::Relaxed);
            transition
        };
        match transition {
            Transition::Stay => {}
            Transition::Down => {
                metrics::gauge!("sluicegate_limit_backend_up").set(0.0);
                self.inner.up_tx.send_replace(false);
                tracing::warn!(
                    redis = %self.inner.addr,
                    error,
                    on_backend_error = self.fallback().as_str(),
                    fleet_share = self.fleet_share(),
                    "Redis backend down: shared limits unavailable, applying on_backend_error"
                );
            }
            Transition::Up => {
                metrics::gauge!("sluicegate_limit_backend_up").set(1.0);
                self.inner.up_tx.send_replace(true);
            }
        }
    }

    /// A call answered in time.
    fn succeeded(&self) {
        self.transition(|h| h.call(true, tokio::time::Instant::now()), "");
    }

    /// A call failed with `error`: a lost connection takes the backend down at once, any
    /// other error counts as [`failed`](Self::failed).
    fn failed_with(&self, error: &::redis::RedisError) {
        self.failed_as(&Failure::from(error));
    }

    /// [`failed_with`](Self::failed_with) for an error already classified.
    fn failed_as(&self, failure: &Failure) {
        if failure.lost {
            metrics::counter!("sluicegate_limit_backend_errors_total").increment(1);
            self.transition(Health::lost, &failure.message);
        } else {
            self.failed(&failure.message);
        }
    }

    /// A call failed: count it, and feed it to the hysteresis (which may take the backend
    /// down, logged once).
    fn failed(&self, error: impl Display) {
        metrics::counter!("sluicegate_limit_backend_errors_total").increment(1);
        let error = error.to_string();
        self.transition(|h| h.call(false, tokio::time::Instant::now()), &error);
    }
}

/// The call of `script` (`gcra.lua`) over `buckets` in order, then the usage `counter`;
/// `now` replaces the server's clock (see [`RedisBackend::eval`]).
fn invocation<'s>(
    script: &'s Script,
    buckets: &[BucketRef<'_>],
    counter: Option<CounterRef<'_>>,
    now: Option<Duration>,
) -> ScriptInvocation<'s> {
    let mut call = script.prepare_invoke();
    for bucket in buckets {
        call.key(bucket.key);
    }
    if let Some(counter) = &counter {
        call.key(counter.key);
    }
    match now {
        Some(now) => call.arg(now.as_nanos().to_string()).arg(LOGICAL_MIN_TTL_MS),
        None => call.arg("").arg(0u64),
    };
    for bucket in buckets {
        call.arg(bucket.gcra.period).arg(bucket.gcra.tau);
    }
    if let Some(counter) = &counter {
        call.arg(counter.limit)
            .arg(counter.expire_at.as_millis() as u64)
            .arg(1u64);
    }
    call
}

/// While the backend is down, probes every [`PROBE_EVERY`] (a probe is good when answered
/// within the call deadline, so a slow Redis stays down); while up, heartbeats every
/// [`HEARTBEAT_EVERY`]. Ends when the backend is dropped: holds only a weak reference
/// between ticks, so it never keeps a backend alive.
async fn watch_health(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heartbeat: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let backend = RedisBackend { inner };
        if backend.is_up() {
            let due =
                last_heartbeat.is_none_or(|at| at.elapsed() + PROBE_EVERY / 2 >= HEARTBEAT_EVERY);
            if due {
                last_heartbeat = Some(tokio::time::Instant::now());
                backend.heartbeat().await;
            }
            continue;
        }
        let ok = backend.probe(backend.inner.options.timeout).await.is_ok();
        backend.transition(|h| h.probe(ok), "");
        if backend.is_up() {
            tracing::info!(
                redis = %backend.inner.addr,
                "Redis backend up again: shared limits restored"
            );
            last_heartbeat = Some(tokio::time::Instant::now());
            backend.heartbeat().await;
        }
    }
}

/// Checks and converts the script's `{admitted, bucket, a, b[, used]}` reply; `counted`:
/// the call had a usage counter after its `buckets`.
fn verdict(reply: &[i64], buckets: usize, counted: bool) -> Option<Verdict> {
    // A bucket's refusal has four elements even in a call with a counter (the script stops
    // before the counter); an admission or the counter's refusal then has five.
    let (admitted, bucket, a, b) = match *reply {
        [admitted, bucket, a, b] if !counted || admitted == 0 => (admitted, bucket, a, b),
        [admitted, bucket, a, b, _] if counted => (admitted, bucket, a, b),
        _ => return None,
    };
    let used = match reply.get(4) {
        Some(&used) => Some(u64::try_from(used).ok()?),
        None => None,
    };
    let index = usize::try_from(bucket).ok()?.checked_sub(1)?;
    if index == buckets && counted && admitted == 0 && used.is_some() {
        // The usage counter refused; its wait is the period's end, known to the caller.
        return Some(Verdict {
            bucket: index,
            decision: Decision::Limited {
                wait: Duration::ZERO,
            },
            used,
        });
    }
    if index >= buckets {
        return None;
    }
    let decision = match admitted {
        1 => Decision::Allowed {
            remaining: u32::try_from(a).ok()?,
            reset: Duration::from_nanos(u64::try_from(b).ok()?),
        },
        0 if a < 0 => Decision::Limited { wait: CLOSED_WAIT },
        0 => Decision::Limited {
            wait: Duration::from_nanos(u64::try_from(a).ok()?),
        },
        _ => return None,
    };
    Some(Verdict {
        bucket: index,
        decision,
        used,
    })
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn layer_kinds_keep_the_key_letters_other_replicas_use() {
        // Replicas of different versions share buckets through these keys.
        assert_eq!(LayerKind::Global.letter(), 'g');
        assert_eq!(LayerKind::Route.letter(), 'r');
        assert_eq!(LayerKind::Key.letter(), 'k');
    }

    #[test]
    fn gcra_parameters_match_the_local_engines_rounding() {
        assert_eq!(
            Gcra::of(Quota {
                rate: 3.0,
                burst: 4
            }),
            Gcra {
                period: 333_333_334,
                tau: 3 * 333_333_334
            }
        );
        assert_eq!(
            Gcra::of(Quota {
                rate: 0.0,
                burst: 4
            }),
            Gcra { period: 0, tau: 0 }
        );
        assert_eq!(
            Gcra::of(Quota {
                rate: 5.0,
                burst: 0
            })
            .period,
            0
        );
    }

    #[test]
    fn replies_are_checked_before_they_are_trusted() {
        let allowed = verdict(&[1, 3, 7, 1_500], 3, false).expect("valid");
        assert_eq!(
            allowed,
            Verdict {
                bucket: 2,
                decision: Decision::Allowed {
                    remaining: 7,
                    reset: Duration::from_nanos(1_500)
                },
                used: None,
            }
        );
        assert_eq!(
            verdict(&[0, 1, -1, 0], 3, false).expect("valid").decision,
            Decision::Limited { wait: CLOSED_WAIT }
        );
        assert_eq!(verdict(&[0, 4, 10, 0], 3, false), None);
        assert_eq!(verdict(&[0, 0, 10, 0], 3, false), None);
        assert_eq!(verdict(&[2, 1, 10, 0], 3, false), None);
        assert_eq!(verdict(&[1, 1, -5, 0], 3, false), None);
        // With a usage counter: the count comes back; the counter's refusal is index 3.
        assert_eq!(
            verdict(&[1, 3, 7, 1_500, 42], 3, true).expect("valid").used,
            Some(42)
        );
        assert_eq!(
            verdict(&[0, 4, 9, 0, 9], 3, true),
            Some(Verdict {
                bucket: 3,
                decision: Decision::Limited {
                    wait: Duration::ZERO
                },
                used: Some(9),
            })
        );
        assert_eq!(verdict(&[1, 3, 7, 1_500], 3, true), None, "count missing");
        assert_eq!(
            verdict(&[0, 2, 10, 0], 3, true),
            Some(Verdict {
                bucket: 1,
                decision: Decision::Limited {
                    wait: Duration::from_nanos(10)
                },
                used: None,
            }),
            "a bucket refused before the counter"
        );
        assert_eq!(verdict(&[0, 4, 9, 0], 3, true), None, "count missing");
        assert_eq!(verdict(&[0, 4, 9, 0, 9], 3, false), None);
        assert_eq!(verdict(&[1, 3, 7, 1_500, -1], 3, true), None);
    }

    #[test]
    fn logged_addresses_carry_no_credentials() {
        let redact = crate::redact::url;
        assert_eq!(
            redact("redis://:s3cret@cache:6380/2"),
            "redis://***@cache:6380/2"
        );
        assert_eq!(redact("redis://user:p@ss@h"), "redis://***@h");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}

/// Against a real `redis-server`: the script against the local engine, and both users.
#[cfg(test)]
mod tests;

/// Against a real `redis-server`: heartbeats, the fallback's share, charges.
#[cfg(test)]
mod fleet_tests;

/// Against a real `redis-server`: batched calls decide as lone ones.
#[cfg(test)]
mod batch_tests;
