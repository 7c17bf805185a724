//! Admission control with AWS API Gateway throttling semantics.
//!
//! Every request passes up to three token buckets, in order: the **global** layer
//! (account/stage), the **route** layer, and the **key** layer (the client's usage plan, or
//! the `default` quota for keys without one). Each bucket follows API Gateway's rules:
//!
//! - `rate` tokens are added per second (fractional rates such as `0.5` are fine) up to
//!   `burst` tokens; a bucket starts full; a request takes one token or is refused.
//! - `rate = 0` or `burst = 0` closes the layer: it refuses everything, with a wait of
//!   [`CLOSED_WAIT`] (one hour — a large but finite number, so `Retry-After` stays a
//!   meaningful integer instead of "never").
//! - A refusal names the refusing layer ([`Scope`]), its [`Quota`] and the **exact** time until
//!   that layer has a token again ([`Rejected::wait`]): never early, and not rounded —
//!   rounding up to whole seconds for `Retry-After` is the server's job.
//! - A token that an upper layer gave is **not** returned when a lower layer refuses (as in API
//!   Gateway): a client hammering its own key bucket also spends the route's and the
//!   account's tokens.
//! - An admitted request carries its key layer's state ([`Admitted`]): whole tokens left and
//!   the time until the bucket is full again, for the `RateLimit` header.
//!
//! # Engine
//!
//! The arithmetic is [`governor`]'s GCRA, which is exactly this token bucket
//! (`Quota::with_period(1/rate).allow_burst(burst)`); the period is rounded *up* to whole
//! nanoseconds so a bucket never runs faster than its configured rate. We plug our own state
//! stores into governor's `RateLimiter` (see `engine.rs`) to get the exact reset time, the key
//! cap and the overflow bucket described below. Everything is generic over governor's
//! [`Clock`](governor::clock::Clock): production uses [`TokioClock`] (so `tokio::time::pause()`
//! controls admission in tests too), unit tests use `governor::clock::FakeRelativeClock`.
//!
//! `tower_governor` is not used as-is because it truncates `Retry-After` to whole seconds
//! (sending `0` for every sub-second wait, which makes well-behaved clients retry at once),
//! holds a single quota per layer (no usage plans, no global → route → key chain), and leaves
//! its keyed state unbounded (one entry per distinct key, forever, unless the application
//! sweeps it).
//!
//! # Keyed state is bounded
//!
//! Keys are whatever clients send (API keys, IPs, header values), so:
//!
//! - Keys are stored as a 64-bit hash from a per-process randomly seeded
//!   [`ahash::RandomState`] — 16 bytes of state per key plus the table's slack. Two keys that
//!   collide share one bucket; with a 64-bit hash the chance that *any* two of 1M tracked keys
//!   collide is about `n² / 2⁶⁵ ≈ 3·10⁻⁸`, and the random seed keeps clients from
//!   manufacturing collisions. Plan membership is decided on the exact key string, never on
//!   the hash, so a collision can never lend a client someone else's plan.
//! - `max_keys` caps the number of tracked keys across all keyed layers. When the cap is
//!   reached, a *new* key without a plan gets no state of its own: it is checked against one
//!   shared **overflow** bucket with the `default` quota. Key spraying therefore degrades only
//!   the sprayers' service and that of other keys first seen while the cap is reached;
//!   keys already tracked keep their buckets and memory stays bounded. Plan keys are listed
//!   in the config — a fixed, bounded set — so they always get their own bucket (they count
//!   towards the cap, but a sprayer cannot push a paying key into the overflow bucket); the
//!   total is therefore at most `max_keys` plus the number of configured plan keys.
//! - [`Admission::reclaim`] drops keys whose bucket is full again (governor's
//!   `retain_recent`) and shrinks the tables, so memory returns near its baseline; the server
//!   calls it periodically. A reclaimed key that comes back starts with a full bucket, which is
//!   exactly the state it was dropped in.
//! - Unknown keys create state only if they are admitted to the key layer at all: with
//!   `require_known_key`, the server refuses them with [`Admission::is_known_key`] before
//!   calling [`Admission::check`], so they never create state.
//!
//! # Shared limits: the Redis backend
//!
//! With `[limits] backend = "redis"` every replica checks the same buckets in Redis
//! ([`redis`] module, [`Admission::with_backend`]): one Lua script holds the same GCRA in the
//! same integer nanoseconds, checks a request's layers in the same order with the same
//! "upper tokens stay taken" rule, and so gives the local engine's decisions — including
//! `remaining`, `reset` and the exact `wait` — for the same request sequence (a property
//! test holds the two to it). Time is Redis' own clock, so replicas' clocks never matter;
//! a request costs one round trip on a connection that concurrent requests share
//! (pipelined; on a Redis Cluster one call per layer, at most two round trips).
//! [`Admission::admit`] is the entry point that follows the configured
//! backend: locally it is [`Admission::check`], ready at once; with Redis it is a future,
//! bounded by `limits.redis_timeout` (twice that on a Cluster: two calls in sequence). A
//! call that fails or misses it, and every request
//! while Redis is down, is decided by `on_backend_error` ([`Fallback`]): `local` uses this
//! replica's buckets at its share of the limits (`rate / N`, `burst / N`, N the live
//! replicas) and charges what it admitted to the shared buckets when Redis returns, so the
//! fleet stays near the shared limits; `allow` admits, `deny` refuses. Each function's invoke-rate bucket is shared the
//! same way (`invoke::Gate::shared`).
//!
//! # Usage quotas
//!
//! A plan (or `limits.default`) may also carry a usage quota ([`crate::usage::UsageQuota`]:
//! at most `limit` requests per key per UTC day, week or month), as API Gateway usage plans
//! do. It is checked *after* the key layer admitted the request, so only requests that every
//! throttling layer admitted count against it (a request shed by a bucket uses none of it);
//! past the limit the refusal's scope is [`Scope::Quota`] and its wait runs to the next
//! period's start. Counts live in [`UsageCounters`] (per key and period, bounded like the
//! keyed buckets, persisted by the server to `limits.quota_state`), or with the Redis backend
//! in Redis, checked and incremented in the same script call as the buckets. Periods follow
//! a [`WallClock`] (the system's UTC clock; a fake one in tests).
//!
//! # Reload
//!
//! [`Admission::reconfigured`] builds the admission for a new config and hands every layer
//! whose quota did not change over as the same bucket (keys keep their tokens); new or
//! changed layers start full. Usage counters are always carried over: a plan whose quota
//! limit changes keeps each key's count and applies the new limit (a changed period or offset
//! starts the new period's count).
//!
//! # Use
//!
//! ```
//! use sluicegate::limit::{Admission, Plans, Quota, Scope};
//!
//! let default = Quota { rate: 100.0, burst: 200 };
//! let gold = Quota { rate: 500.0, burst: 1000 };
//! let plans = Plans::new(default, vec![("gold".into(), gold, vec!["gold-key-1".into()])]);
//! let admission = Admission::new(
//!     Some(Quota { rate: 1000.0, burst: 500 }),
//!     vec![("records".into(), None)],
//!     plans,
//!     1_000_000,
//!     sluicegate::limit::TokioClock,
//! );
//! let admitted = admission.check(0, "gold-key-1").expect("a fresh bucket has tokens");
//! assert_eq!(admitted.quota, gold);
//! assert_eq!(admitted.remaining, 999);
//! # let _ = Scope::Key;
//! ```
//!
//! The Tower middleware ([`AdmissionLayer`]) reads the client key from the [`ClientKey`]
//! request extension and answers refusals with a caller-supplied response; mapping a
//! [`Rejected`] to `429` and headers happens in `server`, the only module that knows HTTP
//! responses.

