//! Validation of a parsed config: every value the code must be able to hold, checked once
//! at load time with the offending key named, so the rest of the code never re-checks.
//!
//! Sections are checked in file order (`[server]`, `[identity]`, `[limits]`, `[[plans]]`,
//! `[lambda]`, `[[routes]]`, `[emulator]`, `[idempotency]`); the first problem found is the one reported.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use super::{
    ByteSize, Config, ConfigError, Envelope, IdempotencyConfig, IdentityConfig, InvokeConfig,
    LambdaConfig, LimitBackend, LimitsConfig, PlanConfig, RetryConfig, RouteConfig, ServerConfig,
    DEFAULT_MAX_JSON_DEPTH, ENVELOPE_FRAME, ENVELOPE_RECORD_OVERHEAD, LAMBDA_INVOKE_PREFIX,
    MAX_BULK_BYTES, MAX_BULK_RECORDS, MAX_CONNECTIONS, SYNC_PAYLOAD_LIMIT,
};
use crate::units;

impl Config {
    /// Checks everything `serve` needs: at least one route, and every value possible.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_server(&self.server)?;
        validate_identity(&self.identity)?;
        validate_limits(&self.limits)?;
        validate_plans(&self.plans)?;
        validate_lambda(&self.lambda)?;
        let mut names = HashSet::new();
        let mut paths = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            self.validate_route(i, route, &mut names, &mut paths)?;
        }
        self.emulator
            .validate()
            .map_err(|(key, message)| ConfigError::invalid(format!("emulator.{key}"), message))?;
        validate_idempotency(&self.idempotency)?;
        if self.routes.is_empty() {
            return Err(ConfigError::invalid(
                "routes",
                "at least one [[routes]] entry is required",
            ));
        }
        Ok(())
    }

    /// One route: a unique name and plain path, a function, its own quota and deadline,
    /// then its sizes, invoke limits, retries and dead-letter sink.
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
        if path.starts_with(LAMBDA_INVOKE_PREFIX) {
            return Err(ConfigError::invalid(
                key("path"),
                format!("{path:?} is under {LAMBDA_INVOKE_PREFIX}, where the data plane serves the Lambda Invoke API"),
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
        validate_sizes(i, r, self.server.max_record_bytes)?;
        validate_invoke(i, &r.invoke)?;
        validate_retry(i, &r.retry)?;
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
}

/// `[server]`: record bounds, the admin listener's token (one that can travel in a header,
/// and one whenever the listener is reachable from other hosts), timeouts, listeners.
fn validate_server(s: &ServerConfig) -> Result<(), ConfigError> {
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
    if s.admin_token.is_none() && s.admin_token_file.is_some() && s.admin_token_from_file.is_none()
    {
        return Err(ConfigError::invalid(
            "server.admin_token_file",
            "was not read (load the config with Config::load or Config::from_toml)",
        ));
    }
    let key = if s.admin_token.is_none() && s.admin_token_file.is_some() {
        "server.admin_token_file"
    } else {
        "server.admin_token"
    };
    if let Some(token) = s.admin_token() {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::invalid(
                key,
                "must be non-empty printable ASCII without spaces (it travels in the Authorization header)",
            ));
        }
    } else if !s.admin_listen.ip().is_loopback() {
        return Err(ConfigError::invalid(
            "server.admin_token",
            format!(
                "admin_listen = {} is reachable from other hosts: set server.admin_token (or server.admin_token_file, or SLUICEGATE_SERVER__ADMIN_TOKEN) so /admin/* needs it, or listen on a loopback address",
                s.admin_listen
            ),
        ));
    }
    if s.body_read_timeout.is_zero() || s.body_read_timeout > MAX_TIMEOUT {
        return Err(ConfigError::invalid(
            "server.body_read_timeout",
            "must be greater than 0 and at most 1h",
        ));
    }
    check_range(
        "server.max_bulk_records",
        s.max_bulk_records,
        1..=MAX_BULK_RECORDS,
        "records",
    )?;
    check_range(
        "server.max_bulk_bytes",
        s.max_bulk_bytes.bytes(),
        1..=MAX_BULK_BYTES.bytes(),
        "bytes",
    )?;
    if !(1..=MAX_CONNECTIONS).contains(&s.max_connections) {
        return Err(ConfigError::invalid(
            "server.max_connections",
            format!("must be between 1 and {MAX_CONNECTIONS}"),
        ));
    }
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
    Ok(())
}

