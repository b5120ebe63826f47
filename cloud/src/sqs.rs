//! SQS as the receiver uses it: one trait ([`Queue`]), implemented for the AWS SDK's
//! client ([`SdkSqs`], feature `sqs`) and in memory ([`MemoryQueue`]: visibility
//! timeouts on a clock the test moves, receive counts, redrive to a dead-letter list,
//! the newest-receipt-only rule, faults).

use crate::error::{CloudError, ErrorKind};
use crate::fault::{lock, Faults};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: String,
    /// The handle of this delivery: only the newest one deletes the message.
    pub receipt: String,
    pub body: String,
    /// How many times the queue has delivered it (ApproximateReceiveCount).
    pub receive_count: u32,
}

pub trait Queue: Send + Sync {
    /// Up to `max` (1 to 10) messages, waiting up to `wait` (at most 20 s) for one.
    fn receive(
        &self,
        max: i32,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Message>, CloudError>> + Send;
    /// Deletes up to 10 messages in one request; returns why each one it could not
    /// delete was refused.
    fn delete_batch(
        &self,
        receipts: &[String],
    ) -> impl Future<Output = Result<Vec<String>, CloudError>> + Send;
    /// Keeps a message invisible for `secs` more seconds (a long apply, a waiting
    /// manifest), or makes it visible again soon (a back-off).
    fn change_visibility(
        &self,
        receipt: &str,
        secs: i32,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Sends up to [`MAX_BATCH`] messages in one request (SendMessageBatch); returns why
    /// each one it could not send was refused (the index and the reason).
    fn send_batch(
        &self,
        bodies: &[String],
    ) -> impl Future<Output = Result<Vec<(usize, String)>, CloudError>> + Send;
}

/// SendMessageBatch and DeleteMessageBatch: "a maximum of 10 messages" per request.
pub const MAX_BATCH: usize = 10;
/// SendMessageBatch: "The maximum allowed individual message size and the maximum total
/// payload size (the sum of the individual lengths of all of the batched messages) are
/// both 256 KiB" (SQS API reference).
pub const MAX_BATCH_PAYLOAD: usize = 256 * 1024;

/// Why a batch cannot be sent at all (checked before any message goes).
fn batch_problem(bodies: &[String]) -> Option<&'static str> {
    if bodies.is_empty() || bodies.len() > MAX_BATCH {
        return Some("a batch holds 1 to 10 messages");
    }
    if bodies.iter().map(String::len).sum::<usize>() > MAX_BATCH_PAYLOAD {
        return Some("the batch's total payload is over 256 KiB");
    }
    None
}

impl<T: Queue + ?Sized> Queue for Arc<T> {
    fn receive(
        &self,
        max: i32,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Message>, CloudError>> + Send {
        (**self).receive(max, wait)
    }
    fn delete_batch(
        &self,
        receipts: &[String],
    ) -> impl Future<Output = Result<Vec<String>, CloudError>> + Send {
        (**self).delete_batch(receipts)
    }
    fn change_visibility(
        &self,
        receipt: &str,
        secs: i32,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        (**self).change_visibility(receipt, secs)
    }
    fn send_batch(
        &self,
        bodies: &[String],
    ) -> impl Future<Output = Result<Vec<(usize, String)>, CloudError>> + Send {
        (**self).send_batch(bodies)
    }
}

#[derive(Debug)]
struct Stored {
    id: String,
    body: String,
    /// Virtual time (since the queue was made) at which it is visible again.
    visible_at: Duration,
    receive_count: u32,
    receipt: Option<String>,
}

#[derive(Debug, Default)]
struct QueueState {
    now: Duration,
    next: u64,
    messages: Vec<Stored>,
    dead: Vec<String>,
    rng: u64,
}

/// A standard queue in memory. Time is virtual: it moves only by [`MemoryQueue::advance`],
/// so a visibility timeout expires exactly when a test says.
#[derive(Debug)]
pub struct MemoryQueue {
    state: Mutex<QueueState>,
    /// The queue's default visibility timeout.
    pub visibility: Duration,
    /// Redrive: a message received more than this many times goes to the dead-letter list.
    pub max_receive_count: Option<u32>,
    pub faults: Faults,
}

impl Default for MemoryQueue {
    fn default() -> Self {
        MemoryQueue::new(Duration::from_secs(30), Some(5))
    }
}

impl MemoryQueue {
    pub fn new(visibility: Duration, max_receive_count: Option<u32>) -> Self {
        MemoryQueue {
            state: Mutex::new(QueueState {
                rng: 0x9E37_79B9_7F4A_7C15,
                ..Default::default()
            }),
            visibility,
            max_receive_count,
            faults: Faults::default(),
        }
    }

