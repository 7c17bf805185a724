//! The steps every front door takes with a record, whatever its wire format: the caller's
//! deadline, the body read within its bounds, the record checked for what a function
//! runtime can parse, submitted to the route's batcher, and its outcome awaited.
//!
//! Each step returns what went wrong as a [`RequestError`], so a door renders failures in
//! its own shape (the `/records` contract, Lambda's Invoke API errors, a bulk result line)
//! from one set of causes, and no status is chosen here.

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::parseable;
use super::records::RecordRoute;
use super::respond::RequestError;
use super::TIMEOUT_HEADER;
use crate::coalesce::{Delivered, Ticket};

/// The caller's deadline: the route's, shortened by `x-sluicegate-timeout-ms`.
// A request error holds a record's failure by value so that a refusal (a queue-full
// `429`) allocates nothing; it is moved once, to `respond`.
#[allow(clippy::result_large_err)]
pub(super) fn deadline(
    headers: &HeaderMap,
    route_timeout: Duration,
) -> Result<Instant, RequestError> {
    let timeout = match headers.get(TIMEOUT_HEADER) {
        None => route_timeout,
        Some(value) => {
            let ms = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|ms| *ms > 0)
                .ok_or_else(|| RequestError::BadRequest {
                    reason: format!(
                        "{TIMEOUT_HEADER} must be a positive integer number of milliseconds"
                    ),
                })?;
            route_timeout.min(Duration::from_millis(ms))
        }
    };
    Ok(Instant::now() + timeout)
}

/// Reads a body of at most `max` bytes, refusing a larger declared `Content-Length` before
/// reading (`413`), within the route's `body_read_timeout` and never after the caller's
/// deadline (`408`): a client that stalls mid-body holds a connection and a buffer, nothing
/// more.
#[allow(clippy::result_large_err)]
pub(super) async fn read_limited(
    route: &RecordRoute,
    headers: &HeaderMap,
    body: Incoming,
    max: usize,
    deadline: Instant,
) -> Result<bytes::Bytes, RequestError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(RequestError::TooLarge { max });
    }
    let wait = route
        .body_read_timeout
        .min(deadline.saturating_duration_since(Instant::now()));
    tokio::time::timeout(wait, read_body(body, declared, max))
        .await
        .map_err(|_elapsed| RequestError::BodyTimeout { waited: wait })?
}

/// Reads one record's body: at most the route's `max_record_bytes`.
#[allow(clippy::result_large_err)]
pub(super) async fn read_record_body(
    route: &RecordRoute,
    headers: &HeaderMap,
    body: Incoming,
    deadline: Instant,
) -> Result<bytes::Bytes, RequestError> {
    read_limited(route, headers, body, route.max_record_bytes, deadline).await
}

/// The most a body buffer is given before its bytes arrive.
const INITIAL_BODY_BUFFER: usize = 64 * 1024;

/// Reads a body of at most `max` bytes into one buffer (`413` past that, `400` when the
/// connection fails mid-body).
///
/// Each frame is copied out and dropped at once. Collecting the frames instead keeps every
/// one of them — and, through it, the part of hyper's read buffer it points into — until
/// the body ends: a body sent as one-byte chunks then held roughly 50 bytes of bookkeeping
/// and framing per byte of record. Here a body costs its bytes, at most `max`, and the
/// buffer grows by doubling but never past `max`.
async fn read_body(
    mut body: Incoming,
    declared: Option<u64>,
    max: usize,
) -> Result<bytes::Bytes, RequestError> {
    // The declared length sizes the buffer only up to what one read can bring (hyper reads
    // at most 64 KiB at a time): a client that declares a large body and stalls does not get
    // `max` bytes reserved for it before sending them.
    let initial = declared.map_or(8 * 1024, |len| {
        usize::try_from(len).unwrap_or(max).min(INITIAL_BODY_BUFFER)
    });
    let mut buffer = Vec::with_capacity(initial.min(max));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| RequestError::BadRequest {
            reason: format!("cannot read the body: {e}"),
        })?;
        let Ok(data) = frame.into_data() else {
            // Trailers carry nothing a record needs.
            continue;
        };
        let needed = buffer.len() + data.len();
        if needed > max {
            return Err(RequestError::TooLarge { max });
        }
        if needed > buffer.capacity() {
            let grown = needed.max(buffer.capacity() * 2).min(max);
            buffer.reserve_exact(grown - buffer.len());
        }
        buffer.extend_from_slice(&data);
    }
    Ok(buffer.into())
}

/// One record as the function will receive it: a single JSON value that a runtime's JSON
/// parser accepts (not empty, valid JSON, no nesting past the route's depth, no lone
/// surrogates). The record is a slice of `bytes`.
#[allow(clippy::result_large_err)]
pub(super) fn parse_record<'a>(
    route: &RecordRoute,
    bytes: &'a [u8],
) -> Result<&'a RawValue, RequestError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::BadRequest {
            reason: "the body is empty; send one JSON record".to_owned(),
        });
    }
    let record: &RawValue =
        serde_json::from_slice(bytes).map_err(|e| RequestError::BadRequest {
            reason: format!("the body is not valid JSON: {e}"),
        })?;
    parseable::check(record.get().as_bytes(), route.max_json_depth).map_err(|unparseable| {
        RequestError::BadRequest {
            reason: unparseable.to_string(),
        }
    })?;
    Ok(record)
}

/// Queues `record` for `key` (with its plan's weight in a fair queue) on the route's
/// batcher, or says at once why not (a full queue or one that cannot reach the record in
/// time: `429 scope=queue`; a closing route: `503`).
#[allow(clippy::result_large_err)]
pub(super) fn submit(
    route: &RecordRoute,
    key: &Arc<str>,
    record: &RawValue,
    deadline: Instant,
) -> Result<Ticket, RequestError> {
    let weight = route.weights.weight_of(key);
    route
        .batcher
        .submit_weighted(key, weight, record, deadline)
        .map_err(|error| RequestError::Record {
            record: None,
            error,
            policies: route.policies(),
        })
}

/// Waits for a submitted record's outcome until the caller's deadline (`504` past it: the
/// record may still be delivered).
#[allow(clippy::result_large_err)]
pub(super) async fn outcome(
    route: &RecordRoute,
    ticket: Ticket,
    deadline: Instant,
) -> Result<Delivered, RequestError> {
    let id = Arc::clone(&ticket.id);
    match tokio::time::timeout_at(deadline, ticket.outcome()).await {
        Ok(Ok(delivered)) => Ok(delivered),
        Ok(Err(error)) => Err(RequestError::Record {
            record: Some(id),
            error,
            policies: route.policies(),
        }),
        Err(_elapsed) => Err(RequestError::CallerDeadline { record: id }),
    }
}
