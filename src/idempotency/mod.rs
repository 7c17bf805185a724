//! `Idempotency-Key`: a request that carries the header is processed at most once per
//! (route, client key, idempotency key) — its [`Scope`] — while its entry lives
//! (IETF `draft-ietf-httpapi-idempotency-key-header`; Stripe's behaviour).
//!
//! [`Idempotency::begin`] decides what a request with a key does:
//! - **lead** ([`Lead`]): nobody holds the scope; this request submits its record, and its
//!   outcome is published to everyone waiting on the scope, then stored or forgotten;
//! - **join** ([`Waiter`]): the scope's request is in flight here; wait for its outcome
//!   (no second submit), or for the joiner's own deadline;
//! - **replay**: the scope's request completed; its stored response ([`Snapshot`]);
//! - **refuse** ([`Refusal`]): the same key came with another body (SHA-256 of the body,
//!   [`BodyHash`]), the scope is in flight on another replica, the bounds are full of
//!   in-flight requests, or the shared store cannot be reached.
//!
//! What is stored is the caller's decision ([`Lead::spawn`] takes it with the outcome): an
//! outcome the record may have caused is kept, so a retry is told it; one that says the
//! record was never processed (a shed, an unavailable Lambda) is forgotten, so a retry is a
//! real retry. The leader's record is awaited by a spawned task that holds its ticket, not
//! by the leader's request: a caller whose deadline passes leaves, the record is still
//! awaited (and the batcher does not drop it as abandoned), and its real outcome is stored
//! for the next retry. An in-flight entry is never evicted, so the store never says "not
//! seen" for a key whose record may be running.
//!
//! Where entries live:
//! - `local.rs`: this replica's bounded map (`ttl`, `max_entries`, `max_bytes`, oldest
//!   completed out first); always used, also as the cache in front of Redis;
//! - `redis.rs`: with `limits.backend = "redis"`, completed outcomes live in Redis (one key
//!   per scope, expiring after `ttl`) and the in-flight claim is `SET NX PX` with this
//!   process's owner token, so a retry on another replica is replayed and a duplicate that
//!   reaches another replica while the first is in flight is refused (`409`), never invoked
//!   twice. When Redis cannot be reached a request with a key is refused (`503`), not served
//!   from the local store: another replica may hold the key, and only Redis would tell.
//!
//! The store survives reloads: a new [`Idempotency`] built with the previous one keeps its
//! entries (in-flight ones especially) and applies the new bounds.

mod local;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;

use self::local::{Limits, LocalStore, Lookup};
pub use self::redis::RedisStoreError;
use self::redis::{Claim, RedisStore};
use crate::config::{IdempotencyConfig, LimitBackend, LimitsConfig};

/// The request header that carries the key.
pub const HEADER: HeaderName = HeaderName::from_static("idempotency-key");

/// The response header that marks a response as a copy of an earlier request's outcome.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// Why an `Idempotency-Key` header is not a usable key (`400`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The header is present but empty.
    #[error("the Idempotency-Key header is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_BYTES`].
    #[error("the Idempotency-Key header is {len} bytes long; at most 256 bytes are allowed")]
    TooLong {
        /// The key's length in bytes.
        len: usize,
    },
    /// The key has a byte that is not visible ASCII (`!`..=`~`).
    #[error("the Idempotency-Key header must be visible ASCII (no spaces, control or non-ASCII characters)")]
    NotVisibleAscii,
    /// The header appears more than once.
    #[error("the Idempotency-Key header appears more than once")]
    Repeated,
}

/// The request's idempotency key: `None` without the header. The draft's quoted form
/// (`"abc"`, a structured-field string) and the bare form (`abc`) name the same key.
pub fn key_of(headers: &HeaderMap) -> Result<Option<&str>, KeyError> {
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    let bytes = value.as_bytes();
    let bytes = match bytes {
        [b'"', inner @ .., b'"'] => inner,
        _ => bytes,
    };
    if bytes.is_empty() {
        return Err(KeyError::Empty);
    }
    if bytes.len() > MAX_KEY_BYTES {
        return Err(KeyError::TooLong { len: bytes.len() });
    }
    if !bytes.iter().all(|b| (b'!'..=b'~').contains(b)) {
        return Err(KeyError::NotVisibleAscii);
    }
    Ok(Some(
        std::str::from_utf8(bytes).expect("visible ASCII is UTF-8"),
    ))
}

