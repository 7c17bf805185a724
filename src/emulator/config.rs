//! The `[emulator]` section of the sluicegate config file.
//!
//! Every key has a default, so an empty `[emulator]` section (or none at all) describes one
//! function, `process-records`, that echoes its records back with the limits of a small
//! production function: 20 ms latency, a 3 s timeout, reserved concurrency 10 and a
//! synchronous invoke quota of 10 per second.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Lambda's own bounds on a function's memory setting, in MB.
const MEMORY_MB: std::ops::RangeInclusive<u32> = 128..=10_240;
/// Lambda's longest function timeout (15 minutes).
const MAX_TIMEOUT: Duration = Duration::from_secs(900);
/// Lambda's longest function name.
const MAX_NAME_LEN: usize = 64;

/// The emulator: where it listens and which functions it hosts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmulatorConfig {
    /// Whether `sluicegate serve` starts the emulator next to the proxy. `spawn` and `serve`
    /// in this module do not look at it: calling them is the decision to run it.
    pub enabled: bool,
    /// Address of the Lambda endpoint (`endpoint_url = "http://<listen>"` in `[lambda]`).
    pub listen: SocketAddr,
    /// The functions that can be invoked, by name.
    pub functions: Vec<FunctionConfig>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 9001)),
            functions: vec![FunctionConfig {
                reserved_concurrency: Some(10),
                invoke_rate: Some(10.0),
                ..FunctionConfig::new("process-records")
            }],
        }
    }
}

/// What an emulated function does with the records it is given.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Handler {
    /// Every record succeeds and its body comes back unchanged.
    #[default]
    Echo,
    /// The n-th, 2n-th, ... record the function ever receives fails (`every = n`).
    FailEvery,
    /// Each record fails independently with probability `ratio`.
    FailRatio,
    /// Records whose body is an object with `"poison": true` fail.
    Poison,
}

impl Handler {
    /// The name used in config files and reported as the function's `Handler`.
    pub fn as_str(self) -> &'static str {
        match self {
            Handler::Echo => "echo",
            Handler::FailEvery => "fail_every",
            Handler::FailRatio => "fail_ratio",
            Handler::Poison => "poison",
        }
    }
}

/// How a failed record shows in the invoke response.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// The function catches the failure and reports it per record; the invoke succeeds.
    #[default]
    Record,
    /// The function throws: one failed record makes the whole invocation fail with
    /// `X-Amz-Function-Error: Unhandled`.
    Crash,
}

/// The shape of a successful batch response.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ResponseShape {
    /// `{"results":[{"id","status":"success","body"} | {"id","status":"error","error"}]}`.
    #[default]
    Results,
    /// SQS-style partial batch response: `{"batchItemFailures":[{"itemIdentifier":"r2"}]}`.
    BatchItemFailures,
}

/// One emulated Lambda function. Every key but `name` has a default.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// The function name (`[a-zA-Z0-9_-]`, at most 64 characters, as in Lambda).
    pub name: String,
    /// What the function does with each record.
    #[serde(default)]
    pub handler: Handler,
    /// `fail_every`: every n-th record fails.
    #[serde(default = "default_every")]
    pub every: u32,
    /// `fail_ratio`: the probability that a record fails.
    #[serde(default = "default_ratio")]
    pub ratio: f64,
    /// Whether a failed record is reported per record or fails the whole invocation.
    #[serde(default)]
    pub failure: FailureMode,
    /// The shape of a successful batch response.
    #[serde(default)]
    pub response: ResponseShape,
    /// How long the function runs before it answers.
    #[serde(default = "default_latency", with = "crate::units::duration")]
    pub latency: Duration,
    /// The function's own timeout; a run longer than this answers `Task timed out`.
    #[serde(default = "default_timeout", with = "crate::units::duration")]
    pub timeout: Duration,
    /// Reserved concurrency: at most this many synchronous runs at once. `None` = unreserved
    /// (no limit); `Some(0)` throttles every synchronous invoke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_concurrency: Option<u32>,
    /// Synchronous and asynchronous invoke quota, in invokes per second. `None` = unlimited;
    /// `Some(0.0)` throttles every invoke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoke_rate: Option<f64>,
    /// How many invokes may arrive at once before `invoke_rate` applies.
    /// Default: `ceil(invoke_rate)`, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoke_burst: Option<u32>,
    /// Reported by `GetFunctionConfiguration`; Lambda allows 128 to 10240 (MB).
    #[serde(default = "default_memory_size")]
    pub memory_size: u32,
    /// A payload limit below Lambda's own (6 MB sync, 1 MB async), answered with the same
    /// `RequestTooLargeException`: lets tests exercise batch splitting with small records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_payload: Option<crate::units::ByteSize>,
}

