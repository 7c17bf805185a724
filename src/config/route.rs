//! A `[[routes]]` entry: its path and function, how records are enveloped and batched, its
//! queue, invoke limits, retries and dead-letter sink.

use std::fmt;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::lambda::{Invocation, ASYNC_PAYLOAD_LIMIT};
use super::server::ServerConfig;
use crate::quota::Quota;
use crate::units::{self, ByteSize};

/// `routes[].envelope`: how records are put into an invoke's payload (default `batch`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Envelope {
    /// `{"records":[{"id","key","body"}, ...]}`.
    Batch,
    /// One record per invoke: the record is the payload and the payload is the result.
    Raw,
}

/// `routes[].batch.flush`: when a batch is sent (default `adaptive`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Flush {
    /// Dispatch a full batch at once, and a partial one as soon as none of the route's
    /// batches is in flight and an invoke slot is free (or at `max_wait`): a lone record
    /// leaves at once, and under load batches stay full.
    Adaptive,
    /// Dispatch when `max_records`, `max_bytes` or `max_wait` is reached.
    Window,
}

/// `routes[].batch`: how records are grouped into one invoke.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Records per invoke (default `20`, `1..=10000`; the `raw` envelope always sends 1).
    pub max_records: NonZeroU32,
    /// Largest invoke payload, envelope included. Default: 5MiB for `request_response`
    /// routes, 1MiB (Lambda's limit) for `event` routes; at most Lambda's 6 MB / 1 MB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<ByteSize>,
    /// Longest a batch waits after its first record before it is sent (default `50ms`).
    #[serde(with = "units::duration")]
    pub max_wait: Duration,
    /// When a batch is sent (default `adaptive`).
    pub flush: Flush,
    /// With `flush = "adaptive"`: the least a partial batch waits after its first record
    /// before it may leave early (default `0ms`, at most `max_wait`), as Kafka's `linger.ms`:
    /// fewer, fuller invokes at moderate load for up to this much latency.
    #[serde(with = "units::duration")]
    pub linger: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: NonZeroU32::new(20).expect("20 is not zero"),
            max_bytes: None,
            max_wait: Duration::from_millis(50),
            flush: Flush::Adaptive,
            linger: Duration::ZERO,
        }
    }
}

/// `routes[].queue.fairness`: the order in which queued records are drawn into batches and
/// who is shed when the queue is full (default `per_key`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Fairness {
    /// Deficit round robin across the keys with records waiting, `weight` records per key
    /// and round; a newcomer to a full queue displaces the newest record of the key holding
    /// the most queued records (that caller gets `429 scope=queue`), unless the newcomer's
    /// own key holds the most.
    PerKey,
    /// First in, first out; a full queue refuses the newcomer.
    Fifo,
}

/// `routes[].queue`: the bound on records waiting for an invoke; past it callers get
/// `429 scope=queue`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Records waiting at once (default `10000`, `1..=10000000`).
    pub max_pending: usize,
    /// Bound on the bytes of records waiting in the queue (their envelope entries; default
    /// `64MiB`); must hold one record of `server.max_record_bytes`.
    pub max_bytes: ByteSize,
    /// Order of service and who is shed at the bound (default `per_key`).
    pub fairness: Fairness,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_pending: 10_000,
            max_bytes: ByteSize::mib(64),
            fairness: Fairness::PerKey,
        }
    }
}

/// `routes[].invoke`: the per-function invoke gate every attempt passes through.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InvokeConfig {
    /// Invokes per second (client-side invoke-rate bucket; default `10.0`, `0.001..=1e6`).
    pub rate: f64,
    /// Invokes a full bucket lets through at once (default `10`, `1..=1000000`: a bucket
    /// without a token could never pass an invoke).
    pub burst: NonZeroU32,
    /// Invokes in flight at once (default `10`, `1..=100000`); keep it at or below the
    /// function's reserved concurrency.
    pub max_concurrency: NonZeroU32,
    /// Lower concurrency and rate on throttles (AIMD) and recover while they stay away
    /// (default `false`).
    pub adaptive: bool,
}

impl Default for InvokeConfig {
    fn default() -> Self {
        InvokeConfig {
            rate: 10.0,
            burst: NonZeroU32::new(10).expect("10 is not zero"),
            max_concurrency: NonZeroU32::new(10).expect("10 is not zero"),
            adaptive: false,
        }
    }
}

/// Jitter applied to a backoff delay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Jitter {
    /// Uniform in `[0, delay]`.
    Full,
    /// `delay/2 + uniform[0, delay/2]`.
    Equal,
    /// `delay × (1 - ratio × uniform[0,1])`.
    Ratio(f64),
}

impl Serialize for Jitter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Jitter::Full => s.serialize_str("full"),
            Jitter::Equal => s.serialize_str("equal"),
            Jitter::Ratio(r) => s.serialize_f64(*r),
        }
    }
}