/// A key's scope: SHA-256 of (route, client key, idempotency key), each part
/// length-prefixed so no two triples share a scope by concatenation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Scope([u8; 32]);

impl Scope {
    /// The scope of `key` sent by `client` to `route`. Another front door scopes its own
    /// keys by passing a route or key of its own (a bulk request's `<key>/<line>`).
    pub fn new(route: &str, client: &str, key: &str) -> Scope {
        let mut digest = Sha256::new();
        for part in [route, client, key] {
            digest.update((part.len() as u64).to_be_bytes());
            digest.update(part.as_bytes());
        }
        Scope(digest.finalize().into())
    }

    fn hex(&self) -> String {
        hex(&self.0)
    }
}

/// SHA-256 of a request body: the same key with another body is a different request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BodyHash([u8; 32]);

impl BodyHash {
    /// The hash of `body`.
    pub fn of(body: &[u8]) -> BodyHash {
        BodyHash(Sha256::digest(body).into())
    }

    fn hex(&self) -> String {
        hex(&self.0)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A response as stored for replay: status, headers, extensions (the counters' labels)
/// and body.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The response's status.
    pub status: StatusCode,
    /// The response's headers.
    pub headers: HeaderMap,
    /// The response's extensions (not stored in Redis: they only label local counters).
    pub extensions: http::Extensions,
    /// The whole body.
    pub body: Bytes,
}

impl Snapshot {
    /// What the snapshot is counted as against `max_bytes`: body, headers and a fixed
    /// overhead for the entry.
    pub fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        local::IN_FLIGHT_WEIGHT + self.body.len() + headers
    }
}

/// How a scope's request ended, as everyone waiting on it is told.
#[derive(Clone, Debug)]
pub enum Settled {
    /// The request's response (the leader's own, or the stored one).
    Answer(Arc<Snapshot>),
    /// The request was refused before its record was submitted.
    Refused(Refusal),
}

/// A request with a key that is not served (each is its own answer in `respond`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The key was used before with another body (`422`).
    #[error("this Idempotency-Key was already used with a different request body; use a new key for a new request")]
    Reused,
    /// The key's request is in flight on another replica (`409`, retry later).
    #[error("a request with this Idempotency-Key is still in flight; retry after it completes")]
    InFlightElsewhere,
    /// The store's bounds are full of requests in flight (`503`).
    #[error("too many requests with an Idempotency-Key are in flight; retry shortly")]
    Full,
    /// The shared store (Redis) cannot be reached, so duplicates cannot be ruled out (`503`).
    #[error("the shared idempotency store cannot be reached; retry shortly")]
    Unavailable,
    /// The request this one joined ended before submitting its record (`503`).
    #[error("the request with this Idempotency-Key ended before its record was submitted; retry")]
    Abandoned,
}

impl Refusal {
    /// The metric label of the refusal.
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Reused => "reused",
            Refusal::InFlightElsewhere => "in_flight_elsewhere",
            Refusal::Full => "full",
            Refusal::Unavailable => "unavailable",
            Refusal::Abandoned => "abandoned",
        }
    }
}

/// An in-flight entry's progress, published to its joiners.
#[derive(Clone, Debug, Default)]
pub(crate) struct Progress {
    /// The leader's record id, once submitted.
    record: Option<Arc<str>>,
    /// How it ended, once it has.
    settled: Option<Settled>,
}

/// What [`Idempotency::begin`] tells a request to do.
pub enum Begin {
    /// Submit the record, then hand its outcome to the lead.
    Lead(Lead),
    /// Wait for the in-flight request with the same key.
    Join(Waiter),
    /// Answer with the stored response of the completed request.
    Replay(Arc<Snapshot>),
}

/// The request that holds a scope until its outcome is settled. Dropping it unsettled
/// (its request went away before submitting the record) forgets the scope and tells
/// joiners [`Refusal::Abandoned`].
pub struct Lead {
    pending: Box<Pending>,
}

