//! [`MemorySsm`]: Run Command in memory: each command is `InProgress` when first looked
//! at, then `Success` (or `Failed` with its output, where told to), with faults on demand.

use super::*;
use crate::fault::{lock, Faults};
use std::sync::Mutex;

#[derive(Debug, Default, Clone)]
pub struct MemorySsmState {
    /// Every command sent, in order: (command id, request).
    pub sent: Vec<(String, CommandRequest)>,
    /// Times each command was looked at.
    pub looks: BTreeMap<String, usize>,
    /// Commands of this document (or on this instance) fail with this output.
    pub fail: BTreeMap<String, String>,
    /// Instances that are not managed instances: SendCommand answers InvalidInstanceId.
    pub unmanaged: Vec<String>,
}

#[derive(Debug, Default)]
pub struct MemorySsm {
    pub state: Mutex<MemorySsmState>,
    pub faults: Faults,
}

impl MemorySsm {
    pub fn snapshot(&self) -> MemorySsmState {
        lock(&self.state).clone()
    }
}

impl RunCommandApi for MemorySsm {
    async fn send_command(&self, req: &CommandRequest) -> Result<String, CloudError> {
        req.check()?;
        self.faults.check("SSM", "SendCommand", &req.instance_id)?;
        let mut s = lock(&self.state);
        // SendCommand error codes: InvalidInstanceId ("the instance is not ... registered
        // with SSM" or not running).
        if s.unmanaged.contains(&req.instance_id) {
            return Err(ssm_error(
                "SendCommand",
                ErrorKind::Invalid,
                "InvalidInstanceId",
                format!("{} is not a managed instance", req.instance_id),
            ));
        }
        let id = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            s.sent.len() + 1,
            s.sent.len() + 1
        );
        s.sent.push((id.clone(), req.clone()));
        Ok(id)
    }

    async fn invocation(
        &self,
        command_id: &str,
        instance_id: &str,
    ) -> Result<Option<Invocation>, CloudError> {
        self.faults
            .check("SSM", "GetCommandInvocation", command_id)?;
        let mut s = lock(&self.state);
        let Some((_, req)) = s.sent.iter().find(|(id, _)| id == command_id).cloned() else {
            return Ok(None);
        };
        if req.instance_id != instance_id {
            return Ok(None);
        }
        let looks = s.looks.entry(command_id.to_string()).or_default();
        *looks += 1;
        if *looks == 1 {
            return Ok(Some(Invocation {
                status: "InProgress".into(),
                output: String::new(),
            }));
        }
        let failed = s
            .fail
            .get(&req.document)
            .or_else(|| s.fail.get(&req.instance_id));
        Ok(Some(match failed {
            Some(out) => Invocation {
                status: "Failed".into(),
                output: out.clone(),
            },
            None => Invocation {
                status: "Success".into(),
                output: format!("ran {}", req.document),
            },
        }))
    }
}
