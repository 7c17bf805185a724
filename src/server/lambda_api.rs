//! The Lambda Invoke API as a front door: `POST /2015-03-31/functions/{FunctionName}/invocations`
//! on the data-plane listener, answered as Lambda answers, so a service that calls Lambda
//! through an AWS SDK adopts the sidecar by pointing its `endpoint_url` at it.
//!
//! `FunctionName` (percent-decoded) may be a name, a partial ARN (`123456789012:function:f`)
//! or an ARN, with a qualifier in it or in `?Qualifier=`. It resolves to the first route, in
//! config order, that invokes that function ([`Targets`], built once per app): names must
//! be equal, qualifiers too when either side names one (`$LATEST` is none), and account and
//! region when both sides name them. Any other function is Lambda's `404
//! ResourceNotFoundException`: no client can make the sidecar invoke a function it was not
//! configured for.
//!
//! A call then takes the route's path as a record does — identity, admission (all layers,
//! one token), the body read and checked, the route's batcher, invoke gate, retries and
//! dead letters — with `intake`'s steps, and is answered by `X-Amz-Invocation-Type`:
//!
//! - `RequestResponse` (default): the function's result for this record as the payload
//!   (with `envelope = "batch"` each caller of a coalesced batch gets its own record's
//!   result); a record the function failed comes back `200` with `X-Amz-Function-Error`.
//!   Refused on a route with `invocation = "event"`, which has no result to give.
//! - `Event`: `202` once the record was delivered (accepted by Lambda on an `event` route;
//!   run on a `request_response` route, whatever its result).
//! - `DryRun`: `204` after identity and the body checks; nothing invoked, no token spent.
//!
//! Statuses, error types and bodies are chosen in [`respond`] ([`respond::lambda_error`]);
//! this module adds the headers every answer carries: `x-amzn-RequestId` (the request id)
//! and, on a `200`, `X-Amz-Executed-Version` (the route's qualifier, else `$LATEST`).
//! `X-Amz-Log-Type: Tail` gets no `X-Amz-Log-Result` (the sidecar has no truthful log tail
//! of a batched run), and `X-Amz-Client-Context` is not forwarded (a batch has one
//! context, not one per record).

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use hyper::body::Incoming;

use super::app::App;
use super::intake;
use super::records::REQUEST_ID;
use super::respond::{self, LambdaRefusal, RequestError, Response};
use super::IdentityError;
use crate::coalesce::RecordError;
use crate::config::{Config, IdentitySource, Invocation, LAMBDA_INVOKE_PREFIX};

const X_AMZN_REQUEST_ID: HeaderName = HeaderName::from_static("x-amzn-requestid");
const X_AMZ_EXECUTED_VERSION: HeaderName = HeaderName::from_static("x-amz-executed-version");
const X_AMZ_INVOCATION_TYPE: &str = "x-amz-invocation-type";
/// The account named in a not-found function's ARN when the caller named none: AWS's own
/// documentation placeholder (the sidecar does not know the caller's account).
const PLACEHOLDER_ACCOUNT: &str = "123456789012";

/// Whether `path` is the Invoke API's, served by [`serve`].
pub(super) fn is_invoke_path(path: &str) -> bool {
    path.starts_with(LAMBDA_INVOKE_PREFIX)
}

/// A function as an Invoke call or a route names it: name, partial ARN or ARN, with an
/// optional qualifier (version or alias).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct FunctionRef {
    region: Option<String>,
    account: Option<String>,
    name: String,
    qualifier: Option<String>,
}

