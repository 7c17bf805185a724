//! The shared idempotency store of `limits.backend = "redis"`: one Redis key per scope,
//! `<prefix>:idem:<scope hex>`, holding either the in-flight claim or the completed response.
//!
//! - claim: one script runs `SET key <claim> NX PX <ttl>` and, when the key is taken, returns
//!   what it holds — so claiming and reading what another replica holds is one atomic step;
//! - store: `SET key <response> PX <ttl>` when the outcome is known;
//! - release: a script deletes the key only while it still holds this request's own claim
//!   (its owner token and body hash), so an outcome forgotten here never deletes another
//!   replica's claim or a stored response.
//!
//! The store has its own connection (a [`ConnectionManager`]: one multiplexed connection,
//! reconnecting by itself), separate from the limit backend's, and every call has the
//! `limits.redis_timeout` deadline. A failed call is the caller's to decide: a claim that
//! fails refuses the request (`503`); a store or release that fails leaves the claim to
//! expire.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::Script;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use super::{BodyHash, Scope, Snapshot};

/// Claims the key, or returns what it holds (`nil` when claimed).
const CLAIM_LUA: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return false
end
return redis.call('GET', KEYS[1])
";

/// Deletes the key only while it holds ARGV[1] (this request's claim).
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Why a call to the shared store failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    /// Redis refused the call, or the connection failed (or the URL is unusable).
    #[error("Redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// No answer within `limits.redis_timeout`.
    #[error("no answer from Redis within {0:?}")]
    Timeout(Duration),
    /// The key holds something this version cannot read.
    #[error("unreadable idempotency entry in Redis: {0}")]
    Malformed(String),
}

/// What the claim found.
pub(crate) enum Claim {
    /// The key was free; this request holds it now.
    Won,
    /// Another request holds the key and is in flight.
    InFlight {
        /// That request's body hash.
        hash: BodyHash,
    },
    /// The key's request completed.
    Completed {
        /// That request's body hash.
        hash: BodyHash,
        /// Its response.
        answer: Snapshot,
    },
}

/// A value under a scope's key.
#[derive(Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Stored {
    InFlight {
        owner: String,
        hash: String,
    },
    Completed {
        hash: String,
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
}

/// The shared store: a connection, the scripts and this process's owner token.
#[derive(Clone)]
pub(crate) struct RedisStore {
    conn: ConnectionManager,
    claim: Script,
    release: Script,
    /// Marks this process's claims, so a release deletes only its own.
    owner: String,
    url: String,
    timeout: Duration,
    /// Whether the last claim got an answer: only transitions are logged, never each
    /// refused request. Guards no other memory, so `Relaxed`.
    up: Arc<AtomicBool>,
}

