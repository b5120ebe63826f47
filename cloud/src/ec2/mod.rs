//! EC2 as the DR flow uses it: one trait ([`Ec2Api`]), implemented for the AWS SDK's
//! client ([`SdkEc2`], feature `ec2`) and in memory ([`MemoryEc2`]).

use crate::error::{CloudError, ErrorKind};
use crate::fault::{lock, Faults};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;

mod memory;
pub use memory::{MadeSnapshot, MemoryEc2, MemoryEc2State};
#[cfg(test)]
mod tests;

fn ec2_error(
    op: &'static str,
    kind: ErrorKind,
    code: Option<&str>,
    detail: impl Into<String>,
) -> CloudError {
    let mut e = CloudError::new("EC2", op, "", kind, detail);
    e.code = code.map(String::from);
    e
}

/// An `ec2:ImportImage` call: the disks as S3 objects, boot disk first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRequest {
    pub disks: Vec<(String, String)>,
    pub role_name: String,
    /// `legacy-bios`, `uefi`, `uefi-preferred`.
    pub boot_mode: Option<String>,
    /// `AWS`, `BYOL`.
    pub license_type: Option<String>,
    pub description: String,
    pub tags: Vec<(String, String)>,
    /// Encrypt the imported snapshots (EBS default key unless `kms_key_id`).
    pub encrypted: bool,
    /// A customer KMS key for them; EC2 refuses it without `encrypted`.
    pub kms_key_id: Option<String>,
    /// Idempotency token (EC2 `ClientToken`, at most 64 ASCII characters): a retried or
    /// repeated call with the same token starts no second import.
    pub client_token: String,
}

impl ImportRequest {
    /// What EC2 checks of the request itself before it starts a task (ImportImage API
    /// reference: "If a KmsKeyId is specified, the Encrypted flag must also be set";
    /// ClientToken up to 64 ASCII characters).
    pub fn check(&self) -> Result<(), CloudError> {
        if self.kms_key_id.is_some() && !self.encrypted {
            return Err(ec2_error(
                "ImportImage",
                ErrorKind::Invalid,
                Some("InvalidParameter"),
                "KmsKeyId requires Encrypted",
            ));
        }
        if self.client_token.is_empty()
            || self.client_token.len() > 64
            || !self.client_token.is_ascii()
        {
            return Err(ec2_error(
                "ImportImage",
                ErrorKind::Invalid,
                Some("InvalidParameterValue"),
                "ClientToken must be 1 to 64 ASCII characters",
            ));
        }
        Ok(())
    }
}

/// An import task as `DescribeImportImageTasks` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImportTask {
    pub task_id: String,
    /// `active`, `completed`, `deleting`, `deleted`.
    pub status: String,
    pub status_message: Option<String>,
    pub progress: Option<u32>,
    pub image_id: Option<String>,
    pub snapshot_ids: Vec<String>,
}

/// The states an import task walks, one per DescribeImportImageTasks call here: EC2 API
/// reference, ImportImageTask: `status` "A brief status" (the task-state filter's values:
/// `active`, `completed`, `deleting`, `deleted`), `statusMessage` "A descriptive status
/// message" (VM Import/Export User Guide, "Monitor an import image task": pending,
/// converting, updating, preparing ami), `progress` a percentage. The in-memory EC2 and
/// the emulator's simulated import both walk it.
pub const IMPORT_STEPS: &[(&str, Option<&str>, Option<u32>)] = &[
    ("active", Some("pending"), Some(0)),
    ("active", Some("converting"), Some(28)),
    ("active", Some("updating"), Some(57)),
    ("active", Some("preparing ami"), Some(85)),
];

/// Describe calls after which a task told to fail is `deleted` with its message (a
/// failed import ends deleted: VM Import/Export User Guide, "Troubleshooting").
pub const IMPORT_FAILS_AFTER: usize = 2;

