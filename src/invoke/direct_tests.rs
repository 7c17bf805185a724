use std::sync::atomic::{AtomicUsize, Ordering};

use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::future::ProvideCredentials as CredentialsFuture;
use aws_credential_types::Credentials;
use http::HeaderMap;

use super::*;
use crate::invoke::MAX_RETRY_AFTER;

fn client(endpoint: &str) -> DirectClient {
    let cfg = LambdaConfig {
        region: "eu-west-1".to_owned(),
        ..LambdaConfig::default()
    };
    DirectClient::new(
        &cfg,
        endpoint,
        Some(SharedCredentialsProvider::new(Credentials::new(
            "AKID", "secret", None, None, "test",
        ))),
    )
    .expect("a client")
}

/// An `Event` invoke of `orders` in eu-west-1, signed with credentials that carry session
/// `token`.
async fn event_signed_with_token(token: &str) -> Request<Full<Bytes>> {
    let cfg = LambdaConfig {
        region: "eu-west-1".to_owned(),
        ..LambdaConfig::default()
    };
    let direct = DirectClient::new(
        &cfg,
        "http://127.0.0.1:9001",
        Some(SharedCredentialsProvider::new(Credentials::new(
            "ASIAEXAMPLE",
            "secret",
            Some(token.to_owned()),
            None,
            "test",
        ))),
    )
    .expect("a client");
    let target = direct.target("orders").expect("a target");
    signed(&direct, &target, Invocation::Event).await
}

/// `direct`'s request for an invoke of `target` with the payload `{}`, signed at our time.
async fn signed(
    direct: &DirectClient,
    target: &Target,
    invocation: Invocation,
) -> Request<Full<Bytes>> {
    direct
        .signed(target, Bytes::from_static(b"{}"), invocation, 0)
        .await
        .expect("a signed request")
}

#[tokio::test]
async fn the_invoke_uri_is_built_once_and_percent_encodes_what_the_sdk_encodes() {
    let direct = client("http://127.0.0.1:9001/");
    assert_eq!(
        direct.target("orders").unwrap().text,
        "http://127.0.0.1:9001/2015-03-31/functions/orders/invocations"
    );
    let arn = direct
        .target("arn:aws:lambda:eu-west-1:123456789012:function:orders:live")
        .unwrap();
    assert_eq!(
        arn.text,
        "http://127.0.0.1:9001/2015-03-31/functions/arn%3Aaws%3Alambda%3Aeu-west-1%3A123456789012%3Afunction%3Aorders%3Alive/invocations"
    );
    assert_eq!(
        arn.uri.to_string(),
        arn.text,
        "the URI sent is the one signed"
    );
    assert_eq!(direct.host, "127.0.0.1:9001");
}

#[tokio::test]
async fn an_https_endpoint_needs_root_certificates_and_says_so_when_there_are_none() {
    // Building an https client loads the machine's root certificates; without them the error
    // must say so at start-up rather than fail on the first invoke.
    match DirectClient::new(
        &LambdaConfig::default(),
        "https://lambda.eu-west-1.amazonaws.com",
        Some(SharedCredentialsProvider::new(Credentials::new(
            "AKID", "secret", None, None, "test",
        ))),
    ) {
        Ok(direct) => assert_eq!(direct.host, "lambda.eu-west-1.amazonaws.com"),
        Err(e) => assert!(e.to_string().contains("root certificates"), "{e}"),
    }
}

#[tokio::test]
async fn an_endpoint_that_is_not_a_uri_or_has_no_host_is_refused_by_name() {
    for bad in ["not a url", "/just/a/path"] {
        let err = DirectClient::new(
            &LambdaConfig::default(),
            bad,
            Some(SharedCredentialsProvider::new(Credentials::new(
                "AKID", "secret", None, None, "test",
            ))),
        )
        .err()
        .unwrap_or_else(|| panic!("{bad:?} was accepted"));
        assert!(err.to_string().contains("the Lambda endpoint"), "{err}");
    }
    let err = DirectClient::new(&LambdaConfig::default(), "http://127.0.0.1:9001", None)
        .err()
        .expect("no credentials provider is refused");
    assert!(err.to_string().contains("credentials"), "{err}");
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            )
        })
        .collect()
}