    /// Receives visible messages in an order drawn from `seed` (a standard queue does
    /// not keep order).
    pub fn shuffled(self, seed: u64) -> Self {
        lock(&self.state).rng = seed | 1;
        self
    }

    /// Sends a message; returns its id.
    pub fn send(&self, body: impl Into<String>) -> String {
        let mut s = lock(&self.state);
        s.next += 1;
        let id = format!("m-{}", s.next);
        let now = s.now;
        s.messages.push(Stored {
            id: id.clone(),
            body: body.into(),
            visible_at: now,
            receive_count: 0,
            receipt: None,
        });
        id
    }

    /// Moves the queue's clock: invisible messages whose timeout passes come back.
    pub fn advance(&self, d: Duration) {
        lock(&self.state).now += d;
    }

    /// Messages in the queue, visible or not.
    pub fn len(&self) -> usize {
        lock(&self.state).messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Messages visible now.
    pub fn visible(&self) -> usize {
        let s = lock(&self.state);
        s.messages.iter().filter(|m| m.visible_at <= s.now).count()
    }

    /// Bodies of messages redriven to the dead-letter list.
    pub fn dead_letters(&self) -> Vec<String> {
        lock(&self.state).dead.clone()
    }

    fn err(&self, op: &'static str, kind: ErrorKind, code: &str, detail: &str) -> CloudError {
        CloudError::new("SQS", op, "memory-queue", kind, detail).with_code(code)
    }
}

impl Queue for MemoryQueue {
    async fn send_batch(&self, bodies: &[String]) -> Result<Vec<(usize, String)>, CloudError> {
        self.faults
            .check("SQS", "SendMessageBatch", "memory-queue")?;
        if let Some(why) = batch_problem(bodies) {
            return Err(self.err(
                "SendMessageBatch",
                ErrorKind::Invalid,
                "AWS.SimpleQueueService.BatchRequestTooLong",
                why,
            ));
        }
        for b in bodies {
            self.send(b.clone());
        }
        Ok(vec![])
    }

    async fn receive(&self, max: i32, _wait: Duration) -> Result<Vec<Message>, CloudError> {
        self.faults.check("SQS", "ReceiveMessage", "memory-queue")?;
        // ReceiveMessage API reference, MaxNumberOfMessages: "Valid values: 1 to 10."
        if !(1..=10).contains(&max) {
            return Err(self.err(
                "ReceiveMessage",
                ErrorKind::Invalid,
                "InvalidParameterValue",
                "MaxNumberOfMessages must be 1 to 10",
            ));
        }
        let mut s = lock(&self.state);
        let now = s.now;
        // Redrive first: a visible message already received max_receive_count times (SQS
        // Developer Guide, dead-letter queues: "when the ReceiveCount for a message
        // exceeds the maxReceiveCount for a queue, Amazon SQS moves the message to the
        // dead-letter queue").
        if let Some(limit) = self.max_receive_count {
            let mut i = 0;
            while i < s.messages.len() {
                if s.messages[i].visible_at <= now && s.messages[i].receive_count >= limit {
                    let m = s.messages.remove(i);
                    s.dead.push(m.body);
                } else {
                    i += 1;
                }
            }
        }
        // Standard queues: "at-least-once delivery" and "best-effort ordering" (SQS
        // Developer Guide, standard queues): any visible message, in any order; a received
        // one is hidden for the visibility timeout.
        let mut idx: Vec<usize> = (0..s.messages.len())
            .filter(|&i| s.messages[i].visible_at <= now)
            .collect();
        // Fisher-Yates with xorshift: deterministic for a seed.
        for i in (1..idx.len()).rev() {
            s.rng ^= s.rng << 13;
            s.rng ^= s.rng >> 7;
            s.rng ^= s.rng << 17;
            let j = (s.rng % (i as u64 + 1)) as usize;
            idx.swap(i, j);
        }
        idx.truncate(max as usize);
        let mut out = Vec::new();
        for i in idx {
            s.next += 1;
            let receipt = format!("r-{}", s.next);
            let m = &mut s.messages[i];
            m.receive_count += 1;
            m.visible_at = now + self.visibility;
            m.receipt = Some(receipt.clone());
            out.push(Message {
                id: m.id.clone(),
                receipt,
                body: m.body.clone(),
                receive_count: m.receive_count,
            });
        }
        Ok(out)
    }

