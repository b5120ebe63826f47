//! [`SdkWitness`]: CloudWatch alarms, Route 53 health checks and SNS through the AWS SDK.

use super::*;
use crate::error::from_sdk;

#[derive(Debug, Clone)]
pub struct SdkWitness {
    pub cloudwatch: aws_sdk_cloudwatch::Client,
    pub route53: aws_sdk_route53::Client,
    pub sns: aws_sdk_sns::Client,
}

impl WitnessApi for SdkWitness {
    async fn primary_down(&self, w: &Witness) -> Result<Option<bool>, CloudError> {
        match w {
            Witness::CloudwatchAlarm(name) => {
                let out = self
                    .cloudwatch
                    .describe_alarms()
                    .alarm_names(name)
                    .send()
                    .await
                    .map_err(|e| from_sdk("CloudWatch", "DescribeAlarms", name, &e))?;
                let state = out
                    .metric_alarms()
                    .iter()
                    .find(|a| a.alarm_name() == Some(name.as_str()))
                    .and_then(|a| a.state_value().map(|s| s.as_str().to_string()))
                    .or_else(|| {
                        out.composite_alarms()
                            .iter()
                            .find(|a| a.alarm_name() == Some(name.as_str()))
                            .and_then(|a| a.state_value().map(|s| s.as_str().to_string()))
                    });
                Ok(match state.as_deref() {
                    Some("ALARM") => Some(true),
                    Some("OK") => Some(false),
                    _ => None,
                })
            }
            Witness::Route53HealthCheck(id) => {
                let out = match self
                    .route53
                    .get_health_check_status()
                    .health_check_id(id)
                    .send()
                    .await
                {
                    Ok(o) => o,
                    Err(e) => {
                        let e = from_sdk("Route53", "GetHealthCheckStatus", id, &e);
                        return if e.is_not_found() { Ok(None) } else { Err(e) };
                    }
                };
                let obs = out.health_check_observations();
                let healthy = obs
                    .iter()
                    .filter(|o| {
                        o.status_report()
                            .and_then(|r| r.status())
                            .is_some_and(|s| s.starts_with("Success"))
                    })
                    .count();
                Ok((!obs.is_empty()).then(|| !route53_considers_healthy(healthy, obs.len())))
            }
        }
    }

    async fn notify(
        &self,
        topic_arn: &str,
        subject: &str,
        message: &str,
    ) -> Result<(), CloudError> {
        self.sns
            .publish()
            .topic_arn(topic_arn)
            .subject(sns_subject(subject))
            .message(message)
            .send()
            .await
            .map_err(|e| from_sdk("SNS", "Publish", topic_arn, &e))?;
        Ok(())
    }
}