#[test]
fn error_codes_are_read_from_the_header_or_the_body_without_namespace_or_suffix() {
    let throttle = read_error(
        429,
        &headers(&[
            (
                "x-amzn-errortype",
                "TooManyRequestsException:http://internal.amazon.com/coral/com.amazonaws.lambda/",
            ),
            ("retry-after", "3"),
        ]),
        br#"{"Reason":"ReservedFunctionConcurrentInvocationLimitExceeded","Type":"User","message":"Rate Exceeded."}"#,
    );
    assert_eq!(
        throttle.classify(),
        InvokeFailure::Throttled {
            reason: "ReservedFunctionConcurrentInvocationLimitExceeded".into(),
            message: "Rate Exceeded.".into(),
            retry_after: Some(Duration::from_secs(3)),
        }
    );
    let from_body = read_error(
        429,
        &HeaderMap::new(),
        br#"{"__type":"com.amazonaws.lambda#TooManyRequestsException","message":"slow down"}"#,
    );
    assert_eq!(
        from_body.classify(),
        InvokeFailure::Throttled {
            reason: "Unknown".into(),
            message: "slow down".into(),
            retry_after: None,
        }
    );
    let not_found = read_error(
        404,
        &headers(&[("x-amzn-errortype", "ResourceNotFoundException")]),
        br#"{"Type":"User","Message":"Function not found"}"#,
    );
    assert_eq!(
        not_found.classify(),
        InvokeFailure::Rejected {
            kind: "ResourceNotFoundException".into(),
            message: "Function not found".into(),
        }
    );
    let too_large = read_error(
        413,
        &headers(&[("x-amzn-errortype", "RequestTooLargeException")]),
        b"{}",
    );
    assert!(matches!(
        too_large.classify(),
        InvokeFailure::TooLarge { .. }
    ));
}

#[test]
fn garbage_from_lambda_is_classified_by_status_and_never_trusted() {
    // A 5xx without a Lambda error code came from something in between, which may have
    // forwarded the request: unknown, not "nothing ran".
    let bad_gateway = read_error(502, &HeaderMap::new(), b"<html>bad gateway</html>");
    assert!(matches!(
        bad_gateway.classify(),
        InvokeFailure::OutcomeUnknown {
            cause: UnknownCause::UnexplainedServerError,
            ..
        }
    ));
    let service = read_error(
        500,
        &headers(&[("x-amzn-errortype", "ServiceException")]),
        b"{}",
    );
    assert!(matches!(
        service.classify(),
        InvokeFailure::Unavailable { .. }
    ));
    // Both spellings of a field in one body: neither is lost.
    let both = read_error(
        429,
        &headers(&[("x-amzn-errortype", "TooManyRequestsException")]),
        br#"{"message":"a","Message":"b","Reason":"ReservedFunctionConcurrentInvocationLimitExceeded","__type":"x","code":"y"}"#,
    );
    assert_eq!(
        both.classify(),
        InvokeFailure::Throttled {
            reason: "ReservedFunctionConcurrentInvocationLimitExceeded".into(),
            message: "a".into(),
            retry_after: None,
        }
    );
    let teapot = read_error(418, &HeaderMap::new(), b"\xff\xfe not json");
    assert_eq!(
        teapot.classify(),
        InvokeFailure::Rejected {
            kind: "Unknown".into(),
            message: String::new(),
        }
    );
    let absurd = read_error(
        429,
        &headers(&[
            ("x-amzn-errortype", "TooManyRequestsException"),
            ("retry-after", "1e300"),
        ]),
        b"[1,2,3]",
    );
    assert_eq!(absurd.classify().retry_after(), Some(MAX_RETRY_AFTER));
}

/// Counts its calls and hands out credentials that expire `expires_in` after each call; from
/// its `fail_from`-th call on it fails (or, with `hang`, never answers).
#[derive(Debug)]
struct Counting {
    calls: AtomicUsize,
    expires_in: Option<Duration>,
    fail_from: usize,
    hang: bool,
}

