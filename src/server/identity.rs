//! Who a request is: the key its admission is counted against.
//!
//! - `api_key` / `header`: the value of `identity.header`. Without it, a request counts
//!   against the shared anonymous key [`ANONYMOUS`] — unless `require_known_key` is set,
//!   when a missing key is `401` and a key in no plan is `403`, before any limiter state
//!   exists for it.
//! - `ip`: the socket peer's address. Only when the peer is inside `trusted_proxies` is
//!   `X-Forwarded-For` read, walking from the right past trusted hops; the first untrusted
//!   hop is the client. A client-supplied header from an untrusted peer is ignored.
//! - `aws_access_key`: the access key id of an AWS Signature Version 4 `Authorization`
//!   header (`AWS4-HMAC-SHA256 Credential=AKID/date/region/service/aws4_request, ...`), as
//!   every AWS SDK signs its requests, so per-tenant limits need no change to SDK clients.
//!   The signature is not verified (the sidecar holds no client secrets): whoever can reach
//!   the listener can claim any access key id. A missing header is treated as a missing key;
//!   one that is not a SigV4 credential is refused as malformed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;

use crate::config::{IdentityConfig, IdentitySource};

/// The key shared by requests that carry none (when keys are not required).
pub use crate::limit::ANONYMOUS_KEY as ANONYMOUS;
/// Longest accepted key; longer values are refused rather than tracked.
pub const MAX_KEY_BYTES: usize = 256;

/// Why a request has no usable key; the data plane maps each to its refusal status.
#[derive(Debug, PartialEq, Eq)]
pub enum IdentityError {
    /// No key header (or an empty one) while `identity.require_known_key` is set.
    Missing,
    /// A key that belongs to no configured plan while `identity.require_known_key` is set.
    Unknown,
    /// A key header that cannot be a key (not visible ASCII, or too long); the text says which.
    Invalid(String),
}

/// Extracts each request's rate-limit key as `[identity]` configures: the client IP, or a
/// header value, optionally required to name a known plan.
#[derive(Clone, Debug)]
pub struct Identify {
    source: IdentitySource,
    header: HeaderName,
    trusted: Vec<IpNet>,
    require_known: bool,
}

impl Identify {
    /// An extractor for a validated `[identity]` section (the header name was checked at
    /// load, so it parses here).
    pub fn new(cfg: &IdentityConfig) -> Self {
        Identify {
            source: cfg.source,
            // A missing SigV4 credential is reported as a missing `Authorization` header.
            header: match cfg.source {
                IdentitySource::AwsAccessKey => http::header::AUTHORIZATION,
                _ => {
                    HeaderName::from_bytes(cfg.header.as_bytes()).expect("validated at config load")
                }
            },
            trusted: cfg.trusted_proxies.clone(),
            require_known: cfg.require_known_key,
        }
    }

    /// The request's key. `is_known` tells whether a key belongs to a plan.
    pub fn key(
        &self,
        headers: &HeaderMap,
        peer: SocketAddr,
        is_known: impl Fn(&str) -> bool,
    ) -> Result<Arc<str>, IdentityError> {
        let key: Arc<str> = match self.source {
            IdentitySource::Ip => client_ip(headers, peer.ip(), &self.trusted)
                .to_string()
                .into(),
            IdentitySource::AwsAccessKey => match headers.get(http::header::AUTHORIZATION) {
                None => {
                    if self.require_known {
                        return Err(IdentityError::Missing);
                    }
                    return Ok(ANONYMOUS.into());
                }
                Some(value) => access_key_id(value.as_bytes())
                    .map_err(|reason| IdentityError::Invalid(reason.to_owned()))?
                    .into(),
            },
            IdentitySource::ApiKey | IdentitySource::Header => {
                match headers.get(&self.header).map(|v| v.to_str().map(str::trim)) {
                    None | Some(Ok("")) => {
                        if self.require_known {
                            return Err(IdentityError::Missing);
                        }
                        return Ok(ANONYMOUS.into());
                    }
                    Some(Err(_)) => {
                        return Err(IdentityError::Invalid(format!(
                            "header {} is not visible ASCII",
                            self.header
                        )))
                    }
                    Some(Ok(value)) => value.into(),
                }
            }
        };
        if key.len() > MAX_KEY_BYTES {
            return Err(IdentityError::Invalid(format!(
                "key is longer than {MAX_KEY_BYTES} bytes"
            )));
        }
        if self.require_known && !is_known(&key) {
            return Err(IdentityError::Unknown);
        }
        Ok(key)
    }

    /// The header a key is read from (named in a missing-key refusal's message).
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// Where the key comes from (`identity.source`).
    pub fn source(&self) -> IdentitySource {
        self.source
    }
}

/// The access key id in a SigV4 `Authorization` header's `Credential=AKID/date/region/
/// service/aws4_request` (the scheme's parameters are comma-separated, in any order).
/// The error says what is wrong with the header.
fn access_key_id(authorization: &[u8]) -> Result<&str, &'static str> {
    const MALFORMED: &str = "the Authorization header is not an AWS Signature Version 4 \
         header (AWS4-HMAC-SHA256 Credential=<access key id>/<date>/<region>/<service>/aws4_request, ...)";
    let text = std::str::from_utf8(authorization).map_err(|_| MALFORMED)?;
    let params = text
        .trim()
        .strip_prefix("AWS4-HMAC-SHA256")
        .filter(|rest| rest.starts_with([' ', '\t']))
        .ok_or(MALFORMED)?;
    let credential = params
        .split(',')
        .map(str::trim)
        .find_map(|param| param.strip_prefix("Credential="))
        .ok_or(MALFORMED)?;
    let mut scope = credential.split('/');
    let key = scope.next().unwrap_or_default();
    // The scope after the key is date, region, service and the `aws4_request` terminator.
    if scope.count() != 4 || !credential.ends_with("/aws4_request") {
        return Err(MALFORMED);
    }
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err("the Authorization header's access key id is empty or not alphanumeric");
    }
    Ok(key)
}

