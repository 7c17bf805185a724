//! Delivering one batch: the attempt loop between the worker and the callers.
//!
//! Each attempt passes the function's gate (concurrency permit + invoke-rate token), so
//! retries count against Lambda's limits exactly as first attempts do. Then, by outcome:
//!
//! - a result → fan out to the callers;
//! - a function error with `bisect_on_function_error` → split the batch in halves and
//!   deliver each, down to the single poison record, whose caller alone gets `502`;
//! - `RequestTooLargeException` → split in halves; a single record that cannot fit → `413`;
//! - a retryable failure (see the table in [`crate::invoke`]) → back off with jitter (never
//!   sooner than a throttle's Retry-After, never longer than `retry.cap`), within
//!   `max_attempts` and the retry budget. Callers whose deadline falls before the retry
//!   leave the batch first, with `504`. An unknown outcome (the request may have reached
//!   the function) is retryable only with `retry.retry_timeouts`;
//! - retries exhausted → the route's dead-letter sink, and `503` with the dead-letter id
//!   once the sink confirmed the letter (`503` without an id when it did not, within the
//!   earliest caller deadline); without a sink: `429 scope=upstream` for throttles, `503`
//!   otherwise. When any attempt of the batch ended in an unknown outcome, the letters say
//!   `possibly_processed`, and without a sink the callers hear that the outcome is unknown
//!   (`504`), not merely that Lambda was unavailable at the last attempt;
//! - anything else (unknown function, permissions, an unknown outcome of a non-idempotent
//!   function) → answered at once, with an error log for configuration problems.

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use futures_util::future::BoxFuture;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::envelope;
use super::{BatchSpec, DrainMeter, Message, RecordError};

use crate::dlq::{self, DeadLetter, DeadLetterSink};
use crate::invoke::retry::{backoff, RetryBudget};
use crate::invoke::{Invoke, InvokeFailure, InvokePermit, Invoked};

/// What every batch of one route shares. `I` is the function's invoker ([`Invoke`]).
pub(super) struct Delivery<I> {
    pub(super) spec: Arc<BatchSpec>,
    pub(super) invoker: Arc<I>,
    pub(super) budget: RetryBudget,
    pub(super) dlq: Option<DeadLetterSink>,
    pub(super) drain: Arc<DrainMeter>,
    /// The route's batch histograms, registered at the first attempt (see [`RouteMetrics`]).
    pub(super) metrics: OnceLock<RouteMetrics>,
}

/// A route's `sluicegate_batch_records` and `sluicegate_batch_bytes` handles, registered
/// once instead of per attempt (which cloned the route name into a fresh label set and
/// looked the series up in the recorder's registry every time).
///
/// Registered lazily, not when the route's batcher starts: `serve` builds the pipeline
/// before it installs the process-wide recorder, and a handle registered before that is a
/// no-op for good. The first attempt always comes later, once the listener takes records.
pub(super) struct RouteMetrics {
    records: metrics::Histogram,
    bytes: metrics::Histogram,
}

impl RouteMetrics {
    fn register(route: &str) -> Self {
        RouteMetrics {
            records: metrics::histogram!("sluicegate_batch_records", "route" => route.to_owned()),
            bytes: metrics::histogram!("sluicegate_batch_bytes", "route" => route.to_owned()),
        }
    }
}

/// Removes records whose caller has gone (see [`Message::prune_gone`]).
fn prune(batch: &mut Vec<Message>) {
    Message::prune_gone(batch, Instant::now());
}