impl ProvideCredentials for Counting {
    fn provide_credentials<'a>(&'a self) -> CredentialsFuture<'a>
    where
        Self: 'a,
    {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call >= self.fail_from {
            if self.hang {
                return CredentialsFuture::new(std::future::pending());
            }
            return CredentialsFuture::ready(Err(CredentialsError::not_loaded("no chain")));
        }
        let expiry = self.expires_in.map(|d| SystemTime::now() + d);
        CredentialsFuture::ready(Ok(Credentials::new("AKID", "secret", None, expiry, "test")))
    }
}

fn counting(expires_in: Option<Duration>, fail: bool) -> (Arc<Counting>, CredentialsCache) {
    counting_from(expires_in, if fail { 0 } else { usize::MAX }, false)
}

fn counting_from(
    expires_in: Option<Duration>,
    fail_from: usize,
    hang: bool,
) -> (Arc<Counting>, CredentialsCache) {
    let provider = Arc::new(Counting {
        calls: AtomicUsize::new(0),
        expires_in,
        fail_from,
        hang,
    });
    let shared = SharedCredentialsProvider::new(CountingRef(Arc::clone(&provider)));
    (provider, CredentialsCache::new(shared))
}

#[derive(Debug)]
struct CountingRef(Arc<Counting>);

impl ProvideCredentials for CountingRef {
    fn provide_credentials<'a>(&'a self) -> CredentialsFuture<'a>
    where
        Self: 'a,
    {
        self.0.provide_credentials()
    }
}

#[tokio::test]
async fn credentials_are_fetched_once_and_reused_until_close_to_expiry() {
    let (provider, cache) = counting(Some(Duration::from_secs(3600)), false);
    let lookups = (0..50).map(|_| cache.identity());
    for identity in futures_util::future::join_all(lookups).await {
        identity.expect("credentials");
    }
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1);

    let (provider, cache) = counting(None, false);
    for _ in 0..5 {
        cache.identity().await.expect("credentials");
    }
    assert_eq!(
        provider.calls.load(Ordering::SeqCst),
        1,
        "credentials without expiry"
    );
}

