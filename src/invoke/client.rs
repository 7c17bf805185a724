//! Building the `aws-sdk-lambda` client from `[lambda]`. The SDK config behind it (region,
//! endpoint, timeouts, SDK retries off, credentials) is [`crate::aws::sdk_config`], which the
//! SQS dead-letter sink shares.

/// Moved to [`crate::aws`]; kept here for code not yet moved to the new path.
pub use crate::aws::sdk_config;
use crate::config::LambdaConfig;

/// One client per process: region, optional endpoint, connect/read timeouts, SDK retries
/// off (sluicegate retries itself), and credentials from the default chain — or, with
/// `credentials = "auto"` and a loopback `endpoint_url`, placeholder keys, because an
/// emulator does not check signatures and a fresh machine has no AWS credentials at all.
pub async fn build_client(cfg: &LambdaConfig) -> aws_sdk_lambda::Client {
    aws_sdk_lambda::Client::new(&sdk_config(cfg).await)
}