    async fn delete_batch(&self, receipts: &[String]) -> Result<Vec<String>, CloudError> {
        self.faults
            .check("SQS", "DeleteMessageBatch", "memory-queue")?;
        // DeleteMessageBatch API reference, errors: EmptyBatchRequest ("The batch request
        // doesn't contain any entries") and TooManyEntriesInBatchRequest (more than 10).
        if receipts.is_empty() {
            return Err(self.err(
                "DeleteMessageBatch",
                ErrorKind::Invalid,
                "AWS.SimpleQueueService.EmptyBatchRequest",
                "There should be at least one entry in the request",
            ));
        }
        if receipts.len() > 10 {
            return Err(self.err(
                "DeleteMessageBatch",
                ErrorKind::Invalid,
                "AWS.SimpleQueueService.TooManyEntriesInBatchRequest",
                "Maximum number of entries per request are 10",
            ));
        }
        let mut s = lock(&self.state);
        // DeleteMessage API reference: "you must provide the most recently received
        // ReceiptHandle for the message (otherwise, the request succeeds, but the message
        // will not be deleted)".
        s.messages
            .retain(|m| !m.receipt.as_ref().is_some_and(|r| receipts.contains(r)));
        Ok(Vec::new())
    }

    async fn change_visibility(&self, receipt: &str, secs: i32) -> Result<(), CloudError> {
        self.faults
            .check("SQS", "ChangeMessageVisibility", receipt)?;
        // ChangeMessageVisibility API reference, VisibilityTimeout: "Values range: 0 to
        // 43200. Maximum: 12 hours."
        if !(0..=43_200).contains(&secs) {
            return Err(self.err(
                "ChangeMessageVisibility",
                ErrorKind::Invalid,
                "InvalidParameterValue",
                "VisibilityTimeout must be 0 to 43200",
            ));
        }
        let mut s = lock(&self.state);
        let now = s.now;
        match s
            .messages
            .iter_mut()
            .find(|m| m.receipt.as_deref() == Some(receipt) && m.visible_at > now)
        {
            Some(m) => {
                m.visible_at = now + Duration::from_secs(secs as u64);
                Ok(())
            }
            None => Err(self.err(
                "ChangeMessageVisibility",
                ErrorKind::Invalid,
                "InvalidParameterValue",
                "Message does not exist or is not available for visibility timeout change",
            )),
        }
    }
}

#[cfg(feature = "sqs")]
pub use sdk::SdkSqs;

#[cfg(feature = "sqs")]
mod sdk {
    use super::*;
    use crate::error::from_sdk;
    use aws_sdk_sqs::types::MessageSystemAttributeName;

    /// SQS through the AWS SDK for Rust, bound to one queue.
    #[derive(Debug, Clone)]
    pub struct SdkSqs {
        pub client: aws_sdk_sqs::Client,
        pub url: String,
    }

