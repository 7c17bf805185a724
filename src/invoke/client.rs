//! Building the Lambda client from `[lambda]`: the `aws-sdk-lambda` client (control plane,
//! and the data plane with `transport = "sdk"`) and, with `transport = "direct"`, the direct
//! client the data plane invokes through. The SDK config behind both (region, endpoint,
//! timeouts, SDK retries off, credentials) is [`crate::aws::sdk_config`], which the SQS
//! dead-letter sink shares.

use std::sync::Arc;

use super::direct::DirectClient;
/// Moved to [`crate::aws`]; kept here for code not yet moved to the new path.
pub use crate::aws::sdk_config;
use crate::config::{LambdaConfig, LambdaTransport};

/// The process's Lambda client: the SDK client, and the direct one when `[lambda]` asks for
/// it. Cheap to clone.
#[derive(Clone)]
pub struct LambdaClient {
    sdk: aws_sdk_lambda::Client,
    direct: Option<Arc<DirectClient>>,
}

impl LambdaClient {
    /// The SDK client: discovery, readiness probes, and invokes with `transport = "sdk"`.
    pub fn sdk(&self) -> &aws_sdk_lambda::Client {
        &self.sdk
    }

    /// The direct client, when `lambda.transport = "direct"`.
    pub(super) fn direct(&self) -> Option<&Arc<DirectClient>> {
        self.direct.as_ref()
    }
}

impl From<aws_sdk_lambda::Client> for LambdaClient {
    /// A client that invokes through the SDK.
    fn from(sdk: aws_sdk_lambda::Client) -> Self {
        LambdaClient { sdk, direct: None }
    }
}

/// One client per process: region, optional endpoint, connect/read timeouts, SDK retries
/// off (sluicegate retries itself), and credentials from the default chain — or, with
/// `credentials = "auto"` and a loopback `endpoint_url`, placeholder keys, because an
/// emulator does not check signatures and a fresh machine has no AWS credentials at all.
/// Fails only for `transport = "direct"` with an endpoint it cannot reach (an `https`
/// endpoint on a machine without root certificates).
pub async fn build_client(cfg: &LambdaConfig) -> std::io::Result<LambdaClient> {
    let sdk_config = sdk_config(cfg).await;
    let direct = match cfg.transport {
        LambdaTransport::Sdk => None,
        LambdaTransport::Direct => Some(Arc::new(DirectClient::new(
            cfg,
            sdk_config.credentials_provider(),
        )?)),
    };
    Ok(LambdaClient {
        sdk: aws_sdk_lambda::Client::new(&sdk_config),
        direct,
    })
}