/// One instance to launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    pub image_id: String,
    pub instance_type: String,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    pub private_ip: Option<String>,
    pub tags: Vec<(String, String)>,
    /// Idempotency token (EC2 `ClientToken`, at most 64 ASCII characters): the same token
    /// with the same parameters returns the instance already launched; with other
    /// parameters EC2 answers `IdempotentParameterMismatch`.
    pub client_token: String,
    /// An EC2 launch template (id, version: a number, `$Latest` or `$Default`) as the
    /// base; the fields above override it.
    pub launch_template: Option<(String, String)>,
    /// Require IMDSv2 (session tokens) on the instance.
    pub imds_v2: bool,
    /// An IAM instance profile (name or ARN) for the instance (its role lets the SSM
    /// agent register, for one).
    pub instance_profile: Option<String>,
}

/// One disk of an AMI registered from snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMapping {
    /// `/dev/xvda`, `/dev/sdf`, ...
    pub device_name: String,
    pub snapshot_id: String,
    pub volume_type: String,
    pub delete_on_termination: bool,
}

/// An `ec2:RegisterImage` call for an EBS-backed AMI made of existing snapshots. EC2
/// takes no client token for it: an AMI name is unique per account and region
/// (`InvalidAMIName.Duplicate`), which is what makes a repeated call safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterRequest {
    /// 3 to 128 characters: letters, digits, `( ) [ ] . / - ' @ _` and space.
    pub name: String,
    pub description: String,
    /// The boot disk's device; `mappings[0]` must be on it.
    pub root_device_name: String,
    pub mappings: Vec<BlockMapping>,
    /// `x86_64` or `arm64`.
    pub architecture: String,
    /// `legacy-bios`, `uefi`, `uefi-preferred`.
    pub boot_mode: Option<String>,
    pub ena_support: bool,
    /// `ImdsSupport = v2.0`: instances from it require IMDSv2.
    pub imds_v2: bool,
    pub tags: Vec<(String, String)>,
}

impl RegisterRequest {
    /// What EC2 checks of the request itself (RegisterImage API reference).
    pub fn check(&self) -> Result<(), CloudError> {
        let bad = |code: &str, why: String| {
            Err(ec2_error(
                "RegisterImage",
                ErrorKind::Invalid,
                Some(code),
                why,
            ))
        };
        let name_ok = (3..=128).contains(&self.name.len())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "()[]./-'@_ ".contains(c));
        if !name_ok {
            return bad(
                "InvalidAMIName.Malformed",
                format!(
                    "AMI name {:?}: 3 to 128 letters, digits or ()[]./-'@_ and space",
                    self.name
                ),
            );
        }
        if self.description.len() > 255 {
            return bad(
                "InvalidParameterValue",
                "Description is longer than 255 characters".into(),
            );
        }
        match self.mappings.first() {
            Some(m) if m.device_name == self.root_device_name => {}
            _ => {
                return bad(
                    "InvalidBlockDeviceMapping",
                    format!("no mapping for the root device {}", self.root_device_name),
                )
            }
        }
        for (i, m) in self.mappings.iter().enumerate() {
            if self.mappings[..i]
                .iter()
                .any(|o| o.device_name == m.device_name)
            {
                return bad(
                    "InvalidBlockDeviceMapping",
                    format!("device {} is mapped twice", m.device_name),
                );
            }
        }
        Ok(())
    }
}

/// An instance's state and status checks, as `DescribeInstanceStatus` reports them
/// (with `IncludeAllInstances`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceHealth {
    /// `pending`, `running`, `stopping`, `stopped`, `shutting-down`, `terminated`.
    pub state: String,
    /// Instance reachability: `ok`, `impaired`, `initializing`, `insufficient-data`,
    /// `not-applicable`.
    pub instance_status: String,
    /// System reachability, the same values.
    pub system_status: String,
}

impl InstanceHealth {
    pub fn passed(&self) -> bool {
        self.state == "running" && self.instance_status == "ok" && self.system_status == "ok"
    }
    /// Will not pass by waiting longer.
    pub fn failed(&self) -> bool {
        matches!(
            self.state.as_str(),
            "stopping" | "stopped" | "shutting-down" | "terminated"
        ) || self.instance_status == "impaired"
            || self.system_status == "impaired"
    }
}

