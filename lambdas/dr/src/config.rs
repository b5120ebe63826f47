//! Settings (environment variables, or flags of the CLI) and the AWS clients.

use crate::handler::{DrConfig, DrEnv};
use crate::sim::SimulatedImport;
use pilotlight_cloud::ebs::SdkEbs;
use pilotlight_cloud::ec2::{
    Ec2Api, ImportRequest, ImportTask, InstanceHealth, LaunchRequest, RegisterRequest, SdkEc2,
};
use pilotlight_cloud::s3::SdkS3;
use pilotlight_cloud::{Aws, AwsSettings, CloudError};
use pilotlight_protocol::Prefix;
use std::time::Duration;

/// One definition for both: the Lambda reads these from its environment, the CLI also
/// takes them as flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DrSettings {
    /// The replication bucket.
    #[arg(long, env = "PILOTLIGHT_BUCKET")]
    pub bucket: Option<String>,
    /// The replication prefix.
    #[arg(long, env = "PILOTLIGHT_PREFIX", default_value = "pilotlight")]
    pub prefix: String,
    /// Where DR run records are kept (outside the replication prefix).
    #[arg(
        long,
        env = "PILOTLIGHT_DR_RUNS_PREFIX",
        default_value = "pilotlight-dr/runs/"
    )]
    pub runs_prefix: String,
    /// The VM Import service role.
    #[arg(long, env = "PILOTLIGHT_DR_VMIMPORT_ROLE", default_value = "vmimport")]
    pub vmimport_role: String,
    /// How long the receiver may take to export.
    #[arg(long, env = "PILOTLIGHT_DR_EXPORT_TIMEOUT", default_value = "6h", value_parser = humantime::parse_duration)]
    pub export_timeout: Duration,
    /// How long EC2 may take to import.
    #[arg(long, env = "PILOTLIGHT_DR_IMPORT_TIMEOUT", default_value = "12h", value_parser = humantime::parse_duration)]
    pub import_timeout: Duration,
    /// Drills launch into this subnet (instead of the request's).
    #[arg(long, env = "PILOTLIGHT_DR_DRILL_SUBNET")]
    pub drill_subnet: Option<String>,
    /// Drills get these security groups (comma-separated).
    #[arg(
        long,
        env = "PILOTLIGHT_DR_DRILL_SECURITY_GROUPS",
        value_delimiter = ','
    )]
    pub drill_security_groups: Vec<String>,
    /// Customer KMS key for the imported snapshots (the stack's key); without it they are
    /// encrypted with the account's EBS default key.
    #[arg(long, env = "PILOTLIGHT_DR_KMS_KEY")]
    pub kms_key: Option<String>,
    /// Use only this stack's recovery points (their `pilotlight:stack` tag).
    #[arg(long, env = "PILOTLIGHT_DR_STACK")]
    pub stack: Option<String>,
    /// How long a registered AMI (snapshot method) may take to become available.
    #[arg(long, env = "PILOTLIGHT_DR_REGISTER_TIMEOUT", default_value = "30m", value_parser = humantime::parse_duration)]
    pub register_timeout: Duration,
    /// How long a launched instance may take to pass its status checks.
    #[arg(long, env = "PILOTLIGHT_DR_VERIFY_TIMEOUT", default_value = "20m", value_parser = humantime::parse_duration)]
    pub verify_timeout: Duration,
    /// AWS endpoint URL (the local emulator).
    #[arg(long, env = "PILOTLIGHT_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// EMULATOR ONLY: simulate EC2 image import, which the emulator lacks. The value
    /// `ok` completes; any other value is the failure's StatusMessage.
    #[arg(long, env = "PILOTLIGHT_DR_SIMULATE_IMPORT")]
    pub simulate_import: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no bucket: set PILOTLIGHT_BUCKET (or --bucket)")]
    NoBucket,
    #[error("PILOTLIGHT_PREFIX {0:?}: {1}")]
    Prefix(String, String),
    #[error("PILOTLIGHT_DR_RUNS_PREFIX {0:?} must end with '/' and not be under the replication prefix {1:?}")]
    RunsPrefix(String, String),
}