mod admission;
mod bucket;
mod clock;
mod engine;
mod keyed;
mod layer;
mod usage;

#[cfg(test)]
mod props;

pub use self::admission::{Admission, Admit, Admitted, Plan, Plans, Rejected};
pub use self::bucket::Bucket;
pub use self::clock::{DefaultClock, TokioClock, TokioInstant, WallClock};
pub use self::keyed::KeyedBuckets;
pub use self::layer::{AdmissionLayer, AdmissionService, ClientKey, ResponseFuture, ANONYMOUS_KEY};
pub use self::usage::{Loaded, UsageCounters};
/// The Redis backend now lives in [`crate::backend`] (the invoke gate uses it too); this
/// path is kept for code not yet moved to the new one.
pub use crate::backend as redis;
pub use crate::backend::{Fallback, RedisBackend, RedisOptions};
pub use crate::quota::{Decision, Quota, CLOSED_WAIT, MAX_RATE, MAX_REFILL};

/// Which admission layer a decision is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The account/stage bucket shared by every request.
    Global,
    /// The bucket of the request's route.
    Route,
    /// The client key's bucket (its plan's quota, or `default`).
    Key,
    /// The client key's usage quota (requests per day, week or month), checked once every
    /// bucket admitted the request.
    Quota,
}

impl Scope {
    /// The name used in the `429` body (`"scope"`) and the `RateLimit*` headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Route => "route",
            Scope::Key => "key",
            Scope::Quota => "quota",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_names_match_the_http_contract() {
        assert_eq!(Scope::Global.as_str(), "global");
        assert_eq!(Scope::Route.as_str(), "route");
        assert_eq!(Scope::Key.as_str(), "key");
        assert_eq!(Scope::Quota.as_str(), "quota");
    }
}
