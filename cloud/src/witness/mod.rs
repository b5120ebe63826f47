//! What guarded automatic failover watches and tells: the user's witness of the primary
//! (a CloudWatch alarm of their own monitoring, or a Route 53 health check), and the
//! notification of a countdown (SNS). One trait ([`WitnessApi`]), implemented for the AWS
//! SDK ([`SdkWitness`], feature `witness`) and in memory ([`MemoryWitness`]).

use crate::error::{CloudError, ErrorKind};
use std::future::Future;

mod memory;
pub use memory::{MemoryWitness, MemoryWitnessState};

/// A witness the user names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Witness {
    /// A CloudWatch alarm: the primary is down while it is `ALARM`.
    CloudwatchAlarm(String),
    /// A Route 53 health check: the primary is down while Route 53 considers it
    /// unhealthy.
    Route53HealthCheck(String),
}

/// "If more than 18% of health checkers report that an endpoint is healthy, Route 53
/// considers it healthy" (Route 53 Developer Guide, "How Amazon Route 53 determines
/// whether a health check is healthy").
pub fn route53_considers_healthy(healthy: usize, total: usize) -> bool {
    total > 0 && healthy * 100 > total * 18
}

/// The calls of guarded automatic failover.
pub trait WitnessApi: Send + Sync {
    /// Whether the witness says the primary is down (`None`: the witness does not exist or
    /// has no data yet: never counted as down).
    fn primary_down(
        &self,
        w: &Witness,
    ) -> impl Future<Output = Result<Option<bool>, CloudError>> + Send;
    /// Publishes to an SNS topic (`Subject` at most 100 characters).
    fn notify(
        &self,
        topic_arn: &str,
        subject: &str,
        message: &str,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
}

fn witness_error(
    op: &'static str,
    kind: ErrorKind,
    code: &str,
    detail: impl Into<String>,
) -> CloudError {
    let mut e = CloudError::new("Witness", op, "", kind, detail);
    e.code = Some(code.to_string());
    e
}

/// SNS Publish: "Subject ... must be ASCII text that begins with a letter, number, or
/// punctuation mark; must not include line breaks or control characters; and must be
/// less than 100 characters long."
pub fn sns_subject(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                ' '
            }
        })
        .collect();
    clean.trim().chars().take(99).collect()
}

#[cfg(feature = "witness")]
mod sdk;
#[cfg(feature = "witness")]
pub use sdk::SdkWitness;
