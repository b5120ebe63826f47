//! [`SdkSsm`]: Run Command through the AWS SDK.

use super::*;
use crate::error::from_sdk;

#[derive(Debug, Clone)]
pub struct SdkSsm {
    pub client: aws_sdk_ssm::Client,
}

impl RunCommandApi for SdkSsm {
    async fn send_command(&self, req: &CommandRequest) -> Result<String, CloudError> {
        req.check()?;
        let out = self
            .client
            .send_command()
            .instance_ids(&req.instance_id)
            .document_name(&req.document)
            .set_parameters(Some(req.parameters.clone().into_iter().collect()))
            .comment(&req.comment)
            .timeout_seconds(req.timeout_seconds as i32)
            .send()
            .await
            .map_err(|e| from_sdk("SSM", "SendCommand", &req.instance_id, &e))?;
        out.command()
            .and_then(|c| c.command_id())
            .map(String::from)
            .ok_or_else(|| {
                ssm_error(
                    "SendCommand",
                    ErrorKind::ServerError,
                    "NoCommandId",
                    "the answer named no command",
                )
            })
    }

    async fn invocation(
        &self,
        command_id: &str,
        instance_id: &str,
    ) -> Result<Option<Invocation>, CloudError> {
        match self
            .client
            .get_command_invocation()
            .command_id(command_id)
            .instance_id(instance_id)
            .send()
            .await
        {
            Ok(o) => {
                let mut output = o.standard_output_content().unwrap_or_default().to_string();
                let err = o.standard_error_content().unwrap_or_default();
                if !err.is_empty() {
                    output.push('\n');
                    output.push_str(err);
                }
                Ok(Some(Invocation {
                    status: o.status().map_or("Pending", |s| s.as_str()).to_string(),
                    output,
                }))
            }
            Err(e) => {
                let e = from_sdk("SSM", "GetCommandInvocation", command_id, &e);
                // Right after SendCommand the invocation may not exist yet.
                if e.code.as_deref() == Some("InvocationDoesNotExist") {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }
}