impl DrSettings {
    pub fn dr_config(&self) -> Result<DrConfig, ConfigError> {
        let prefix = Prefix::new(&self.prefix)
            .map_err(|e| ConfigError::Prefix(self.prefix.clone(), e.to_string()))?;
        if !self.runs_prefix.ends_with('/') || self.runs_prefix.starts_with(&prefix.key_start()) {
            return Err(ConfigError::RunsPrefix(
                self.runs_prefix.clone(),
                prefix.to_string(),
            ));
        }
        let bucket = self.bucket.as_deref().ok_or(ConfigError::NoBucket)?;
        let mut c = DrConfig::new(bucket, prefix);
        c.runs_prefix = self.runs_prefix.clone();
        c.vmimport_role = self.vmimport_role.clone();
        c.export_timeout = self.export_timeout;
        c.import_timeout = self.import_timeout;
        c.drill_subnet_id = self.drill_subnet.clone();
        c.drill_security_group_ids = self.drill_security_groups.clone();
        c.kms_key_id = self.kms_key.clone().filter(|k| !k.is_empty());
        c.stack = self.stack.clone().filter(|k| !k.is_empty());
        c.verify_timeout = self.verify_timeout;
        c.register_timeout = self.register_timeout;
        Ok(c)
    }

    /// The SDK's configuration (pilotlight's one builder): credentials from the default
    /// chain only.
    pub async fn aws(&self) -> Aws {
        AwsSettings::new(self.region.clone(), self.endpoint_url.clone())
            .load()
            .await
    }

    /// The handler's environment: clients for the bucket and EC2.
    pub async fn env(&self) -> Result<DrEnv<SdkS3, AnyEc2, SdkEbs>, ConfigError> {
        let cfg = self.dr_config()?;
        let aws = self.aws().await;
        let store = aws.s3(cfg.bucket.clone());
        let sdk = aws.ec2();
        let ec2 = match &self.simulate_import {
            None => AnyEc2::Sdk(sdk),
            Some(mode) => AnyEc2::Simulated(SimulatedImport {
                inner: sdk,
                store: store.clone(),
                prefix: format!(
                    "{}simulated-imports/",
                    cfg.runs_prefix.trim_end_matches("runs/")
                ),
                fail: (mode != "ok" && !mode.is_empty()).then(|| mode.clone()),
            }),
        };
        Ok(DrEnv {
            store,
            ec2,
            ebs: aws.ebs(),
            cfg,
        })
    }
}

/// The real EC2, or the same with a simulated import (emulator only).
#[derive(Debug, Clone)]
pub enum AnyEc2 {
    Sdk(SdkEc2),
    Simulated(SimulatedImport<SdkEc2, SdkS3>),
}

macro_rules! both {
    ($self:ident, $e:ident => $call:expr) => {
        match $self {
            AnyEc2::Sdk($e) => $call,
            AnyEc2::Simulated($e) => $call,
        }
    };
}

impl Ec2Api for AnyEc2 {
    async fn import_image(&self, req: &ImportRequest) -> Result<String, CloudError> {
        both!(self, e => e.import_image(req).await)
    }
    async fn describe_import_image_task(&self, id: &str) -> Result<ImportTask, CloudError> {
        both!(self, e => e.describe_import_image_task(id).await)
    }
    async fn run_instance(&self, req: &LaunchRequest) -> Result<String, CloudError> {
        both!(self, e => e.run_instance(req).await)
    }
    async fn terminate_instances(&self, ids: &[String]) -> Result<(), CloudError> {
        both!(self, e => e.terminate_instances(ids).await)
    }
    async fn deregister_image(&self, id: &str) -> Result<(), CloudError> {
        both!(self, e => e.deregister_image(id).await)
    }
    async fn delete_snapshot(&self, id: &str) -> Result<(), CloudError> {
        both!(self, e => e.delete_snapshot(id).await)
    }
    async fn create_tags(
        &self,
        ids: &[String],
        tags: &[(String, String)],
    ) -> Result<(), CloudError> {
        both!(self, e => e.create_tags(ids, tags).await)
    }
    async fn register_image(&self, req: &RegisterRequest) -> Result<String, CloudError> {
        both!(self, e => e.register_image(req).await)
    }
    async fn find_image(&self, name: &str) -> Result<Option<String>, CloudError> {
        both!(self, e => e.find_image(name).await)
    }
    async fn instance_health(&self, id: &str) -> Result<Option<InstanceHealth>, CloudError> {
        both!(self, e => e.instance_health(id).await)
    }
    async fn console_output(&self, id: &str) -> Result<Option<String>, CloudError> {
        both!(self, e => e.console_output(id).await)
    }
    async fn instance_profile(&self, id: &str) -> Result<Option<String>, CloudError> {
        both!(self, e => e.instance_profile(id).await)
    }
    async fn ssm_ping(&self, id: &str) -> Result<Option<String>, CloudError> {
        both!(self, e => e.ssm_ping(id).await)
    }
}
