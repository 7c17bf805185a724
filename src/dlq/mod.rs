//! Dead letters: records whose invokes exhausted their retries are written, with what
//! happened to them, to the route's sink — a JSON-lines file or an SQS queue — so
//! `sluicegate dlq redrive` can replay them later.
//!
//! A caller is promised a `dead_letter_id` only once the sink holds its letter:
//! [`DeadLetterSink::write`] hands the letters to the sink's own writer (a dedicated thread
//! for the file, because appends and fsync block; a task for SQS, whose client is async)
//! and waits, at most until the given instant (the earliest waiting caller's deadline), for
//! the writer to confirm each letter. The file writer confirms after the batch is appended
//! and fsynced; the SQS writer confirms the entries `SendMessageBatch` accepted. A letter
//! that is not confirmed — the write failed, the writer is stopped, it did not confirm in
//! time, or it is larger than SQS takes — is reported per letter as a [`SinkError`],
//! counted in `sluicegate_dead_letter_failures_total` and logged in full at `error` level,
//! so no record vanishes without a trace. A letter whose confirmation came too late may
//! still be written; the writer logs that it was.
//!
//! The file sink reopens the file when it was rotated (moved or deleted) and starts each
//! batch on a fresh line even after a torn write; [`read_letters`] skips and reports lines
//! that do not parse instead of rejecting the file. [`lock`] keeps two redrives of one file
//! apart.
//!
//! This module is storage only: it knows neither the batcher nor the pipeline. Replaying
//! letters is a use case above the pipeline ([`crate::redrive`]), and the `sluicegate dlq`
//! commands over these files live in [`crate::commands::dlq`].

mod file;
pub mod lock;
mod sqs;

use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

pub use self::file::{read_letters, FileSink, LetterFile, SkippedLine};
pub use self::sqs::SqsSink;
use crate::config::{DlqConfig, LambdaConfig};

/// One record that could not be delivered.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The dead-letter id the caller was given.
    pub id: String,
    /// The route (`routes[].name`) the record came in on; a redrive replays it there.
    pub route: String,
    /// The Lambda function the record was meant for.
    pub function: String,
    /// The client key the record was admitted under (`identity.source`; `-` when anonymous).
    pub key: String,
    /// The record's JSON body, verbatim (`null` when it was not valid UTF-8 JSON).
    pub record: Box<RawValue>,
    /// The last failure, as text.
    pub error: String,
    /// Lambda's error label (throttle reason, `Unavailable`, …).
    pub error_kind: String,
    /// How many invokes of the record's batch were attempted before giving up.
    pub attempts: u32,
    /// An attempt ended without knowing whether the function ran (a lost connection or a
    /// read timeout, retried because `retry.retry_timeouts` is on): a redrive may run the
    /// record a second time. Absent in letters written before this field existed.
    #[serde(default)]
    pub possibly_processed: bool,
    /// When the first attempt started, RFC 3339 UTC with milliseconds.
    pub first_attempt_at: String,
    /// When the record was given up on, after its last attempt; RFC 3339 UTC with
    /// milliseconds.
    pub last_attempt_at: String,
}

/// A new dead-letter id: `dl-` and a random (v4) UUID.
pub fn new_id() -> String {
    format!("dl-{}", uuid::Uuid::new_v4())
}

