//! Typed configuration: one TOML file, every key overridable by a `SLUICEGATE_*`
//! environment variable, validated once at load time.
//!
//! The key names are the contract the README, the examples and the tests use
//! (see `config/sluicegate.toml`). Every key has a default except a route's `name`
//! and `function`. Loading fails — with the offending key named — on unknown keys,
//! wrong types and impossible values, so the rest of the code never re-checks config.
//!
//! Environment overrides: `SLUICEGATE_SERVER__LISTEN=0.0.0.0:8080` sets `server.listen`;
//! `__` separates path segments, a numeric segment indexes an array
//! (`SLUICEGATE_ROUTES__0__FUNCTION=other`). A value is read as a TOML value when it parses
//! as one (`10`, `true`, `{ rate = 5.0, burst = 10 }`) and as a string otherwise; when the
//! key already holds a string in the file the value always stays a string.
//! Variables without `__` (such as `SLUICEGATE_CONFIG`) are not overrides.

/// Moved to the leaf [`crate::redact`]; kept here for code not yet moved to the new path.
pub use crate::redact;
/// Moved to the leaf [`crate::units`] (the emulator's config uses it too); kept here for
/// code not yet moved to the new path.
pub use crate::units;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::emulator::EmulatorConfig;
pub use crate::limit::Quota;
pub use crate::units::ByteSize;

/// The default config file, compiled in so `sluicegate serve` runs out of the box.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../config/sluicegate.toml");

/// Lambda's payload limit for synchronous (RequestResponse) invokes, request and response.
pub const SYNC_PAYLOAD_LIMIT: u64 = 6_291_456;
/// Lambda's payload limit for asynchronous (Event) invokes.
pub const ASYNC_PAYLOAD_LIMIT: u64 = 1_048_576;

/// A config that could not be loaded, naming the key (dotted path) where it can.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The dotted key the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub identity: IdentityConfig,
    pub limits: LimitsConfig,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plans: Vec<PlanConfig>,
    pub lambda: LambdaConfig,
    pub routes: Vec<RouteConfig>,
    pub emulator: EmulatorConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            identity: IdentityConfig::default(),
            limits: LimitsConfig::default(),
            plans: Vec::new(),
            lambda: LambdaConfig::default(),
            routes: Vec::new(),
            emulator: EmulatorConfig {
                enabled: false,
                ..EmulatorConfig::default()
            },
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Data-plane listener.
    pub listen: SocketAddr,
    /// Admin listener (`/metrics`, `/admin/*`); loopback by default.
    pub admin_listen: SocketAddr,
    /// Largest accepted record body.
    pub max_record_bytes: ByteSize,
    /// A caller's deadline, unless the route sets its own.
    #[serde(with = "units::duration")]
    pub request_timeout: Duration,
    /// On SIGTERM/SIGINT, time allowed for in-flight work to finish.
    #[serde(with = "units::duration")]
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request's head (request line and headers)
    /// before its connection is closed; keeps slow clients from holding connections.
    #[serde(with = "units::duration")]
    pub header_read_timeout: Duration,
    /// Deepest nesting of arrays and objects a record may have; deeper records are refused
    /// with `400` before they can fail a batch in a runtime that cannot parse them.
    pub max_json_depth: u32,
    /// How long a client may take to send a record's body once its head has arrived (never
    /// past the caller's deadline); a body that does not arrive in time is answered `408`
    /// and its connection closed.
    #[serde(with = "units::duration")]
    pub body_read_timeout: Duration,
    /// Data-plane connections open at once. At the cap the listener stops accepting (new
    /// connections wait in the kernel's backlog) until one closes. Lowered at start-up when
    /// the open-files limit could not hold this many plus a reserve for Lambda, Redis, the
    /// dead-letter sink and the admin listener.
    pub max_connections: u32,
    /// Bearer token every `/admin/*` request must carry (`/metrics` and `/healthz` stay
    /// open). Required when `admin_listen` is not a loopback address. Never printed.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "redact::secret"
    )]
    pub admin_token: Option<String>,
    /// A file holding the admin token (a mounted secret), read when the config is loaded
    /// (and on every reload); surrounding whitespace is ignored. `admin_token`, when also
    /// set, wins and the file is not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// The token read from `admin_token_file`.
    #[serde(skip)]
    pub admin_token_from_file: Option<String>,
}