impl FunctionRef {
    /// Reads `arn:<partition>:lambda:<region>:<account>:function:<name>[:<qualifier>]`,
    /// `<account>:function:<name>[:<qualifier>]` or `<name>[:<qualifier>]`; `None` when
    /// `text` is none of them (or the name or qualifier holds characters Lambda refuses).
    pub(super) fn parse(text: &str) -> Option<FunctionRef> {
        let parts: Vec<&str> = text.split(':').collect();
        let (region, account, rest) = match parts.as_slice() {
            ["arn", _partition, "lambda", region, account, "function", rest @ ..] => {
                (Some(*region), Some(*account), rest)
            }
            [account, "function", rest @ ..] => (None, Some(*account), rest),
            rest => (None, None, rest),
        };
        let (name, qualifier) = match rest {
            [name] => (*name, None),
            [name, qualifier] => (*name, Some(*qualifier)),
            _ => return None,
        };
        let name_ok = !name.is_empty()
            && name.len() <= 140
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let qualifier_ok = qualifier.is_none_or(|q| {
            !q.is_empty()
                && q.len() <= 128
                && q.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'$'))
        });
        let part_ok = |p: Option<&str>| p.is_none_or(|p| !p.is_empty());
        if !name_ok || !qualifier_ok || !part_ok(region) || !part_ok(account) {
            return None;
        }
        Some(FunctionRef {
            region: region.map(str::to_owned),
            account: account.map(str::to_owned),
            name: name.to_owned(),
            // `$LATEST` is what an unqualified call runs.
            qualifier: qualifier.filter(|q| *q != "$LATEST").map(str::to_owned),
        })
    }

    /// Whether a call naming `self` reaches a route invoking `route`.
    fn reaches(&self, route: &FunctionRef) -> bool {
        let agree = |a: &Option<String>, b: &Option<String>| match (a, b) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        self.name == route.name
            && self.qualifier == route.qualifier
            && agree(&self.account, &route.account)
            && agree(&self.region, &route.region)
    }

    /// The function's ARN, as Lambda names it in a not-found message.
    fn arn(&self, default_region: &str) -> String {
        let region = self.region.as_deref().unwrap_or(default_region);
        let account = self.account.as_deref().unwrap_or(PLACEHOLDER_ACCOUNT);
        match &self.qualifier {
            Some(q) => format!(
                "arn:aws:lambda:{region}:{account}:function:{}:{q}",
                self.name
            ),
            None => format!("arn:aws:lambda:{region}:{account}:function:{}", self.name),
        }
    }
}

/// Which route serves each function reachable through the Invoke API: built once per app
/// (so a reload rebuilds it with the routes), looked up on every call.
pub(super) struct Targets {
    /// `(function, route index)` in config order: the first match wins.
    routes: Vec<(FunctionRef, usize)>,
    region: String,
}

impl Targets {
    /// The targets of `config`'s routes. A route whose `function` is no function reference
    /// (a name with characters Lambda refuses) is reachable only through its own path.
    pub(super) fn new(config: &Config) -> Targets {
        Targets {
            routes: config
                .routes
                .iter()
                .enumerate()
                .filter_map(|(index, route)| Some((FunctionRef::parse(&route.function)?, index)))
                .collect(),
            region: config.lambda.region.clone(),
        }
    }

    /// The index of the first route invoking `function`.
    fn resolve(&self, function: &FunctionRef) -> Option<usize> {
        self.routes
            .iter()
            .find(|(route, _)| function.reaches(route))
            .map(|(_, index)| *index)
    }
}

/// `X-Amz-Invocation-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InvocationType {
    RequestResponse,
    Event,
    DryRun,
}

impl InvocationType {
    fn of(headers: &HeaderMap) -> Result<Self, LambdaRefusal> {
        match headers
            .get(X_AMZ_INVOCATION_TYPE)
            .map(HeaderValue::as_bytes)
        {
            None | Some(b"RequestResponse") => Ok(Self::RequestResponse),
            Some(b"Event") => Ok(Self::Event),
            Some(b"DryRun") => Ok(Self::DryRun),
            Some(other) => Err(LambdaRefusal::InvalidInvocationType {
                value: String::from_utf8_lossy(other).into_owned(),
            }),
        }
    }
}

/// Why a call is not answered with its result: a Lambda request error, or one of a
/// record's.
enum Refused {
    Lambda(LambdaRefusal),
    Request(RequestError),
}

