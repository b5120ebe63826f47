//! The event queue: a narrow trait, implemented for the AWS SDK's SQS client.

use aws_sdk_sqs::error::DisplayErrorContext;
use std::future::Future;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("queue {queue}: {op} failed: {detail}")]
pub struct QueueError {
    pub queue: String,
    pub op: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct Message {
    pub id: String,
    pub receipt: String,
    pub body: String,
    /// How many times the queue has delivered it (ApproximateReceiveCount).
    pub receive_count: u32,
}

pub trait Queue: Send + Sync {
    fn receive(
        &self,
        max: i32,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Message>, QueueError>> + Send;
    /// Deletes up to 10 messages in one request; returns why each one it could not
    /// delete was refused.
    fn delete_batch(
        &self,
        receipts: &[String],
    ) -> impl Future<Output = Result<Vec<String>, QueueError>> + Send;
    /// Keeps a message invisible for `secs` more seconds (a long apply, a waiting manifest).
    fn extend(
        &self,
        receipt: &str,
        secs: i32,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
}

#[derive(Debug, Clone)]
pub struct SqsQueue {
    pub client: aws_sdk_sqs::Client,
    pub url: String,
}

impl SqsQueue {
    fn err<E: std::error::Error + 'static>(&self, op: &'static str, e: E) -> QueueError {
        QueueError {
            queue: self.url.clone(),
            op,
            detail: DisplayErrorContext(e)
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

impl Queue for SqsQueue {
    async fn receive(&self, max: i32, wait: Duration) -> Result<Vec<Message>, QueueError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10))
            .wait_time_seconds(wait.as_secs().min(20) as i32)
            .message_system_attribute_names(
                aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount,
            )
            .send()
            .await
            .map_err(|e| self.err("receive", e))?;
        Ok(out
            .messages()
            .iter()
            .map(|m| Message {
                id: m.message_id().unwrap_or_default().to_string(),
                receipt: m.receipt_handle().unwrap_or_default().to_string(),
                body: m.body().unwrap_or_default().to_string(),
                receive_count: m
                    .attributes()
                    .and_then(|a| a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1),
            })
            .collect())
    }

    async fn delete_batch(&self, receipts: &[String]) -> Result<Vec<String>, QueueError> {
        // Entry ids only need to be unique within the request: the index.
        let entries = receipts
            .iter()
            .enumerate()
            .map(|(i, r)| {
                aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(r)
                    .build()
                    .map_err(|e| self.err("delete batch", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = self
            .client
            .delete_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| self.err("delete batch", e))?;
        Ok(out
            .failed()
            .iter()
            .map(|f| format!("{}: {}", f.code(), f.message().unwrap_or_default()))
            .collect())
    }

    async fn extend(&self, receipt: &str, secs: i32) -> Result<(), QueueError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(secs)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.err("change visibility", e))
    }
}
