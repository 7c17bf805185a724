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

/// One client per process: region, optional endpoint, connect/read timeouts, SDK retries
/// off (sluicegate retries itself), and credentials from the default chain — or, with
/// `credentials = "auto"` and a loopback `endpoint_url`, placeholder keys, because an
/// emulator does not check signatures and a fresh machine has no AWS credentials at all.
///
/// With `transport = "direct"`, an endpoint reached through an HTTP(S) proxy (the SDK follows
/// `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`; the direct client does not) is
/// invoked through the SDK instead, with a warning. Fails only for `direct` when the endpoint
/// cannot be resolved or used (an invalid region or URL, an `https` endpoint on a machine
/// without root certificates) or there is no credentials provider.
pub async fn build_client(cfg: &LambdaConfig) -> std::io::Result<LambdaClient> {
    let sdk_config = sdk_config(cfg).await;
    let direct = match cfg.transport {
        LambdaTransport::Sdk => None,
        LambdaTransport::Direct => {
            let endpoint = invoke_endpoint(&sdk_config).await?;
            match proxied(&endpoint, |name| std::env::var(name).ok()) {
                Some(variable) => {
                    tracing::warn!(
                        %endpoint,
                        variable,
                        "the Lambda endpoint is reached through a proxy, which only the SDK \
                         follows: invoking through the SDK (lambda.transport = \"sdk\")"
                    );
                    None
                }
                None => Some(Arc::new(DirectClient::new(
                    cfg,
                    &endpoint,
                    sdk_config.credentials_provider(),
                )?)),
            }
        }
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

/// The proxy variable that would carry the SDK's connections to `endpoint`, if any: the first
/// of the variables the SDK reads that is set, unless `NO_PROXY` names the endpoint's host
/// (`*`, the host itself, or a domain suffix).
fn proxied(endpoint: &str, var: impl Fn(&str) -> Option<String>) -> Option<&'static str> {
    const PROXIES: [&str; 6] = [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ];
    let variable = PROXIES
        .into_iter()
        .find(|name| var(name).is_some_and(|value| !value.trim().is_empty()))?;
    let host = endpoint
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| {
            uri.host()
                .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
        })
        .unwrap_or_default();
    let bypass = ["NO_PROXY", "no_proxy"]
        .into_iter()
        .filter_map(&var)
        .flat_map(|rules| {
            rules
                .split(',')
                .map(|rule| rule.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .any(|rule| {
            let domain = rule.trim_start_matches('.');
            rule == "*"
                || (!domain.is_empty() && (host == domain || host.ends_with(&format!(".{domain}"))))
        });
    (!bypass).then_some(variable)
}

/// A set-up error naming what in `[lambda]` or the environment cannot be used.
pub(super) fn invalid(message: String) -> std::io::Error {
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

    #[test]
    fn an_endpoint_behind_a_proxy_goes_through_the_sdk_unless_no_proxy_names_it() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let aws = "https://lambda.eu-west-1.amazonaws.com";
        assert_eq!(proxied(aws, env(&[])), None);
        assert_eq!(proxied(aws, env(&[("HTTPS_PROXY", " ")])), None);
        assert_eq!(
            proxied(aws, env(&[("https_proxy", "http://proxy:3128")])),
            Some("https_proxy")
        );
        assert_eq!(
            proxied(aws, env(&[("ALL_PROXY", "http://proxy:3128")])),
            Some("ALL_PROXY")
        );
        for no_proxy in [
            ".amazonaws.com",
            "amazonaws.com",
            "*",
            "x.org, lambda.eu-west-1.amazonaws.com",
        ] {
            let pairs: &'static [(&str, &str)] = Box::leak(Box::new([
                ("HTTP_PROXY", "http://proxy:3128"),
                ("NO_PROXY", no_proxy),
            ]));
            assert_eq!(proxied(aws, env(pairs)), None, "NO_PROXY={no_proxy}");
        }
        assert_eq!(
            proxied(
                "http://127.0.0.1:9001",
                env(&[
                    ("HTTP_PROXY", "http://proxy:3128"),
                    ("no_proxy", "localhost,127.0.0.1")
                ])
            ),
            None
        );
        assert_eq!(
            proxied(
                aws,
                env(&[
                    ("HTTP_PROXY", "http://proxy:3128"),
                    ("NO_PROXY", "example.com,lambda.eu")
                ])
            ),
            Some("HTTP_PROXY")
        );
    }

    #[tokio::test]
    async fn a_region_that_is_no_host_label_is_refused_by_name() {
        let err = invoke_endpoint(&sdk("not a region!").build())
            .await
            .expect_err("an invalid region");
        assert!(err.to_string().contains("Lambda endpoint"), "{err}");
    }
}