impl From<LambdaRefusal> for Refused {
    fn from(refusal: LambdaRefusal) -> Self {
        Refused::Lambda(refusal)
    }
}

impl From<RequestError> for Refused {
    fn from(error: RequestError) -> Self {
        Refused::Request(error)
    }
}

impl From<crate::limit::Rejected> for Refused {
    fn from(rejected: crate::limit::Rejected) -> Self {
        Refused::Request(rejected.into())
    }
}

impl Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Lambda(refusal) => refusal.into_response(),
            Refused::Request(error) => respond::lambda_error(error),
        }
    }
}

/// Serves one Invoke API request and counts it on the route it resolved to.
pub(super) async fn serve(app: &App, request: Request<Incoming>, peer: SocketAddr) -> Response {
    let request_id = request.headers().get(REQUEST_ID).cloned();
    let (route, mut response) = match target(app, &request) {
        Err(refusal) => (None, refusal.into_response()),
        Ok(index) => {
            let response = invoke(app, index, request, peer)
                .await
                .unwrap_or_else(Refused::into_response);
            (Some(index), response)
        }
    };
    if let Some(index) = route {
        let entry = &app.routes[index];
        entry.endpoint.counters().count(&response);
        if response.status() == StatusCode::OK {
            response.headers_mut().insert(
                X_AMZ_EXECUTED_VERSION,
                executed_version(&entry.config.function),
            );
        }
    }
    if let Some(id) = request_id {
        response.headers_mut().insert(X_AMZN_REQUEST_ID, id);
    }
    response
}

/// The version a route's calls run: its qualifier as the route names it, else `$LATEST`.
/// (An alias is reported as named; Lambda would give the version it points to.)
fn executed_version(function: &str) -> HeaderValue {
    FunctionRef::parse(function)
        .and_then(|f| f.qualifier)
        .and_then(|q| HeaderValue::from_str(&q).ok())
        .unwrap_or(HeaderValue::from_static("$LATEST"))
}

/// The route serving the request's function: method, path and qualifier checked.
fn target(app: &App, request: &Request<Incoming>) -> Result<usize, LambdaRefusal> {
    let path = request.uri().path();
    let name = path
        .strip_prefix(LAMBDA_INVOKE_PREFIX)
        .and_then(|rest| rest.strip_suffix("/invocations"))
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .ok_or(LambdaRefusal::UnknownOperation)?;
    if request.method() != Method::POST {
        return Err(LambdaRefusal::UnknownOperation);
    }
    let not_a_name = || {
        LambdaRefusal::InvalidParameter(format!(
            "FunctionName {name:?} is not a function name, partial ARN or ARN"
        ))
    };
    let decoded = percent_decode(name).ok_or_else(not_a_name)?;
    let mut function = FunctionRef::parse(&decoded).ok_or_else(not_a_name)?;
    if let Some(qualifier) = query_param(request.uri().query().unwrap_or(""), "Qualifier")? {
        let qualifier = Some(qualifier).filter(|q| q != "$LATEST");
        match &function.qualifier {
            Some(named) if Some(named) != qualifier.as_ref() => {
                return Err(LambdaRefusal::InvalidParameter(
                    "The derived qualifier from the function name does not match the specified qualifier."
                        .to_owned(),
                ))
            }
            _ => function.qualifier = qualifier,
        }
    }
    app.invoke_targets
        .resolve(&function)
        .ok_or_else(|| LambdaRefusal::FunctionNotFound {
            arn: function.arn(&app.invoke_targets.region),
        })
}