/// A claimed scope until it is settled; dropped unsettled, it forgets the scope (see its
/// `Drop`).
struct Pending {
    scope: Scope,
    hash: BodyHash,
    local: Arc<Mutex<LocalStore>>,
    /// With the shared store: the claim this request holds there.
    redis: Option<RedisStore>,
    ttl: Duration,
    progress: watch::Sender<Progress>,
    settled: bool,
}

impl Lead {
    /// A waiter on this request's own outcome.
    pub fn waiter(&self) -> Waiter {
        Waiter {
            progress: self.pending.progress.subscribe(),
        }
    }

    /// The record was refused before it was submitted: publishes `answer` and forgets the
    /// scope (`keep` false) so a retry is a real retry.
    pub async fn refused(self, answer: Snapshot) {
        self.pending
            .settle(Settled::Answer(Arc::new(answer)), false)
            .await;
    }

    /// The record `record` was submitted: a task awaits `outcome` — the response and
    /// whether to keep it — however long it takes, then stores or forgets it and tells
    /// everyone waiting. Returns a waiter on that outcome.
    pub fn spawn<F>(self, record: Arc<str>, outcome: F) -> Waiter
    where
        F: std::future::Future<Output = (Snapshot, bool)> + Send + 'static,
    {
        let pending = self.pending;
        pending.progress.send_modify(|p| p.record = Some(record));
        let waiter = Waiter {
            progress: pending.progress.subscribe(),
        };
        tokio::spawn(async move {
            let (answer, keep) = outcome.await;
            pending
                .settle(Settled::Answer(Arc::new(answer)), keep)
                .await;
        });
        waiter
    }
}

impl Drop for Pending {
    /// Unsettled: the request went away (a client that disconnected while its claim was
    /// checked, or before its record was submitted) or the runtime is shutting down. The
    /// scope is forgotten at once, so it neither stays claimed forever nor counts against
    /// the bounds, and joiners are told. A submitted record is settled by a task that
    /// holds its ticket, which no caller can cut short.
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.local.lock().settle(&self.scope, None, Instant::now());
        self.progress
            .send_modify(|p| p.settled = Some(Settled::Refused(Refusal::Abandoned)));
        if let Some(redis) = &self.redis {
            if tokio::runtime::Handle::try_current().is_ok() {
                redis.release_later(self.scope, self.hash);
            }
        }
    }
}

impl Pending {
    /// Writes the outcome to Redis first (so a retry that reaches another replica after
    /// the caller has its answer is replayed, not refused as in flight), then to the local
    /// store, then tells the waiters.
    async fn settle(mut self: Box<Self>, settled: Settled, keep: bool) {
        let stored = match (&settled, keep) {
            (Settled::Answer(answer), true) => Some(Arc::clone(answer)),
            _ => None,
        };
        if let Some(redis) = &self.redis {
            let written = match &stored {
                Some(answer) => redis.store(&self.scope, &self.hash, answer, self.ttl).await,
                None => redis.release(&self.scope, &self.hash).await,
            };
            if let Err(error) = written {
                // The claim stays in Redis until it expires: other replicas answer `409`
                // meanwhile, which is safe; this replica replays from its own store.
                tracing::warn!(%error, kept = keep, "cannot settle an idempotency key in Redis");
            }
        }
        self.local
            .lock()
            .settle(&self.scope, stored, Instant::now());
        self.progress.send_modify(|p| p.settled = Some(settled));
        self.settled = true;
    }
}

/// Waits for an in-flight request's outcome.
pub struct Waiter {
    progress: watch::Receiver<Progress>,
}

/// The waiter's deadline passed first; `record` is the leader's record, if submitted.
#[derive(Debug)]
pub struct Elapsed {
    /// The record that is still in flight.
    pub record: Option<Arc<str>>,
}

impl Waiter {
    /// The outcome, or [`Elapsed`] when `deadline` passes first.
    pub async fn wait(mut self, deadline: Instant) -> Result<Settled, Elapsed> {
        let waited = tokio::time::timeout_at(deadline, async {
            match self.progress.wait_for(|p| p.settled.is_some()).await {
                Ok(progress) => progress.settled.clone(),
                // The lead went away unsettled: only when the runtime shuts down.
                Err(_closed) => None,
            }
        })
        .await;
        match waited {
            Ok(settled) => Ok(settled.unwrap_or(Settled::Refused(Refusal::Abandoned))),
            Err(_elapsed) => Err(Elapsed {
                record: self.progress.borrow().record.clone(),
            }),
        }
    }
}

