//! The `[lambda]` section (region, endpoint, credentials, timeouts) and Lambda's own
//! limits per invocation type.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units;

pub use crate::lambda::{ASYNC_PAYLOAD_LIMIT, SYNC_PAYLOAD_LIMIT};

/// `lambda.credentials`: where the Lambda (and SQS dead-letter) client gets its
/// credentials. Default `auto`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CredentialsSource {
    /// Placeholder credentials when `endpoint_url` is a loopback address (an emulator does
    /// not check signatures), the default AWS credential chain otherwise.
    Auto,
    /// Always the default AWS credential chain.
    Chain,
}

/// `lambda.transport`: how the data plane sends invokes. Default `direct`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LambdaTransport {
    /// Through `aws-sdk-lambda`'s `Invoke` operation.
    Sdk,
    /// To the endpoint the SDK resolves, signed with the SDK's SigV4 signer and credentials,
    /// sent over a pooled hyper client without the SDK's orchestrator (see
    /// `src/invoke/direct.rs`): about half the CPU of an SDK invoke. Discovery and readiness
    /// still use the SDK.
    #[default]
    Direct,
}

/// The `[lambda]` section: how the Lambda client reaches and waits on the service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LambdaConfig {
    /// AWS region of the functions (default `us-east-1`).
    pub region: String,
    /// Lambda endpoint; omit for real AWS. The embedded emulator receives records only
    /// when this is `http://<emulator.listen>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Where credentials come from (default `auto`).
    pub credentials: CredentialsSource,
    /// How invokes are sent (default `direct`).
    pub transport: LambdaTransport,
    /// TCP/TLS connect timeout of the Lambda client (default `3s`).
    #[serde(with = "units::duration")]
    pub connect_timeout: Duration,
    /// How long one invoke may wait for its answer (default `65s`). Must exceed the
    /// function's own timeout, or a slow invoke is abandoned while it runs.
    #[serde(with = "units::duration")]
    pub read_timeout: Duration,
    /// Refuse to start when discovery finds unsafe timeouts or concurrency, instead of
    /// warning (default `false`).
    pub strict: bool,
}

impl Default for LambdaConfig {
    fn default() -> Self {
        LambdaConfig {
            region: "us-east-1".to_owned(),
            endpoint_url: None,
            credentials: CredentialsSource::Auto,
            transport: LambdaTransport::default(),
            connect_timeout: Duration::from_secs(3),
            read_timeout: Duration::from_secs(65),
            strict: false,
        }
    }
}

/// `routes[].invocation`: how a route's function is invoked (default `request_response`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Invocation {
    /// Synchronous: the caller waits for the function's result (6 MB payload limit).
    RequestResponse,
    /// Asynchronous: Lambda queues the payload and the caller is answered `202` once it is
    /// accepted (1 MB payload limit).
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
