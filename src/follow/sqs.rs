//! follow::sqs: `--events sqs:QUEUE`, the queue an S3 bucket's notifications go to (the way
//! AWS users wire buckets; moto's server does it too). Long-poll ReceiveMessage, each message
//! a [`Delivery`] deleted (DeleteMessageBatch) only when the caller acknowledges it, the
//! backlog from GetQueueAttributes.
//!
//! The client is built from the source side's AWS configuration (`s3::client::sdk_config`:
//! profile, region, endpoint, the standard credential chain); a queue given as a URL is
//! reached at that URL's host (and, on AWS, in the region the host names). Retries: the
//! SDK's standard retry (3 attempts, backoff), not the S3 layer's loop: a failed receive
//! only delays the next one, and nothing is lost while a message is not deleted.
//!
//! May call: aws-sdk-sqs, [`super::records`], [`super::intake`]'s types, `s3::client` (the
//! side's configuration), `events` (`say!`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::config::retry::RetryConfig;
use aws_sdk_sqs::config::timeout::TimeoutConfig;
use aws_sdk_sqs::config::Region;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, QueueAttributeName};
use tokio::time::Instant;

use super::intake::{Delivery, Handle, Held, IntakeError};
use super::records::parse_body;
use crate::s3::side::SideConfig;
use crate::s3::Timeouts;

/// The longest long poll SQS allows.
const LONG_POLL: Duration = Duration::from_secs(20);
/// Messages per ReceiveMessage and per DeleteMessageBatch (SQS's limit).
const BATCH: usize = 10;
/// ReceiveMessage calls one receive makes while each fills up, so a busy queue is drained
/// in batches of up to this many times [`BATCH`] messages.
const DRAIN_CALLS: usize = 10;

/// An open queue. A clone shares the client and the count of held messages (a
/// [`super::intake::BacklogProbe`] reads the backlog through one).
#[derive(Clone, Debug)]
pub(super) struct Queue {
    client: aws_sdk_sqs::Client,
    /// The queue as given (URL or name), for messages.
    given: String,
    url: String,
    /// Messages handed over and neither acknowledged nor dropped.
    held: Arc<AtomicU64>,
}

/// A received message's receipt handle; counted as held by this process until it is
/// deleted or dropped.
#[derive(Debug)]
pub(super) struct Receipt {
    handle: String,
    _held: Held,
}

/// The region a queue URL on AWS names (`sqs.REGION.amazonaws.com`,
/// `REGION.queue.amazonaws.com`); None for other hosts.
fn aws_region(host: &str) -> Option<String> {
    let host = host.split(':').next().unwrap_or(host);
    let parts: Vec<&str> = host.split('.').collect();
    match parts.as_slice() {
        ["sqs", region, "amazonaws", ..] | [region, "queue", "amazonaws", ..] => {
            Some(region.to_string())
        }
        _ => None,
    }
}

/// The scheme and host of a URL (`https://sqs.eu-west-1.amazonaws.com/1/q` →
/// `https://sqs.eu-west-1.amazonaws.com`) and the host alone.
fn origin(url: &str) -> Option<(String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split('/').next().filter(|h| !h.is_empty())?;
    Some((format!("{scheme}://{host}"), host.to_string()))
}

/// The reason of an SDK error in one line: the service's code and message, else the whole
/// chain of causes.
fn reason<E, R>(e: &aws_sdk_sqs::error::SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let text = match (e.code(), e.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_string(),
        _ => DisplayErrorContext(e).to_string(),
    };
    text.replace(['\n', '\r'], " ")
}