/// RFC 3339 UTC with milliseconds.
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// Why the sink did not confirm one letter.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SinkError {
    /// The sink refused or failed the write (an I/O error with the file's path, or what SQS
    /// answered); metric reason `write_error`.
    #[error("the dead-letter sink could not write it: {0}")]
    Write(String),
    /// The letter is larger than the sink can hold (SQS: 256 KiB a message); it cannot be
    /// written at all. Metric reason `too_large`.
    #[error("the dead-letter of {size} bytes is larger than the sink takes ({limit} bytes)")]
    TooLarge {
        /// The serialized letter, in bytes.
        size: usize,
        /// The most the sink takes, in bytes.
        limit: usize,
    },
    /// The writer had not taken the letter by the deadline (or the buffer to it stayed
    /// full); it was withdrawn, so it is never written. Metric reason `timeout`.
    #[error("the dead-letter sink did not take the letter before the caller's deadline; it was withdrawn and will not be written")]
    Timeout,
    /// The writer was still writing the letter at the deadline: it may yet land in the
    /// sink, without the caller holding its id. Metric reason `unconfirmed`.
    #[error("the dead-letter sink was still writing the letter at the caller's deadline; it may yet appear in the sink")]
    Unconfirmed,
    /// The writer is gone (its thread or task ended), so nothing more is written. Metric
    /// reason `stopped`.
    #[error("the dead-letter writer has stopped")]
    Stopped,
}

impl SinkError {
    /// The `reason` label of `sluicegate_dead_letter_failures_total`.
    pub fn label(&self) -> &'static str {
        match self {
            SinkError::Write(_) => "write_error",
            SinkError::TooLarge { .. } => "too_large",
            SinkError::Timeout => "timeout",
            SinkError::Unconfirmed => "unconfirmed",
            SinkError::Stopped => "stopped",
        }
    }
}

/// What the writer made of each letter of a job, in the job's order.
type Confirmation = Vec<Result<(), SinkError>>;

/// Letters for the writer and where to confirm them. Shared with the waiting side, so the
/// letters can be logged in full when the writer does not answer in time.
struct Job {
    letters: Arc<[DeadLetter]>,
    reply: oneshot::Sender<Confirmation>,
    /// Who has the job: [`QUEUED`] until the writer [takes](Job::take) it or the waiting side
    /// [withdraws](withdraw) it at its deadline — exactly one of the two wins. A withdrawn
    /// job is never written, so a caller told "no dead letter" never finds its record
    /// replayed by `dlq redrive`; a job taken in time may land after the deadline, and its
    /// callers are told so ([`SinkError::Unconfirmed`]).
    state: Arc<AtomicU8>,
}

const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const WITHDRAWN: u8 = 2;

impl Job {
    /// The writer's claim on the job; `false` when the waiting side withdrew it.
    fn take(&self) -> bool {
        self.state
            .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// The waiting side's deadline passed: withdraw the job if the writer has not taken it.
/// Returns what the callers are told.
fn withdraw(state: &AtomicU8) -> SinkError {
    match state.compare_exchange(QUEUED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => SinkError::Timeout,
        Err(_) => SinkError::Unconfirmed,
    }
}

/// Where a route's dead letters go. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DeadLetterSink {
    tx: mpsc::Sender<Job>,
    kind: &'static str,
}

/// Jobs buffered between the delivery tasks and the writer. A full buffer makes
/// [`DeadLetterSink::write`] wait (within its bound), never drop.
const BUFFER: usize = 1024;

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("letters", &self.letters.len())
            .finish()
    }
}

impl DeadLetterSink {
    /// Opens the sink a route's `dlq` names and starts its writer.
    pub async fn open(
        config: &DlqConfig,
        lambda: &LambdaConfig,
    ) -> std::io::Result<DeadLetterSink> {
        match (&config.file, &config.sqs_queue_url) {
            (Some(path), _) => Self::file(path),
            (None, Some(url)) => Ok(Self::sqs(url, lambda).await),
            (None, None) => Err(std::io::Error::other(
                "dlq has neither `file` nor `sqs_queue_url`",
            )),
        }
    }