impl<I: Invoke> Delivery<I> {
    /// Delivers `batch`, starting with `slot` when the worker already holds one. Boxed
    /// because splitting recurses.
    pub(super) fn deliver(
        self: Arc<Self>,
        batch: Vec<Message>,
        slot: Option<InvokePermit>,
    ) -> BoxFuture<'static, ()> {
        self.deliver_part(batch, slot, None)
    }

    /// [`Delivery::deliver`] for a batch, or half of one, that an earlier attempt may already
    /// have run (`earlier_unknown`: that attempt's failure).
    fn deliver_part(
        self: Arc<Self>,
        batch: Vec<Message>,
        slot: Option<InvokePermit>,
        earlier_unknown: Option<InvokeFailure>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.attempts(batch, slot, earlier_unknown).await })
    }

    async fn attempts(
        self: Arc<Self>,
        mut batch: Vec<Message>,
        mut slot: Option<InvokePermit>,
        mut unknown: Option<InvokeFailure>,
    ) {
        let spec = &self.spec;
        let first_at = SystemTime::now();
        let mut attempt: u32 = 0;
        loop {
            let acquired = match slot.take() {
                Some(slot) => slot,
                None => self.invoker.gate().acquire().await,
            };
            prune(&mut batch);
            if batch.is_empty() {
                return;
            }
            attempt += 1;
            if attempt == 1 {
                self.budget.record_invoke();
            }
            let metrics = self
                .metrics
                .get_or_init(|| RouteMetrics::register(&spec.route));
            metrics.records.record(batch.len() as f64);
            let payload = envelope::payload(spec.envelope, &batch);
            metrics.bytes.record(payload.len() as f64);
            let result = self
                .invoker
                .invoke(payload, spec.invocation, acquired)
                .await
                // Lambda's Retry-After is a number off the network: never wait past the cap.
                .map_err(|failure| failure.with_retry_after_at_most(spec.retry.cap));
            if let Err(failure) = &result {
                if failure.may_have_run() && unknown.is_none() {
                    unknown = Some(failure.clone());
                }
            }
            match result {
                Ok(Invoked::Response {
                    function_error: Some(kind),
                    ..
                }) if spec.bisect && batch.len() > 1 => {
                    tracing::info!(
                        records = batch.len(),
                        kind,
                        "function error: bisecting the batch to isolate the failing record"
                    );
                    self.split(batch, unknown).await;
                    return;
                }
                Ok(invoked) => {
                    envelope::fan_out(batch, Ok(invoked), spec.envelope);
                    return;
                }
                Err(InvokeFailure::TooLarge { .. }) if batch.len() > 1 => {
                    tracing::info!(
                        records = batch.len(),
                        "Lambda said the payload is too large: splitting the batch"
                    );
                    self.split(batch, unknown).await;
                    return;
                }
                Err(failure) if failure.is_retryable(spec.retry.retry_timeouts) => {
                    if attempt >= spec.retry.max_attempts || !self.budget.try_retry() {
                        let possibly_processed = unknown.is_some();
                        let failure = match unknown {
                            // The last attempt's failure is not the whole truth: an earlier
                            // one may have run the batch. The callers' answer (and the
                            // letter's error) must say the record may have run.
                            Some(earlier) if !failure.may_have_run() => {
                                unknown_then(earlier, &failure)
                            }
                            _ => failure,
                        };
                        self.give_up(batch, failure, attempt, first_at, possibly_processed)
                            .await;
                        return;
                    }
                    let delay = backoff(
                        &spec.retry,
                        attempt,
                        failure.retry_after(),
                        &mut rand::rng(),
                    );
                    // `delay` is at most `retry.cap`; should the clock still overflow, no
                    // deadline can come after the retry.
                    let retry_at = Instant::now().checked_add(delay);
                    // A caller whose deadline comes first would only wait to time out.
                    let (stay, leave): (Vec<Message>, Vec<Message>) = batch
                        .into_iter()
                        .partition(|m| retry_at.is_some_and(|at| m.deadline > at));
                    if !leave.is_empty() {
                        // Those leaving hear the whole truth: an earlier attempt may have run
                        // their records.
                        let told = match &unknown {
                            Some(earlier) if !failure.may_have_run() => {
                                unknown_then(earlier.clone(), &failure)
                            }
                            _ => failure.clone(),
                        };
                        for m in leave {
                            m.answer(Err(RecordError::DeadlineBeforeRetry(told.clone())));
                        }
                    }
                    batch = stay;
                    let Some(retry_at) = retry_at.filter(|_| !batch.is_empty()) else {
                        return;
                    };
                    metrics::counter!("sluicegate_retries_total", "function" => self.invoker.function().to_owned(), "reason" => failure.label().to_owned())
                        .increment(1);
                    tracing::debug!(attempt, delay_ms = delay.as_millis() as u64, error = %failure, "retrying the batch");
                    tokio::time::sleep_until(retry_at).await;
                }
                Err(failure) => {
                    if matches!(failure, InvokeFailure::Rejected { .. }) {
                        tracing::error!(function = self.invoker.function(), error = %failure, "Lambda refused the invoke; not retrying");
                    }
                    let failure = match unknown {
                        Some(earlier) if !failure.may_have_run() => unknown_then(earlier, &failure),
                        _ => failure,
                    };
                    envelope::fan_out(batch, Err(failure), spec.envelope);
                    return;
                }
            }
        }
    }

    /// Delivers each half of `left`; both inherit whether the whole may already have run.
    async fn split(self: &Arc<Self>, mut left: Vec<Message>, unknown: Option<InvokeFailure>) {
        let right = left.split_off(left.len() / 2);
        tokio::join!(
            Arc::clone(self).deliver_part(left, None, unknown.clone()),
            Arc::clone(self).deliver_part(right, None, unknown)
        );
    }

    /// Retries are exhausted: dead-letter the records, or answer with the failure when the
    /// route has no sink. A caller hears its `dead_letter_id` only once the sink confirmed
    /// the letter; the wait ends at the earliest deadline among the callers still waiting,
    /// so none of them times out for it. A letter the sink did not confirm is answered
    /// `503` without an id (the sink counted and logged it in full).
    async fn give_up(
        &self,
        batch: Vec<Message>,
        failure: InvokeFailure,
        attempts: u32,
        first_at: SystemTime,
        possibly_processed: bool,
    ) {
        let Some(sink) = &self.dlq else {
            envelope::fan_out(batch, Err(failure), self.spec.envelope);
            return;
        };
        let first = dlq::timestamp(first_at);
        let last = dlq::timestamp(SystemTime::now());
        let mut letters = Vec::with_capacity(batch.len());
        let mut answers = Vec::with_capacity(batch.len());
        for m in batch {
            let id = dlq::new_id();
            let record = std::str::from_utf8(&m.body)
                .ok()
                .and_then(|text| RawValue::from_string(text.to_owned()).ok())
                .unwrap_or_else(|| RawValue::from_string("null".to_owned()).expect("null is JSON"));
            letters.push(DeadLetter {
                id: id.clone(),
                route: self.spec.route.clone(),
                function: self.invoker.function().to_owned(),
                key: m.key.to_string(),
                record,
                error: failure.to_string(),
                error_kind: failure.label().to_owned(),
                attempts,
                possibly_processed,
                first_attempt_at: first.clone(),
                last_attempt_at: last.clone(),
            });
            answers.push((m, id));
        }
        tracing::warn!(records = letters.len(), attempts, error = %failure, sink = sink.kind(), "retries exhausted: dead-lettering");
        // Records whose callers have gone are still dead-lettered, but nobody waits for
        // them; with nobody waiting at all, the write still gets a bound.
        let now = Instant::now();
        let until = answers
            .iter()
            .filter(|(m, _)| !m.is_gone(now))
            .map(|(m, _)| m.deadline)
            .min()
            .unwrap_or(now + UNWATCHED_WRITE_BOUND);
        let confirmed = sink.write(&self.spec.route, letters, until).await;
        let mut lost = Vec::new();
        for ((m, id), written) in answers.into_iter().zip(confirmed) {
            let outcome = match written {
                Ok(()) => RecordError::DeadLettered {
                    id,
                    failure: failure.clone(),
                },
                Err(sink) => {
                    lost.push(m.id.clone());
                    RecordError::NotDeadLettered {
                        failure: failure.clone(),
                        sink,
                    }
                }
            };
            m.answer(Err(outcome));
        }
        if !lost.is_empty() {
            tracing::error!(route = %self.spec.route, records = ?lost, error = %failure, "retries exhausted and the dead-letter sink did not take the records; their callers get 503 without a dead-letter id");
        }
    }
}

