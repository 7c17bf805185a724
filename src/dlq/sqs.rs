//! SQS sink: `SendMessageBatch` (up to 10 messages per call), one JSON letter per message.

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;

use super::DeadLetter;
use crate::config::LambdaConfig;

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
        let sdk = crate::invoke::sdk_config(&cfg).await;
        SqsSink {
            client: aws_sdk_sqs::Client::new(&sdk),
            queue_url: queue_url.to_owned(),
        }
    }

    pub async fn write(&self, letters: &[DeadLetter]) -> Result<(), String> {
        for chunk in letters.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, letter)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(format!("m{i}"))
                        .message_body(serde_json::to_string(letter).unwrap_or_default())
                        .build()
                        .map_err(|e| e.to_string())
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = self
                .client
                .send_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| {
                    format!(
                        "SendMessageBatch to {}: {}",
                        self.queue_url,
                        aws_sdk_sqs::error::DisplayErrorContext(e)
                    )
                })?;
            if !out.failed().is_empty() {
                let why: Vec<String> = out
                    .failed()
                    .iter()
                    .map(|f| format!("{}: {}", f.code(), f.message().unwrap_or("")))
                    .collect();
                return Err(format!(
                    "SQS refused {} dead letters: {}",
                    why.len(),
                    why.join("; ")
                ));
            }
        }
        Ok(())
    }
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
}