impl Queue {
    pub(super) async fn open(
        queue: &str,
        side: &SideConfig,
        timeouts: Timeouts,
    ) -> Result<Queue, IntakeError> {
        let mut cfg = side.clone();
        let is_url = queue.starts_with("http://") || queue.starts_with("https://");
        if is_url {
            if let Some((origin, host)) = origin(queue) {
                if let Some(region) = aws_region(&host) {
                    cfg.region = Some(region);
                    cfg.endpoint = None;
                } else {
                    cfg.endpoint = Some(origin);
                }
            }
        }
        let sdk = crate::s3::client::sdk_config(&cfg).await;
        let mut b = aws_sdk_sqs::config::Builder::from(&sdk)
            .retry_config(RetryConfig::standard())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(timeouts.connect)
                    // A long poll answers after up to 20 s.
                    .operation_attempt_timeout(timeouts.attempt.max(LONG_POLL * 2))
                    .build(),
            );
        if sdk.region().is_none() {
            b = b.region(Region::new("us-east-1"));
        }
        let client = aws_sdk_sqs::Client::from_conf(b.build());
        let url = if is_url {
            queue.to_string()
        } else {
            let out = client
                .get_queue_url()
                .queue_name(queue)
                .send()
                .await
                .map_err(|e| IntakeError::Sqs {
                    queue: queue.to_string(),
                    op: "GetQueueUrl",
                    reason: reason(&e),
                })?;
            out.queue_url().unwrap_or_default().to_string()
        };
        let q = Queue {
            client,
            given: queue.to_string(),
            url,
            held: Arc::new(AtomicU64::new(0)),
        };
        // Reach the queue once now: a wrong URL or missing rights fail at start.
        q.backlog().await?;
        Ok(q)
    }

    pub(super) fn url(&self) -> &str {
        &self.url
    }

    fn error(&self, op: &'static str, reason: String) -> IntakeError {
        IntakeError::Sqs {
            queue: self.given.clone(),
            op,
            reason,
        }
    }

    /// Long-polls until a message with changes comes or `wait` passes; drains up to
    /// [`DRAIN_CALLS`] full batches. Messages without changes are deleted here.
    pub(super) async fn receive(&mut self, wait: Duration) -> Result<Vec<Delivery>, IntakeError> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        let mut calls = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Once something came, only what is already there (no wait).
            let poll = if out.is_empty() {
                left.min(LONG_POLL)
            } else {
                Duration::ZERO
            };
            let page = match self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(BATCH as i32)
                .wait_time_seconds(poll.as_secs() as i32)
                .send()
                .await
            {
                Ok(page) => page,
                // What came before is handed over; the error, if it lasts, comes next time.
                Err(_) if !out.is_empty() => return Ok(out),
                Err(e) => return Err(self.error("ReceiveMessage", reason(&e))),
            };
            calls += 1;
            let messages = page.messages();
            let full = messages.len() == BATCH;
            let mut empty = Vec::new();
            for m in messages {
                let Some(handle) = m.receipt_handle() else {
                    continue;
                };
                let receipt = Receipt {
                    handle: handle.to_string(),
                    _held: Held::new(&self.held),
                };
                match parse_body(m.body().unwrap_or_default().as_bytes()) {
                    Ok(changes) if !changes.is_empty() => out.push(Delivery {
                        changes,
                        handle: Handle::Sqs(receipt),
                    }),
                    Ok(_) => empty.push(receipt),
                    Err(e) => {
                        crate::say!(
                            "--events sqs:{}: message {} ignored and deleted: {e}",
                            self.given,
                            m.message_id().unwrap_or("?")
                        );
                        empty.push(receipt);
                    }
                }
            }
            if let Err(e) = self.delete(empty).await {
                if out.is_empty() {
                    return Err(e);
                }
                // Not deleted, they come again (and are deleted then).
                return Ok(out);
            }
            let more = if out.is_empty() {
                // A poll waits whole seconds: less than one left is the end.
                deadline.saturating_duration_since(Instant::now()) >= Duration::from_secs(1)
            } else {
                full && calls < DRAIN_CALLS
            };
            if !more {
                return Ok(out);
            }
        }
    }

    /// Deletes acknowledged messages, [`BATCH`] per request. A message another consumer's
    /// receive made stale (its receipt handle expired) is not an error: it comes again.
    pub(super) async fn delete(&mut self, receipts: Vec<Receipt>) -> Result<(), IntakeError> {
        for chunk in receipts.chunks(BATCH) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(&r.handle)
                        .build()
                        .expect("id and receipt handle are set")
                })
                .collect();
            let out = self
                .client
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| self.error("DeleteMessageBatch", reason(&e)))?;
            let failed: Vec<_> = out
                .failed()
                .iter()
                .filter(|f| f.code() != "ReceiptHandleIsInvalid")
                .collect();
            if let Some(f) = failed.first() {
                return Err(self.error(
                    "DeleteMessageBatch",
                    format!(
                        "{} of {} messages not deleted ({}: {})",
                        failed.len(),
                        chunk.len(),
                        f.code(),
                        f.message().unwrap_or_default()
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(super) async fn backlog(&self) -> Result<u64, IntakeError> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| self.error("GetQueueAttributes", reason(&e)))?;
        let attr = |name: QueueAttributeName| {
            out.attributes()
                .and_then(|a| a.get(&name))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let waiting = attr(QueueAttributeName::ApproximateNumberOfMessages);
        let in_flight = attr(QueueAttributeName::ApproximateNumberOfMessagesNotVisible);
        let held = self.held.load(Ordering::SeqCst);
        Ok(waiting + in_flight.saturating_sub(held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_urls_on_aws_name_their_region() {
        assert_eq!(
            aws_region("sqs.eu-west-1.amazonaws.com").as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(
            aws_region("us-east-2.queue.amazonaws.com").as_deref(),
            Some("us-east-2")
        );
        assert_eq!(aws_region("127.0.0.1:5000"), None);
        assert_eq!(aws_region("localhost"), None);
        assert_eq!(
            origin("http://127.0.0.1:5000/123456789012/q"),
            Some(("http://127.0.0.1:5000".into(), "127.0.0.1:5000".into()))
        );
        assert_eq!(origin("q"), None);
    }
}
