//! The `[lambda]` section (region, endpoint, credentials, timeouts) and Lambda's own
//! limits per invocation type.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units;

/// Lambda's payload limit for synchronous (RequestResponse) invokes, request and response.
pub const SYNC_PAYLOAD_LIMIT: u64 = 6_291_456;
/// Lambda's payload limit for asynchronous (Event) invokes.
pub const ASYNC_PAYLOAD_LIMIT: u64 = 1_048_576;

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