    impl Queue for SdkSqs {
        async fn send_batch(&self, bodies: &[String]) -> Result<Vec<(usize, String)>, CloudError> {
            let op = "SendMessageBatch";
            if let Some(why) = batch_problem(bodies) {
                return Err(CloudError::new(
                    "SQS",
                    op,
                    &self.url,
                    ErrorKind::Invalid,
                    why,
                ));
            }
            let entries = bodies
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(b)
                        .build()
                        .map_err(|e| {
                            CloudError::new("SQS", op, &self.url, ErrorKind::Invalid, e.to_string())
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = self
                .client
                .send_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| from_sdk("SQS", op, &self.url, &e))?;
            Ok(out
                .failed()
                .iter()
                .map(|f| {
                    let i = f.id().parse().unwrap_or(usize::MAX);
                    (
                        i,
                        format!("{}: {}", f.code(), f.message().unwrap_or_default()),
                    )
                })
                .collect())
        }

        async fn receive(&self, max: i32, wait: Duration) -> Result<Vec<Message>, CloudError> {
            let out = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(max.clamp(1, 10))
                .wait_time_seconds(wait.as_secs().min(20) as i32)
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .send()
                .await
                .map_err(|e| from_sdk("SQS", "ReceiveMessage", &self.url, &e))?;
            Ok(out
                .messages()
                .iter()
                .map(|m| Message {
                    id: m.message_id().unwrap_or_default().to_string(),
                    receipt: m.receipt_handle().unwrap_or_default().to_string(),
                    body: m.body().unwrap_or_default().to_string(),
                    receive_count: m
                        .attributes()
                        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(1),
                })
                .collect())
        }

        async fn delete_batch(&self, receipts: &[String]) -> Result<Vec<String>, CloudError> {
            // Entry ids only need to be unique within the request: the index.
            let entries = receipts
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .build()
                        .map_err(|e| {
                            CloudError::new(
                                "SQS",
                                "DeleteMessageBatch",
                                &self.url,
                                ErrorKind::Invalid,
                                e.to_string(),
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = self
                .client
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| from_sdk("SQS", "DeleteMessageBatch", &self.url, &e))?;
            Ok(out
                .failed()
                .iter()
                .map(|f| format!("{}: {}", f.code(), f.message().unwrap_or_default()))
                .collect())
        }

        async fn change_visibility(&self, receipt: &str, secs: i32) -> Result<(), CloudError> {
            self.client
                .change_message_visibility()
                .queue_url(&self.url)
                .receipt_handle(receipt)
                .visibility_timeout(secs)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| from_sdk("SQS", "ChangeMessageVisibility", &self.url, &e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    #[test]
    fn a_batch_sends_1_to_10_messages_of_at_most_256_kib_in_all() {
        let q = MemoryQueue::default();
        block_on(async {
            let ten: Vec<String> = (0..10).map(|i| i.to_string()).collect();
            assert!(q.send_batch(&ten).await.unwrap().is_empty());
            assert_eq!(q.len(), 10);
            let eleven: Vec<String> = (0..11).map(|i| i.to_string()).collect();
            assert!(q.send_batch(&eleven).await.is_err());
            assert!(q.send_batch(&[]).await.is_err());
            let big = vec!["x".repeat(200 * 1024), "y".repeat(100 * 1024)];
            assert!(q.send_batch(&big).await.is_err());
            assert_eq!(q.len(), 10, "a refused batch sends nothing");
        });
    }

    #[test]
    fn visibility_redelivery_newest_receipt_and_redrive() {
        let q = MemoryQueue::new(Duration::from_secs(30), Some(2));
        q.send("a");
        block_on(async {
            let m1 = q.receive(10, Duration::ZERO).await.unwrap();
            assert_eq!(m1.len(), 1);
            assert!(
                q.receive(10, Duration::ZERO).await.unwrap().is_empty(),
                "invisible"
            );
            q.advance(Duration::from_secs(31));
            let m2 = q.receive(10, Duration::ZERO).await.unwrap();
            assert_eq!(m2[0].receive_count, 2);
            assert_eq!(m2[0].id, m1[0].id);
            // The old receipt deletes nothing.
            q.delete_batch(std::slice::from_ref(&m1[0].receipt))
                .await
                .unwrap();
            assert_eq!(q.len(), 1);
            // Changing visibility keeps it away; 0 brings it back.
            q.change_visibility(&m2[0].receipt, 100).await.unwrap();
            q.advance(Duration::from_secs(60));
            assert!(q.receive(10, Duration::ZERO).await.unwrap().is_empty());
            q.advance(Duration::from_secs(41));
            // Received twice already: redriven.
            assert!(q.receive(10, Duration::ZERO).await.unwrap().is_empty());
            assert_eq!(q.dead_letters(), vec!["a".to_string()]);
            q.send("b");
            let m = q.receive(10, Duration::ZERO).await.unwrap();
            q.delete_batch(&[m[0].receipt.clone()]).await.unwrap();
            assert!(q.is_empty());
            assert!(q.change_visibility(&m[0].receipt, 10).await.is_err());
        });
    }
}