    /// A sink appending JSON lines to the file at `path` (`dlq.file`), created with its
    /// directory if absent, written and fsynced by a dedicated thread. Fails when the file cannot be opened or
    /// the thread cannot be started.
    pub fn file(path: &Path) -> std::io::Result<DeadLetterSink> {
        let mut sink = FileSink::open(path)?;
        let (tx, mut rx) = mpsc::channel::<Job>(BUFFER);
        // A dedicated thread: file writes and fsync block, and must not stall the runtime.
        std::thread::Builder::new()
            .name("sluicegate-dlq-file".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    if !job.take() {
                        continue;
                    }
                    // One append and one fsync per job: all its letters are on disk, or none
                    // is confirmed.
                    let outcome = sink
                        .write(&job.letters)
                        .map_err(|e| SinkError::Write(format!("{}: {e}", sink.path().display())));
                    let confirmation = vec![outcome; job.letters.len()];
                    confirm(job, confirmation, "file");
                }
            })?;
        Ok(DeadLetterSink { tx, kind: "file" })
    }

    /// A sink sending each letter as one message to the SQS queue at `queue_url`
    /// (`dlq.sqs_queue_url`), with `[lambda]`'s region, timeouts and credentials, from a
    /// task on the current runtime.
    pub async fn sqs(queue_url: &str, lambda: &LambdaConfig) -> DeadLetterSink {
        let sink = SqsSink::new(queue_url, lambda).await;
        let (tx, mut rx) = mpsc::channel::<Job>(BUFFER);
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                if !job.take() {
                    continue;
                }
                let confirmation = sink.write(&job.letters).await;
                confirm(job, confirmation, "sqs");
            }
        });
        DeadLetterSink { tx, kind: "sqs" }
    }

    /// `file` or `sqs`: the `sink` label of the dead-letter metrics.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Hands `letters` to the writer and waits, until `until` at the latest, for it to
    /// confirm them. One result per letter, in order: `Ok` once the sink holds the letter.
    /// Letters the writer did not confirm in time are logged in full here; failures the
    /// writer saw are logged by the writer.
    pub async fn write(
        &self,
        route: &str,
        letters: Vec<DeadLetter>,
        until: Instant,
    ) -> Vec<Result<(), SinkError>> {
        let letters: Arc<[DeadLetter]> = letters.into();
        let count = letters.len();
        let (reply, confirmed) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        let job = Job {
            letters: Arc::clone(&letters),
            reply,
            state: Arc::clone(&state),
        };
        let outcome = match tokio::time::timeout_at(until, self.tx.send(job)).await {
            Ok(Ok(())) => match tokio::time::timeout_at(until, confirmed).await {
                Ok(Ok(confirmation)) => confirmation,
                // The writer dropped the job without answering: it has stopped.
                Ok(Err(_)) => vec![Err(SinkError::Stopped); count],
                Err(_) => vec![Err(withdraw(&state)); count],
            },
            Ok(Err(_)) => vec![Err(SinkError::Stopped); count],
            Err(_) => vec![Err(SinkError::Timeout); count],
        };
        for (letter, result) in letters.iter().zip(&outcome) {
            match result {
                Ok(()) => metrics::counter!("sluicegate_dead_letters_total", "route" => route.to_owned(), "sink" => self.kind)
                    .increment(1),
                Err(e) => {
                    metrics::counter!("sluicegate_dead_letter_failures_total", "route" => route.to_owned(), "sink" => self.kind, "reason" => e.label())
                        .increment(1);
                    // The writer logs what it failed to write; what it never answered for
                    // is logged here, so every lost letter is in the log exactly once.
                    if matches!(
                        e,
                        SinkError::Timeout | SinkError::Unconfirmed | SinkError::Stopped
                    ) {
                        lost(letter, e);
                    }
                }
            }
        }
        outcome
    }
}

/// Sends the writer's `confirmation` back; logs the letters it could not write, and those
/// written after the waiting side gave up (their callers were told there is no letter).
fn confirm(job: Job, confirmation: Confirmation, sink: &'static str) {
    for (letter, result) in job.letters.iter().zip(&confirmation) {
        if let Err(e) = result {
            lost(letter, e);
        }
    }
    if let Err(confirmation) = job.reply.send(confirmation) {
        let late: Vec<&str> = job
            .letters
            .iter()
            .zip(&confirmation)
            .filter(|(_, result)| result.is_ok())
            .map(|(letter, _)| letter.id.as_str())
            .collect();
        if !late.is_empty() {
            tracing::warn!(sink, dead_letter_ids = ?late, "dead letters written after their callers were answered without an id");
        }
    }
}

