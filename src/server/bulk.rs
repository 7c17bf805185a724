//! Bulk records: `POST <route path>` with `Content-Type: application/x-ndjson`, one JSON
//! record per line, for producers that hold many records at once (as Kinesis `PutRecords`
//! or SQS `SendMessageBatch` take them).
//!
//! A bulk request is dispatched after identity and *instead of* the route's request-level
//! admission layer: each record spends one token of the same layers (global → route → key,
//! for the request's key), so a bulk of `n` records costs what `n` `/records` requests cost,
//! and the records past the key's tokens are shed one by one, not the whole request.
//!
//! Guarantees:
//! - the body is read with intake's bounded read at `server.max_bulk_bytes` (and the body
//!   read timeout); more than `server.max_bulk_records` record lines, a larger body, or a
//!   `Content-Type` whose parameters make the body unreadable is one whole-request `4xx`;
//! - blank lines (only whitespace) are skipped and count for nothing; a `\r\n` line ending
//!   is accepted; every other line is one record and gets exactly one entry, in input order;
//! - each record is checked on its own (`413` past `server.max_record_bytes`, `400` when it
//!   is not one JSON value a runtime can parse) *before* admission: a line that is refused
//!   spends no token and is never queued;
//! - admitted records are submitted to the route's batcher like any record, then awaited
//!   together, each bounded by the request's deadline (a record still waiting gets its own
//!   `504`; an unknown outcome is a `504 outcome_unknown` entry, never a success);
//! - the answer is `200` `{"failed":<n>,"results":[…]}`, each entry the record's own body
//!   (`respond::record_answer`, the same body `/records` gives) with `"http_status"` first;
//!   `failed` counts the entries that are not `2xx`. When any record was shed the response
//!   carries `Retry-After` and the `RateLimit` fields of the record that must wait longest;
//!   otherwise the key layer's `RateLimit` fields after the last admitted record;
//! - with `Accept: application/x-ndjson` the answer is streamed instead: `200`
//!   `application/x-ndjson`, one entry per line, each written once its record and every
//!   record before it are answered (no `failed` total: the caller counts the lines). Its
//!   `Retry-After` / `RateLimit` fields can only describe what was known before the first
//!   line (admission and queue refusals). A caller that hangs up drops the records still
//!   waiting, as a `/records` caller's would be.
//!
//! `Idempotency-Key` on a bulk request (validated as on `/records`, a bad key is one
//! whole-request `400`) scopes per line: the record at position `i` — its index in
//! `results`, blank lines not counted — is served as a `/records` request with the key
//! `<key>/<i>` and the body hash of its record (the line without its line ending and
//! surrounding whitespace), through the same `idempotent` seam and store. It still passes
//! admission (a replayed line spends its token); once admitted it is replayed (its stored
//! response is its entry), joins the same line in flight, or is refused (`422`
//! `idempotency_key_reused` with another record, `409` in flight on another replica) as
//! its own entry. An entry that is another request's outcome (replayed or joined) has
//! `"replayed":true` after `"http_status"`. A line refused by its check or by admission
//! never reaches the store, and sheds and `503`s are not stored, so their retry is real.
//!
//! Counting: every entry is counted in `sluicegate_requests_total` exactly as the same
//! record sent alone would be (so shed and error rates mean "records"), a bulk request
//! refused as a whole is counted there once, and `sluicegate_bulk_requests_total` /
//! `sluicegate_bulk_records_total` count the bulk requests and their records.

use std::sync::Arc;

use futures_util::future::join_all;
use futures_util::stream::{FuturesOrdered, StreamExt};
use http::{header, HeaderMap, Request};
use hyper::body::Incoming;
use serde_json::value::RawValue;

use super::app::App;
use super::counters::RouteCounters;
use super::idempotent::{self, Started};
use super::intake;
use super::records::RecordRoute;
use super::respond::{self, Answer, RequestError, Response, Shed};
use crate::coalesce::{Delivered, Ticket};
use crate::idempotency::{self, BodyHash, Snapshot};
use crate::limit::Admitted;

