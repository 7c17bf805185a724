//! SQS sink: one JSON letter per message, sent with `SendMessageBatch` in batches within
//! its limits (10 entries, 256 KiB of bodies). A letter larger than 256 KiB cannot go to
//! SQS at all; it is reported as [`SinkError::TooLarge`] (its caller gets no dead-letter id
//! and the letter is logged in full) rather than truncated, because a letter without its
//! whole record could not be redriven.

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;

use super::{DeadLetter, SinkError};
use crate::config::LambdaConfig;

/// Sends letters to one SQS queue (`dlq.sqs_queue_url`) with `SendMessageBatch`. Async:
/// the sink's writer task owns it.
#[derive(Debug)]
pub struct SqsSink {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

/// The endpoint that serves a queue URL: its scheme and authority. This is the regional
/// SQS endpoint for AWS queue URLs, and the server itself for SQS-compatible servers.
fn endpoint_of(queue_url: &str) -> Option<String> {
    let uri: http::Uri = queue_url.parse().ok()?;
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?))
}

impl SqsSink {
    /// The client shares `[lambda]`'s region, timeouts and credential rule.
    pub async fn new(queue_url: &str, lambda: &LambdaConfig) -> SqsSink {
        let mut cfg = lambda.clone();
        cfg.endpoint_url = endpoint_of(queue_url);
        let sdk = crate::aws::sdk_config(&cfg).await;
        SqsSink {
            client: aws_sdk_sqs::Client::new(&sdk),
            queue_url: queue_url.to_owned(),
        }
    }

    /// Sends `letters`, one message each, and says per letter whether SQS accepted it: a
    /// refused call fails its whole batch, a `Failed` entry fails only its letter.
    pub async fn write(&self, letters: &[DeadLetter]) -> Vec<Result<(), SinkError>> {
        let mut results: Vec<Result<(), SinkError>> = vec![Ok(()); letters.len()];
        let mut bodies: Vec<String> = Vec::with_capacity(letters.len());
        for letter in letters {
            bodies.push(serde_json::to_string(letter).unwrap_or_default());
        }
        let sizes: Vec<usize> = bodies.iter().map(String::len).collect();
        for (i, &size) in sizes.iter().enumerate() {
            if size > MAX_BATCH_BYTES {
                results[i] = Err(SinkError::TooLarge {
                    size,
                    limit: MAX_BATCH_BYTES,
                });
            }
        }
        for batch in batches(&sizes) {
            let entries = batch
                .iter()
                .map(|&i| {
                    SendMessageBatchRequestEntry::builder()
                        .id(format!("m{i}"))
                        .message_body(std::mem::take(&mut bodies[i]))
                        .build()
                        .map_err(|e| e.to_string())
                })
                .collect::<Result<Vec<_>, _>>();
            let sent = match entries {
                Ok(entries) => self
                    .client
                    .send_message_batch()
                    .queue_url(&self.queue_url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| {
                        format!(
                            "SendMessageBatch to {}: {}",
                            crate::config::redact::url(&self.queue_url),
                            aws_sdk_sqs::error::DisplayErrorContext(e)
                        )
                    }),
                Err(e) => Err(e),
            };
            let out = match sent {
                Ok(out) => out,
                Err(why) => {
                    for &i in &batch {
                        results[i] = Err(SinkError::Write(why.clone()));
                    }
                    continue;
                }
            };
            for failed in out.failed() {
                let refused = failed
                    .id()
                    .strip_prefix('m')
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|i| batch.contains(i));
                let why = format!(
                    "SQS refused the message: {}: {}",
                    failed.code(),
                    failed.message().unwrap_or("")
                );
                match refused {
                    Some(i) => results[i] = Err(SinkError::Write(why)),
                    // An entry id we did not send: nothing in this batch can be trusted.
                    None => {
                        for &i in &batch {
                            results[i] = Err(SinkError::Write(why.clone()));
                        }
                    }
                }
            }
            // Only entries SQS lists as successful are confirmed; one it lists nowhere
            // was not accepted either.
            for &i in &batch {
                let entry = format!("m{i}");
                if results[i].is_ok() && !out.successful().iter().any(|ok| ok.id() == entry) {
                    results[i] = Err(SinkError::Write(
                        "SendMessageBatch did not report the message as sent".to_owned(),
                    ));
                }
            }
        }
        results
    }
}

/// `SendMessageBatch` limits: 10 entries, and 256 KiB for all message bodies together
/// (the sink sends no attributes).
const MAX_BATCH_ENTRIES: usize = 10;
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Groups messages of `sizes` bytes, in order, into `SendMessageBatch` calls within both
/// limits. A message larger than a whole batch may be is left out: SQS cannot take it.
fn batches(sizes: &[usize]) -> Vec<Vec<usize>> {
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut bytes = 0;
    for (i, &size) in sizes.iter().enumerate() {
        if size > MAX_BATCH_BYTES {
            continue;
        }
        if current.len() == MAX_BATCH_ENTRIES || bytes + size > MAX_BATCH_BYTES {
            batches.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(i);
        bytes += size;
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_endpoint_is_the_queue_urls_origin() {
        assert_eq!(
            super::endpoint_of("https://sqs.eu-west-1.amazonaws.com/123456789012/dlq").as_deref(),
            Some("https://sqs.eu-west-1.amazonaws.com")
        );
        assert_eq!(
            super::endpoint_of("http://127.0.0.1:5000/123456789012/dlq").as_deref(),
            Some("http://127.0.0.1:5000")
        );
    }

    #[test]
    fn batches_hold_at_most_ten_entries() {
        let sizes = vec![100; 25];
        let lens: Vec<usize> = super::batches(&sizes).iter().map(Vec::len).collect();
        assert_eq!(lens, [10, 10, 5]);
    }

    #[test]
    fn batches_split_by_total_bytes() {
        let kib = 1024;
        // 100 + 100 fits 256 KiB; a third 100 KiB message starts a new batch.
        let sizes = [
            100 * kib,
            100 * kib,
            100 * kib,
            56 * kib,
            200 * kib,
            256 * kib,
        ];
        assert_eq!(
            super::batches(&sizes),
            vec![vec![0, 1], vec![2, 3], vec![4], vec![5]]
        );
        for batch in super::batches(&sizes) {
            let total: usize = batch.iter().map(|&i| sizes[i]).sum();
            assert!(total <= super::MAX_BATCH_BYTES, "{batch:?}: {total}");
        }
    }

    #[test]
    fn a_message_larger_than_a_batch_is_left_out() {
        let sizes = [10, 256 * 1024 + 1, 10];
        assert_eq!(super::batches(&sizes), vec![vec![0, 2]]);
    }
}