impl RedisStore {
    /// Sets up the (lazy) connection; fails only for an unusable URL.
    pub(crate) fn connect(url: &str, timeout: Duration) -> Result<Self, RedisStoreError> {
        let client = ::redis::Client::open(url)?;
        // As the limit backend's: short capped reconnection backoff, our own deadline on
        // every call instead of the manager's response timeout.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(None)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_number_of_retries(4);
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(RedisStore {
            conn,
            claim: Script::new(CLAIM_LUA),
            release: Script::new(RELEASE_LUA),
            owner: uuid::Uuid::new_v4().to_string(),
            url: url.to_owned(),
            timeout,
            up: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Whether this store talks to `url` with `timeout` (a reload keeps it then).
    pub(crate) fn reaches(&self, url: &str, timeout: Duration) -> bool {
        self.url == url && self.timeout == timeout
    }

    fn key(scope: &Scope) -> String {
        format!("{}:idem:{}", crate::backend::DEFAULT_PREFIX, scope.hex())
    }

    /// This request's claim value: the same bytes every time, so release can compare.
    fn claim_value(&self, hash: &BodyHash) -> String {
        serde_json::to_string(&Stored::InFlight {
            owner: self.owner.clone(),
            hash: hash.hex(),
        })
        .expect("plain struct serializes")
    }

    async fn call<T: ::redis::FromRedisValue>(
        &self,
        call: ::redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisStoreError> {
        let mut conn = self.conn.clone();
        tokio::time::timeout(self.timeout, call.invoke_async::<T>(&mut conn))
            .await
            .map_err(|_elapsed| RedisStoreError::Timeout(self.timeout))?
            .map_err(RedisStoreError::from)
    }

    /// Claims `scope` for `hash` for `ttl`, or says what holds it. Logs when Redis stops
    /// or starts answering (once per transition).
    pub(crate) async fn claim(
        &self,
        scope: &Scope,
        hash: &BodyHash,
        ttl: Duration,
    ) -> Result<Claim, RedisStoreError> {
        let claim = self.try_claim(scope, hash, ttl).await;
        match &claim {
            Err(error) if self.up.swap(false, Ordering::Relaxed) => tracing::warn!(
                %error,
                "the idempotency store in Redis is unreachable: requests with an Idempotency-Key are refused (503) until it answers"
            ),
            Ok(_) if !self.up.swap(true, Ordering::Relaxed) => {
                tracing::info!("the idempotency store in Redis answers again");
            }
            _ => {}
        }
        claim
    }

    async fn try_claim(
        &self,
        scope: &Scope,
        hash: &BodyHash,
        ttl: Duration,
    ) -> Result<Claim, RedisStoreError> {
        let mut call = self.claim.prepare_invoke();
        call.key(Self::key(scope))
            .arg(self.claim_value(hash))
            .arg(ttl_ms(ttl));
        let Some(held) = self.call::<Option<String>>(call).await? else {
            return Ok(Claim::Won);
        };
        let stored: Stored =
            serde_json::from_str(&held).map_err(|e| RedisStoreError::Malformed(e.to_string()))?;
        Ok(match stored {
            Stored::InFlight { hash, .. } => Claim::InFlight {
                hash: parse_hash(&hash)?,
            },
            Stored::Completed {
                hash,
                status,
                headers,
                body,
            } => Claim::Completed {
                hash: parse_hash(&hash)?,
                answer: snapshot(status, headers, body)?,
            },
        })
    }

    /// Stores `answer` as the completed response of `scope` for `ttl`.
    pub(crate) async fn store(
        &self,
        scope: &Scope,
        hash: &BodyHash,
        answer: &Snapshot,
        ttl: Duration,
    ) -> Result<(), RedisStoreError> {
        let value = Stored::Completed {
            hash: hash.hex(),
            status: answer.status.as_u16(),
            headers: answer
                .headers
                .iter()
                .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect(),
            // Bodies are written by `respond` as JSON text.
            body: String::from_utf8_lossy(&answer.body).into_owned(),
        };
        let value = serde_json::to_string(&value).expect("plain struct serializes");
        let mut conn = self.conn.clone();
        let set = ::redis::cmd("SET")
            .arg(Self::key(scope))
            .arg(value)
            .arg("PX")
            .arg(ttl_ms(ttl))
            .to_owned();
        tokio::time::timeout(self.timeout, set.query_async::<()>(&mut conn))
            .await
            .map_err(|_elapsed| RedisStoreError::Timeout(self.timeout))?
            .map_err(RedisStoreError::from)
    }

    /// Deletes this request's claim on `scope`, if the key still holds it.
    pub(crate) async fn release(
        &self,
        scope: &Scope,
        hash: &BodyHash,
    ) -> Result<(), RedisStoreError> {
        let mut call = self.release.prepare_invoke();
        call.key(Self::key(scope)).arg(self.claim_value(hash));
        self.call::<i64>(call).await.map(drop)
    }

    /// [`release`](Self::release) in the background, for a claim whose call failed (it may
    /// have been written all the same); a failure is only logged.
    pub(crate) fn release_later(&self, scope: Scope, hash: BodyHash) {
        let store = self.clone();
        tokio::spawn(async move {
            if let Err(error) = store.release(&scope, &hash).await {
                tracing::debug!(%error, "cannot take back an idempotency claim");
            }
        });
    }
}

/// The ttl in whole milliseconds, at least 1 (`PX 0` is an error).
fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn parse_hash(hex: &str) -> Result<BodyHash, RedisStoreError> {
    let bad = || RedisStoreError::Malformed(format!("body hash {hex:?}"));
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(BodyHash(bytes))
}

fn snapshot(
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
) -> Result<Snapshot, RedisStoreError> {
    let status = StatusCode::from_u16(status)
        .map_err(|_| RedisStoreError::Malformed(format!("status {status}")))?;
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let name = HeaderName::try_from(name.as_str())
            .map_err(|_| RedisStoreError::Malformed(format!("header name {name:?}")))?;
        let value = HeaderValue::try_from(value.as_str())
            .map_err(|_| RedisStoreError::Malformed(format!("header value {value:?}")))?;
        map.append(name, value);
    }
    Ok(Snapshot {
        status,
        headers: map,
        extensions: http::Extensions::new(),
        body: body.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_hash_survives_its_hex_form() {
        let hash = BodyHash::of(b"{\"a\":1}");
        assert_eq!(parse_hash(&hash.hex()).expect("parses"), hash);
        assert!(parse_hash("zz").is_err());
    }

    #[test]
    fn a_stored_response_reads_back_with_status_headers_and_body() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let stored = Stored::Completed {
            hash: BodyHash::of(b"1").hex(),
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: r#"{"id":"r1"}"#.into(),
        };
        let text = serde_json::to_string(&stored).expect("serializes");
        let Stored::Completed {
            status,
            headers: h,
            body,
            ..
        } = serde_json::from_str(&text).expect("parses")
        else {
            panic!("completed");
        };
        let answer = snapshot(status, h, body).expect("valid");
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.headers, headers);
        assert_eq!(&answer.body[..], br#"{"id":"r1"}"#);
    }

    #[test]
    fn ttl_is_whole_milliseconds_and_never_zero() {
        assert_eq!(ttl_ms(Duration::from_secs(600)), 600_000);
        assert_eq!(ttl_ms(Duration::from_micros(10)), 1);
    }
}