/// An instance's EBS volumes, as `DescribeInstances` reports its block device mappings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceVolumes {
    /// `pending`, `running`, `stopping`, `stopped`, `shutting-down`, `terminated`.
    pub state: String,
    /// `(device name, volume id)`, as mapped.
    pub volumes: Vec<(String, String)>,
}

/// A `CreateSnapshots` call: one crash-consistent snapshot of every EBS volume attached to
/// the instance ("Each volume attached to the specified instance will produce one
/// snapshot that is crash-consistent across the instance", EC2 API reference). It takes
/// no client token: the caller tags the set with an id of its own and looks for that tag
/// ([`Ec2Api::snapshots_tagged`]) before it calls again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotsRequest {
    pub instance_id: String,
    /// Propagated to every snapshot of the set.
    pub description: String,
    /// Put on every snapshot of the set at creation (TagSpecifications, resource type
    /// `snapshot`).
    pub tags: Vec<(String, String)>,
}

/// One snapshot of an instance's volume, as `CreateSnapshots` or `DescribeSnapshots`
/// report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSnapshot {
    pub snapshot_id: String,
    pub volume_id: String,
    /// `pending`, `completed`, `error` (also `recoverable`, `recovering`).
    pub state: String,
    pub start_time: Option<chrono::DateTime<chrono::Utc>>,
}

/// The EC2 calls of the DR flow.
pub trait Ec2Api: Send + Sync {
    fn import_image(
        &self,
        req: &ImportRequest,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
    fn describe_import_image_task(
        &self,
        task_id: &str,
    ) -> impl Future<Output = Result<ImportTask, CloudError>> + Send;
    /// Launches one instance; returns its id.
    fn run_instance(
        &self,
        req: &LaunchRequest,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
    fn terminate_instances(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn deregister_image(&self, id: &str) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn delete_snapshot(&self, id: &str) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Adds tags to existing resources (AMIs, snapshots); tags already there are replaced.
    fn create_tags(
        &self,
        ids: &[String],
        tags: &[(String, String)],
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Registers an AMI from snapshots; returns its id.
    fn register_image(
        &self,
        req: &RegisterRequest,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
    /// The id of this account's AMI of that name, if any (DescribeImages, Owners=self).
    fn find_image(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<String>, CloudError>> + Send;
    /// The instance's state and status checks (`None`: no status yet, or not found yet:
    /// EC2 is eventually consistent right after a launch).
    fn instance_health(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<InstanceHealth>, CloudError>> + Send;
    /// The instance's console output, decoded (`None` when there is none yet).
    fn console_output(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<String>, CloudError>> + Send;
    /// The instance's IAM instance profile (ARN), if it has one (DescribeInstances): an
    /// instance with one may run the SSM agent.
    fn instance_profile(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<String>, CloudError>> + Send;
    /// Systems Manager's ping status of the instance (`Online`, `ConnectionLost`,
    /// `Inactive`; SSM `DescribeInstanceInformation`), `None` while it is not a managed
    /// instance (yet).
    fn ssm_ping(&self, id: &str)
        -> impl Future<Output = Result<Option<String>, CloudError>> + Send;
    /// The instance's state and EBS volumes (`None`: not found, or not yet).
    fn instance_volumes(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<InstanceVolumes>, CloudError>> + Send;
    /// `CreateSnapshots` of every volume of the instance; returns what it started.
    fn create_snapshots(
        &self,
        req: &SnapshotsRequest,
    ) -> impl Future<Output = Result<Vec<VolumeSnapshot>, CloudError>> + Send;
    /// This account's snapshots carrying the tag (DescribeSnapshots, OwnerIds self, a tag
    /// filter; every page).
    fn snapshots_tagged(
        &self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<Vec<VolumeSnapshot>, CloudError>> + Send;
    /// The instance's primary private IPv4 address (`None`: not found, or none yet).
    fn instance_address(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<String>, CloudError>> + Send;
    /// `StopInstances` (a clean shutdown: the guest gets an ACPI shutdown).
    fn stop_instances(&self, ids: &[String])
        -> impl Future<Output = Result<(), CloudError>> + Send;
}

#[cfg(feature = "ec2")]
pub use sdk::SdkEc2;
#[cfg(feature = "ec2")]
mod sdk;
