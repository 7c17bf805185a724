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
            &invoke_endpoint(&sdk_config).await?,
            sdk_config.credentials_provider(),
        )?)),
    };
    Ok(LambdaClient {
        sdk: aws_sdk_lambda::Client::new(&sdk_config),
        direct,
    })
}

/// The endpoint the SDK's Lambda client resolves for `sdk_config`, found the way the SDK finds
/// it: `lambda.endpoint_url`, else `AWS_ENDPOINT_URL_LAMBDA` / `AWS_ENDPOINT_URL` or the
/// profile's `endpoint_url`, else Lambda's endpoint rules for the region (FIPS, dual-stack and
/// partitions included). Lambda's rules depend on nothing per request, so resolving once is
/// exact.
async fn invoke_endpoint(sdk_config: &aws_config::SdkConfig) -> std::io::Result<String> {
    use aws_sdk_lambda::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};
    use aws_types::service_config::ServiceConfigKey;

    let configured = if sdk_config.get_origin("endpoint_url").is_client_config() {
        sdk_config.endpoint_url().map(str::to_owned)
    } else {
        let key = ServiceConfigKey::builder()
            .service_id("Lambda")
            .env("AWS_ENDPOINT_URL")
            .profile("endpoint_url")
            .build()
            .map_err(|e| std::io::Error::other(format!("the Lambda endpoint: {e}")))?;
        sdk_config
            .service_config()
            .and_then(|conf| conf.load_config(key))
            .or_else(|| sdk_config.endpoint_url().map(str::to_owned))
    };
    let params = Params::builder()
        .set_region(sdk_config.region().map(ToString::to_string))
        .set_use_fips(sdk_config.use_fips())
        .set_use_dual_stack(sdk_config.use_dual_stack())
        .set_endpoint(configured)
        .build()
        .map_err(|e| invalid(format!("the Lambda endpoint: {e}")))?;
    let endpoint = DefaultResolver::new()
        .resolve_endpoint(&params)
        .await
        .map_err(|e| invalid(format!("the Lambda endpoint cannot be resolved: {e}")))?;
    Ok(endpoint.url().to_owned())
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, message)
}

#[cfg(test)]
mod tests {
    use aws_config::{BehaviorVersion, Region, SdkConfig};

    use super::*;

    fn sdk(region: &str) -> aws_types::sdk_config::Builder {
        SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.to_owned()))
    }

    #[tokio::test]
    async fn the_direct_transport_invokes_the_endpoint_the_sdk_would() {
        let cases = [
            (
                sdk("eu-west-1").build(),
                "https://lambda.eu-west-1.amazonaws.com",
            ),
            (
                sdk("us-east-1").use_fips(true).build(),
                "https://lambda-fips.us-east-1.amazonaws.com",
            ),
            (
                sdk("cn-north-1").build(),
                "https://lambda.cn-north-1.amazonaws.com.cn",
            ),
            (
                sdk("eu-west-1")
                    .endpoint_url("http://127.0.0.1:9001")
                    .build(),
                "http://127.0.0.1:9001",
            ),
        ];
        for (config, expected) in cases {
            assert_eq!(
                invoke_endpoint(&config).await.expect("an endpoint"),
                expected
            );
        }
    }

    #[tokio::test]
    async fn a_region_that_is_no_host_label_is_refused_by_name() {
        let err = invoke_endpoint(&sdk("not a region!").build())
            .await
            .expect_err("an invalid region");
        assert!(err.to_string().contains("Lambda endpoint"), "{err}");
    }
}