/// The call on route number `index`: identity, then by invocation type.
async fn invoke(
    app: &App,
    index: usize,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response, Refused> {
    let entry = &app.routes[index];
    let route = &entry.record;
    let (parts, body) = request.into_parts();
    let kind = InvocationType::of(&parts.headers)?;
    if kind == InvocationType::RequestResponse && entry.config.invocation == Invocation::Event {
        return Err(LambdaRefusal::InvalidParameter(format!(
            "route {:?} invokes {} asynchronously (invocation = \"event\") and has no result \
             to return: call it with InvocationType Event",
            route.name, entry.config.function
        ))
        .into());
    }
    let key = app
        .identify
        .key(&parts.headers, peer, |k| app.admission.is_known_key(k))
        .map_err(|e| -> Refused {
            match e {
                IdentityError::Missing => RequestError::Unauthorized {
                    header: app.identify.header().clone(),
                }
                .into(),
                IdentityError::Unknown => RequestError::Forbidden.into(),
                IdentityError::Invalid(reason)
                    if app.identify.source() == IdentitySource::AwsAccessKey =>
                {
                    LambdaRefusal::IncompleteSignature(reason).into()
                }
                IdentityError::Invalid(reason) => RequestError::BadRequest { reason }.into(),
            }
        })?;
    let deadline = intake::deadline(&parts.headers, route.request_timeout)?;
    if kind == InvocationType::DryRun {
        // A permission and parameter check: the body is checked, no token is spent.
        let bytes = intake::read_record_body(route, &parts.headers, body, deadline).await?;
        intake::parse_record(route, &bytes)?;
        return Ok(respond::lambda_dry_run());
    }
    // Admission before the body, as on the record path: a shed call costs no body read.
    let admitted = app
        .admission
        .admit(index, &key)
        .await
        .inspect_err(|rejected| {
            tracing::debug!(
                scope = rejected.scope.as_str(),
                wait_ms = rejected.wait.as_millis() as u64,
                "admission refused"
            );
        })?;
    let bytes = intake::read_record_body(route, &parts.headers, body, deadline).await?;
    let record = intake::parse_record(route, &bytes)?;
    let ticket = intake::submit(route, &key, record, deadline)?;
    drop(bytes);
    let id = Arc::clone(&ticket.id);
    tracing::Span::current().record("record", &*id);
    let outcome = intake::outcome(route, ticket, deadline).await;
    let mut response = match (kind, outcome) {
        (InvocationType::Event, Ok(_)) => respond::lambda_accepted(),
        // An `Event` call on a synchronous route was delivered and ran; its failure is the
        // function's, which an asynchronous caller is not told of (as with Lambda's).
        (
            InvocationType::Event,
            Err(RequestError::Record {
                error: RecordError::Function(_),
                ..
            }),
        ) => respond::lambda_accepted(),
        (_, Ok(delivered)) => respond::lambda_result(delivered),
        (_, Err(error)) => respond::lambda_error(error),
    };
    respond::add_admitted_headers(&mut response, &admitted);
    Ok(response)
}

/// The value of `name` in a query string, percent-decoded; `None` when absent.
fn query_param(query: &str, name: &str) -> Result<Option<String>, LambdaRefusal> {
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            return percent_decode(value).map(Some).ok_or_else(|| {
                LambdaRefusal::InvalidParameter(format!(
                    "{name} {value:?} is not percent-encoded text"
                ))
            });
        }
    }
    Ok(None)
}

