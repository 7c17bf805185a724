//! Building the `aws-sdk-lambda` client from `[lambda]`.

use aws_config::retry::RetryConfig;
use aws_config::stalled_stream_protection::StalledStreamProtectionConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_lambda::config::{Credentials, Region};

use crate::config::{CredentialsSource, LambdaConfig};

/// One client per process: region, optional endpoint, connect/read timeouts, SDK retries
/// off (sluicegate retries itself), and credentials from the default chain — or, with
/// `credentials = "auto"` and a loopback `endpoint_url`, placeholder keys, because an
/// emulator does not check signatures and a fresh machine has no AWS credentials at all.
pub async fn build_client(cfg: &LambdaConfig) -> aws_sdk_lambda::Client {
    aws_sdk_lambda::Client::new(&sdk_config(cfg).await)
}

/// The shared SDK config behind [`build_client`] (also used for the SQS dead-letter sink).
pub async fn sdk_config(cfg: &LambdaConfig) -> aws_config::SdkConfig {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(cfg.connect_timeout)
        .read_timeout(cfg.read_timeout)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(cfg.region.clone()))
        .retry_config(RetryConfig::disabled())
        .timeout_config(timeouts)
        // A function may legitimately take minutes before its first response byte;
        // `read_timeout` bounds that, not a throughput heuristic.
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
    if let Some(url) = &cfg.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if uses_placeholder_credentials(cfg) {
        loader = loader.credentials_provider(Credentials::new(
            "sluicegate-emulator",
            "sluicegate-emulator",
            None,
            None,
            "sluicegate-loopback-endpoint",
        ));
    }
    loader.load().await
}

/// Whether `credentials = "auto"` resolves to placeholder keys for this endpoint.
pub fn uses_placeholder_credentials(cfg: &LambdaConfig) -> bool {
    cfg.credentials == CredentialsSource::Auto
        && cfg.endpoint_url.as_deref().is_some_and(is_loopback_url)
}

fn is_loopback_url(url: &str) -> bool {
    let Some(host) = url
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_owned))
    else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_credentials_only_for_loopback_endpoints_in_auto_mode() {
        let mut cfg = LambdaConfig {
            endpoint_url: Some("http://127.0.0.1:9001".into()),
            ..LambdaConfig::default()
        };
        assert!(uses_placeholder_credentials(&cfg));
        cfg.endpoint_url = Some("http://[::1]:9001".into());
        assert!(uses_placeholder_credentials(&cfg));
        cfg.endpoint_url = Some("http://localhost:9001".into());
        assert!(uses_placeholder_credentials(&cfg));
        cfg.endpoint_url = Some("https://lambda.us-east-1.amazonaws.com".into());
        assert!(!uses_placeholder_credentials(&cfg));
        cfg.endpoint_url = None;
        assert!(!uses_placeholder_credentials(&cfg));
        cfg.endpoint_url = Some("http://127.0.0.1:9001".into());
        cfg.credentials = CredentialsSource::Chain;
        assert!(!uses_placeholder_credentials(&cfg));
    }
}