/// Last resort: the letter goes to the log in full.
fn lost(letter: &DeadLetter, why: &SinkError) {
    let json = serde_json::to_string(letter).unwrap_or_default();
    tracing::error!(dead_letter = %json, reason = why.label(), error = %why, "dead letter not confirmed by its sink");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_ids_are_prefixed_uuids_and_unique() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            let uuid = id.strip_prefix("dl-").expect("prefixed");
            assert!(uuid::Uuid::parse_str(uuid).is_ok(), "{id}");
        }
    }

    fn letter(id: &str) -> DeadLetter {
        DeadLetter {
            id: id.to_owned(),
            route: "records".into(),
            function: "f".into(),
            key: "k".into(),
            record: RawValue::from_string("1".into()).unwrap(),
            error: "unavailable".into(),
            error_kind: "Unavailable".into(),
            attempts: 2,
            possibly_processed: false,
            first_attempt_at: "2026-01-01T00:00:00.000Z".into(),
            last_attempt_at: "2026-01-01T00:00:01.000Z".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_that_does_not_confirm_in_time_is_a_timeout_per_letter() {
        let (tx, _jobs_never_answered) = mpsc::channel(1);
        let sink = DeadLetterSink { tx, kind: "test" };
        let until = Instant::now() + std::time::Duration::from_millis(50);
        let results = sink
            .write("records", vec![letter("a"), letter("b")], until)
            .await;
        assert!(
            results.iter().all(|r| matches!(r, Err(SinkError::Timeout))),
            "{results:?}"
        );
        assert_eq!(Instant::now(), until, "waits exactly until the bound");
    }

    #[tokio::test(start_paused = true)]
    async fn a_withdrawn_job_is_never_written_and_a_taken_one_is_unconfirmed() {
        let (tx, mut jobs) = mpsc::channel::<Job>(4);
        let sink = DeadLetterSink { tx, kind: "test" };
        let until = Instant::now() + std::time::Duration::from_millis(50);
        // Nobody takes the job before the deadline: it is withdrawn, and a writer that gets
        // to it later must skip it.
        let results = sink.write("records", vec![letter("a")], until).await;
        assert!(
            matches!(results[..], [Err(SinkError::Timeout)]),
            "{results:?}"
        );
        let withdrawn = jobs.recv().await.expect("the job was queued");
        assert!(
            !withdrawn.take(),
            "a withdrawn job is not the writer's to write"
        );
        // A writer that took the job but did not confirm by the deadline: the letter may
        // land, and the callers are told exactly that.
        let writer = tokio::spawn(async move {
            let job = jobs.recv().await.expect("the job was queued");
            assert!(job.take());
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            drop(job);
        });
        let until = Instant::now() + std::time::Duration::from_millis(50);
        let results = sink.write("records", vec![letter("b")], until).await;
        assert!(
            matches!(results[..], [Err(SinkError::Unconfirmed)]),
            "{results:?}"
        );
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_stopped_writer_confirms_nothing() {
        let (tx, jobs) = mpsc::channel(1);
        drop(jobs);
        let sink = DeadLetterSink { tx, kind: "test" };
        let until = Instant::now() + std::time::Duration::from_secs(5);
        let results = sink.write("records", vec![letter("a")], until).await;
        assert!(
            matches!(results[..], [Err(SinkError::Stopped)]),
            "{results:?}"
        );
    }

    #[tokio::test]
    async fn the_file_writer_confirms_each_letter_once_it_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        let sink = DeadLetterSink::file(&path).unwrap();
        let until = Instant::now() + std::time::Duration::from_secs(5);
        let results = sink
            .write("records", vec![letter("a"), letter("b")], until)
            .await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let ids: Vec<String> = read_letters(&path)
            .unwrap()
            .letters
            .into_iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(ids, ["a", "b"]);
    }
}