/// `[identity]`: the key header must be a header name.
fn validate_identity(identity: &IdentityConfig) -> Result<(), ConfigError> {
    if http::HeaderName::from_bytes(identity.header.as_bytes()).is_err() {
        return Err(ConfigError::invalid(
            "identity.header",
            format!("{:?} is not a valid header name", identity.header),
        ));
    }
    Ok(())
}

/// `[limits]`: the key bound, the Redis deadline and URL, the reclaim period, the quotas.
fn validate_limits(l: &LimitsConfig) -> Result<(), ConfigError> {
    check_range("limits.max_keys", l.max_keys, 1..=MAX_KEYS, "tracked keys")?;
    if l.redis_timeout.is_zero() || l.redis_timeout > Duration::from_secs(10) {
        return Err(ConfigError::invalid(
            "limits.redis_timeout",
            "must be greater than 0 and at most 10s (requests wait on Redis up to this long)",
        ));
    }
    validate_redis_fleet(l)?;
    if l.backend == LimitBackend::Redis && l.redis_cluster.is_empty() {
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
        .throttle()
        .validate()
        .map_err(|m| ConfigError::invalid("limits.default", m))?;
    if let Some(quota) = &l.default.quota {
        quota
            .validate()
            .map_err(|m| ConfigError::invalid("limits.default.quota", m))?;
    }
    if l.quota_state.as_os_str().is_empty() {
        return Err(ConfigError::invalid(
            "limits.quota_state",
            "must name a file (usage-quota counters are kept there)",
        ));
    }
    Ok(())
}

/// `[[plans]]`: unique names, valid quotas, and no key in two plans.
fn validate_plans(plans: &[PlanConfig]) -> Result<(), ConfigError> {
    let mut plan_names = HashSet::new();
    let mut plan_keys = HashSet::new();
    for (i, plan) in plans.iter().enumerate() {
        if plan.name.is_empty() || !plan_names.insert(plan.name.as_str()) {
            return Err(ConfigError::invalid(
                format!("plans[{i}].name"),
                format!("{:?} is empty or used twice", plan.name),
            ));
        }
        plan.quota()
            .validate()
            .map_err(|m| ConfigError::invalid(format!("plans[{i}].rate"), m))?;
        check_range(
            &format!("plans[{i}].weight"),
            plan.weight,
            PLAN_WEIGHT,
            "records per round",
        )?;
        if let Some(quota) = &plan.quota {
            quota
                .validate()
                .map_err(|m| ConfigError::invalid(format!("plans[{i}].quota"), m))?;
        }
        for key in &plan.keys {
            if key.is_empty() || !plan_keys.insert(key.as_str()) {
                return Err(ConfigError::invalid(
                    format!("plans[{i}].keys"),
                    format!("key {key:?} is empty or belongs to two plans"),
                ));
            }
        }
    }
    Ok(())
}

/// `[lambda]`: a region, an http(s) endpoint when one is given, bounded timeouts.
fn validate_lambda(lambda: &LambdaConfig) -> Result<(), ConfigError> {
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
    Ok(())
}

/// A route's batch and queue bounds: within Lambda's payload limit, and each able to carry
/// one record of `server.max_record_bytes` with its envelope.
fn validate_sizes(
    i: usize,
    r: &RouteConfig,
    max_record_bytes: ByteSize,
) -> Result<(), ConfigError> {
    let key = |field: &str| format!("routes[{i}].{field}");
    check_range(
        &key("batch.max_records"),
        r.batch.max_records.get(),
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
    let one_record = max_record_bytes.bytes() + ENVELOPE_RECORD_OVERHEAD + ENVELOPE_FRAME + 256;
    if r.envelope == Envelope::Batch && r.max_bytes() < one_record {
        return Err(ConfigError::invalid(
            key("batch.max_bytes"),
            format!("{} cannot carry one record of server.max_record_bytes ({}) with its envelope and key", ByteSize(r.max_bytes()), max_record_bytes),
        ));
    }
    if r.envelope == Envelope::Raw && r.max_bytes() < max_record_bytes.bytes() {
        return Err(ConfigError::invalid(
            key("batch.max_bytes"),
            "is smaller than server.max_record_bytes",
        ));
    }
    check_timeout(&key("batch.max_wait"), r.batch.max_wait)?;
    if r.batch.linger > r.batch.max_wait {
        return Err(ConfigError::invalid(
            key("batch.linger"),
            format!(
                "must be at most batch.max_wait ({} ms): a batch leaves at max_wait whatever",
                r.batch.max_wait.as_millis()
            ),
        ));
    }
    check_range(
        &key("queue.max_pending"),
        r.queue.max_pending,
        1..=MAX_PENDING,
        "queued records",
    )?;
    if r.queue.max_bytes.bytes() < one_record {
        return Err(ConfigError::invalid(
            key("queue.max_bytes"),
            format!(
                "{} cannot hold one record of server.max_record_bytes ({}) with its envelope and key",
                r.queue.max_bytes, max_record_bytes
            ),
        ));
    }
    Ok(())
}

/// A route's invoke gate: rate, burst and concurrency within what the gate can hold.
fn validate_invoke(i: usize, inv: &InvokeConfig) -> Result<(), ConfigError> {
    let key = |field: &str| format!("routes[{i}].{field}");
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
        inv.burst.get(),
        1..=MAX_INVOKE_BURST,
        "invokes",
    )?;
    check_range(
        &key("invoke.max_concurrency"),
        inv.max_concurrency.get(),
        1..=MAX_CONCURRENCY,
        "invokes in flight",
    )?;
    // The gate's bucket holds what an admission layer can: a bucket that takes more than ten
    // years to fill (`burst / rate`) would have its token interval clamped, admitting faster
    // than configured.
    crate::quota::Quota {
        rate: inv.rate,
        burst: inv.burst.get(),
    }
    .validate()
    .map_err(|message| ConfigError::invalid(key("invoke.burst"), message))?;
    Ok(())
}

/// A route's retries: attempts, a backoff base within its cap, a budget fraction.
fn validate_retry(i: usize, retry: &RetryConfig) -> Result<(), ConfigError> {
    let key = |field: &str| format!("routes[{i}].{field}");
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
    Ok(())
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
/// `plans[].weight`: a key's records per round of a fair queue, against 1 for keys without
/// a plan.
pub const PLAN_WEIGHT: std::ops::RangeInclusive<u32> = 1..=1000;
/// `retry.max_attempts`.
pub const MAX_ATTEMPTS: u32 = 100;
/// `limits.max_keys`.
pub const MAX_KEYS: usize = 100_000_000;
/// `limits.expected_replicas`.
const MAX_EXPECTED_REPLICAS: u32 = 10_000;
/// `limits.redis_down_after` and `limits.redis_up_after`.
const MAX_HYSTERESIS: u32 = 1_000;

/// `limits.redis_cluster`, `limits.expected_replicas` and the hysteresis counts.
fn validate_redis_fleet(l: &LimitsConfig) -> Result<(), ConfigError> {
    if let Some(n) = l.expected_replicas {
        check_range(
            "limits.expected_replicas",
            n,
            1..=MAX_EXPECTED_REPLICAS,
            "replicas",
        )?;
    }
    check_range(
        "limits.redis_down_after",
        l.redis_down_after,
        1..=MAX_HYSTERESIS,
        "calls",
    )?;
    check_range(
        "limits.redis_up_after",
        l.redis_up_after,
        1..=MAX_HYSTERESIS,
        "probes",
    )?;
    if l.redis_cluster.is_empty() {
        return Ok(());
    }
    if l.redis_url != LimitsConfig::default().redis_url {
        return Err(ConfigError::invalid(
            "limits.redis_cluster",
            "set either limits.redis_url (one Redis) or limits.redis_cluster (a Redis Cluster), not both",
        ));
    }
    for node in &l.redis_cluster {
        let usable = redis::Client::open(node.as_str())
            .map_err(|e| e.to_string())
            .and_then(|_| match node.split_once("://") {
                Some(("redis" | "rediss", _)) => Ok(()),
                _ => Err("not a redis:// URL".to_owned()),
            });
        if let Err(e) = usable {
            return Err(ConfigError::invalid(
                "limits.redis_cluster",
                format!(
                    "{:?} is not a usable Redis node URL: {e}",
                    crate::redact::url(node)
                ),
            ));
        }
    }
    Ok(())
}

/// `[idempotency]`: a ttl of a second to a week, and bounds that hold at least a few
/// responses.
fn validate_idempotency(i: &IdempotencyConfig) -> Result<(), ConfigError> {
    if i.ttl < Duration::from_secs(1) || i.ttl > Duration::from_secs(7 * 24 * 3600) {
        return Err(ConfigError::invalid(
            "idempotency.ttl",
            format!("must be in 1s..=7d, got {}", units::format_duration(i.ttl)),
        ));
    }
    check_range(
        "idempotency.max_entries",
        i.max_entries,
        1..=100_000_000,
        "entries",
    )?;
    check_range(
        "idempotency.max_bytes",
        i.max_bytes.0,
        64 * 1024..=64 * 1024 * 1024 * 1024,
        "bytes",
    )
}

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
