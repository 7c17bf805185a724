//! How sluicegate reaches AWS: the one SDK config that the Lambda client and the SQS
//! dead-letter sink share (region, `lambda.endpoint_url`, connect/read timeouts, SDK retries
//! off, credentials), and starting the embedded emulator as the Lambda endpoint.
//!
//! The rule that decides whether the data plane's Lambda *is* the embedded emulator lives in
//! the config ([`Config::targets_embedded_emulator`]); [`start_embedded_emulator`] is the one
//! procedure that starts it and applies that rule to the address it got.

use aws_config::retry::RetryConfig;
use aws_config::stalled_stream_protection::StalledStreamProtectionConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_lambda::config::{Credentials, Region};
use tokio::net::TcpListener;

use crate::config::{Config, CredentialsSource, LambdaConfig};
use crate::emulator::{self, RunningEmulator};

/// The SDK config of every AWS client sluicegate builds: the Lambda client
/// ([`crate::invoke::build_client`]) and the SQS dead-letter sink.
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

/// The embedded emulator, started for a config.
pub struct EmbeddedEmulator {
    /// The running emulator; dropping it stops it.
    pub running: RunningEmulator,
    /// The URL it actually listens on (differs from `emulator.listen` when that has port 0).
    pub url: String,
    /// Whether `lambda.endpoint_url` named it, and so now points at `url`.
    pub targeted: bool,
}

/// Starts `config`'s `[emulator]` on `listener` and, when the config names it as the Lambda
/// endpoint ([`Config::targets_embedded_emulator`]), points `lambda.endpoint_url` at the
/// address it actually got. Used by `serve` and by `check-config --discover`.
pub async fn start_embedded_emulator(
    config: &mut Config,
    listener: TcpListener,
) -> std::io::Result<EmbeddedEmulator> {
    let running = emulator::spawn(config.emulator.clone(), listener).await?;
    let url = running.endpoint_url();
    let targeted = config.retarget_embedded_emulator(&url);
    Ok(EmbeddedEmulator {
        running,
        url,
        targeted,
    })
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