/// The idempotency store of a running server: this replica's entries and, with the Redis
/// backend, the shared ones.
pub struct Idempotency {
    enabled: bool,
    ttl: Duration,
    /// How long a Redis in-flight claim lives: `ttl`, but never less than a record can stay
    /// in flight (`new`'s `in_flight`), so a claim cannot expire while its record may still
    /// run and let another replica invoke it again.
    claim_ttl: Duration,
    local: Arc<Mutex<LocalStore>>,
    redis: Option<RedisStore>,
}

impl Idempotency {
    /// The store for `config` and `[limits]` (Redis with `backend = "redis"`). With
    /// `previous` (a reload) its entries are kept under the new bounds, and its Redis
    /// connection when `limits` reach the same Redis. Fails only for an unusable
    /// `redis_url`; connecting is lazy. `in_flight` bounds how long a submitted record can
    /// wait for its outcome (the longest caller deadline, plus one invoke after it).
    pub fn new(
        config: &IdempotencyConfig,
        limits: &LimitsConfig,
        in_flight: Duration,
        previous: Option<&Idempotency>,
    ) -> Result<Idempotency, RedisStoreError> {
        let bounds = Limits {
            ttl: config.ttl,
            max_entries: config.max_entries,
            max_bytes: usize::try_from(config.max_bytes.0).unwrap_or(usize::MAX),
        };
        let local = match previous {
            Some(previous) => {
                previous.local.lock().reconfigure(bounds);
                Arc::clone(&previous.local)
            }
            None => Arc::new(Mutex::new(LocalStore::new(bounds))),
        };
        let redis = match limits.backend {
            LimitBackend::Local => None,
            LimitBackend::Redis => {
                let kept = previous
                    .and_then(|p| p.redis.as_ref())
                    .filter(|r| r.reaches(&limits.redis_url, limits.redis_timeout));
                Some(match kept {
                    Some(redis) => redis.clone(),
                    None => RedisStore::connect(&limits.redis_url, limits.redis_timeout)?,
                })
            }
        };
        Ok(Idempotency {
            enabled: config.enabled,
            ttl: config.ttl,
            claim_ttl: config.ttl.max(in_flight),
            local,
            redis,
        })
    }

    /// Whether requests with the header are deduplicated (`idempotency.enabled`).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// What the request with `scope` and `hash` does (module docs).
    pub async fn begin(&self, scope: Scope, hash: BodyHash) -> Result<Begin, Refusal> {
        let claimed = {
            let mut local = self.local.lock();
            match local.lookup(&scope, &hash, Instant::now()) {
                Lookup::Replay(answer) => return Ok(counted(Begin::Replay(answer))),
                Lookup::Join(progress) => return Ok(counted(Begin::Join(Waiter { progress }))),
                Lookup::Conflict => return Err(refused(Refusal::Reused)),
                Lookup::Absent => local.claim(scope, hash, Instant::now()),
            }
        };
        let progress = claimed.map_err(|local::Full| refused(Refusal::Full))?;
        let mut pending = Box::new(Pending {
            scope,
            hash,
            local: Arc::clone(&self.local),
            redis: None,
            ttl: self.ttl,
            progress,
            settled: false,
        });
        let Some(redis) = &self.redis else {
            return Ok(Begin::Lead(Lead { pending }));
        };
        // The local claim is held while Redis is asked, so duplicates on this replica join
        // it instead of racing to Redis.
        // Set before the call: a request that goes away while waiting for Redis takes back
        // the claim the call may have written (`Pending`'s drop); cleared below when the
        // key is someone else's.
        pending.redis = Some(redis.clone());
        let claim = redis.claim(&scope, &hash, self.claim_ttl).await;
        if !matches!(claim, Ok(Claim::Won)) {
            pending.redis = None;
        }
        let answer = match claim {
            Ok(Claim::Won) => return Ok(Begin::Lead(Lead { pending })),
            Ok(Claim::Completed { hash: stored, .. }) | Ok(Claim::InFlight { hash: stored })
                if stored != hash =>
            {
                Err(Refusal::Reused)
            }
            Ok(Claim::Completed { answer, .. }) => Ok(Arc::new(answer)),
            Ok(Claim::InFlight { .. }) => Err(Refusal::InFlightElsewhere),
            Err(_logged) => {
                // The claim may have been written before the call failed: take it back,
                // or the key would answer 409 until it expires.
                redis.release_later(scope, hash);
                Err(Refusal::Unavailable)
            }
        };
        match answer {
            Ok(answer) => {
                // Cached here too; joiners of the local claim get the same replay.
                pending
                    .settle(Settled::Answer(Arc::clone(&answer)), true)
                    .await;
                Ok(counted(Begin::Replay(answer)))
            }
            Err(refusal) => {
                pending.settle(Settled::Refused(refusal), false).await;
                Err(refused(refusal))
            }
        }
    }
}