#[tokio::test]
async fn credentials_close_to_expiry_are_reused_for_a_short_while_and_expired_ones_never() {
    // Expiring within the refresh margin: kept for the minimum interval, not fetched per call.
    let (provider, cache) = counting(Some(Duration::from_secs(60)), false);
    for _ in 0..5 {
        cache.identity().await.expect("credentials");
    }
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1);
    // Already expired when handed out: asked again every time.
    let (provider, cache) = counting(Some(Duration::ZERO), false);
    for _ in 0..3 {
        cache.identity().await.expect("credentials");
    }
    assert_eq!(provider.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn no_credentials_is_an_invoke_that_was_never_sent() {
    let (_, cache) = counting(None, true);
    let failure = cache.identity().await.err().expect("no credentials");
    assert!(
        matches!(&failure, InvokeFailure::Unavailable { message } if message.contains("no AWS credentials")),
        "{failure:?}"
    );
    assert!(failure.is_retryable(false) && !failure.may_have_run());
}

#[tokio::test]
async fn a_failed_refresh_keeps_unexpired_credentials_and_is_not_retried_per_invoke() {
    // Expiring within the refresh margin, so every lookup after the first wants a refresh;
    // the provider fails from its second call on.
    let (provider, cache) = counting_from(Some(Duration::from_secs(120)), 1, false);
    cache.identity().await.expect("the first fetch");
    // Past the minimum interval the cache asks again; the failure leaves the old credentials.
    let cached = cache.current.load_full().expect("cached");
    cache.current.store(Some(Arc::new(Cached {
        identity: cached.identity.clone(),
        credentials: cached.credentials.clone(),
        keys: KeyCache::default(),
        expiry: cached.expiry,
        refresh_after: SystemTime::now() - Duration::from_secs(1),
    })));
    for _ in 0..5 {
        cache
            .identity()
            .await
            .expect("still-valid credentials are kept");
    }
    assert_eq!(
        provider.calls.load(Ordering::SeqCst),
        2,
        "one failed refresh, then held off"
    );
}

#[tokio::test]
async fn without_usable_credentials_a_failure_is_held_briefly_instead_of_asked_again() {
    let (provider, cache) = counting(None, true);
    for _ in 0..5 {
        cache.identity().await.err().expect("no credentials");
    }
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_provider_that_hangs_is_given_up_on_and_the_invoke_was_never_sent() {
    let (_, cache) = counting_from(None, 0, true);
    let started = tokio::time::Instant::now();
    let failure = cache.identity().await.err().expect("no credentials");
    assert_eq!(started.elapsed(), CREDENTIALS_TIMEOUT);
    assert!(
        matches!(&failure, InvokeFailure::Unavailable { message } if message.contains("did not answer")),
        "{failure:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_connect_that_does_not_finish_fails_at_the_connect_timeout_as_a_connect_error() {
    use tower::Service;
    let never = tower::service_fn(|_: Uri| std::future::pending::<Result<(), std::io::Error>>());
    let mut connect = TimedConnect {
        inner: never,
        timeout: Duration::from_secs(3),
    };
    let started = tokio::time::Instant::now();
    let err = connect
        .call(Uri::from_static("https://lambda.eu-west-1.amazonaws.com"))
        .await
        .expect_err("no connection");
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    let io = err
        .downcast_ref::<std::io::Error>()
        .expect("an io::Error, which hyper-util reports as a connect error");
    assert_eq!(io.kind(), std::io::ErrorKind::TimedOut);
}

#[tokio::test]
async fn a_session_token_is_sent_and_signed() {
    let request = event_signed_with_token("the-session-token").await;
    let headers = request.headers();
    assert_eq!(headers["x-amz-security-token"], "the-session-token");
    assert_eq!(headers["x-amz-invocation-type"], "Event");
    assert_eq!(headers["host"], "127.0.0.1:9001");
    let authorization = headers["authorization"].to_str().expect("ASCII");
    assert!(
        authorization.starts_with("AWS4-HMAC-SHA256 Credential=ASIAEXAMPLE/")
            && authorization.contains("/eu-west-1/lambda/aws4_request")
            && authorization.contains(
                "SignedHeaders=content-type;host;x-amz-date;x-amz-invocation-type;x-amz-security-token"
            ),
        "{authorization}"
    );
}

/// Signature headers, sorted by name.
type SignatureHeaders = Vec<(String, String)>;

/// The direct signer's headers for an invoke of `target`, and `aws-sigv4`'s, sorted.
fn both_signatures(
    direct: &DirectClient,
    target: &Target,
    credentials: &Credentials,
    keys: &KeyCache,
    invocation: &str,
    payload: &[u8],
    time: SystemTime,
) -> (SignatureHeaders, SignatureHeaders) {
    let shape = target
        .shape
        .as_ref()
        .expect("the direct signer signs this target");
    let identity = Identity::new(credentials.clone(), None);
    let reference = direct
        .reference_signature(&target.text, &identity, invocation, payload, time)
        .expect("aws-sigv4 signs");
    let mut theirs: SignatureHeaders = reference
        .headers()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    theirs.sort();
    let Some(signed) = shape.sign(credentials, keys, &direct.region, invocation, payload, time)
    else {
        // Declined (a token with whitespace around it): the invoke is signed by aws-sigv4.
        let token = credentials
            .session_token()
            .expect("only a token is declined");
        assert_ne!(token.trim(), token, "declined without a reason");
        return (theirs.clone(), theirs);
    };
    let ours = signed
        .pairs()
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    (ours, theirs)
}

#[tokio::test]
async fn a_function_whose_shape_disagrees_with_aws_sigv4_is_signed_by_it() {
    let mut direct = client("http://127.0.0.1:9001");
    // A setting the direct signer does not follow: aws-sigv4 then also signs the payload's
    // hash as a header, so the shapes disagree.
    direct.settings.payload_checksum_kind =
        aws_sigv4::http_request::PayloadChecksumKind::XAmzSha256;
    let target = direct.target("orders").expect("a target");
    assert!(target.shape.is_none(), "the check found the disagreement");
    let request = signed(&direct, &target, Invocation::RequestResponse).await;
    assert!(
        request.headers().contains_key("x-amz-content-sha256"),
        "signed by aws-sigv4: {:?}",
        request.headers()
    );
    let authorization = request.headers()["authorization"].to_str().expect("ASCII");
    assert!(
        authorization.contains("x-amz-content-sha256"),
        "{authorization}"
    );
}

#[tokio::test]
async fn a_session_token_with_whitespace_around_it_is_signed_by_aws_sigv4() {
    let direct = client("http://127.0.0.1:9001");
    let target = direct.target("orders").expect("a target");
    let shape = target.shape.as_ref().expect("a shape");
    for token in [" abc", "abc ", "\tabc"] {
        let credentials = Credentials::new("AKID", "secret", Some(token.to_owned()), None, "t");
        let signed = shape.sign(
            &credentials,
            &KeyCache::default(),
            &direct.region,
            "Event",
            b"{}",
            SystemTime::now(),
        );
        assert!(
            signed.is_none(),
            "{token:?} was signed by the direct signer"
        );
    }
    // The whole invoke is signed (by aws-sigv4), with the token as it is.
    let request = event_signed_with_token("abc ").await;
    assert!(request.headers().contains_key("authorization"));
}

#[tokio::test]
async fn names_arns_and_qualifiers_are_signed_by_the_direct_signer() {
    let direct = client("http://127.0.0.1:9001");
    for function in [
        "orders",
        "orders:live",
        "arn:aws:lambda:eu-west-1:123456789012:function:orders",
        "arn:aws:lambda:eu-west-1:123456789012:function:orders:$LATEST",
        "123456789012:function:orders:7",
    ] {
        let target = direct.target(function).expect("a target");
        assert!(target.shape.is_some(), "{function}: fell back to aws-sigv4");
    }
}

#[tokio::test]
async fn a_path_the_direct_signer_would_have_to_normalise_is_signed_by_aws_sigv4() {
    let direct = client("http://127.0.0.1:9001");
    let target = direct.target("..").expect("a target");
    assert!(
        target.shape.is_none(),
        "a `..` segment is normalised by aws-sigv4 alone"
    );
    let request = signed(&direct, &target, Invocation::RequestResponse).await;
    let authorization = request.headers()["authorization"].to_str().expect("ASCII");
    assert!(
        authorization.starts_with("AWS4-HMAC-SHA256 Credential=AKID/"),
        "{authorization}"
    );
    assert!(request.headers().contains_key("x-amz-date"));
}

#[tokio::test]
async fn the_cached_signing_key_is_the_days_own_across_midnight() {
    let direct = client("http://127.0.0.1:9001");
    let target = direct.target("orders").expect("a target");
    let credentials = Credentials::new("AKID", "secret", None, None, "test");
    let keys = KeyCache::default();
    // 2024-02-29 23:59:59 UTC, then one second later (1 March), then back.
    let before = SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_251_199);
    for time in [before, before + Duration::from_secs(1), before] {
        let (ours, theirs) =
            both_signatures(&direct, &target, &credentials, &keys, "Event", b"{}", time);
        assert_eq!(ours, theirs, "at {time:?}");
    }
    let (ours, _) = both_signatures(
        &direct,
        &target,
        &credentials,
        &keys,
        "Event",
        b"{}",
        before,
    );
    assert!(ours
        .iter()
        .any(|(name, value)| name == "x-amz-date" && value == "20240229T235959Z"));
}

mod signatures {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The direct signer and `aws-sigv4` agree on any function, time (1970–2199),
        /// payload, invocation type and credentials, with or without a session token.
        #[test]
        fn the_direct_signer_signs_as_aws_sigv4_does(
            function in "[A-Za-z0-9_-]{1,40}(:[A-Za-z0-9_$-]{1,20})?",
            secs in 0u64..7_258_118_400,
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            event in any::<bool>(),
            secret in "[A-Za-z0-9/+=]{1,40}",
            token in proptest::option::of("[ \t]?[A-Za-z0-9/+=]{1,60}[ \t]?"),
            region in "(us-east-1|eu-west-1|ap-southeast-2|cn-north-1|us-gov-west-1)",
        ) {
            let cfg = LambdaConfig { region, ..LambdaConfig::default() };
            let direct = DirectClient::new(
                &cfg,
                "http://127.0.0.1:9001",
                Some(SharedCredentialsProvider::new(Credentials::new("AKID", "x", None, None, "t"))),
            )
            .expect("a client");
            let target = direct.target(&function).expect("a target");
            let credentials = Credentials::new("AKIDEXAMPLE", secret, token, None, "test");
            let invocation = if event { "Event" } else { "RequestResponse" };
            let time = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            let (ours, theirs) = both_signatures(
                &direct, &target, &credentials, &KeyCache::default(), invocation, &payload, time,
            );
            prop_assert_eq!(ours, theirs);
        }
    }
}

#[test]
fn the_service_clock_offset_is_read_from_date_against_the_round_trips_midpoint() {
    let sent = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_547_200); // 2025-12-01 00:00:00
    let received = sent + Duration::from_secs(2);
    let date = |secs: u64| httpdate::fmt_http_date(sent + Duration::from_secs(secs));
    // The midpoint is sent + 1 s: a Date of sent + 3601 s is an hour ahead.
    assert_eq!(
        clock_skew(Some(&date(3601)), false, sent, received),
        Some(3_600_000)
    );
    let behind = httpdate::fmt_http_date(sent - Duration::from_secs(3599));
    assert_eq!(
        clock_skew(Some(&behind), false, sent, received),
        Some(-3_600_000)
    );
    assert_eq!(
        clock_skew(Some(&date(3601)), true, sent, received),
        None,
        "from a cache"
    );
    assert_eq!(clock_skew(Some("yesterday"), false, sent, received), None);
    assert_eq!(clock_skew(None, false, sent, received), None);
    // Lambda dates an answer when it ends: a long invoke's `Date` says little about the clock.
    let slow = sent + Duration::from_secs(11);
    assert_eq!(
        clock_skew(Some(&date(3601)), false, sent, slow),
        None,
        "an 11 s round trip"
    );
    let quick = sent + Duration::from_secs(9);
    assert!(
        clock_skew(Some(&date(3601)), false, sent, quick).is_some(),
        "a 9 s round trip"
    );
}

