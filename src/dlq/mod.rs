//! Dead letters: records whose invokes exhausted their retries are written, with what
//! happened to them, to the route's sink — a JSON-lines file or an SQS queue — so
//! `sluicegate dlq redrive` can replay them later.
//!
//! Writing never blocks the request path: [`DeadLetterSink::send`] hands a batch of letters
//! to the sink's own task over a bounded channel, and the callers are answered (`503` with
//! the dead-letter id) without waiting for the write. The file sink appends, flushes and
//! fsyncs once per batch and reopens the file when it was rotated (moved or deleted). If a
//! letter cannot be written at all, it is logged in full at `error` level, so no record
//! vanishes without a trace.

mod file;
pub mod redrive;
mod sqs;

use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::mpsc;

pub use self::file::{read_letters, FileSink};
pub use self::sqs::SqsSink;
use crate::config::{DlqConfig, LambdaConfig};

/// One record that could not be delivered.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The dead-letter id the caller was given.
    pub id: String,
    pub route: String,
    pub function: String,
    pub key: String,
    pub record: Box<RawValue>,
    /// The last failure, as text.
    pub error: String,
    /// Lambda's error label (throttle reason, `Unavailable`, …).
    pub error_kind: String,
    pub attempts: u32,
    /// An attempt ended without knowing whether the function ran (a lost connection or a
    /// read timeout, retried because `retry.retry_timeouts` is on): a redrive may run the
    /// record a second time. Absent in letters written before this field existed.
    #[serde(default)]
    pub possibly_processed: bool,
    /// RFC 3339 UTC.
    pub first_attempt_at: String,
    pub last_attempt_at: String,
}

/// A new dead-letter id.
pub fn new_id() -> String {
    format!("dl-{:016x}", rand::random::<u64>())
}

/// RFC 3339 UTC with milliseconds.
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// Where a route's dead letters go. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DeadLetterSink {
    tx: mpsc::Sender<Vec<DeadLetter>>,
    kind: &'static str,
}

/// Batches of letters buffered between the delivery tasks and the writer.
const BUFFER: usize = 1024;

impl DeadLetterSink {
    /// Opens the sink a route's `dlq` names and starts its writer task.
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

    pub fn file(path: &Path) -> std::io::Result<DeadLetterSink> {
        let mut sink = FileSink::open(path)?;
        let (tx, mut rx) = mpsc::channel::<Vec<DeadLetter>>(BUFFER);
        // A dedicated thread: file writes and fsync block, and must not stall the runtime.
        std::thread::Builder::new()
            .name("sluicegate-dlq-file".into())
            .spawn(move || {
                while let Some(letters) = rx.blocking_recv() {
                    if let Err(e) = sink.write(&letters) {
                        lost(&letters, &e.to_string());
                    }
                }
            })?;
        Ok(DeadLetterSink { tx, kind: "file" })
    }

    pub async fn sqs(queue_url: &str, lambda: &LambdaConfig) -> DeadLetterSink {
        let sink = SqsSink::new(queue_url, lambda).await;
        let (tx, mut rx) = mpsc::channel::<Vec<DeadLetter>>(BUFFER);
        tokio::spawn(async move {
            while let Some(letters) = rx.recv().await {
                if let Err(e) = sink.write(&letters).await {
                    lost(&letters, &e);
                }
            }
        });
        DeadLetterSink { tx, kind: "sqs" }
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Queues letters for writing; never waits.
    pub fn send(&self, route: &str, letters: Vec<DeadLetter>) {
        metrics::counter!("sluicegate_dead_letters_total", "route" => route.to_owned(), "sink" => self.kind)
            .increment(letters.len() as u64);
        if let Err(e) = self.tx.try_send(letters) {
            let letters = match e {
                mpsc::error::TrySendError::Full(l) | mpsc::error::TrySendError::Closed(l) => l,
            };
            lost(&letters, "the dead-letter writer is backed up or stopped");
        }
    }
}

/// Last resort: the letter goes to the log in full.
fn lost(letters: &[DeadLetter], why: &str) {
    for letter in letters {
        let json = serde_json::to_string(letter).unwrap_or_default();
        tracing::error!(dead_letter = %json, why, "dead letter could not be written to its sink");
    }
}