/// The media type of a bulk request.
const NDJSON: &str = "application/x-ndjson";

/// Marks a bulk response whose answers were counted by this module, so the data plane does
/// not count the response (a `200` that carries many answers) a second time.
#[derive(Clone, Copy, Debug)]
pub(super) struct Counted;

/// Whether `headers` ask for the bulk door: a `Content-Type` whose media type is
/// `application/x-ndjson` (its parameters are checked when the request is served).
pub(super) fn is_bulk(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case(NDJSON))
}

/// Serves one bulk request for the route that is number `index` in admission's list, under
/// the client `key` identity found, and counts its answers.
pub(super) async fn serve(
    app: &App,
    index: usize,
    route: &Arc<RecordRoute>,
    counters: &Arc<RouteCounters>,
    key: Arc<str>,
    request: Request<Incoming>,
) -> Response {
    let mut response = match answer(app, index, route, counters, &key, request).await {
        Ok(response) => response,
        Err(error) => {
            let response = error.into_response();
            counters.count(&response);
            counters.count_bulk(response.status(), 0);
            response
        }
    };
    response.extensions_mut().insert(Counted);
    response
}

/// Where a record stands once its line has been checked, admitted and submitted.
enum Slot {
    /// Answered already: refused at the check, by admission or at submit.
    Done(Outcome),
    /// Queued; its outcome is awaited.
    Queued(Ticket),
    /// Under the request's `Idempotency-Key`: started (answered, or awaited) by the seam.
    Keyed(Started),
}

/// A record's outcome as its entry is written.
enum Outcome {
    /// Served without a key: its own result or why there is none.
    Record(Result<(Arc<str>, Delivered), RequestError>),
    /// Served under its line's key: the response as stored for it (and whether it is
    /// another request's outcome), or why there is none.
    Keyed(Result<(Arc<Snapshot>, bool), RequestError>),
}

impl Outcome {
    /// The entry's answer and body (`respond::record_answer`'s, or the stored response's).
    fn entry(&self) -> (Answer, bytes::Bytes) {
        match self {
            Outcome::Record(outcome) => respond::record_answer(outcome),
            Outcome::Keyed(Ok((answer, replayed))) => {
                let body = if *replayed {
                    respond::replayed_body(&answer.body)
                } else {
                    answer.body.clone()
                };
                (respond::snapshot_answer(answer), body)
            }
            Outcome::Keyed(Err(error)) => error.body(),
        }
    }

    /// The shed it reports, if any.
    fn shed(&self) -> Option<Shed> {
        match self {
            Outcome::Record(outcome) => outcome.as_ref().err().and_then(RequestError::shed),
            Outcome::Keyed(Ok((answer, _))) => respond::snapshot_shed(answer),
            Outcome::Keyed(Err(error)) => error.shed(),
        }
    }
}

