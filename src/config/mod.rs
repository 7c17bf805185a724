//! Typed configuration: one TOML file, every key overridable by a `SLUICEGATE_*`
//! environment variable, validated once at load time.
//!
//! The key names are the contract the README, the examples and the tests use
//! (see `config/sluicegate.toml`). Every key has a default except a route's `name`
//! and `function`. Loading fails — with the offending key named — on unknown keys,
//! wrong types and impossible values, so the rest of the code never re-checks config.
//!
//! One file per responsibility, every type re-exported here (`crate::config::RouteConfig`):
//! - `server.rs`: `[server]` and `[identity]`;
//! - `limits.rs`: `[limits]` and `[[plans]]`;
//! - `lambda.rs`: `[lambda]` and Lambda's payload limits per invocation type;
//! - `route.rs`: a `[[routes]]` entry (envelope, batch, queue, invoke, retry, dlq);
//! - `idempotency.rs`: `[idempotency]` (`Idempotency-Key`: on or off, ttl and bounds);
//! - `[emulator]` is the emulator's own type ([`EmulatorConfig`]): config depends on the
//!   emulator's config, never the other way round, so `sluicegate emulate` and the emulator
//!   stay usable without the proxy's config;
//! - `env.rs`: the `SLUICEGATE_*` overrides (`SLUICEGATE_SERVER__LISTEN=0.0.0.0:8080` sets
//!   `server.listen`; `__` separates path segments, a numeric segment indexes an array);
//! - `validate.rs`: every bound, checked once at load, the offending key named;
//! - `error.rs`: [`ConfigError`].
//!
//! Durations and byte sizes are written in human units ([`crate::units`]); secrets are
//! masked when the config is shown ([`Config::redacted`], [`crate::redact`]).

mod env;
mod error;
mod idempotency;
mod lambda;
mod limits;
mod route;
mod server;
mod validate;

use std::path::Path;

use serde::{Deserialize, Serialize};

use self::env::parse_with_env;
pub use self::error::ConfigError;
pub use self::idempotency::IdempotencyConfig;
pub use self::lambda::{
    CredentialsSource, Invocation, LambdaConfig, LambdaTransport, ASYNC_PAYLOAD_LIMIT,
    SYNC_PAYLOAD_LIMIT,
};
pub use self::limits::{BackendErrorPolicy, KeyLimit, LimitBackend, LimitsConfig, PlanConfig};
pub use self::route::{
    BatchConfig, DlqConfig, Envelope, Fairness, Flush, InvokeConfig, Jitter, QueueConfig,
    RetryConfig, RouteConfig, ENVELOPE_FRAME, ENVELOPE_RECORD_OVERHEAD,
};
pub use self::server::{
    IdentityConfig, IdentitySource, ServerConfig, DEFAULT_MAX_JSON_DEPTH, LAMBDA_INVOKE_PREFIX,
    MAX_BULK_BYTES, MAX_BULK_RECORDS, MAX_CONNECTIONS,
};
pub use self::validate::{
    INVOKE_RATE, MAX_ATTEMPTS, MAX_BATCH_RECORDS, MAX_CONCURRENCY, MAX_INVOKE_BURST, MAX_KEYS,
    MAX_PENDING, MAX_TIMEOUT, PLAN_WEIGHT,
};
use crate::emulator::EmulatorConfig;
pub use crate::quota::Quota;
/// Moved to the leaf [`crate::redact`]; kept here for code not yet moved to the new path.
pub use crate::redact;
/// Moved to the leaf [`crate::units`] (the emulator's config uses it too); kept here for
/// code not yet moved to the new path.
pub use crate::units;
pub use crate::units::ByteSize;

/// The default config file, compiled in so `sluicegate serve` runs out of the box.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../config/sluicegate.toml");

/// The whole file: one field per section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`: listeners, request bounds, timeouts, the admin token.
    pub server: ServerConfig,
    /// `[identity]`: how a request's client key is found.
    pub identity: IdentityConfig,
    /// `[limits]`: admission's backend and its global and default quotas.
    pub limits: LimitsConfig,
    /// `[[plans]]`: usage plans giving their keys their own quota (default none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plans: Vec<PlanConfig>,
    /// `[lambda]`: region, endpoint, credentials and timeouts of the Lambda client.
    pub lambda: LambdaConfig,
    /// `[[routes]]`: each request path and the function its records go to (default none).
    pub routes: Vec<RouteConfig>,
    /// `[emulator]`: the embedded Lambda emulator; off when the section is absent.
    pub emulator: EmulatorConfig,
    /// `[idempotency]`: `Idempotency-Key` handling and its bounds.
    pub idempotency: IdempotencyConfig,
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
            idempotency: IdempotencyConfig::default(),
        }
    }
}

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
        for node in &mut config.limits.redis_cluster {
            *node = redact::url(node);
        }
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

#[cfg(test)]
mod tests;
