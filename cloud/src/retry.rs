//! Calls retried with exponential back-off (the receiver's points and the replica
//! function): throttling and 5xx always (EBS direct APIs: "You should always retry requests that receive server (5xx) error responses, and
//! ThrottlingException and RequestThrottledException client error responses"), and "no
//! such snapshot" for a while after a snapshot was started or sealed (EC2 and EBS reads
//! are eventually consistent).

use crate::CloudError;
use std::future::Future;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub base: Duration,
    pub max_wait: Duration,
    pub attempts: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            base: Duration::from_millis(200),
            max_wait: Duration::from_secs(10),
            attempts: 8,
        }
    }
}

impl Retry {
    fn wait(&self, attempt: u32, salt: u64) -> Duration {
        (self.base * 2u32.saturating_pow(attempt.min(10))).min(self.max_wait)
            + Duration::from_millis(salt % 50)
    }

    /// `f` until it succeeds, fails for good, or `attempts` transient failures; until
    /// `visible_by`, "no such snapshot" counts as transient.
    pub async fn run<T, F, Fut>(
        &self,
        salt: u64,
        visible_by: Option<tokio::time::Instant>,
        f: F,
    ) -> Result<T, CloudError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, CloudError>>,
    {
        let mut attempt = 0u32;
        loop {
            let not_visible_yet = |e: &CloudError| {
                e.is_snapshot_not_visible()
                    && visible_by.is_some_and(|t| tokio::time::Instant::now() < t)
            };
            match f().await {
                Ok(v) => return Ok(v),
                Err(e)
                    if not_visible_yet(&e) || (e.is_transient() && attempt + 1 < self.attempts) =>
                {
                    tracing::debug!("{e}; retrying");
                    tokio::time::sleep(self.wait(attempt, salt)).await;
                    attempt = attempt.saturating_add(1);
                }
                Err(e) => return Err(e),
            }
        }
    }
}