/// Reads, checks, admits and submits the records, then answers with every record's
/// outcome: all at once, or (`Accept: application/x-ndjson`) one line each as it is ready.
/// Counts the records' answers; a whole-request refusal is returned for the caller to count.
#[allow(clippy::result_large_err)]
async fn answer(
    app: &App,
    index: usize,
    route: &Arc<RecordRoute>,
    counters: &Arc<RouteCounters>,
    key: &Arc<str>,
    request: Request<Incoming>,
) -> Result<Response, RequestError> {
    let (parts, body) = request.into_parts();
    check_content_type(&parts.headers)?;
    let streamed = wants_lines(&parts.headers);
    let deadline = intake::deadline(&parts.headers, route.request_timeout)?;
    // A bad key is refused for the whole request, before the body is read (as `/records`).
    let idempotency_key = if route.idempotency.enabled() {
        idempotency::key_of(&parts.headers).map_err(RequestError::InvalidIdempotencyKey)?
    } else {
        None
    };
    let server = &app.config.server;
    let max_bytes = server.max_bulk_bytes.as_usize();
    let body = intake::read_limited(route, &parts.headers, body, max_bytes, deadline)
        .await
        .map_err(|error| match error {
            // The bound that refused is the bulk body's, not one record's.
            RequestError::TooLarge { .. } => RequestError::BulkTooLarge { max: max_bytes },
            other => other,
        })?;
    let lines = record_lines(&body, server.max_bulk_records as usize)?;
    tracing::debug!(records = lines.len(), streamed, "bulk request");

    // Every line is checked before any is admitted: a line that cannot be a record spends
    // no token, and admission sees the valid records in input order.
    let checked: Vec<Result<&RawValue, RequestError>> =
        lines.iter().map(|line| check(route, line)).collect();
    // Under an Idempotency-Key a record's own key is `<Idempotency-Key>/<position>`, its
    // position being its index in `checked` (and in `results`; blank lines are not
    // counted). It is looked up after admission, as a `/records` request's is.

    // Decided together, in input order: `join_all` creates every future before polling
    // any, so with the local engine each decision is made as its future is created; with
    // Redis the checks go out in that order, one round trip for all rather than one each.
    let decisions = join_all(checked.into_iter().map(|record| {
        let admit = record.map(|record| (record, app.admission.admit(index, key)));
        async move {
            let (record, admit) = admit?;
            let admitted = admit.await?;
            Ok::<_, RequestError>((record, admitted))
        }
    }))
    .await;

    let mut admitted: Option<Admitted> = None;
    let slots: Vec<Slot> = match idempotency_key {
        None => decisions
            .into_iter()
            .map(|decision| match decision {
                Ok((record, decision)) => {
                    admitted = Some(decision);
                    match intake::submit(route, key, record, deadline) {
                        Ok(ticket) => Slot::Queued(ticket),
                        Err(error) => Slot::Done(Outcome::Record(Err(error))),
                    }
                }
                Err(error) => Slot::Done(Outcome::Record(Err(error))),
            })
            .collect(),
        Some(idempotency_key) => {
            let records: Vec<_> = decisions
                .into_iter()
                .map(|decision| {
                    decision.map(|(record, decision)| {
                        admitted = Some(decision);
                        record
                    })
                })
                .collect();
            // Every line is started (replayed, joined, or submitted when it leads) before
            // any is awaited; with the local store each start runs to its submit on its
            // first poll, in input order.
            join_all(records.into_iter().enumerate().map(|(position, record)| {
                start_line(route, key, idempotency_key, position, record, deadline)
            }))
            .await
        }
    };
    // Each queued record holds its own copy (its envelope entry): the body is let go before
    // the wait, so a bulk in flight costs its records once, not twice.
    drop(lines);
    drop(body);

    let records = slots.len();
    // Sheds decided so far (admission, a full queue): all a streamed answer's headers can
    // say, since they go out before the first line.
    let decided = slots.iter().fold(None, |longest, slot| match slot {
        Slot::Done(outcome) => longer(longest, outcome),
        Slot::Keyed(Started::Answered { answer, .. }) => {
            longer_shed(longest, respond::snapshot_shed(answer))
        }
        Slot::Queued(_) | Slot::Keyed(Started::Waiting { .. }) => longest,
    });
    // Owned futures (the route by `Arc`): a streamed answer's body outlives this call.
    // Dropping one drops its ticket, which marks the record gone (a caller that hung up).
    let outcomes = slots.into_iter().map(|slot| {
        let route = Arc::clone(route);
        async move {
            match slot {
                Slot::Done(outcome) => outcome,
                Slot::Queued(ticket) => {
                    let id = Arc::clone(&ticket.id);
                    Outcome::Record(
                        intake::outcome(&route, ticket, deadline)
                            .await
                            .map(|delivered| (id, delivered)),
                    )
                }
                Slot::Keyed(started) => Outcome::Keyed(started.finish(deadline).await),
            }
        }
    });
    let response = if streamed {
        // An upstream shed found later is in its own line only.
        let counters = Arc::clone(counters);
        let lines = outcomes.collect::<FuturesOrdered<_>>().map(move |outcome| {
            let (answer, body) = outcome.entry();
            counters.count_answer(answer);
            respond::bulk_line(answer, &body)
        });
        let mut response = respond::bulk_lines(lines);
        add_rate_headers(&mut response, decided, admitted.as_ref());
        response
    } else {
        let outcomes = join_all(outcomes).await;
        let mut answers = Vec::with_capacity(outcomes.len());
        let mut bodies = Vec::with_capacity(outcomes.len());
        let mut longest: Option<Shed> = None;
        for outcome in &outcomes {
            let (answer, body) = outcome.entry();
            longest = longer(longest, outcome);
            counters.count_answer(answer);
            answers.push(answer);
            bodies.push(body);
        }
        let mut response = respond::bulk_answer(&answers, &bodies);
        add_rate_headers(&mut response, longest, admitted.as_ref());
        response
    };
    counters.count_bulk(response.status(), records);
    Ok(response)
}

