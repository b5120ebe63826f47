//! Systems Manager Run Command as recovery plans use it: run a document on a recovered
//! instance (post-launch steps, health probes) and follow it. One trait ([`RunCommandApi`]),
//! implemented for the AWS SDK ([`SdkSsm`], feature `ssm`) and in memory ([`MemorySsm`]).

use crate::error::{CloudError, ErrorKind};
use std::collections::BTreeMap;
use std::future::Future;

mod memory;
pub use memory::{MemorySsm, MemorySsmState};

/// One `SendCommand` to one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRequest {
    pub instance_id: String,
    /// `AWS-RunShellScript`, `AWS-RunPowerShellScript`, or the user's own document.
    pub document: String,
    pub parameters: BTreeMap<String, Vec<String>>,
    /// At most 100 characters (SendCommand API reference).
    pub comment: String,
    /// How long the command may take to start on the instance before it is TimedOut
    /// (30 to 2 592 000 seconds).
    pub timeout_seconds: u32,
}

/// Where a command is on its instance (`GetCommandInvocation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// `Pending`, `InProgress`, `Delayed`, `Success`, `Cancelled`, `TimedOut`, `Failed`,
    /// `Cancelling`.
    pub status: String,
    /// The end of the command's standard output and error (SSM keeps the first 24 000
    /// characters of each).
    pub output: String,
}

impl Invocation {
    pub fn succeeded(&self) -> bool {
        self.status == "Success"
    }
    /// Will not succeed by waiting longer.
    pub fn failed(&self) -> bool {
        matches!(
            self.status.as_str(),
            "Cancelled" | "TimedOut" | "Failed" | "Cancelling"
        )
    }
}

/// The Run Command calls of a recovery plan.
pub trait RunCommandApi: Send + Sync {
    /// Sends the command; returns its id.
    fn send_command(
        &self,
        req: &CommandRequest,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
    /// The command on the instance (`None`: not known yet: "InvocationDoesNotExist" right
    /// after SendCommand, as the service is eventually consistent).
    fn invocation(
        &self,
        command_id: &str,
        instance_id: &str,
    ) -> impl Future<Output = Result<Option<Invocation>, CloudError>> + Send;
}

fn ssm_error(
    op: &'static str,
    kind: ErrorKind,
    code: &str,
    detail: impl Into<String>,
) -> CloudError {
    let mut e = CloudError::new("SSM", op, "", kind, detail);
    e.code = Some(code.to_string());
    e
}

impl CommandRequest {
    /// What SSM checks of the request itself (SendCommand API reference: Comment "Length
    /// Constraints: Maximum length of 100", TimeoutSeconds "Valid Range: Minimum value of
    /// 30. Maximum value of 2592000").
    pub fn check(&self) -> Result<(), CloudError> {
        if self.comment.chars().count() > 100 {
            return Err(ssm_error(
                "SendCommand",
                ErrorKind::Invalid,
                "ValidationException",
                "Comment is longer than 100 characters",
            ));
        }
        if !(30..=2_592_000).contains(&self.timeout_seconds) {
            return Err(ssm_error(
                "SendCommand",
                ErrorKind::Invalid,
                "ValidationException",
                "TimeoutSeconds must be 30 to 2592000",
            ));
        }
        if self.document.is_empty() {
            return Err(ssm_error(
                "SendCommand",
                ErrorKind::Invalid,
                "ValidationException",
                "DocumentName is required",
            ));
        }
        Ok(())
    }
}

#[cfg(feature = "ssm")]
mod sdk;
#[cfg(feature = "ssm")]
pub use sdk::SdkSsm;