fn default_every() -> u32 {
    10
}

fn default_ratio() -> f64 {
    0.1
}

fn default_latency() -> Duration {
    Duration::from_millis(20)
}

fn default_timeout() -> Duration {
    Duration::from_secs(3)
}

fn default_memory_size() -> u32 {
    128
}

impl FunctionConfig {
    /// A function with every setting at its default: an unreserved, unthrottled echo.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            handler: Handler::default(),
            every: default_every(),
            ratio: default_ratio(),
            failure: FailureMode::default(),
            response: ResponseShape::default(),
            latency: default_latency(),
            timeout: default_timeout(),
            reserved_concurrency: None,
            invoke_rate: None,
            invoke_burst: None,
            memory_size: default_memory_size(),
            max_payload: None,
        }
    }

    /// The invoke-rate bucket's capacity: `invoke_burst`, or `ceil(invoke_rate)` but at least 1.
    /// `None` when the function has no invoke quota.
    pub fn effective_invoke_burst(&self) -> Option<u32> {
        let rate = self.invoke_rate?;
        Some(self.invoke_burst.unwrap_or_else(|| {
            // `as` saturates, and validation keeps the rate finite and non-negative.
            (rate.ceil() as u32).max(1)
        }))
    }
}

impl EmulatorConfig {
    /// Checks what serde cannot: unique, well-formed names and values inside their ranges.
    ///
    /// The error is `(key, message)`, the key relative to `[emulator]`
    /// (e.g. `"functions[1].ratio"`), so the caller can prefix it with the section name.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (i, f) in self.functions.iter().enumerate() {
            let key = |field: &str| format!("functions[{i}].{field}");
            if f.name.is_empty() {
                return Err((key("name"), "a function name must not be empty".into()));
            }
            if f.name.len() > MAX_NAME_LEN
                || !f
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err((
                    key("name"),
                    format!(
                        "invalid function name {:?}: use at most {MAX_NAME_LEN} letters, digits, '-' or '_' (as Lambda does)",
                        f.name
                    ),
                ));
            }
            if let Some(j) = self.functions[..i].iter().position(|g| g.name == f.name) {
                return Err((
                    key("name"),
                    format!("function {:?} is already defined as functions[{j}]", f.name),
                ));
            }
            if f.every == 0 {
                return Err((
                    key("every"),
                    "must be at least 1 (every n-th record fails)".into(),
                ));
            }
            if !f.ratio.is_finite() || !(0.0..=1.0).contains(&f.ratio) {
                return Err((
                    key("ratio"),
                    format!("must be a probability between 0 and 1, got {}", f.ratio),
                ));
            }
            if f.timeout.is_zero() {
                return Err((key("timeout"), "must be longer than 0s".into()));
            }
            if f.timeout > MAX_TIMEOUT {
                return Err((
                    key("timeout"),
                    "Lambda functions time out after at most 15m".into(),
                ));
            }
            if let Some(rate) = f.invoke_rate {
                if !rate.is_finite() || rate < 0.0 {
                    return Err((
                        key("invoke_rate"),
                        format!(
                            "must be a finite number of invokes per second, 0 or more, got {rate}"
                        ),
                    ));
                }
            }
            if !MEMORY_MB.contains(&f.memory_size) {
                return Err((
                    key("memory_size"),
                    format!(
                        "Lambda allows {} to {} MB, got {}",
                        MEMORY_MB.start(),
                        MEMORY_MB.end(),
                        f.memory_size
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EmulatorConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn empty_section_is_the_documented_default() {
        let cfg = parse("").expect("empty section parses");
        assert_eq!(cfg, EmulatorConfig::default());
        assert!(cfg.enabled);
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:9001");
        let f = &cfg.functions[0];
        assert_eq!(f.name, "process-records");
        assert_eq!(f.handler, Handler::Echo);
        assert_eq!(f.latency, Duration::from_millis(20));
        assert_eq!(f.timeout, Duration::from_secs(3));
        assert_eq!(f.reserved_concurrency, Some(10));
        assert_eq!(f.invoke_rate, Some(10.0));
        assert_eq!(f.effective_invoke_burst(), Some(10));
        assert_eq!(f.memory_size, 128);
        cfg.validate().expect("the default is valid");
    }

    #[test]
    fn function_needs_only_a_name() {
        let cfg = parse("[[functions]]\nname = \"f\"\n").expect("parses");
        assert_eq!(cfg.functions, vec![FunctionConfig::new("f")]);
        assert_eq!(cfg.functions[0].effective_invoke_burst(), None);
    }

    #[test]
    fn parses_every_key_of_a_function() {
        let cfg = parse(
            r#"
            enabled = false
            listen = "0.0.0.0:9100"
            [[functions]]
            name = "flaky"
            handler = "fail_ratio"
            every = 3
            ratio = 0.25
            failure = "crash"
            response = "batch_item_failures"
            latency = "150ms"
            timeout = "1m"
            reserved_concurrency = 0
            invoke_rate = 2.5
            invoke_burst = 7
            memory_size = 1024
            "#,
        )
        .expect("parses");
        let f = &cfg.functions[0];
        assert!(!cfg.enabled);
        assert_eq!(f.handler, Handler::FailRatio);
        assert_eq!(f.every, 3);
        assert_eq!(f.ratio, 0.25);
        assert_eq!(f.failure, FailureMode::Crash);
        assert_eq!(f.response, ResponseShape::BatchItemFailures);
        assert_eq!(f.latency, Duration::from_millis(150));
        assert_eq!(f.timeout, Duration::from_secs(60));
        assert_eq!(f.reserved_concurrency, Some(0));
        assert_eq!(f.invoke_rate, Some(2.5));
        assert_eq!(f.effective_invoke_burst(), Some(7));
        assert_eq!(f.memory_size, 1024);
    }

    #[test]
    fn round_trips_through_toml_with_durations_as_strings() {
        let cfg = EmulatorConfig::default();
        let text = toml::to_string(&cfg).expect("serializes");
        assert!(text.contains("latency = \"20ms\""), "{text}");
        assert_eq!(parse(&text).expect("parses back"), cfg);
    }

    #[test]
    fn rejects_unknown_keys_and_unknown_handlers() {
        let err = parse("[[functions]]\nname = \"f\"\nlatncy = \"1s\"\n").unwrap_err();
        assert!(err.to_string().contains("latncy"), "{err}");
        let err = parse("[[functions]]\nname = \"f\"\nhandler = \"explode\"\n").unwrap_err();
        assert!(err.to_string().contains("explode"), "{err}");
        assert!(
            parse("[[functions]]\nlatency = \"1s\"\n").is_err(),
            "name is required"
        );
    }

    #[test]
    fn burst_defaults_to_the_rate_rounded_up_and_at_least_one() {
        let with_rate = |rate| FunctionConfig {
            invoke_rate: Some(rate),
            ..FunctionConfig::new("f")
        };
        assert_eq!(with_rate(2.5).effective_invoke_burst(), Some(3));
        assert_eq!(with_rate(0.2).effective_invoke_burst(), Some(1));
        assert_eq!(with_rate(0.0).effective_invoke_burst(), Some(1));
    }

    #[test]
    fn validation_names_the_offending_key() {
        let check = |edit: fn(&mut FunctionConfig)| {
            let mut second = FunctionConfig::new("second");
            edit(&mut second);
            let cfg = EmulatorConfig {
                functions: vec![FunctionConfig::new("first"), second],
                ..Default::default()
            };
            cfg.validate().map_err(|(key, _)| key)
        };
        assert_eq!(check(|_| ()), Ok(()));
        assert_eq!(check(|f| f.name.clear()), Err("functions[1].name".into()));
        assert_eq!(
            check(|f| f.name = "first".into()),
            Err("functions[1].name".into())
        );
        assert_eq!(
            check(|f| f.name = "has space".into()),
            Err("functions[1].name".into())
        );
        assert_eq!(check(|f| f.every = 0), Err("functions[1].every".into()));
        assert_eq!(check(|f| f.ratio = 1.5), Err("functions[1].ratio".into()));
        assert_eq!(
            check(|f| f.ratio = f64::NAN),
            Err("functions[1].ratio".into())
        );
        assert_eq!(
            check(|f| f.invoke_rate = Some(-1.0)),
            Err("functions[1].invoke_rate".into())
        );
        assert_eq!(
            check(|f| f.invoke_rate = Some(f64::INFINITY)),
            Err("functions[1].invoke_rate".into())
        );
        assert_eq!(check(|f| f.invoke_rate = Some(0.0)), Ok(()));
        assert_eq!(
            check(|f| f.timeout = Duration::ZERO),
            Err("functions[1].timeout".into())
        );
        assert_eq!(
            check(|f| f.timeout = Duration::from_secs(901)),
            Err("functions[1].timeout".into())
        );
        assert_eq!(
            check(|f| f.memory_size = 64),
            Err("functions[1].memory_size".into())
        );
    }

    #[test]
    fn duplicate_name_message_points_at_the_first_definition() {
        let cfg = EmulatorConfig {
            functions: vec![
                FunctionConfig::new("a"),
                FunctionConfig::new("b"),
                FunctionConfig::new("a"),
            ],
            ..Default::default()
        };
        let (key, message) = cfg.validate().unwrap_err();
        assert_eq!(key, "functions[2].name");
        assert!(message.contains("functions[0]"), "{message}");
    }
}