/// Starts the record at `position` under its line's key `<idempotency_key>/<position>`
/// (see the module docs); a line refused by its check or by admission is answered as it
/// is and never reaches the store.
// The submit closure returns intake's `RequestError`, held by value (see `intake`).
#[allow(clippy::result_large_err)]
async fn start_line(
    route: &RecordRoute,
    key: &Arc<str>,
    idempotency_key: &str,
    position: usize,
    record: Result<&RawValue, RequestError>,
    deadline: tokio::time::Instant,
) -> Slot {
    let record = match record {
        Ok(record) => record,
        Err(error) => return Slot::Done(Outcome::Record(Err(error))),
    };
    let line_key = format!("{idempotency_key}/{position}");
    let started = idempotent::start(
        route,
        key,
        &line_key,
        BodyHash::of(record.get().as_bytes()),
        || intake::submit(route, key, record, deadline),
        idempotent::render_record,
    )
    .await;
    match started {
        Ok(started) => Slot::Keyed(started),
        Err(refusal) => Slot::Done(Outcome::Keyed(Err(refusal))),
    }
}

/// The shed with the longer wait: `longest` so far, or `outcome`'s.
fn longer(longest: Option<Shed>, outcome: &Outcome) -> Option<Shed> {
    longer_shed(longest, outcome.shed())
}

/// The shed with the longer wait of `longest` so far and `shed`.
fn longer_shed(longest: Option<Shed>, shed: Option<Shed>) -> Option<Shed> {
    match (longest, shed) {
        (Some(longest), Some(shed)) if longest.wait >= shed.wait => Some(longest),
        (longest, None) => longest,
        (_, shed) => shed,
    }
}

/// A bulk answer's `Retry-After` and `RateLimit` fields: those of the record that must wait
/// longest when any was shed, otherwise the key layer's after the last admitted record.
fn add_rate_headers(response: &mut Response, longest: Option<Shed>, admitted: Option<&Admitted>) {
    match (longest, admitted) {
        (Some(shed), _) => respond::add_shed_headers(response, shed),
        (None, Some(admitted)) => respond::add_admitted_headers(response, admitted),
        (None, None) => {}
    }
}

/// Whether the caller asked for the answer streamed (`Accept` lists `application/x-ndjson`).
fn wants_lines(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|range| range.split(';').next())
        .any(|media| media.trim().eq_ignore_ascii_case(NDJSON))
}

/// Splits the body into its record lines: a `\r\n` ending is accepted, lines holding only
/// whitespace are skipped. `413` past `max` records, `400` when there is none.
#[allow(clippy::result_large_err)]
fn record_lines(body: &[u8], max: usize) -> Result<Vec<&[u8]>, RequestError> {
    let mut lines = Vec::new();
    for line in body.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if lines.len() == max {
            return Err(RequestError::TooManyRecords { max });
        }
        lines.push(line);
    }
    if lines.is_empty() {
        return Err(RequestError::BadRequest {
            reason: "the body holds no records; send one JSON record per line".to_owned(),
        });
    }
    Ok(lines)
}

/// One line as a record: at most `max_record_bytes`, then intake's parse check.
#[allow(clippy::result_large_err)]
fn check<'a>(route: &RecordRoute, line: &'a [u8]) -> Result<&'a RawValue, RequestError> {
    if line.len() > route.max_record_bytes {
        return Err(RequestError::TooLarge {
            max: route.max_record_bytes,
        });
    }
    intake::parse_record(route, line)
}

