//! `Idempotency-Key` on a record front door: the request's key decides whether its record
//! is submitted (lead), waits for the same key's record in flight (join), or is answered
//! with a completed request's stored response (replay) — see [`crate::idempotency`].
//!
//! [`once`] takes what any door has once it has read a record: the route, the caller's
//! client key, its idempotency key and the body's hash, a way to submit the record and a
//! way to render its outcome. A door that scopes keys otherwise (a bulk request's
//! `<key>/<line index>`) passes its own key string. [`once`] is [`start`] (begin, and
//! submit when leading) then [`Started::finish`] (wait): a bulk request starts every line
//! before it waits for any, and renders each line's stored response as its entry — one
//! store and one set of rules for both doors.

use std::sync::Arc;

use tokio::time::Instant;

use super::records::RecordRoute;
use super::respond::{self, RequestError, Response};
use crate::coalesce::{Delivered, Ticket};
use crate::idempotency::{Begin, BodyHash, Elapsed, Scope, Settled, Snapshot, Waiter};

/// Renders a record's outcome as the door answers it: `(record id, outcome)`.
pub(super) type Render = fn(&str, Result<Delivered, RequestError>) -> Response;

/// Serves one record under `key`: submits it at most once per (route, `client`, `key`)
/// while its entry lives, and answers with its outcome, a joined or replayed copy of it
/// (`Idempotent-Replayed: true`), or the refusal. A caller whose `deadline` passes gets
/// `504` while the record is still awaited, and its outcome stored, for the next retry.
///
/// A replay still passed admission: it spent the caller's tokens like any request.
#[allow(clippy::result_large_err)]
pub(super) async fn once(
    route: &RecordRoute,
    client: &str,
    key: &str,
    body: BodyHash,
    deadline: Instant,
    submit: impl FnOnce() -> Result<Ticket, RequestError>,
    render: Render,
) -> Result<Response, RequestError> {
    let started = start(route, client, key, body, submit, render).await?;
    let (answer, replayed) = started.finish(deadline).await?;
    Ok(respond::from_snapshot(&answer, replayed))
}

/// A record under its key once [`start`]ed: answered already, or waiting for its outcome.
/// Owns what it waits on, so a door may await it after the request's body is gone.
pub(super) enum Started {
    /// A stored response (a replay), or the refusal of the lead's own submit.
    Answered {
        answer: Arc<Snapshot>,
        /// Another request's outcome (a replay), not this request's own.
        replayed: bool,
    },
    /// The scope's outcome is awaited: this request's own record, or the one it joined.
    Waiting {
        waiter: Waiter,
        /// Joined another request's record.
        replayed: bool,
    },
}

/// The first half of [`once`]: decides what the record does under `key` and, when it
/// leads, submits it. A door that answers many records (a bulk request) starts them all,
/// in input order, before it waits for any.
#[allow(clippy::result_large_err)]
pub(super) async fn start(
    route: &RecordRoute,
    client: &str,
    key: &str,
    body: BodyHash,
    submit: impl FnOnce() -> Result<Ticket, RequestError>,
    render: Render,
) -> Result<Started, RequestError> {
    let scope = Scope::new(&route.name, client, key);
    let begun = route
        .idempotency
        .begin(scope, body)
        .await
        .map_err(RequestError::Idempotency)?;
    Ok(match begun {
        Begin::Replay(answer) => Started::Answered {
            answer,
            replayed: true,
        },
        Begin::Join(waiter) => Started::Waiting {
            waiter,
            replayed: true,
        },
        Begin::Lead(lead) => match submit() {
            // Never queued: joiners get the same refusal, and the key is forgotten so a
            // retry is a real retry.
            Err(error) => {
                let answer = respond::snapshot(error.into_response()).await;
                lead.refused(answer.clone()).await;
                Started::Answered {
                    answer: Arc::new(answer),
                    replayed: false,
                }
            }
            Ok(ticket) => {
                let id = Arc::clone(&ticket.id);
                tracing::Span::current().record("record", &*id);
                let policies = route.policies();
                let record = Arc::clone(&id);
                // The ticket moves into the store's task: the record stays wanted (the
                // batcher does not drop it as abandoned) after this caller has gone.
                let waiter = lead.spawn(id, async move {
                    let outcome = ticket
                        .outcome()
                        .await
                        .map_err(|error| RequestError::Record {
                            record: Some(Arc::clone(&record)),
                            error,
                            policies,
                        });
                    let keep = respond::keep_for_replay(&outcome);
                    (respond::snapshot(render(&record, outcome)).await, keep)
                });
                Started::Waiting {
                    waiter,
                    replayed: false,
                }
            }
        },
    })
}

impl Started {
    /// The second half of [`once`]: the response as stored (or as refused at submit) and
    /// whether it is another request's outcome; the refusal, or `504` once `deadline`
    /// passes with the record still awaited.
    #[allow(clippy::result_large_err)]
    pub(super) async fn finish(
        self,
        deadline: Instant,
    ) -> Result<(Arc<Snapshot>, bool), RequestError> {
        let (waiter, replayed) = match self {
            Started::Answered { answer, replayed } => return Ok((answer, replayed)),
            Started::Waiting { waiter, replayed } => (waiter, replayed),
        };
        match waiter.wait(deadline).await {
            Ok(Settled::Answer(answer)) => Ok((answer, replayed)),
            Ok(Settled::Refused(refusal)) => Err(RequestError::Idempotency(refusal)),
            Err(Elapsed { record }) => Err(RequestError::CallerDeadline {
                record: record.unwrap_or_else(|| "-".into()),
            }),
        }
    }
}

/// The `/records` rendering of an outcome.
pub(super) fn render_record(id: &str, outcome: Result<Delivered, RequestError>) -> Response {
    match outcome {
        Ok(delivered) => respond::delivered(id, delivered),
        Err(error) => error.into_response(),
    }
}