impl ServerConfig {
    /// The admin token in force: `admin_token`, or the one read from `admin_token_file`.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token
            .as_deref()
            .or(self.admin_token_from_file.as_deref())
    }

    /// Reads `admin_token_file` into `admin_token_from_file`, unless `admin_token` is set:
    /// a token given directly (often `SLUICEGATE_SERVER__ADMIN_TOKEN`) overrides the file,
    /// so an image whose config names a secret file can still be run with the variable.
    fn read_admin_token_file(&mut self) -> Result<(), ConfigError> {
        let (None, Some(path)) = (&self.admin_token, &self.admin_token_file) else {
            return Ok(());
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::invalid(
                "server.admin_token_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        self.admin_token_from_file = Some(text.trim().to_owned());
        Ok(())
    }

    /// The admin listener's checks: a token that can travel in a header, and one whenever
    /// the listener is reachable from other hosts.
    fn validate_admin(&self) -> Result<(), ConfigError> {
        if self.admin_token.is_none()
            && self.admin_token_file.is_some()
            && self.admin_token_from_file.is_none()
        {
            return Err(ConfigError::invalid(
                "server.admin_token_file",
                "was not read (load the config with Config::load or Config::from_toml)",
            ));
        }
        let key = if self.admin_token.is_none() && self.admin_token_file.is_some() {
            "server.admin_token_file"
        } else {
            "server.admin_token"
        };
        if let Some(token) = self.admin_token() {
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::invalid(
                    key,
                    "must be non-empty printable ASCII without spaces (it travels in the Authorization header)",
                ));
            }
        } else if !self.admin_listen.ip().is_loopback() {
            return Err(ConfigError::invalid(
                "server.admin_token",
                format!(
                    "admin_listen = {} is reachable from other hosts: set server.admin_token (or server.admin_token_file, or SLUICEGATE_SERVER__ADMIN_TOKEN) so /admin/* needs it, or listen on a loopback address",
                    self.admin_listen
                ),
            ));
        }
        if self.body_read_timeout.is_zero() || self.body_read_timeout > MAX_TIMEOUT {
            return Err(ConfigError::invalid(
                "server.body_read_timeout",
                "must be greater than 0 and at most 1h",
            ));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections) {
            return Err(ConfigError::invalid(
                "server.max_connections",
                format!("must be between 1 and {MAX_CONNECTIONS}"),
            ));
        }
        Ok(())
    }
}

/// The largest `server.max_connections`: past this the open-files limit, not the setting,
/// is what bounds connections on any usual system.
pub const MAX_CONNECTIONS: u32 = 1_000_000;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            max_record_bytes: ByteSize::kib(256),
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(20),
            header_read_timeout: Duration::from_secs(30),
            max_json_depth: DEFAULT_MAX_JSON_DEPTH,
            body_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            admin_token: None,
            admin_token_file: None,
            admin_token_from_file: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// The API key header (`identity.header`, default `x-api-key`).
    ApiKey,
    /// The client IP: the socket peer, or `X-Forwarded-For` when the peer is a trusted proxy.
    Ip,
    /// The value of a named header (`identity.header`).
    Header,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    pub source: IdentitySource,
    pub header: String,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub require_known_key: bool,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            source: IdentitySource::ApiKey,
            header: "x-api-key".to_owned(),
            trusted_proxies: Vec::new(),
            require_known_key: false,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LimitBackend {
    Local,
    Redis,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BackendErrorPolicy {
    Local,
    Allow,
    Deny,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub backend: LimitBackend,
    pub redis_url: String,
    pub on_backend_error: BackendErrorPolicy,
    /// With `backend = "redis"`: deadline of one call to Redis. A call that fails or misses
    /// it marks Redis down and `on_backend_error` decides until a probe finds it back, so no
    /// request waits on Redis longer than this.
    #[serde(with = "units::duration")]
    pub redis_timeout: Duration,
    /// Bound on tracked keys across all keyed layers.
    pub max_keys: usize,
    /// How often idle (full) key buckets are reclaimed.
    #[serde(with = "units::duration")]
    pub reclaim_interval: Duration,
    /// Account/stage layer; omit for none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global: Option<Quota>,
    /// Per-key layer for keys without a plan.
    pub default: Quota,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            backend: LimitBackend::Local,
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            on_backend_error: BackendErrorPolicy::Local,
            redis_timeout: Duration::from_millis(50),
            max_keys: 1_000_000,
            reclaim_interval: Duration::from_secs(10),
            global: None,
            default: Quota {
                rate: 100.0,
                burst: 200,
            },
        }
    }
}

