//! [`MemoryWitness`]: alarms, health checks and a topic in memory, with faults on demand.

use super::*;
use crate::fault::{lock, Faults};
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Debug, Default, Clone)]
pub struct MemoryWitnessState {
    /// Alarm name → `OK`, `ALARM`, `INSUFFICIENT_DATA`.
    pub alarms: BTreeMap<String, String>,
    /// Health check id → (checkers reporting healthy, checkers).
    pub health_checks: BTreeMap<String, (usize, usize)>,
    /// Every notification: (topic, subject, message).
    pub sent: Vec<(String, String, String)>,
}

#[derive(Debug, Default)]
pub struct MemoryWitness {
    pub state: Mutex<MemoryWitnessState>,
    pub faults: Faults,
}

impl MemoryWitness {
    pub fn set_alarm(&self, name: &str, state: &str) {
        lock(&self.state).alarms.insert(name.into(), state.into());
    }
    pub fn snapshot(&self) -> MemoryWitnessState {
        lock(&self.state).clone()
    }
}

impl WitnessApi for MemoryWitness {
    async fn primary_down(&self, w: &Witness) -> Result<Option<bool>, CloudError> {
        let s = lock(&self.state);
        Ok(match w {
            Witness::CloudwatchAlarm(name) => {
                self.faults.check("CloudWatch", "DescribeAlarms", name)?;
                // DescribeAlarms StateValue: OK | ALARM | INSUFFICIENT_DATA.
                s.alarms.get(name).and_then(|v| match v.as_str() {
                    "ALARM" => Some(true),
                    "OK" => Some(false),
                    _ => None,
                })
            }
            Witness::Route53HealthCheck(id) => {
                self.faults.check("Route53", "GetHealthCheckStatus", id)?;
                s.health_checks
                    .get(id)
                    .filter(|(_, total)| *total > 0)
                    .map(|(ok, total)| !route53_considers_healthy(*ok, *total))
            }
        })
    }

    async fn notify(
        &self,
        topic_arn: &str,
        subject: &str,
        message: &str,
    ) -> Result<(), CloudError> {
        self.faults.check("SNS", "Publish", topic_arn)?;
        if subject.len() >= 100
            || subject
                .chars()
                .any(|c| !c.is_ascii() || c.is_ascii_control())
        {
            return Err(witness_error(
                "Publish",
                ErrorKind::Invalid,
                "InvalidParameter",
                "Subject: ASCII, no control characters, under 100",
            ));
        }
        lock(&self.state)
            .sent
            .push((topic_arn.into(), subject.into(), message.into()));
        Ok(())
    }
}