/// A bulk request's `Content-Type` parameters: a `charset` must be UTF-8 (or its subset
/// US-ASCII); other parameters say nothing about how the body reads and are ignored.
#[allow(clippy::result_large_err)]
fn check_content_type(headers: &HeaderMap) -> Result<(), RequestError> {
    let unreadable = |reason: String| RequestError::UnsupportedMediaType { reason };
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| unreadable(format!("Content-Type must be {NDJSON}")))?;
    for parameter in value.split(';').skip(1) {
        let parameter = parameter.trim();
        if parameter.is_empty() {
            continue;
        }
        let Some((name, value)) = parameter.split_once('=') else {
            return Err(unreadable(format!(
                "Content-Type parameter {parameter:?} is not name=value"
            )));
        };
        let value = value.trim().trim_matches('"');
        if name.trim().eq_ignore_ascii_case("charset")
            && !["utf-8", "utf8", "us-ascii"]
                .iter()
                .any(|charset| value.eq_ignore_ascii_case(charset))
        {
            return Err(unreadable(format!(
                "Content-Type charset={value} is not supported: a bulk body is UTF-8 JSON, one record per line"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use crate::server::respond::Answer;

    use super::*;

    fn content_type(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn only_the_ndjson_media_type_is_a_bulk_request() {
        for bulk in [
            "application/x-ndjson",
            "Application/X-NDJSON",
            " application/x-ndjson ; charset=utf-8",
            "application/x-ndjson;charset=latin1",
        ] {
            assert!(is_bulk(&content_type(bulk)), "{bulk}");
        }
        for single in ["application/json", "text/plain", "application/x-ndjsonx"] {
            assert!(!is_bulk(&content_type(single)), "{single}");
        }
        assert!(!is_bulk(&HeaderMap::new()));
    }

    #[test]
    fn a_utf8_charset_and_unknown_parameters_are_accepted() {
        for ok in [
            "application/x-ndjson",
            "application/x-ndjson; charset=utf-8",
            "application/x-ndjson; charset=\"UTF-8\"",
            "application/x-ndjson;charset=us-ascii;",
            "application/x-ndjson; profile=logs",
        ] {
            assert!(check_content_type(&content_type(ok)).is_ok(), "{ok}");
        }
    }

    #[test]
    fn another_charset_or_a_malformed_parameter_is_415_naming_it() {
        for (bad, says) in [
            ("application/x-ndjson; charset=latin1", "charset=latin1"),
            ("application/x-ndjson; charset=utf-16", "charset=utf-16"),
            ("application/x-ndjson; utf-8", "\"utf-8\" is not name=value"),
        ] {
            let error = check_content_type(&content_type(bad)).expect_err(bad);
            assert_eq!(error.answer(), Answer::UnsupportedMediaType, "{bad}");
            assert_eq!(error.code(), "unsupported_media_type");
            assert!(error.to_string().contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn blank_lines_are_skipped_and_crlf_endings_accepted() {
        let body = b"{\"a\":1}\r\n\n   \r\n2\n\t\n[3]";
        let lines = record_lines(body, 10).expect("three records");
        assert_eq!(lines, [&b"{\"a\":1}"[..], b"2", b"[3]"]);
    }

    #[test]
    fn more_records_than_the_bound_is_413_and_none_is_400() {
        assert_eq!(
            record_lines(b"1\n2\n3\n", 3).expect("at the bound").len(),
            3
        );
        let error = record_lines(b"1\n2\n\n3\n4", 3).expect_err("past the bound");
        assert!(matches!(error, RequestError::TooManyRecords { max: 3 }));
        assert_eq!(error.answer(), Answer::TooLarge);
        assert!(error.to_string().contains("server.max_bulk_records (3)"));
        for empty in [&b""[..], b"\n\n", b" \r\n\t"] {
            let error = record_lines(empty, 3).expect_err("no records");
            assert_eq!(error.answer(), Answer::BadRequest);
        }
    }
}