/// The failure to report for a batch whose earlier attempt may have run it (`earlier`) and
/// whose last attempt failed with `last`: the outcome is unknown, and the text says both.
fn unknown_then(earlier: InvokeFailure, last: &InvokeFailure) -> InvokeFailure {
    match earlier {
        InvokeFailure::OutcomeUnknown { cause, message } => InvokeFailure::OutcomeUnknown {
            cause,
            message: format!("{message}; the last attempt failed: {last}"),
        },
        other => other,
    }
}

/// How long a dead-letter write may take when no caller waits for it (all have gone).
const UNWATCHED_WRITE_BOUND: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use crate::coalesce::fake::{self, Reply, ScriptedLambda};
    use crate::coalesce::{Delivered, RecordError};
    use crate::config::Flush;
    use crate::invoke::{InvokeFailure, UnknownCause};

    const MS: Duration = Duration::from_millis(1);
    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn batch_sizes_are_recorded_per_route_through_handles_registered_once() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let metrics = super::RouteMetrics::register("route-a");
            metrics.records.record(20.0);
            metrics.records.record(3.0);
            metrics.bytes.record(900.0);
        });
        let text = handle.render();
        for line in [
            "sluicegate_batch_records_count{route=\"route-a\"} 2",
            "sluicegate_batch_records_sum{route=\"route-a\"} 23",
            "sluicegate_batch_bytes_count{route=\"route-a\"} 1",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
    }

    fn times(lambda: &ScriptedLambda) -> Vec<Duration> {
        lambda.calls().iter().map(|c| c.at).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttles_retry_after_is_a_floor_under_the_backoff() {
        let lambda = ScriptedLambda::echo(1, Duration::ZERO)
            .script([Reply::Fail(fake::throttled(Some(Duration::from_secs(2))))]);
        let (batcher, lambda) = fake::start(fake::spec(1), lambda);
        let outcome = fake::submit(&batcher, "1", LONG).outcome().await;
        assert!(
            matches!(outcome, Ok(Delivered::Success { .. })),
            "{outcome:?}"
        );
        assert_eq!(
            times(&lambda),
            [Duration::ZERO, Duration::from_secs(2)],
            "the retry waits Lambda's 2 s, not the 100 ms backoff"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lambdas_retry_after_is_clamped_to_retry_cap() {
        let mut spec = fake::spec(1);
        spec.retry.cap = Duration::from_secs(3);
        let lambda = ScriptedLambda::echo(1, Duration::ZERO).script([Reply::Fail(
            fake::throttled(Some(crate::invoke::MAX_RETRY_AFTER)),
        )]);
        let (batcher, lambda) = fake::start(spec, lambda);
        let outcome = fake::submit(&batcher, "1", LONG).outcome().await;
        assert!(
            matches!(outcome, Ok(Delivered::Success { .. })),
            "{outcome:?}"
        );
        assert_eq!(times(&lambda), [Duration::ZERO, Duration::from_secs(3)]);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_per_attempt_and_exhausted_retries_answer_the_last_failure() {
        let mut spec = fake::spec(1);
        spec.retry.max_attempts = 4;
        let lambda =
            ScriptedLambda::echo(1, Duration::ZERO).answer(|_| Reply::Fail(fake::unavailable()));
        let (batcher, lambda) = fake::start(spec, lambda);
        let outcome = fake::submit(&batcher, "1", LONG).outcome().await;
        assert!(
            matches!(
                outcome,
                Err(RecordError::Invoke(InvokeFailure::Unavailable { .. }))
            ),
            "no sink: the caller hears the failure: {outcome:?}"
        );
        assert_eq!(
            times(&lambda),
            [Duration::ZERO, 100 * MS, 300 * MS, 700 * MS],
            "base 100 ms, doubled per attempt, max_attempts = 4"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_whose_deadline_precedes_the_retry_leaves_at_once_and_the_rest_retry() {
        let mut spec = fake::spec(2);
        spec.retry.base = Duration::from_secs(2);
        let lambda =
            ScriptedLambda::echo(1, Duration::ZERO).script([Reply::Fail(fake::unavailable())]);
        let (batcher, lambda) = fake::start(spec, lambda);
        let t0 = Instant::now();
        let short = fake::submit(&batcher, "\"short\"", 800 * MS);
        let long = fake::submit(&batcher, "\"long\"", LONG);

        let outcome = short.outcome().await;
        assert!(
            matches!(
                outcome,
                Err(RecordError::DeadlineBeforeRetry(
                    InvokeFailure::Unavailable { .. }
                ))
            ),
            "{outcome:?}"
        );
        assert_eq!(
            t0.elapsed(),
            Duration::ZERO,
            "answered at once, not at its deadline"
        );
        assert!(matches!(
            long.outcome().await,
            Ok(Delivered::Success { .. })
        ));
        let calls = lambda.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].at, Duration::from_secs(2));
        assert_eq!(
            calls[1].bodies,
            ["\"long\""],
            "the retry carries only who can wait"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_outcome_is_not_retried_unless_the_function_is_idempotent() {
        let lost = || InvokeFailure::OutcomeUnknown {
            cause: UnknownCause::ReadTimeout,
            message: "read timeout".to_owned(),
        };
        for retry_timeouts in [false, true] {
            let mut spec = fake::spec(1);
            spec.retry.retry_timeouts = retry_timeouts;
            let lambda = ScriptedLambda::echo(1, Duration::ZERO).script([Reply::Fail(lost())]);
            let (batcher, lambda) = fake::start(spec, lambda);
            let outcome = fake::submit(&batcher, "1", LONG).outcome().await;
            if retry_timeouts {
                assert!(
                    matches!(outcome, Ok(Delivered::Success { .. })),
                    "{outcome:?}"
                );
                assert_eq!(lambda.calls().len(), 2);
            } else {
                assert!(
                    matches!(
                        outcome,
                        Err(RecordError::Invoke(InvokeFailure::OutcomeUnknown { .. }))
                    ),
                    "{outcome:?}"
                );
                assert_eq!(lambda.calls().len(), 1, "one attempt only");
            }
        }
    }

    /// A function that crashes on any batch holding the record `{"poison":true}`.
    fn poisoned() -> ScriptedLambda {
        ScriptedLambda::echo(4, 5 * MS).answer(|call| {
            if call.bodies.iter().any(|b| b.contains("poison")) {
                Reply::FunctionError
            } else {
                Reply::Echo
            }
        })
    }

    fn twenty_with_poison_at_13() -> Vec<String> {
        (0..20)
            .map(|n| {
                if n == 13 {
                    r#"{"poison":true}"#.to_owned()
                } else {
                    format!(r#"{{"n":{n}}}"#)
                }
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn bisecting_isolates_the_poison_record_and_the_others_succeed() {
        let mut spec = fake::spec(20);
        spec.flush = Flush::Window;
        spec.bisect = true;
        let (batcher, lambda) = fake::start(spec, poisoned());
        let tickets: Vec<_> = twenty_with_poison_at_13()
            .iter()
            .map(|b| fake::submit(&batcher, b, LONG))
            .collect();
        for (n, t) in tickets.into_iter().enumerate() {
            let outcome = t.outcome().await;
            if n == 13 {
                assert!(
                    matches!(outcome, Err(RecordError::Function(_))),
                    "{outcome:?}"
                );
            } else {
                assert!(
                    matches!(outcome, Ok(Delivered::Success { .. })),
                    "{n}: {outcome:?}"
                );
            }
        }
        let calls = lambda.calls();
        let failed: Vec<usize> = calls
            .iter()
            .filter(|c| c.bodies.iter().any(|b| b.contains("poison")))
            .map(|c| c.ids.len())
            .collect();
        assert_eq!(
            failed,
            [20, 10, 5, 3, 2, 1],
            "halved down to the poison record"
        );
        let delivered: usize = calls
            .iter()
            .filter(|c| !c.bodies.iter().any(|b| b.contains("poison")))
            .map(|c| c.ids.len())
            .sum();
        assert_eq!(delivered, 19, "every other record ran exactly once");
    }

    #[tokio::test(start_paused = true)]
    async fn without_bisect_a_function_error_reaches_every_record_of_the_batch() {
        let mut spec = fake::spec(20);
        spec.flush = Flush::Window;
        let (batcher, lambda) = fake::start(spec, poisoned());
        let tickets: Vec<_> = twenty_with_poison_at_13()
            .iter()
            .map(|b| fake::submit(&batcher, b, LONG))
            .collect();
        for t in tickets {
            let outcome = t.outcome().await;
            assert!(
                matches!(outcome, Err(RecordError::Function(_))),
                "{outcome:?}"
            );
        }
        assert_eq!(lambda.calls().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_too_large_for_lambda_is_split_and_a_record_that_never_fits_fails_alone() {
        const LIMIT: usize = 100 * 1024;
        let mut spec = fake::spec(10);
        spec.flush = Flush::Window;
        spec.max_wait = 300 * MS;
        let lambda = ScriptedLambda::echo(4, 5 * MS).answer(|call| {
            if call.bytes > LIMIT {
                Reply::Fail(InvokeFailure::TooLarge {
                    message: "Request must be smaller than 102400 bytes".to_owned(),
                })
            } else {
                Reply::Echo
            }
        });
        let (batcher, lambda) = fake::start(spec, lambda);
        let record = format!("\"{}\"", "x".repeat(30 * 1024));
        let huge = format!("\"{}\"", "y".repeat(150 * 1024));
        let mut bodies = vec![record; 8];
        bodies.insert(3, huge);
        let tickets: Vec<_> = bodies
            .iter()
            .map(|b| fake::submit(&batcher, b, LONG))
            .collect();
        for (n, t) in tickets.into_iter().enumerate() {
            let outcome = t.outcome().await;
            if n == 3 {
                assert!(
                    matches!(
                        outcome,
                        Err(RecordError::Invoke(InvokeFailure::TooLarge { .. }))
                    ),
                    "{outcome:?}"
                );
            } else {
                assert!(
                    matches!(outcome, Ok(Delivered::Success { .. })),
                    "{n}: {outcome:?}"
                );
            }
        }
        let calls = lambda.calls();
        let ran: usize = calls.iter().filter(|c| c.ran).map(|c| c.ids.len()).sum();
        assert_eq!(ran, 8, "every record that fits ran exactly once");
        assert!(calls.iter().filter(|c| c.ran).all(|c| c.bytes <= LIMIT));
        assert_eq!(calls[0].ids.len(), 9, "the first batch was refused whole");
    }
}
