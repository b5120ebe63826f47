//! Settings (environment variables, or flags of the CLI) and the AWS clients.

use pilotlight_cloud::ebs::NoEbs;
use pilotlight_cloud::ebs::SdkEbs;
#[cfg(not(feature = "sim"))]
use pilotlight_cloud::ec2::SdkEc2;
use pilotlight_cloud::s3::SdkS3;
use pilotlight_cloud::{Aws, AwsSettings};
use pilotlight_protocol::Prefix;
use std::time::Duration;

/// One definition for both: the Lambda reads these from its environment, the CLI also
/// takes them as flags, before or after the subcommand (`global`).
#[derive(Debug, Clone, clap::Args)]
pub struct DrSettings {
    /// The replication bucket.
    #[arg(long, global = true, env = "PILOTLIGHT_BUCKET")]
    pub bucket: Option<String>,
    /// The replication prefix.
    #[arg(
        long,
        global = true,
        env = "PILOTLIGHT_PREFIX",
        default_value = "pilotlight"
    )]
    pub prefix: String,
    /// Where DR run records are kept (outside the replication prefix).
    #[arg(
        long,
        global = true,
        env = "PILOTLIGHT_DR_RUNS_PREFIX",
        default_value = "pilotlight-dr/runs/"
    )]
    pub runs_prefix: String,
    /// The VM Import service role.
    #[arg(
        long,
        global = true,
        env = "PILOTLIGHT_DR_VMIMPORT_ROLE",
        default_value = "vmimport"
    )]
    pub vmimport_role: String,
    /// How long the receiver may take to export.
    #[arg(long, global = true, env = "PILOTLIGHT_DR_EXPORT_TIMEOUT", default_value = "6h", value_parser = humantime::parse_duration)]
    pub export_timeout: Duration,
    /// How long EC2 may take to import.
    #[arg(long, global = true, env = "PILOTLIGHT_DR_IMPORT_TIMEOUT", default_value = "12h", value_parser = humantime::parse_duration)]
    pub import_timeout: Duration,
    /// Drills launch into this subnet (instead of the request's).
    #[arg(long, global = true, env = "PILOTLIGHT_DR_DRILL_SUBNET")]
    pub drill_subnet: Option<String>,
    /// Drills get these security groups (comma-separated).
    #[arg(
        long,
        global = true,
        env = "PILOTLIGHT_DR_DRILL_SECURITY_GROUPS",
        value_delimiter = ','
    )]
    pub drill_security_groups: Vec<String>,
    /// Customer KMS key for the imported snapshots (the stack's key); without it they are
    /// encrypted with the account's EBS default key.
    #[arg(long, global = true, env = "PILOTLIGHT_DR_KMS_KEY")]
    pub kms_key: Option<String>,
    /// Use only this stack's recovery points (their `pilotlight:stack` tag).
    #[arg(long, global = true, env = "PILOTLIGHT_DR_STACK")]
    pub stack: Option<String>,
    /// How long a registered AMI (snapshot method) may take to become available.
    #[arg(long, global = true, env = "PILOTLIGHT_DR_REGISTER_TIMEOUT", default_value = "30m", value_parser = humantime::parse_duration)]
    pub register_timeout: Duration,
    /// How long a launched instance may take to pass its status checks.
    #[arg(long, global = true, env = "PILOTLIGHT_DR_VERIFY_TIMEOUT", default_value = "20m", value_parser = humantime::parse_duration)]
    pub verify_timeout: Duration,
    /// The SNS topic automatic failover notifies (a plan's own `topic` wins).
    #[arg(long, global = true, env = "PILOTLIGHT_DR_ALERT_TOPIC")]
    pub alert_topic: Option<String>,
    /// AWS endpoint URL (the local emulator).
    #[arg(long, global = true, env = "PILOTLIGHT_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    #[arg(long, global = true, env = "AWS_REGION")]
    pub region: Option<String>,
    /// EMULATOR ONLY (builds with the `sim` feature: tests, the demo, never the
    /// packaged Lambda): simulate EC2 image import, which the emulator lacks. The value
    /// `ok` completes; any other value is the failure's StatusMessage.
    #[cfg(feature = "sim")]
    #[arg(long, global = true, env = "PILOTLIGHT_DR_SIMULATE_IMPORT")]
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
        c.alert_topic = self.alert_topic.clone().filter(|k| !k.is_empty());
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
    pub async fn env(&self) -> Result<DrEnv<SdkS3, DrEc2, SdkEbs>, ConfigError> {
        let cfg = self.dr_config()?;
        let aws = self.aws().await;
        let store = aws.s3(cfg.bucket.clone());
        #[cfg(feature = "sim")]
        let ec2 = crate::sim::AnyEc2::new(
            aws.ec2(),
            &store,
            &cfg.runs_prefix,
            self.simulate_import.as_deref(),
        );
        #[cfg(not(feature = "sim"))]
        let ec2 = aws.ec2();
        Ok(DrEnv {
            store,
            ec2,
            ebs: aws.ebs(),
            cfg,
        })
    }
}

