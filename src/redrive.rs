//! Replaying dead letters (`sluicegate dlq redrive`) through the same pipeline as live
//! traffic — an invoke gate with the route's rate and concurrency, its retries and
//! batching — and reports what succeeded. Letters that fail again are handed back to the
//! caller of [`redrive`] (the CLI writes them back), never dropped.
//!
//! The redrive's gate is its own: a server running beside it has another, so together they
//! may send up to twice a route's limits (with `limits.backend = "redis"` the invoke *rate*
//! is shared, the concurrency never is). [`limit_routes`] lowers the redrive's limits below
//! the route's (`--rate`, `--concurrency`) so that the two fit the function together; it
//! refuses to raise them.
//!
//! A use case above the pipeline: it builds a [`Pipeline`] and reads letters that
//! [`crate::dlq`] stored; `dlq` itself never imports it. The files, locks and report printing
//! of the command are in [`crate::commands::dlq`].

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::SystemTime;

use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::coalesce::{Delivered, RecordError};
use crate::config::{Config, RouteConfig};
use crate::dlq::{timestamp, DeadLetter};
use crate::pipeline::Pipeline;

/// What a redrive did.
#[derive(Debug, Default, Serialize)]
pub struct RedriveReport {
    /// Letters given to the redrive: `succeeded + function_errors + failed`.
    pub total: usize,
    /// The function processed the record successfully (or Lambda queued it, for events).
    pub succeeded: usize,
    /// The function processed the record and reported it failed: not retried again.
    pub function_errors: usize,
    /// Still undeliverable; returned in `remaining`.
    pub failed: usize,
    /// The letters counted in `failed`, their attempts, last attempt time and error
    /// updated, for the caller to keep for a later redrive.
    #[serde(skip)]
    pub remaining: Vec<DeadLetter>,
}

/// Lowers every route's invoke limits for a redrive: `rate` invokes per second (burst cut
/// to match, so the first second does not send the route's full burst) and `concurrency`
/// invokes in flight. Refuses a value above any route's own: a redrive never sends faster
/// than the route is allowed to.
pub fn limit_routes(
    config: &mut Config,
    rate: Option<f64>,
    concurrency: Option<u32>,
) -> Result<(), String> {
    if let Some(rate) = rate {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!("--rate {rate}: must be a positive number"));
        }
    }
    let concurrency = match concurrency {
        Some(n) => Some(
            NonZeroU32::new(n).ok_or_else(|| "--concurrency 0: must be at least 1".to_owned())?,
        ),
        None => None,
    };
    for route in &mut config.routes {
        lower(route, rate, concurrency)?;
    }
    Ok(())
}

fn lower(
    route: &mut RouteConfig,
    rate: Option<f64>,
    concurrency: Option<NonZeroU32>,
) -> Result<(), String> {
    if let Some(rate) = rate {
        if rate > route.invoke.rate {
            return Err(format!(
                "--rate {rate} is above route {}'s invoke.rate {}; a redrive may only go slower",
                route.name, route.invoke.rate
            ));
        }
        route.invoke.rate = rate;
        // At least one token, else the bucket could never pass an invoke.
        let per_second = NonZeroU32::new(rate.ceil() as u32).unwrap_or(NonZeroU32::MIN);
        route.invoke.burst = route.invoke.burst.min(per_second);
    }
    if let Some(concurrency) = concurrency {
        if concurrency > route.invoke.max_concurrency {
            return Err(format!(
                "--concurrency {concurrency} is above route {}'s invoke.max_concurrency {}; a redrive may only use less",
                route.name, route.invoke.max_concurrency
            ));
        }
        route.invoke.max_concurrency = concurrency;
    }
    Ok(())
}