fn counted(begin: Begin) -> Begin {
    match &begin {
        Begin::Replay(_) => metrics::counter!("sluicegate_idempotency_replays_total").increment(1),
        Begin::Join(_) => metrics::counter!("sluicegate_idempotency_joins_total").increment(1),
        Begin::Lead(_) => {}
    }
    begin
}

fn refused(refusal: Refusal) -> Refusal {
    if refusal == Refusal::Reused {
        metrics::counter!("sluicegate_idempotency_conflicts_total").increment(1);
    }
    metrics::counter!("sluicegate_idempotency_refusals_total", "reason" => refusal.as_str())
        .increment(1);
    refusal
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(HEADER, HeaderValue::from_bytes(v).expect("header bytes"));
        }
        map
    }

    #[test]
    fn a_key_is_visible_ascii_of_at_most_256_bytes_quoted_or_bare() {
        assert_eq!(key_of(&headers(&[])), Ok(None));
        assert_eq!(key_of(&headers(&[b"abc-123"])), Ok(Some("abc-123")));
        assert_eq!(key_of(&headers(&[b"\"abc-123\""])), Ok(Some("abc-123")));
        let longest = "k".repeat(256);
        assert_eq!(
            key_of(&headers(&[longest.as_bytes()])),
            Ok(Some(longest.as_str()))
        );
        let long = "k".repeat(257);
        assert_eq!(
            key_of(&headers(&[long.as_bytes()])),
            Err(KeyError::TooLong { len: 257 })
        );
        assert_eq!(key_of(&headers(&[b"a b"])), Err(KeyError::NotVisibleAscii));
        assert_eq!(
            key_of(&headers(&[b"\xc3\xa9"])),
            Err(KeyError::NotVisibleAscii)
        );
        assert_eq!(key_of(&headers(&[b"\"\""])), Err(KeyError::Empty));
        assert_eq!(key_of(&headers(&[b"a", b"b"])), Err(KeyError::Repeated));
    }

    #[test]
    fn key_errors_name_the_header() {
        for error in [
            KeyError::Empty,
            KeyError::TooLong { len: 300 },
            KeyError::NotVisibleAscii,
            KeyError::Repeated,
        ] {
            assert!(error.to_string().contains("Idempotency-Key"), "{error}");
        }
    }

    #[test]
    fn scopes_differ_by_route_client_and_key_and_do_not_collide_by_concatenation() {
        let a = Scope::new("records", "k", "1");
        assert_eq!(a, Scope::new("records", "k", "1"));
        assert_ne!(a, Scope::new("other", "k", "1"));
        assert_ne!(a, Scope::new("records", "j", "1"));
        assert_ne!(a, Scope::new("records", "k", "2"));
        assert_ne!(Scope::new("ab", "c", "d"), Scope::new("a", "bc", "d"));
        assert_eq!(a.hex().len(), 64);
    }

    fn store(max_entries: usize) -> Idempotency {
        let config = IdempotencyConfig {
            max_entries,
            ..IdempotencyConfig::default()
        };
        Idempotency::new(
            &config,
            &LimitsConfig::default(),
            Duration::from_secs(30),
            None,
        )
        .expect("local store")
    }

    fn answer(status: StatusCode) -> Snapshot {
        Snapshot {
            status,
            headers: HeaderMap::new(),
            extensions: http::Extensions::new(),
            body: Bytes::from_static(b"{}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_joiner_gets_the_leaders_outcome_and_a_retry_then_replays_it() {
        let store = store(10);
        let scope = Scope::new("r", "k", "1");
        let hash = BodyHash::of(b"{}");
        let Ok(Begin::Lead(lead)) = store.begin(scope, hash).await else {
            panic!("the first request leads");
        };
        let Ok(Begin::Join(joiner)) = store.begin(scope, hash).await else {
            panic!("a duplicate in flight joins");
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let leader = lead.spawn("r1".into(), async move {
            let _ = rx.await;
            (answer(StatusCode::OK), true)
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        tx.send(()).expect("the task waits");
        for waiter in [leader, joiner] {
            match waiter.wait(deadline).await {
                Ok(Settled::Answer(a)) => assert_eq!(a.status, StatusCode::OK),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            store.begin(scope, hash).await,
            Ok(Begin::Replay(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_joiner_whose_deadline_passes_first_leaves_and_the_outcome_is_still_stored() {
        let store = store(10);
        let scope = Scope::new("r", "k", "1");
        let hash = BodyHash::of(b"{}");
        let Ok(Begin::Lead(lead)) = store.begin(scope, hash).await else {
            panic!("the first request leads");
        };
        let leader = lead.spawn("r1".into(), async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            (answer(StatusCode::OK), true)
        });
        let elapsed = leader
            .wait(Instant::now() + Duration::from_secs(1))
            .await
            .expect_err("the deadline comes first");
        assert_eq!(elapsed.record.as_deref(), Some("r1"));
        // Still in flight: a retry joins rather than submitting again.
        assert!(matches!(store.begin(scope, hash).await, Ok(Begin::Join(_))));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(matches!(
            store.begin(scope, hash).await,
            Ok(Begin::Replay(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_outcome_reaches_the_waiters_and_the_retry_leads_again() {
        let store = store(10);
        let scope = Scope::new("r", "k", "1");
        let hash = BodyHash::of(b"{}");
        let Ok(Begin::Lead(lead)) = store.begin(scope, hash).await else {
            panic!("the first request leads");
        };
        let Ok(Begin::Join(joiner)) = store.begin(scope, hash).await else {
            panic!("a duplicate in flight joins");
        };
        lead.refused(answer(StatusCode::TOO_MANY_REQUESTS)).await;
        match joiner.wait(Instant::now() + Duration::from_secs(1)).await {
            Ok(Settled::Answer(a)) => assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS),
            other => panic!("{other:?}"),
        }
        assert!(matches!(store.begin(scope, hash).await, Ok(Begin::Lead(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn another_body_is_refused_and_a_full_store_refuses_new_keys() {
        let store = store(1);
        let hash = BodyHash::of(b"{}");
        let Ok(Begin::Lead(_lead)) = store.begin(Scope::new("r", "k", "1"), hash).await else {
            panic!("the first request leads");
        };
        assert_eq!(
            store
                .begin(Scope::new("r", "k", "1"), BodyHash::of(b"[]"))
                .await
                .err(),
            Some(Refusal::Reused)
        );
        assert_eq!(
            store.begin(Scope::new("r", "k", "2"), hash).await.err(),
            Some(Refusal::Full)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lead_dropped_before_submitting_frees_the_scope_and_tells_its_joiners() {
        let store = store(1);
        let scope = Scope::new("r", "k", "1");
        let hash = BodyHash::of(b"{}");
        let Ok(Begin::Lead(lead)) = store.begin(scope, hash).await else {
            panic!("the first request leads");
        };
        let Ok(Begin::Join(joiner)) = store.begin(scope, hash).await else {
            panic!("a duplicate in flight joins");
        };
        drop(lead);
        assert!(matches!(
            joiner.wait(Instant::now() + Duration::from_secs(1)).await,
            Ok(Settled::Refused(Refusal::Abandoned))
        ));
        // Not held forever, not counted against the bound of one entry.
        assert!(matches!(
            store.begin(Scope::new("r", "k", "2"), hash).await,
            Ok(Begin::Lead(_))
        ));
    }
}