/// The clients plans need beyond the DR environment (Route 53, SSM Run Command, the
/// automation's witness and SNS).
pub async fn plan_clients(
    aws: &Aws,
) -> (
    pilotlight_cloud::route53::SdkRoute53,
    pilotlight_cloud::ssm::SdkSsm,
    pilotlight_cloud::witness::SdkWitness,
) {
    (aws.route53(), aws.ssm(), aws.witness())
}

/// The EC2 client of the handler: the SDK's; in builds with the `sim` feature, the same
/// with a simulated image import that `--simulate-import` switches on.
#[cfg(feature = "sim")]
pub type DrEc2 = crate::sim::AnyEc2;
#[cfg(not(feature = "sim"))]
pub type DrEc2 = SdkEc2;

/// Settings of the DR function (environment variables in the Lambda).
#[derive(Debug, Clone)]
pub struct DrConfig {
    pub bucket: String,
    /// The replication prefix (the receiver's).
    pub prefix: Prefix,
    /// Where run records live; outside the replication prefix, so the receiver's
    /// notification never carries them.
    pub runs_prefix: String,
    /// The service role ImportImage uses (`vmimport`).
    pub vmimport_role: String,
    /// How long the receiver may take to export before the run fails.
    pub export_timeout: Duration,
    /// How long EC2 may take to import before the run fails.
    pub import_timeout: Duration,
    /// Drills launch here instead of the request's subnet and security groups.
    pub drill_subnet_id: Option<String>,
    pub drill_security_group_ids: Vec<String>,
    /// Customer KMS key for imported snapshots; `None`: the account's EBS default key.
    pub kms_key_id: Option<String>,
    /// Only recovery points of this stack (tag `pilotlight:stack`); `None`: any.
    pub stack: Option<String>,
    /// How long a launched instance may take to pass its status checks.
    pub verify_timeout: Duration,
    /// How long RegisterImage may keep failing for now before the run fails.
    pub register_timeout: Duration,
    /// The stack's alert topic: automatic failover notifies it unless a plan names one.
    pub alert_topic: Option<String>,
}

impl DrConfig {
    pub fn new(bucket: &str, prefix: Prefix) -> Self {
        Self {
            bucket: bucket.into(),
            prefix,
            runs_prefix: "pilotlight-dr/runs/".into(),
            vmimport_role: "vmimport".into(),
            export_timeout: Duration::from_secs(6 * 3600),
            import_timeout: Duration::from_secs(12 * 3600),
            drill_subnet_id: None,
            drill_security_group_ids: Vec::new(),
            kms_key_id: None,
            stack: None,
            verify_timeout: Duration::from_secs(20 * 60),
            register_timeout: Duration::from_secs(30 * 60),
            alert_topic: None,
        }
    }

    pub(crate) fn run_key(&self, run_id: &str) -> String {
        format!("{}{run_id}.json", self.runs_prefix)
    }

    /// The run's HTML report, beside its record.
    pub fn report_key(&self, run_id: &str) -> String {
        format!("{}{run_id}.html", self.runs_prefix)
    }

    /// The run ids of a recovery of several VMs (`groups/` is not a run: `status` lists
    /// only the records directly under the runs prefix).
    pub fn group_key(&self, group: &str) -> String {
        format!("{}groups/{group}.json", self.runs_prefix)
    }

    /// Beside the run records (`pilotlight-dr/` by default).
    pub(crate) fn base(&self) -> &str {
        self.runs_prefix
            .strip_suffix("runs/")
            .unwrap_or(&self.runs_prefix)
    }

    /// Where a VM's snapshot-ready marker lives: beside the run records.
    pub fn ready_key(&self, site: &str, vm: &str) -> String {
        format!("{}ready/{site}/{vm}.json", self.base())
    }

    /// Where a VM's saved recovery settings live.
    pub fn vm_settings_key(&self, site: &str, vm: &str) -> String {
        format!("{}vms/{site}/{vm}.json", self.base())
    }
}

/// Everything a handler call needs.
#[derive(Debug)]
pub struct DrEnv<S, E, B = NoEbs> {
    pub store: S,
    pub ec2: E,
    /// The recovery points (EC2 DescribeSnapshots and tags on them).
    pub ebs: B,
    pub cfg: DrConfig,
}