#[test]
fn a_signature_refused_for_a_skewed_clock_is_retried_and_a_wrong_one_is_not() {
    let failure = |code: &str, skew_ms: Option<i64>| ServiceFailure {
        status: 403,
        code: code.to_owned(),
        message: "Signature expired: 20261201T100000Z is now earlier than 20261201T105500Z"
            .to_owned(),
        reason: None,
        retry_after: None,
        skew_ms,
    };
    for code in [
        "InvalidSignatureException",
        "RequestTimeTooSkewed",
        "SignatureDoesNotMatch",
    ] {
        for skew in [3_600_000, -3_600_000] {
            let classified = failure(code, Some(skew)).classify();
            assert!(
                matches!(&classified, InvokeFailure::Unavailable { message } if message.contains("3600 s off")),
                "{code} {skew}: {classified:?}"
            );
        }
        // Within the SDK's 4 minutes, or without a Date: the credentials' fault, not the clock's.
        for skew in [Some(60_000), Some(-239_000), Some(240_000), None] {
            let classified = failure(code, skew).classify();
            assert!(
                matches!(&classified, InvokeFailure::Rejected { kind, .. } if kind == code),
                "{code} {skew:?}: {classified:?}"
            );
        }
    }
    // A permission error is never retried as a clock's, however skewed the clock.
    for code in ["ResourceNotFoundException", "AccessDeniedException"] {
        let classified = failure(code, Some(3_600_000)).classify();
        assert!(
            matches!(classified, InvokeFailure::Rejected { .. }),
            "{code}: {classified:?}"
        );
    }
}

#[tokio::test]
async fn a_garbage_date_near_year_9999_does_not_move_the_signing_time() {
    let direct = client("http://127.0.0.1:9001");
    let target = direct.target("orders").expect("a target");
    let now = SystemTime::now();
    let skew = clock_skew(Some("Fri, 31 Dec 9999 23:59:59 GMT"), false, now, now)
        .expect("a readable Date");
    // Signed a second later, the shift would pass 9999, where the signer's date formatting
    // panics. The shift is not applied: the request is signed at our time.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for skew in [skew, i64::MAX, i64::MIN] {
        let request = direct
            .signed(&target, Bytes::from_static(b"{}"), Invocation::Event, skew)
            .await
            .expect("a signed request");
        let date = request.headers()["x-amz-date"].to_str().expect("ASCII");
        let ours = httpdate::fmt_http_date(SystemTime::now());
        assert!(
            date.starts_with(&ours[12..16]),
            "{skew}: signed at {date}, our year is {}",
            &ours[12..16]
        );
    }
}