/// `%XX` escapes decoded; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, qualifier: Option<&str>) -> FunctionRef {
        FunctionRef {
            region: None,
            account: None,
            name: name.to_owned(),
            qualifier: qualifier.map(str::to_owned),
        }
    }

    #[test]
    fn names_partial_arns_and_arns_are_read_as_lambda_reads_them() {
        assert_eq!(FunctionRef::parse("process"), Some(f("process", None)));
        assert_eq!(
            FunctionRef::parse("process:prod"),
            Some(f("process", Some("prod")))
        );
        assert_eq!(
            FunctionRef::parse("process:$LATEST"),
            Some(f("process", None))
        );
        let partial = FunctionRef::parse("123456789012:function:process:7").expect("partial");
        assert_eq!(partial.account.as_deref(), Some("123456789012"));
        assert_eq!(partial.qualifier.as_deref(), Some("7"));
        let arn = FunctionRef::parse("arn:aws:lambda:eu-west-1:123456789012:function:process")
            .expect("arn");
        assert_eq!(arn.region.as_deref(), Some("eu-west-1"));
        assert_eq!(arn.name, "process");
        for bad in [
            "",
            "a/b",
            "a:b:c",
            "arn:aws:lambda:r:a:function:",
            "a b",
            "x:",
        ] {
            assert_eq!(FunctionRef::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_call_reaches_a_route_by_name_qualifier_account_and_region() {
        let route = |s: &str| FunctionRef::parse(s).expect("route function");
        let call = |s: &str| FunctionRef::parse(s).expect("call function");
        assert!(call("process").reaches(&route("process")));
        assert!(
            call("arn:aws:lambda:us-east-1:111122223333:function:process")
                .reaches(&route("process"))
        );
        assert!(call("111122223333:function:process").reaches(&route(
            "arn:aws:lambda:us-east-1:111122223333:function:process"
        )));
        assert!(!call("999999999999:function:process").reaches(&route(
            "arn:aws:lambda:us-east-1:111122223333:function:process"
        )));
        assert!(
            !call("arn:aws:lambda:eu-west-1:111122223333:function:process").reaches(&route(
                "arn:aws:lambda:us-east-1:111122223333:function:process"
            ))
        );
        // A qualifier on either side must be named on both.
        assert!(call("process:prod").reaches(&route("process:prod")));
        assert!(!call("process:prod").reaches(&route("process")));
        assert!(!call("process").reaches(&route("process:prod")));
        assert!(call("process:$LATEST").reaches(&route("process")));
        assert!(!call("other").reaches(&route("process")));
    }

    #[test]
    fn a_not_found_function_is_named_by_its_arn() {
        assert_eq!(
            f("nope", None).arn("us-east-1"),
            "arn:aws:lambda:us-east-1:123456789012:function:nope"
        );
        let call = FunctionRef::parse("arn:aws:lambda:eu-west-1:111122223333:function:nope:3")
            .expect("arn");
        assert_eq!(
            call.arn("us-east-1"),
            "arn:aws:lambda:eu-west-1:111122223333:function:nope:3"
        );
    }

    #[test]
    fn percent_escapes_are_decoded_and_bad_ones_refused() {
        assert_eq!(
            percent_decode("arn%3Aaws%3alambda").as_deref(),
            Some("arn:aws:lambda")
        );
        assert_eq!(percent_decode("%2").as_deref(), None);
        assert_eq!(percent_decode("%zz").as_deref(), None);
        assert_eq!(percent_decode("%ff").as_deref(), None);
        assert_eq!(
            query_param("a=1&Qualifier=%24LATEST", "Qualifier")
                .ok()
                .flatten()
                .as_deref(),
            Some("$LATEST")
        );
        assert!(query_param("Qualifier=%", "Qualifier").is_err());
        assert_eq!(query_param("q=1", "Qualifier").ok().flatten(), None);
    }

    #[test]
    fn the_executed_version_is_the_routes_qualifier_or_latest() {
        assert_eq!(executed_version("process"), "$LATEST");
        assert_eq!(executed_version("process:7"), "7");
        assert_eq!(
            executed_version("arn:aws:lambda:us-east-1:111122223333:function:process:live"),
            "live"
        );
    }

    #[test]
    fn unknown_invocation_types_are_refused() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            InvocationType::of(&headers).ok(),
            Some(InvocationType::RequestResponse)
        );
        headers.insert(X_AMZ_INVOCATION_TYPE, HeaderValue::from_static("DryRun"));
        assert_eq!(
            InvocationType::of(&headers).ok(),
            Some(InvocationType::DryRun)
        );
        headers.insert(X_AMZ_INVOCATION_TYPE, HeaderValue::from_static("Later"));
        assert!(matches!(
            InvocationType::of(&headers),
            Err(LambdaRefusal::InvalidInvocationType { value }) if value == "Later"
        ));
    }
}