impl<'de> Deserialize<'de> for Jitter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Jitter;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"full\", \"equal\" or a ratio between 0 and 1")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Jitter, E> {
                match v {
                    "full" => Ok(Jitter::Full),
                    "equal" => Ok(Jitter::Equal),
                    _ => Err(E::custom(format!(
                        "unknown jitter {v:?}; expected \"full\", \"equal\" or a ratio"
                    ))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Jitter, E> {
                if (0.0..=1.0).contains(&v) {
                    Ok(Jitter::Ratio(v))
                } else {
                    Err(E::custom(format!(
                        "jitter ratio must be between 0 and 1, got {v}"
                    )))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Jitter, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Jitter, E> {
                self.visit_f64(v as f64)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `routes[].retry`: how a failed invoke is retried.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per batch, the first included (default `5`, `1..=100`).
    pub max_attempts: u32,
    /// Backoff before retry `n` is `min(cap, base × 2^n)`, then jittered (default `400ms`;
    /// greater than 0 and at most `cap`).
    #[serde(with = "units::duration")]
    pub base: Duration,
    /// Longest backoff, and the longest a throttle's `Retry-After` is honoured (default
    /// `10s`).
    #[serde(with = "units::duration")]
    pub cap: Duration,
    /// Jitter applied to each backoff (default `equal`).
    pub jitter: Jitter,
    /// Retries allowed as a fraction of invokes over the last 10 s, plus 100 (default
    /// `0.2`, `0..=1`).
    pub budget: f64,
    /// Retry an unknown outcome — a read timeout, or a connection lost after sending (only
    /// safe when the function is idempotent; default `false`).
    pub retry_timeouts: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        // Four equal-jittered backoffs of 0.4, 0.8, 1.6 and 3.2 s (each drawn from its upper
        // half) add up to 3–6 s: a batch outlives a Lambda endpoint that is gone for up to
        // 3 s (a restart, a deploy, a dropped load balancer), and the worst case stays far
        // inside the default 30 s `request_timeout`. Full jitter over `base = 100ms` gave up
        // within 1.5 s at most.
        RetryConfig {
            max_attempts: 5,
            base: Duration::from_millis(400),
            cap: Duration::from_secs(10),
            jitter: Jitter::Equal,
            budget: 0.2,
            retry_timeouts: false,
        }
    }
}

/// `routes[].dlq`: where records that exhausted their attempts are kept; exactly one of
/// the two sinks.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DlqConfig {
    /// A JSON Lines file records are appended to (`data/dlq.jsonl`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// An SQS queue records are sent to; the SQS endpoint is the URL's origin and the
    /// credentials are those of `[lambda]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqs_queue_url: Option<String>,
}

/// A `[[routes]]` entry: a request path whose records are batched into one function.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The route's name (required, unique), used in metrics, logs and `/admin/routes`.
    pub name: String,
    /// Request path; default `/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Lambda function name or ARN the records go to (required).
    pub function: String,
    /// Synchronous or asynchronous invokes (default `request_response`).
    #[serde(default = "default_invocation")]
    pub invocation: Invocation,
    /// How records are put into a payload (default `batch`).
    #[serde(default = "default_envelope")]
    pub envelope: Envelope,
    /// Route layer of admission; omit for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Quota>,
    /// This route's caller deadline; default `server.request_timeout`.
    #[serde(
        default,
        with = "units::opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub request_timeout: Option<Duration>,
    /// How records are grouped into invokes.
    #[serde(default)]
    pub batch: BatchConfig,
    /// The bound on records waiting for an invoke.
    #[serde(default)]
    pub queue: QueueConfig,
    /// The function's invoke gate: rate, burst and concurrency.
    #[serde(default)]
    pub invoke: InvokeConfig,
    /// How failed invokes are retried.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Split a batch that failed with a function error until the failing record is found,
    /// so one poison record costs only its own caller (on by default).
    #[serde(default = "default_bisect")]
    pub bisect_on_function_error: bool,
    /// Dead-letter sink for records that exhausted their attempts; omit for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dlq: Option<DlqConfig>,
}

fn default_invocation() -> Invocation {
    Invocation::RequestResponse
}

fn default_envelope() -> Envelope {
    Envelope::Batch
}

fn default_bisect() -> bool {
    true
}

impl RouteConfig {
    /// The request path the route serves: `path`, or `/<name>` when it is not set.
    pub fn path(&self) -> String {
        self.path
            .clone()
            .unwrap_or_else(|| format!("/{}", self.name))
    }

    /// Records per invoke: always 1 for the raw envelope.
    pub fn max_records(&self) -> usize {
        match self.envelope {
            Envelope::Raw => 1,
            Envelope::Batch => self.batch.max_records.get() as usize,
        }
    }

    /// Largest invoke payload, envelope included.
    pub fn max_bytes(&self) -> u64 {
        match self.batch.max_bytes {
            Some(size) => size.bytes(),
            None => match self.invocation {
                Invocation::RequestResponse => ByteSize::mib(5).bytes(),
                Invocation::Event => ASYNC_PAYLOAD_LIMIT,
            },
        }
    }

    /// This route's caller deadline: its own `request_timeout`, else the server's.
    pub fn request_timeout(&self, server: &ServerConfig) -> Duration {
        self.request_timeout.unwrap_or(server.request_timeout)
    }
}

/// Bytes the batch envelope adds around one record besides its body and key:
/// `{"id":"<id>","key":"<key>","body":}` plus a separating comma, with ids up to 20 digits.
pub const ENVELOPE_RECORD_OVERHEAD: u64 = 64;
/// `{"records":[` + `]}`.
pub const ENVELOPE_FRAME: u64 = 14;
