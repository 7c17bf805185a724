//! Prometheus metrics, served as text at `GET /metrics` on the admin listener.
//!
//! The code records through the `metrics` facade (`counter!`, `histogram!`, `gauge!`);
//! one process-wide recorder from `metrics-exporter-prometheus` collects them. Gauges that
//! describe current state (queue depth, adaptive limits, tracked keys) are set when the
//! endpoint is scraped, from the live objects, so they are never stale.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `sluicegate_requests_total` | counter | `route`, `status`, `scope` (429s; `none` otherwise) |
//! | `sluicegate_admission_rejections_total` | counter | `scope` (`global`, `route`, `key`, `quota`) |
//! | `sluicegate_bulk_requests_total` | counter | `route`, `status` |
//! | `sluicegate_bulk_records_total` | counter | `route` |
//! | `sluicegate_queue_depth` | gauge | `route` |
//! | `sluicegate_queue_bytes` | gauge | `route` |
//! | `sluicegate_batch_records` | histogram | `route` |
//! | `sluicegate_batch_bytes` | histogram | `route` |
//! | `sluicegate_invoke_duration_seconds` | histogram | `function`, `outcome` |
//! | `sluicegate_lambda_throttles_total` | counter | `function`, `reason` |
//! | `sluicegate_retries_total` | counter | `function`, `reason` |
//! | `sluicegate_dead_letters_total` | counter | `route`, `sink` |
//! | `sluicegate_dead_letter_failures_total` | counter | `route`, `sink`, `reason` |
//! | `sluicegate_invoke_rate_limit` | gauge | `function` |
//! | `sluicegate_invoke_concurrency_limit` | gauge | `function` |
//! | `sluicegate_invokes_in_flight` | gauge | `function` |
//! | `sluicegate_tracked_keys` | gauge | |
//! | `sluicegate_limit_backend_errors_total` | counter | |
//! | `sluicegate_limit_backend_up` | gauge | |
//! | `sluicegate_limit_backend_replicas` | gauge | |
//! | `sluicegate_limit_backend_uncharged_total` | counter | |
//! | `sluicegate_limit_backend_fallbacks_total` | counter | `policy` |
//! | `sluicegate_queue_displaced_total` | counter | `route` |
//! | `sluicegate_quota_exhausted_total` | counter | `plan` (`default` for keys without one) |
//! | `sluicegate_quota_keys_at_limit` | gauge | |
//! | `sluicegate_idempotency_replays_total` | counter | |
//! | `sluicegate_idempotency_joins_total` | counter | |
//! | `sluicegate_idempotency_conflicts_total` | counter | |
//! | `sluicegate_idempotency_evictions_total` | counter | |
//! | `sluicegate_idempotency_refusals_total` | counter | `reason` |

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same handle). `None`
/// when another recorder was installed first (an embedding application's own).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("sluicegate_batch_records".to_owned()),
                    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("sluicegate_batch_bytes".to_owned()),
                        &[1e3, 1e4, 1e5, 2.5e5, 5e5, 1e6, 2e6, 4e6, 6.3e6],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("sluicegate_invoke_duration_seconds".to_owned()),
                        &[
                            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                            60.0, 300.0, 900.0,
                        ],
                    )
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(e) => {
                    tracing::error!(error = %e, "cannot configure the metrics recorder");
                    return None;
                }
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
                return None;
            }
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    describe_counter!(
        "sluicegate_requests_total",
        "Record requests answered, by route, HTTP status and shed scope (each record of a bulk request counts as one)."
    );
    describe_counter!(
        "sluicegate_bulk_requests_total",
        "Bulk (application/x-ndjson) requests answered, by route and HTTP status."
    );
    describe_counter!(
        "sluicegate_bulk_records_total",
        "Records received in bulk requests, by route."
    );
    describe_counter!(
        "sluicegate_admission_rejections_total",
        "Requests refused by an admission layer, by scope."
    );
    describe_gauge!(
        "sluicegate_queue_depth",
        "Records waiting in a route's queue."
    );
    describe_gauge!(
        "sluicegate_queue_bytes",
        "Bytes of the records waiting in a route's queue (bounded by queue.max_bytes)."
    );
    describe_histogram!("sluicegate_batch_records", "Records per invoke attempt.");
    describe_histogram!(
        "sluicegate_batch_bytes",
        Unit::Bytes,
        "Invoke payload size, envelope included."
    );
    describe_histogram!(
        "sluicegate_invoke_duration_seconds",
        Unit::Seconds,
        "Lambda Invoke latency, by function and outcome."
    );
    describe_counter!("sluicegate_lambda_throttles_total", "Invokes Lambda throttled (TooManyRequestsException), by Reason: the proxy's view of CloudWatch Throttles.");
    describe_counter!(
        "sluicegate_retries_total",
        "Invoke retries, by function and the failure retried."
    );
    describe_counter!(
        "sluicegate_dead_letters_total",
        "Dead letters the sink confirmed (file: appended and fsynced; SQS: accepted)."
    );
    describe_counter!(
        "sluicegate_dead_letter_failures_total",
        "Dead letters the sink did not confirm, by reason (write_error, too_large, timeout, stopped); their callers got 503 without a dead_letter_id."
    );
    describe_gauge!(
        "sluicegate_invoke_rate_limit",
        "Current invoke-rate limit per function (adaptive may lower it)."
    );
    describe_gauge!(
        "sluicegate_invoke_concurrency_limit",
        "Current concurrency cap per function (adaptive may lower it)."
    );
    describe_gauge!(
        "sluicegate_invokes_in_flight",
        "Invokes in flight per function."
    );
    describe_gauge!("sluicegate_tracked_keys", "Client keys with limiter state.");
    describe_counter!(
        "sluicegate_limit_backend_errors_total",
        "Errors talking to the shared (Redis) limit backend."
    );
    describe_gauge!(
        "sluicegate_limit_backend_up",
        "1 while the shared (Redis) limit backend answers, 0 while the fallback policy applies."
    );
    describe_gauge!(
        "sluicegate_limit_backend_replicas",
        "Live replicas counted through Redis heartbeats (N: the local fallback gives each rate/N, burst/N)."
    );
    describe_counter!(
        "sluicegate_limit_backend_uncharged_total",
        "Fallback tokens not charged to Redis: too many buckets were waiting for charges, or the charge failed or missed its deadline once sent (never retried: it may have been applied)."
    );
    describe_counter!(
        "sluicegate_limit_backend_fallbacks_total",
        "Decisions made by the on_backend_error policy while Redis was down."
    );
    describe_counter!(
        "sluicegate_queue_displaced_total",
        "Queued records displaced from a full per-key fair queue by a lighter key's newcomer (answered 429 scope=queue)."
    );
    describe_counter!(
        "sluicegate_quota_exhausted_total",
        "Times a key used the last request of its usage quota's period, by plan."
    );
    describe_gauge!(
        "sluicegate_quota_keys_at_limit",
        "Keys whose usage-quota count has reached its limit in the current period."
    );
    describe_counter!(
        "sluicegate_idempotency_replays_total",
        "Requests with an Idempotency-Key answered with a completed request's stored response."
    );
    describe_counter!(
        "sluicegate_idempotency_joins_total",
        "Requests with an Idempotency-Key that waited for the same key's request in flight."
    );
    describe_counter!(
        "sluicegate_idempotency_conflicts_total",
        "Idempotency-Keys reused with a different body (422)."
    );
    describe_counter!(
        "sluicegate_idempotency_evictions_total",
        "Completed idempotency entries dropped to stay within max_entries / max_bytes."
    );
    describe_counter!(
        "sluicegate_idempotency_refusals_total",
        "Requests with an Idempotency-Key refused, by reason (reused, in_flight_elsewhere, full, unavailable, abandoned)."
    );
}