/// The client address: the peer, or — behind trusted proxies — the right-most
/// `X-Forwarded-For` hop that is not itself a trusted proxy.
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(&ip));
    let peer = peer.to_canonical();
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match parse_hop(hop) {
            Some(ip) if is_trusted(ip) => client = ip,
            Some(ip) => return ip,
            // An unparsable hop ends the walk: the trusted hop after it is the best we know.
            None => return client,
        }
    }
    client
}

fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    // `1.2.3.4:5678` and `[::1]:5678` forms.
    hop.parse::<SocketAddr>()
        .ok()
        .map(|s| s.ip().to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = headers(&["1.1.1.1"]);
        assert_eq!(
            client_ip(&h, ip("203.0.113.7"), &trusted),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn rightmost_untrusted_hop_is_the_client_behind_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        // The client forged "6.6.6.6"; its real address was appended by the first proxy.
        let h = headers(&["6.6.6.6, 198.51.100.4", "10.0.0.2"]);
        assert_eq!(client_ip(&h, ip("10.0.0.1"), &trusted), ip("198.51.100.4"));
        let h = headers(&["10.0.0.3"]);
        assert_eq!(client_ip(&h, ip("10.0.0.1"), &trusted), ip("10.0.0.3"));
        let h = headers(&["garbage, 10.0.0.3"]);
        assert_eq!(client_ip(&h, ip("10.0.0.1"), &trusted), ip("10.0.0.3"));
    }

    #[test]
    fn ipv4_mapped_peers_are_canonical() {
        let h = HeaderMap::new();
        assert_eq!(client_ip(&h, ip("::ffff:192.0.2.1"), &[]), ip("192.0.2.1"));
    }

    #[test]
    fn required_keys_refuse_missing_and_unknown_keys() {
        let cfg = IdentityConfig {
            require_known_key: true,
            ..IdentityConfig::default()
        };
        let id = Identify::new(&cfg);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let known = |k: &str| k == "gold";
        assert_eq!(
            id.key(&HeaderMap::new(), peer, known),
            Err(IdentityError::Missing)
        );
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "silver".parse().unwrap());
        assert_eq!(id.key(&h, peer, known), Err(IdentityError::Unknown));
        h.insert("x-api-key", "gold".parse().unwrap());
        assert_eq!(id.key(&h, peer, known).unwrap().as_ref(), "gold");
    }

    const SIGNED: &str = "AWS4-HMAC-SHA256 Credential=AKIDTENANTA/20250101/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc123";

    #[test]
    fn the_access_key_id_is_read_from_a_sigv4_credential() {
        assert_eq!(access_key_id(SIGNED.as_bytes()), Ok("AKIDTENANTA"));
        // Parameters in another order, tab after the scheme.
        let reordered = "AWS4-HMAC-SHA256\tSignedHeaders=host, Signature=0, Credential=AKID2/20250101/eu-west-1/lambda/aws4_request";
        assert_eq!(access_key_id(reordered.as_bytes()), Ok("AKID2"));
    }

    #[test]
    fn malformed_sigv4_credentials_are_refused() {
        for bad in [
            "Bearer token",
            "AWS4-HMAC-SHA256",
            "AWS4-HMAC-SHA256X Credential=A/1/2/3/aws4_request",
            "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=0",
            "AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/lambda",
            "AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/lambda/other",
            "AWS4-HMAC-SHA256 Credential=/20250101/us-east-1/lambda/aws4_request",
            "AWS4-HMAC-SHA256 Credential=AK-ID/20250101/us-east-1/lambda/aws4_request",
        ] {
            assert!(access_key_id(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(access_key_id(b"AWS4-HMAC-SHA256 Credential=\xff/a/b/c/aws4_request").is_err());
    }

    #[test]
    fn aws_access_key_identity_keys_by_access_key_id() {
        let cfg = IdentityConfig {
            source: IdentitySource::AwsAccessKey,
            ..IdentityConfig::default()
        };
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let id = Identify::new(&cfg);
        let mut h = HeaderMap::new();
        h.insert("authorization", SIGNED.parse().unwrap());
        assert_eq!(id.key(&h, peer, |_| false).unwrap().as_ref(), "AKIDTENANTA");
        assert_eq!(
            id.key(&HeaderMap::new(), peer, |_| false).unwrap().as_ref(),
            ANONYMOUS
        );
        h.insert("authorization", "Basic dXNlcg==".parse().unwrap());
        assert!(matches!(
            id.key(&h, peer, |_| false),
            Err(IdentityError::Invalid(_))
        ));
        let required = Identify::new(&IdentityConfig {
            require_known_key: true,
            ..cfg
        });
        assert_eq!(required.header(), &http::header::AUTHORIZATION);
        assert_eq!(
            required.key(&HeaderMap::new(), peer, |_| true),
            Err(IdentityError::Missing)
        );
        h.insert("authorization", SIGNED.parse().unwrap());
        assert_eq!(
            required.key(&h, peer, |k| k == "other"),
            Err(IdentityError::Unknown)
        );
    }

    #[test]
    fn without_required_keys_a_missing_key_is_anonymous() {
        let id = Identify::new(&IdentityConfig::default());
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            id.key(&HeaderMap::new(), peer, |_| false).unwrap().as_ref(),
            ANONYMOUS
        );
    }
}