/// A usage plan: API keys that share one `{rate, burst}` per key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    pub name: String,
    pub rate: f64,
    pub burst: u32,
    #[serde(default)]
    pub keys: Vec<String>,
}

impl PlanConfig {
    pub fn quota(&self) -> Quota {
        Quota {
            rate: self.rate,
            burst: self.burst,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CredentialsSource {
    /// Placeholder credentials when `endpoint_url` is a loopback address (an emulator does
    /// not check signatures), the default AWS credential chain otherwise.
    Auto,
    /// Always the default AWS credential chain.
    Chain,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LambdaConfig {
    pub region: String,
    /// Lambda endpoint; omit for real AWS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    pub credentials: CredentialsSource,
    #[serde(with = "units::duration")]
    pub connect_timeout: Duration,
    /// Must exceed the function's own timeout, or a slow invoke is abandoned while it runs.
    #[serde(with = "units::duration")]
    pub read_timeout: Duration,
    /// Refuse to start on unsafe timeouts or concurrency instead of warning.
    pub strict: bool,
}

impl Default for LambdaConfig {
    fn default() -> Self {
        LambdaConfig {
            region: "us-east-1".to_owned(),
            endpoint_url: None,
            credentials: CredentialsSource::Auto,
            connect_timeout: Duration::from_secs(3),
            read_timeout: Duration::from_secs(65),
            strict: false,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Invocation {
    RequestResponse,
    Event,
}

impl Invocation {
    /// Lambda's payload limit for this invocation type.
    pub fn payload_limit(self) -> u64 {
        match self {
            Invocation::RequestResponse => SYNC_PAYLOAD_LIMIT,
            Invocation::Event => ASYNC_PAYLOAD_LIMIT,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Envelope {
    /// `{"records":[{"id","key","body"}, ...]}`.
    Batch,
    /// One record per invoke: the record is the payload and the payload is the result.
    Raw,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Flush {
    /// Dispatch as soon as an invoke slot is free; batches grow by themselves under load.
    Adaptive,
    /// Dispatch when `max_records`, `max_bytes` or `max_wait` is reached.
    Window,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub max_records: u32,
    /// Largest invoke payload, envelope included. Default: 5MiB for `request_response`
    /// routes, 1MiB (Lambda's limit) for `event` routes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<ByteSize>,
    #[serde(with = "units::duration")]
    pub max_wait: Duration,
    pub flush: Flush,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: 20,
            max_bytes: None,
            max_wait: Duration::from_millis(50),
            flush: Flush::Adaptive,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    pub max_pending: usize,
    /// Bound on the bytes of records waiting in the queue (their envelope entries).
    pub max_bytes: ByteSize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_pending: 10_000,
            max_bytes: ByteSize::mib(64),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InvokeConfig {
    /// Invokes per second (client-side invoke-rate bucket).
    pub rate: f64,
    pub burst: u32,
    /// Invokes in flight at once; keep it at or below the function's reserved concurrency.
    pub max_concurrency: u32,
    pub adaptive: bool,
}

impl Default for InvokeConfig {
    fn default() -> Self {
        InvokeConfig {
            rate: 10.0,
            burst: 10,
            max_concurrency: 10,
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

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub max_attempts: u32,
    #[serde(with = "units::duration")]
    pub base: Duration,
    #[serde(with = "units::duration")]
    pub cap: Duration,
    pub jitter: Jitter,
    /// Retries allowed as a fraction of recent invokes.
    pub budget: f64,
    /// Retry a read timeout (only safe when the function is idempotent).
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

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DlqConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqs_queue_url: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// Request path; default `/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub function: String,
    #[serde(default = "default_invocation")]
    pub invocation: Invocation,
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
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub invoke: InvokeConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    /// Split a batch that failed with a function error until the failing record is found,
    /// so one poison record costs only its own caller (on by default).
    #[serde(default = "default_bisect")]
    pub bisect_on_function_error: bool,
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
    pub fn path(&self) -> String {
        self.path
            .clone()
            .unwrap_or_else(|| format!("/{}", self.name))
    }

    /// Records per invoke: always 1 for the raw envelope.
    pub fn max_records(&self) -> usize {
        match self.envelope {
            Envelope::Raw => 1,
            Envelope::Batch => self.batch.max_records as usize,
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

    pub fn request_timeout(&self, server: &ServerConfig) -> Duration {
        self.request_timeout.unwrap_or(server.request_timeout)
    }
}

/// `server.max_json_depth`'s default and largest value: `serde_json`'s recursion limit.
pub const DEFAULT_MAX_JSON_DEPTH: u32 = 128;

/// Bytes the batch envelope adds around one record besides its body and key:
/// `{"id":"<id>","key":"<key>","body":}` plus a separating comma, with ids up to 20 digits.
pub const ENVELOPE_RECORD_OVERHEAD: u64 = 64;
/// `{"records":[` + `]}`.
pub const ENVELOPE_FRAME: u64 = 14;

impl Config {
    /// Reads `path`, applies `SLUICEGATE_*` overrides from the process environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_with_env(&text, &path.display().to_string(), std::env::vars())
    }

    /// Parses TOML text with the given environment overrides, then validates.
    pub fn from_toml_with_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let value = parse_with_env(text, origin, env)?;
        let mut config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." {
                "(top level)".to_owned()
            } else {
                key
            };
            ConfigError::invalid(key, e.into_inner().to_string())
        })?;
        config.server.read_admin_token_file()?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without environment overrides (tests, embedded default).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_toml_with_env(text, "<inline>", std::iter::empty())
    }

    /// Checks everything `serve` needs: at least one route, and every value possible.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_common()?;
        if self.routes.is_empty() {
            return Err(ConfigError::invalid(
                "routes",
                "at least one [[routes]] entry is required",
            ));
        }
        Ok(())
    }

    fn validate_common(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        check_range(
            "server.max_record_bytes",
            s.max_record_bytes.bytes(),
            1..=SYNC_PAYLOAD_LIMIT,
            "bytes (one record must fit one synchronous invoke)",
        )?;
        if !(1..=DEFAULT_MAX_JSON_DEPTH).contains(&s.max_json_depth) {
            return Err(ConfigError::invalid(
                "server.max_json_depth",
                format!(
                    "must be 1 to {DEFAULT_MAX_JSON_DEPTH} (serde_json's recursion limit), got {}",
                    s.max_json_depth
                ),
            ));
        }
        s.validate_admin()?;
        for (name, timeout) in [
            ("server.request_timeout", s.request_timeout),
            ("server.header_read_timeout", s.header_read_timeout),
        ] {
            check_timeout(name, timeout)?;
        }
        check_at_most("server.shutdown_grace", s.shutdown_grace)?;
        if s.listen == s.admin_listen && s.listen.port() != 0 {
            return Err(ConfigError::invalid(
                "server.admin_listen",
                "must differ from server.listen",
            ));
        }
        if http::HeaderName::from_bytes(self.identity.header.as_bytes()).is_err() {
            return Err(ConfigError::invalid(
                "identity.header",
                format!("{:?} is not a valid header name", self.identity.header),
            ));
        }
        let l = &self.limits;
        check_range("limits.max_keys", l.max_keys, 1..=MAX_KEYS, "tracked keys")?;
        if l.redis_timeout.is_zero() || l.redis_timeout > Duration::from_secs(10) {
            return Err(ConfigError::invalid(
                "limits.redis_timeout",
                "must be greater than 0 and at most 10s (requests wait on Redis up to this long)",
            ));
        }
        if l.backend == LimitBackend::Redis {
            if let Err(e) = redis::Client::open(l.redis_url.as_str()) {
                return Err(ConfigError::invalid(
                    "limits.redis_url",
                    format!("{:?} is not a usable Redis URL: {e}", l.redis_url),
                ));
            }
        }
        check_timeout("limits.reclaim_interval", l.reclaim_interval)?;
        if let Some(global) = &l.global {
            global
                .validate()
                .map_err(|m| ConfigError::invalid("limits.global", m))?;
        }
        l.default
            .validate()
            .map_err(|m| ConfigError::invalid("limits.default", m))?;
        let mut plan_names = HashSet::new();
        let mut plan_keys = HashSet::new();
        for (i, plan) in self.plans.iter().enumerate() {
            if plan.name.is_empty() || !plan_names.insert(plan.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("plans[{i}].name"),
                    format!("{:?} is empty or used twice", plan.name),
                ));
            }
            plan.quota()
                .validate()
                .map_err(|m| ConfigError::invalid(format!("plans[{i}].rate"), m))?;
            for key in &plan.keys {
                if key.is_empty() || !plan_keys.insert(key.as_str()) {
                    return Err(ConfigError::invalid(
                        format!("plans[{i}].keys"),
                        format!("key {key:?} is empty or belongs to two plans"),
                    ));
                }
            }
        }
        let lambda = &self.lambda;
        if lambda.region.trim().is_empty() {
            return Err(ConfigError::invalid("lambda.region", "must not be empty"));
        }
        if let Some(url) = &lambda.endpoint_url {
            let ok = url.parse::<http::Uri>().ok().filter(|u| {
                matches!(u.scheme_str(), Some("http") | Some("https")) && u.host().is_some()
            });
            if ok.is_none() {
                return Err(ConfigError::invalid(
                    "lambda.endpoint_url",
                    format!("{url:?} is not an http(s) URL"),
                ));
            }
        }
        for (key, d) in [
            ("lambda.connect_timeout", lambda.connect_timeout),
            ("lambda.read_timeout", lambda.read_timeout),
        ] {
            check_timeout(key, d)?;
        }
        let mut names = HashSet::new();
        let mut paths = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            self.validate_route(i, route, &mut names, &mut paths)?;
        }
        self.emulator
            .validate()
            .map_err(|(key, message)| ConfigError::invalid(format!("emulator.{key}"), message))?;
        Ok(())
    }

    fn validate_route<'a>(
        &self,
        i: usize,
        r: &'a RouteConfig,
        names: &mut HashSet<&'a str>,
        paths: &mut HashSet<String>,
    ) -> Result<(), ConfigError> {
        let key = |field: &str| format!("routes[{i}].{field}");
        if r.name.is_empty() || !names.insert(r.name.as_str()) {
            return Err(ConfigError::invalid(
                key("name"),
                format!("{:?} is empty or used by two routes", r.name),
            ));
        }
        let path = r.path();
        if !path.starts_with('/')
            || path.parse::<http::uri::PathAndQuery>().is_err()
            || path.contains(['?', '{', '}', '*'])
        {
            return Err(ConfigError::invalid(
                key("path"),
                format!("{path:?} is not a plain absolute path"),
            ));
        }
        if matches!(path.as_str(), "/healthz" | "/readyz") || !paths.insert(path.clone()) {
            return Err(ConfigError::invalid(
                key("path"),
                format!("{path:?} is reserved or used by two routes"),
            ));
        }
        if r.function.trim().is_empty() {
            return Err(ConfigError::invalid(
                key("function"),
                "must name a Lambda function",
            ));
        }
        if let Some(limit) = &r.limit {
            limit
                .validate()
                .map_err(|m| ConfigError::invalid(key("limit"), m))?;
        }
        if let Some(timeout) = r.request_timeout {
            check_timeout(&key("request_timeout"), timeout)?;
        }
        check_range(
            &key("batch.max_records"),
            r.batch.max_records,
            1..=MAX_BATCH_RECORDS,
            "records per invoke",
        )?;
        let limit = r.invocation.payload_limit();
        if r.max_bytes() > limit {
            return Err(ConfigError::invalid(
                key("batch.max_bytes"),
                format!(
                    "{} exceeds Lambda's {limit}-byte payload limit for {:?} invokes",
                    ByteSize(r.max_bytes()),
                    r.invocation
                ),
            ));
        }
        let one_record =
            self.server.max_record_bytes.bytes() + ENVELOPE_RECORD_OVERHEAD + ENVELOPE_FRAME + 256;
        if r.envelope == Envelope::Batch && r.max_bytes() < one_record {
            return Err(ConfigError::invalid(
                key("batch.max_bytes"),
                format!("{} cannot carry one record of server.max_record_bytes ({}) with its envelope and key", ByteSize(r.max_bytes()), self.server.max_record_bytes),
            ));
        }
        if r.envelope == Envelope::Raw && r.max_bytes() < self.server.max_record_bytes.bytes() {
            return Err(ConfigError::invalid(
                key("batch.max_bytes"),
                "is smaller than server.max_record_bytes",
            ));
        }
        check_timeout(&key("batch.max_wait"), r.batch.max_wait)?;
        check_range(
            &key("queue.max_pending"),
            r.queue.max_pending,
            1..=MAX_PENDING,
            "queued records",
        )?;
        if r.queue.max_pending == 0 {
            return Err(ConfigError::invalid(
                key("queue.max_pending"),
                "must be at least 1",
            ));
        }
        if r.queue.max_bytes.bytes() < one_record {
            return Err(ConfigError::invalid(
                key("queue.max_bytes"),
                format!(
                    "{} cannot hold one record of server.max_record_bytes ({}) with its envelope and key",
                    r.queue.max_bytes, self.server.max_record_bytes
                ),
            ));
        }
        let inv = &r.invoke;
        if !INVOKE_RATE.contains(&inv.rate) {
            return Err(ConfigError::invalid(
                key("invoke.rate"),
                format!(
                    "must be in {}..={} invokes per second, got {}",
                    INVOKE_RATE.start(),
                    INVOKE_RATE.end(),
                    inv.rate
                ),
            ));
        }
        check_range(
            &key("invoke.burst"),
            inv.burst,
            1..=MAX_INVOKE_BURST,
            "invokes",
        )?;
        check_range(
            &key("invoke.max_concurrency"),
            inv.max_concurrency,
            1..=MAX_CONCURRENCY,
            "invokes in flight",
        )?;
        let retry = &r.retry;
        check_range(
            &key("retry.max_attempts"),
            retry.max_attempts,
            1..=MAX_ATTEMPTS,
            "attempts",
        )?;
        check_timeout(&key("retry.cap"), retry.cap)?;
        if retry.base.is_zero() || retry.base > retry.cap {
            return Err(ConfigError::invalid(
                key("retry.base"),
                "must be greater than 0 and at most retry.cap",
            ));
        }
        if !(0.0..=1.0).contains(&retry.budget) {
            return Err(ConfigError::invalid(
                key("retry.budget"),
                format!("must be between 0 and 1, got {}", retry.budget),
            ));
        }
        if let Some(dlq) = &r.dlq {
            if dlq.file.is_some() == dlq.sqs_queue_url.is_some() {
                return Err(ConfigError::invalid(
                    key("dlq"),
                    "set exactly one of `file` or `sqs_queue_url`",
                ));
            }
        }
        Ok(())
    }

    /// Parses a file meant for `sluicegate emulate`: only the `[emulator]` section must be
    /// valid; the rest may be absent.
    pub fn load_for_emulator(path: &Path) -> Result<EmulatorConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let value = parse_with_env(&text, &path.display().to_string(), std::env::vars())?;
        let section = value
            .get("emulator")
            .cloned()
            .unwrap_or_else(|| toml::Value::Table(Default::default()));
        let emulator: EmulatorConfig = serde_path_to_error::deserialize(section).map_err(|e| {
            ConfigError::invalid(format!("emulator.{}", e.path()), e.into_inner().to_string())
        })?;
        emulator
            .validate()
            .map_err(|(key, message)| ConfigError::invalid(format!("emulator.{key}"), message))?;
        Ok(emulator)
    }

    /// Whether the data plane's Lambda is the embedded emulator: `[emulator] enabled = true`
    /// *and* `lambda.endpoint_url` names it (`http://<emulator.listen>`). This is the one
    /// place that rule lives. Without `endpoint_url` the target is real AWS (SDK endpoint
    /// resolution, default credential chain) whether or not the emulator runs.
    pub fn targets_embedded_emulator(&self) -> bool {
        let named = format!("http://{}", self.emulator.listen);
        self.emulator.enabled
            && self
                .lambda
                .endpoint_url
                .as_deref()
                .is_some_and(|url| url.trim_end_matches('/') == named)
    }

    /// Points `lambda.endpoint_url` at the embedded emulator as it actually listens
    /// (`actual_url`; it differs from the configured one when `emulator.listen` has port 0),
    /// if and only if [`targets_embedded_emulator`](Self::targets_embedded_emulator).
    /// Returns whether it did.
    pub fn retarget_embedded_emulator(&mut self, actual_url: &str) -> bool {
        let targets = self.targets_embedded_emulator();
        if targets {
            self.lambda.endpoint_url = Some(actual_url.to_owned());
        }
        targets
    }

    /// The effective config as TOML (what `check-config` prints), secrets redacted.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.redacted())
            .unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// A copy fit to show: every URL's password replaced by `***` (the admin token is
    /// always serialized as `***`). Plan keys stay: [`Config::to_toml`] must load again.
    pub fn redacted(&self) -> Config {
        let mut config = self.clone();
        config.limits.redis_url = redact::url(&config.limits.redis_url);
        if let Some(url) = &mut config.lambda.endpoint_url {
            *url = redact::url(url);
        }
        for route in &mut config.routes {
            if let Some(url) = route.dlq.as_mut().and_then(|d| d.sqs_queue_url.as_mut()) {
                *url = redact::url(url);
            }
        }
        config
    }
}

/// Parses TOML text and applies the environment overrides onto it.
fn parse_with_env(
    text: &str,
    origin: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<toml::Value, ConfigError> {
    let mut value = text
        .parse::<toml::Table>()
        .map(toml::Value::Table)
        .map_err(|e| ConfigError::Syntax {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
    apply_env_overrides(&mut value, env)?;
    Ok(value)
}

/// Applies `SLUICEGATE_A__B__C=value` overrides onto the parsed file.
fn apply_env_overrides(
    root: &mut toml::Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("SLUICEGATE_") && k.contains("__"))
        .collect();
    // Deterministic order: parents before children, so `ROUTES__0` then `ROUTES__0__NAME`.
    vars.sort();
    for (var, raw) in vars {
        let path: Vec<String> = var["SLUICEGATE_".len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var,
                message: "empty path segment".to_owned(),
            });
        }
        set_path(root, &path, &raw).map_err(|message| ConfigError::Env {
            var: var.clone(),
            message,
        })?;
    }
    Ok(())
}

fn set_path(root: &mut toml::Value, path: &[String], raw: &str) -> Result<(), String> {
    let mut node = root;
    for (depth, segment) in path.iter().enumerate() {
        let last = depth + 1 == path.len();
        let slot: &mut toml::Value = match node {
            toml::Value::Table(table) => {
                if !last && !table.contains_key(segment) {
                    table.insert(segment.clone(), toml::Value::Table(Default::default()));
                }
                if last {
                    let keep_string = matches!(table.get(segment), Some(toml::Value::String(_)));
                    table.insert(segment.clone(), env_value(raw, keep_string));
                    return Ok(());
                }
                table.get_mut(segment).expect("inserted above when missing")
            }
            toml::Value::Array(items) => {
                let index: usize = segment
                    .parse()
                    .map_err(|_| format!("`{segment}` is not an array index"))?;
                if index > items.len() {
                    return Err(format!(
                        "array index {index} skips entries (the array has {})",
                        items.len()
                    ));
                }
                if index == items.len() {
                    items.push(toml::Value::Table(Default::default()));
                }
                if last {
                    let keep_string = matches!(items[index], toml::Value::String(_));
                    items[index] = env_value(raw, keep_string);
                    return Ok(());
                }
                &mut items[index]
            }
            _ => return Err(format!("`{}` is not a table", path[..depth].join("."))),
        };
        node = slot;
    }
    Ok(())
}

fn env_value(raw: &str, keep_string: bool) -> toml::Value {
    if !keep_string {
        if let Ok(mut table) = format!("v = {raw}").parse::<toml::Table>() {
            if let Some(value) = table.remove("v") {
                return value;
            }
        }
    }
    toml::Value::String(raw.to_owned())
}

/// The longest a caller deadline or a connection timeout may be. Lambda itself stops a
/// function after 15 minutes; anything past an hour is a typo (and a deadline that far out
/// would overflow the clock).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

// The ranges below are what the code can hold and what a sane deployment needs; each is
// named in the error, so a rejected value says what would be accepted.

/// `invoke.rate`, invokes per second: one per 1000 s up to a million per second.
pub const INVOKE_RATE: std::ops::RangeInclusive<f64> = 0.001..=1e6;
/// `invoke.burst`.
pub const MAX_INVOKE_BURST: u32 = 1_000_000;
/// `invoke.max_concurrency`: well above any account's Lambda concurrency quota.
pub const MAX_CONCURRENCY: u32 = 100_000;
/// `batch.max_records`: Lambda's payload limit caps real batches far below this.
pub const MAX_BATCH_RECORDS: u32 = 10_000;
/// `queue.max_pending`.
pub const MAX_PENDING: usize = 10_000_000;
/// `retry.max_attempts`.
pub const MAX_ATTEMPTS: u32 = 100;
/// `limits.max_keys`.
pub const MAX_KEYS: usize = 100_000_000;

fn check_timeout(key: &str, timeout: Duration) -> Result<(), ConfigError> {
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        return Err(ConfigError::invalid(
            key,
            format!(
                "must be in 1ns..=1h, got {}",
                units::format_duration(timeout)
            ),
        ));
    }
    Ok(())
}

/// A duration that may be zero but not longer than [`MAX_TIMEOUT`].
fn check_at_most(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d > MAX_TIMEOUT {
        return Err(ConfigError::invalid(
            key,
            format!("must be in 0s..=1h, got {}", units::format_duration(d)),
        ));
    }
    Ok(())
}

fn check_range<T: PartialOrd + fmt::Display>(
    key: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
    unit: &str,
) -> Result<(), ConfigError> {
    if !range.contains(&value) {
        return Err(ConfigError::invalid(
            key,
            format!(
                "must be in {}..={} {unit}, got {value}",
                range.start(),
                range.end()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