/// Replays `letters`. A letter naming a route the config does not have stays remaining.
pub async fn redrive(config: &Config, letters: Vec<DeadLetter>) -> std::io::Result<RedriveReport> {
    let client = crate::invoke::build_client(&config.lambda).await?;
    let pipeline = Pipeline::build(config, &client, false).await?;
    let routes: HashMap<&str, usize> = pipeline
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| (r.name.as_str(), i))
        .collect();
    let mut report = RedriveReport {
        total: letters.len(),
        ..RedriveReport::default()
    };
    // Each letter stays here until its replay ends, so even a panicked task cannot lose it.
    let mut pending: HashMap<tokio::task::Id, DeadLetter> = HashMap::new();
    let mut tasks: JoinSet<Result<Delivered, RecordError>> = JoinSet::new();
    for mut letter in letters {
        let Some(&index) = routes.get(letter.route.as_str()) else {
            letter.error = format!("redrive: the config has no route named {:?}", letter.route);
            report.failed += 1;
            report.remaining.push(letter);
            continue;
        };
        let batcher = pipeline.routes[index].batcher.clone();
        let deadline_after = config.routes[index].request_timeout(&config.server);
        let key: std::sync::Arc<str> = letter.key.as_str().into();
        // Keep the queue from overflowing: redrive waits instead of shedding itself.
        while tasks.len() >= (config.routes[index].queue.max_pending / 2).max(1) {
            if let Some(done) = tasks.join_next_with_id().await {
                tally(&mut report, &mut pending, done);
            }
        }
        let record = letter.record.clone();
        let handle = tasks.spawn(async move {
            loop {
                match batcher.submit(&key, &record, Instant::now() + deadline_after) {
                    Ok(ticket) => {
                        break tokio::time::timeout(deadline_after, ticket.outcome())
                            .await
                            .unwrap_or(Err(RecordError::Lost))
                    }
                    Err(RecordError::QueueFull { retry_after }) => {
                        tokio::time::sleep(retry_after).await
                    }
                    Err(e) => break Err(e),
                }
            }
        });
        pending.insert(handle.id(), letter);
    }
    while let Some(done) = tasks.join_next_with_id().await {
        tally(&mut report, &mut pending, done);
    }
    Ok(report)
}

type Done = Result<(tokio::task::Id, Result<Delivered, RecordError>), tokio::task::JoinError>;

fn tally(
    report: &mut RedriveReport,
    pending: &mut HashMap<tokio::task::Id, DeadLetter>,
    done: Done,
) {
    let (id, outcome) = match done {
        Ok((id, outcome)) => (id, outcome),
        Err(e) => (e.id(), Err(RecordError::Lost)),
    };
    let Some(mut letter) = pending.remove(&id) else {
        return;
    };
    match outcome {
        Ok(Delivered::Success { .. } | Delivered::Accepted) => report.succeeded += 1,
        Ok(Delivered::Failed { .. }) => report.function_errors += 1,
        Err(err) => {
            letter.attempts += 1;
            letter.last_attempt_at = timestamp(SystemTime::now());
            letter.error = err.to_string();
            report.failed += 1;
            report.remaining.push(letter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml(
            "[[routes]]\nname = \"a\"\nfunction = \"f\"\ninvoke = { rate = 8.0, burst = 15, max_concurrency = 5 }\n",
        )
        .unwrap()
    }

    #[test]
    fn by_default_a_redrive_uses_the_routes_own_limits() {
        let mut c = config();
        limit_routes(&mut c, None, None).unwrap();
        let inv = &c.routes[0].invoke;
        assert_eq!(
            (inv.rate, inv.burst.get(), inv.max_concurrency.get()),
            (8.0, 15, 5)
        );
    }

    #[test]
    fn lower_limits_apply_with_a_burst_to_match() {
        let mut c = config();
        limit_routes(&mut c, Some(2.5), Some(1)).unwrap();
        let inv = &c.routes[0].invoke;
        assert_eq!(
            (inv.rate, inv.burst.get(), inv.max_concurrency.get()),
            (2.5, 3, 1)
        );
    }

    #[test]
    fn limits_above_the_routes_are_refused() {
        let err = limit_routes(&mut config(), Some(9.0), None).unwrap_err();
        assert!(err.contains("invoke.rate"), "{err}");
        let err = limit_routes(&mut config(), None, Some(6)).unwrap_err();
        assert!(err.contains("invoke.max_concurrency"), "{err}");
        assert!(limit_routes(&mut config(), Some(f64::NAN), None).is_err());
        assert!(limit_routes(&mut config(), None, Some(0)).is_err());
    }
}
