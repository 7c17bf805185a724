//! `sluicegate dlq redrive`: replays dead letters through the same pipeline as live
//! traffic — the same invoke gate (rate and concurrency), retries and batching — and
//! reports what succeeded. Letters that fail again are handed back to the caller of
//! [`redrive`] (the CLI writes them back), never dropped.

use std::collections::HashMap;
use std::time::SystemTime;

use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{timestamp, DeadLetter};
use crate::coalesce::{Delivered, RecordError};
use crate::config::Config;
use crate::pipeline::Pipeline;

/// What a redrive did.
#[derive(Debug, Default, Serialize)]
pub struct RedriveReport {
    pub total: usize,
    /// The function processed the record successfully (or Lambda queued it, for events).
    pub succeeded: usize,
    /// The function processed the record and reported it failed: not retried again.
    pub function_errors: usize,
    /// Still undeliverable; returned in `remaining`.
    pub failed: usize,
    #[serde(skip)]
    pub remaining: Vec<DeadLetter>,
}

/// Replays `letters`. A letter naming a route the config does not have stays remaining.
pub async fn redrive(config: &Config, letters: Vec<DeadLetter>) -> std::io::Result<RedriveReport> {
    let client = crate::invoke::build_client(&config.lambda).await;
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
