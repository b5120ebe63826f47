//! EC2 as the DR flow uses it: one trait ([`Ec2Api`]), implemented for the AWS SDK's
//! client ([`SdkEc2`], feature `ec2`) and in memory ([`MemoryEc2`]).

use crate::error::{CloudError, ErrorKind};
use crate::fault::{lock, Faults};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;

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
}

/// What [`MemoryEc2`] holds.
#[derive(Debug, Default, Clone)]
pub struct MemoryEc2State {
    pub instances: BTreeMap<String, LaunchRequest>,
    pub terminated: Vec<String>,
    pub images: BTreeMap<String, String>,
    pub snapshots: Vec<String>,
    pub calls: Vec<String>,
    /// RunInstances client tokens and the instance each launched.
    pub launch_tokens: BTreeMap<String, String>,
    /// Tags added by CreateTags, by resource id.
    pub tags: BTreeMap<String, BTreeMap<String, String>>,
    /// RegisterImage requests as made, by AMI id.
    pub registered: BTreeMap<String, RegisterRequest>,
    /// Instance health to answer, by instance id or `*` for any (default: running, both
    /// checks ok).
    pub health: BTreeMap<String, InstanceHealth>,
    /// Console output to answer, by instance id or `*` for any.
    pub console: BTreeMap<String, String>,
    /// Launch templates that exist (`lt-...`); any other is `NotFound`.
    pub launch_templates: Vec<String>,
    /// SSM ping status by instance id (or `*`); absent: not a managed instance.
    pub ssm: BTreeMap<String, String>,
    /// Snapshots RegisterImage accepts (beside those made by `create_snapshot`): point
    /// snapshots of the in-memory EBS. `None`: any id.
    pub known_snapshots: Option<Vec<String>>,
    /// Import tasks by id: the request, describe calls so far, what it made.
    pub imports: BTreeMap<String, (ImportRequest, usize, ImportTask)>,
    /// ImportImage client tokens and the task each started.
    pub import_tokens: BTreeMap<String, String>,
    /// Make every import fail with this status message.
    pub fail_imports: Option<String>,
}

/// EC2 in memory (unit tests). `ImportImage` walks the documented task states
/// ([`IMPORT_STEPS`]), one per describe call, and completes with a snapshot per disk and
/// an AMI (or ends `deleted` with `fail_imports`' message). A launch into subnet
/// `subnet-00000000` fails, as an unknown subnet does.
#[derive(Debug, Default)]
pub struct MemoryEc2 {
    pub state: Mutex<MemoryEc2State>,
    pub faults: Faults,
}

impl MemoryEc2 {
    pub fn snapshot(&self) -> MemoryEc2State {
        lock(&self.state).clone()
    }
    /// Records a call and runs it on the state, unless a fault fails it.
    pub fn call<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut MemoryEc2State) -> T,
    ) -> Result<T, CloudError> {
        self.faults.check("EC2", op, "")?;
        let mut s = lock(&self.state);
        s.calls.push(op.into());
        Ok(f(&mut s))
    }

    /// A snapshot (what CreateSnapshot makes); returns its id.
    pub fn create_snapshot(&self) -> Result<String, CloudError> {
        self.call("CreateSnapshot", |s| {
            let id = format!("snap-{:017x}", s.snapshots.len() + 1);
            s.snapshots.push(id.clone());
            id
        })
    }

    /// An AMI (what RegisterImage makes); returns its id.
    pub fn register_image(&self, name: &str, snapshot: &str) -> Result<String, CloudError> {
        self.call("RegisterImage", |s| {
            let id = format!("ami-{:017x}", s.images.len() + 1);
            s.images.insert(id.clone(), format!("{name} {snapshot}"));
            id
        })
    }
}

impl Ec2Api for MemoryEc2 {
    async fn import_image(&self, req: &ImportRequest) -> Result<String, CloudError> {
        req.check()?;
        if req.disks.is_empty() {
            return Err(ec2_error(
                "ImportImage",
                ErrorKind::Invalid,
                Some("InvalidParameter"),
                "no disk containers",
            ));
        }
        self.call("ImportImage", |s| {
            // ImportImage API reference, ClientToken: "The token to enable idempotency for
            // VM import requests": the same token finds the same task.
            if let Some(id) = s.import_tokens.get(&req.client_token) {
                return id.clone();
            }
            let id = format!("import-ami-{:017x}", s.imports.len() + 1);
            let task = ImportTask {
                task_id: id.clone(),
                ..ImportTask::default()
            };
            s.imports.insert(id.clone(), (req.clone(), 0, task));
            s.import_tokens.insert(req.client_token.clone(), id.clone());
            id
        })
    }
    async fn describe_import_image_task(&self, id: &str) -> Result<ImportTask, CloudError> {
        const OP: &str = "DescribeImportImageTasks";
        self.call(OP, |s| {
            let fail = s.fail_imports.clone();
            let (req, polls, task) = s.imports.get_mut(id).ok_or_else(|| {
                ec2_error(
                    OP,
                    ErrorKind::NotFound,
                    Some("InvalidConversionTaskId.Malformed"),
                    format!("import task {id} does not exist"),
                )
            })?;
            *polls += 1;
            let step = *polls - 1;
            if task.status == "completed" || task.status == "deleted" {
                return Ok(task.clone());
            }
            if let Some(why) = fail.filter(|_| step >= IMPORT_FAILS_AFTER) {
                task.status = "deleted".into();
                task.status_message = Some(why);
                task.progress = None;
                return Ok(task.clone());
            }
            if let Some((status, msg, progress)) = IMPORT_STEPS.get(step) {
                task.status = (*status).into();
                task.status_message = msg.map(String::from);
                task.progress = *progress;
                return Ok(task.clone());
            }
            // Completed: a snapshot per disk and the AMI, as the import makes them.
            let n = req.disks.len();
            let mut snaps = Vec::with_capacity(n);
            for _ in 0..n {
                let sid = format!("snap-{:017x}", s.snapshots.len() + 1);
                s.snapshots.push(sid.clone());
                snaps.push(sid);
            }
            let ami = format!("ami-{:017x}", s.images.len() + 1);
            s.images
                .insert(ami.clone(), format!("import {id} {}", snaps.join(" ")));
            let (_, _, task) = s
                .imports
                .get_mut(id)
                .ok_or_else(|| ec2_error(OP, ErrorKind::NotFound, None, "the task vanished"))?;
            task.status = "completed".into();
            task.status_message = None;
            task.progress = None;
            task.image_id = Some(ami);
            task.snapshot_ids = snaps;
            Ok(task.clone())
        })?
    }
    async fn run_instance(&self, req: &LaunchRequest) -> Result<String, CloudError> {
        // EC2 API reference, error codes: InvalidSubnetID.NotFound "The specified subnet
        // does not exist" (this twin's unknown subnet is subnet-00000000).
        if req.subnet_id.as_deref() == Some("subnet-00000000") {
            return Err(ec2_error(
                "RunInstances",
                ErrorKind::NotFound,
                Some("InvalidSubnetID.NotFound"),
                "The subnet ID 'subnet-00000000' does not exist",
            ));
        }
        // RunInstances API reference, ClientToken: "Constraints: Maximum 64 ASCII
        // characters".
        if req.client_token.is_empty() || req.client_token.len() > 64 {
            return Err(ec2_error(
                "RunInstances",
                ErrorKind::Invalid,
                Some("InvalidParameterValue"),
                "ClientToken must be 1 to 64 ASCII characters",
            ));
        }
        // EC2 API reference, error codes: InvalidLaunchTemplateId.NotFound.
        if let Some((lt, _)) = &req.launch_template {
            let known = lock(&self.state).launch_templates.contains(lt);
            if !known {
                return Err(ec2_error(
                    "RunInstances",
                    ErrorKind::NotFound,
                    Some("InvalidLaunchTemplateId.NotFound"),
                    format!(
                        "The specified launch template, with template ID {lt}, does not exist."
                    ),
                ));
            }
        }
        self.call("RunInstances", |s| {
            // EC2 User Guide, "Ensure idempotency": a repeated request with the same client
            // token returns the first one's result; other parameters with the same token
            // are IdempotentParameterMismatch.
            if let Some(id) = s.launch_tokens.get(&req.client_token) {
                return if s.instances.get(id) == Some(req) {
                    Ok(id.clone())
                } else {
                    Err(ec2_error(
                        "RunInstances",
                        ErrorKind::Invalid,
                        Some("IdempotentParameterMismatch"),
                        "the client token was used with other parameters",
                    ))
                };
            }
            let id = format!("i-{:017x}", s.instances.len() + 1);
            s.instances.insert(id.clone(), req.clone());
            s.launch_tokens.insert(req.client_token.clone(), id.clone());
            Ok(id)
        })?
    }
    async fn terminate_instances(&self, ids: &[String]) -> Result<(), CloudError> {
        self.call("TerminateInstances", |s| {
            s.terminated.extend(ids.iter().cloned())
        })
    }
    async fn deregister_image(&self, id: &str) -> Result<(), CloudError> {
        self.call("DeregisterImage", |s| {
            s.images.remove(id);
        })
    }
    async fn delete_snapshot(&self, id: &str) -> Result<(), CloudError> {
        self.call("DeleteSnapshot", |s| {
            // DeleteSnapshot API reference: "You cannot delete a snapshot of the root
            // device of an EBS volume used by a registered AMI. You must first de-register
            // the AMI" (InvalidSnapshot.InUse).
            let in_use = s.registered.iter().any(|(ami, r)| {
                s.images.contains_key(ami) && r.mappings.iter().any(|m| m.snapshot_id == id)
            });
            if in_use {
                return Err(ec2_error(
                    "DeleteSnapshot",
                    ErrorKind::Invalid,
                    Some("InvalidSnapshot.InUse"),
                    format!("The snapshot {id} is currently in use by an AMI"),
                ));
            }
            s.snapshots.retain(|x| x != id);
            Ok(())
        })?
    }
    async fn create_tags(
        &self,
        ids: &[String],
        tags: &[(String, String)],
    ) -> Result<(), CloudError> {
        self.call("CreateTags", |s| {
            for id in ids {
                let t = s.tags.entry(id.clone()).or_default();
                t.extend(tags.iter().cloned());
            }
        })
    }
    async fn register_image(&self, req: &RegisterRequest) -> Result<String, CloudError> {
        req.check()?;
        self.call("RegisterImage", |s| {
            // RegisterImage: an AMI name is unique in the account and Region
            // (InvalidAMIName.Duplicate); every mapped snapshot must exist
            // (InvalidSnapshot.NotFound).
            if s.registered.values().any(|r| r.name == req.name) {
                return Err(ec2_error(
                    "RegisterImage",
                    ErrorKind::Invalid,
                    Some("InvalidAMIName.Duplicate"),
                    format!("AMI name {} is already in use by an AMI", req.name),
                ));
            }
            for m in &req.mappings {
                let known = s.snapshots.contains(&m.snapshot_id)
                    || s.known_snapshots
                        .as_ref()
                        .is_none_or(|k| k.contains(&m.snapshot_id));
                if !known {
                    return Err(ec2_error(
                        "RegisterImage",
                        ErrorKind::NotFound,
                        Some("InvalidSnapshot.NotFound"),
                        format!("The snapshot '{}' does not exist.", m.snapshot_id),
                    ));
                }
            }
            let id = format!("ami-{:017x}", s.images.len() + s.registered.len() + 1);
            s.images.insert(id.clone(), req.name.clone());
            s.registered.insert(id.clone(), req.clone());
            s.tags
                .entry(id.clone())
                .or_default()
                .extend(req.tags.iter().cloned());
            Ok(id)
        })?
    }
    async fn find_image(&self, name: &str) -> Result<Option<String>, CloudError> {
        self.call("DescribeImages", |s| {
            s.registered
                .iter()
                .find(|(id, r)| r.name == name && s.images.contains_key(*id))
                .map(|(id, _)| id.clone())
        })
    }
    async fn instance_health(&self, id: &str) -> Result<Option<InstanceHealth>, CloudError> {
        self.call("DescribeInstanceStatus", |s| {
            if !s.instances.contains_key(id) {
                return None;
            }
            let terminated = s.terminated.iter().any(|t| t == id);
            Some(match s.health.get(id).or_else(|| s.health.get("*")) {
                Some(h) => h.clone(),
                None if terminated => InstanceHealth {
                    state: "terminated".into(),
                    instance_status: "not-applicable".into(),
                    system_status: "not-applicable".into(),
                },
                None => InstanceHealth {
                    state: "running".into(),
                    instance_status: "ok".into(),
                    system_status: "ok".into(),
                },
            })
        })
    }
    async fn console_output(&self, id: &str) -> Result<Option<String>, CloudError> {
        self.call("GetConsoleOutput", |s| {
            s.console.get(id).or_else(|| s.console.get("*")).cloned()
        })
    }
    async fn instance_profile(&self, id: &str) -> Result<Option<String>, CloudError> {
        self.call("DescribeInstances", |s| {
            s.instances.get(id).and_then(|r| r.instance_profile.clone())
        })
    }
    async fn ssm_ping(&self, id: &str) -> Result<Option<String>, CloudError> {
        self.call("DescribeInstanceInformation", |s| {
            s.ssm.get(id).or_else(|| s.ssm.get("*")).cloned()
        })
    }
}

#[cfg(feature = "ec2")]
pub use sdk::SdkEc2;

#[cfg(feature = "ec2")]
mod sdk {
    use super::*;
    use crate::error::from_sdk;
    use aws_sdk_ec2::config::http::HttpResponse;
    use aws_sdk_ec2::error::SdkError;

    fn ec2_err<E: std::error::Error + aws_sdk_ec2::error::ProvideErrorMetadata + 'static>(
        op: &'static str,
        e: &SdkError<E, HttpResponse>,
    ) -> CloudError {
        from_sdk("EC2", op, "", e)
    }

    /// EC2 through the AWS SDK (and, with the feature `ssm`, Systems Manager's view of
    /// its instances).
    #[derive(Debug, Clone)]
    pub struct SdkEc2 {
        pub client: aws_sdk_ec2::Client,
        #[cfg(feature = "ssm")]
        pub ssm: Option<aws_sdk_ssm::Client>,
    }

    fn ec2_tags(tags: &[(String, String)]) -> Vec<aws_sdk_ec2::types::Tag> {
        tags.iter()
            .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build())
            .collect()
    }

    fn tag_spec(
        kind: aws_sdk_ec2::types::ResourceType,
        tags: &[(String, String)],
    ) -> aws_sdk_ec2::types::TagSpecification {
        aws_sdk_ec2::types::TagSpecification::builder()
            .resource_type(kind)
            .set_tags(Some(ec2_tags(tags)))
            .build()
    }

    impl Ec2Api for SdkEc2 {
        async fn import_image(&self, req: &ImportRequest) -> Result<String, CloudError> {
            use aws_sdk_ec2::types::{
                BootModeValues, ImageDiskContainer, ResourceType, UserBucket,
            };
            let containers = req
                .disks
                .iter()
                .map(|(bucket, key)| {
                    ImageDiskContainer::builder()
                        .format("RAW")
                        .user_bucket(UserBucket::builder().s3_bucket(bucket).s3_key(key).build())
                        .build()
                })
                .collect();
            let out = self
                .client
                .import_image()
                .set_disk_containers(Some(containers))
                .role_name(&req.role_name)
                .description(&req.description)
                .set_boot_mode(req.boot_mode.as_deref().map(BootModeValues::from))
                .set_license_type(req.license_type.clone())
                .tag_specifications(tag_spec(ResourceType::ImportImageTask, &req.tags))
                .encrypted(req.encrypted)
                .set_kms_key_id(req.kms_key_id.clone())
                .client_token(&req.client_token)
                .send()
                .await
                .map_err(|e| ec2_err("ImportImage", &e))?;
            out.import_task_id.ok_or_else(|| {
                ec2_error(
                    "ImportImage",
                    ErrorKind::Invalid,
                    None,
                    "no ImportTaskId in the answer",
                )
            })
        }

        async fn describe_import_image_task(
            &self,
            task_id: &str,
        ) -> Result<ImportTask, CloudError> {
            let out = self
                .client
                .describe_import_image_tasks()
                .import_task_ids(task_id)
                .send()
                .await
                .map_err(|e| ec2_err("DescribeImportImageTasks", &e))?;
            let t = out.import_image_tasks().first().ok_or_else(|| {
                ec2_error(
                    "DescribeImportImageTasks",
                    ErrorKind::Invalid,
                    None,
                    format!("import task {task_id} not found"),
                )
            })?;
            Ok(ImportTask {
                task_id: task_id.into(),
                status: t.status().unwrap_or("unknown").into(),
                status_message: t.status_message().map(String::from),
                progress: t.progress().and_then(|p| p.parse().ok()),
                image_id: t.image_id().map(String::from),
                snapshot_ids: t
                    .snapshot_details()
                    .iter()
                    .filter_map(|s| s.snapshot_id().map(String::from))
                    .collect(),
            })
        }

        async fn run_instance(&self, req: &LaunchRequest) -> Result<String, CloudError> {
            use aws_sdk_ec2::types::{InstanceType, ResourceType};
            let out = self
                .client
                .run_instances()
                .image_id(&req.image_id)
                .instance_type(InstanceType::from(req.instance_type.as_str()))
                .min_count(1)
                .max_count(1)
                .set_subnet_id(req.subnet_id.clone())
                .set_security_group_ids(
                    (!req.security_group_ids.is_empty()).then(|| req.security_group_ids.clone()),
                )
                .set_private_ip_address(req.private_ip.clone())
                .client_token(&req.client_token)
                .tag_specifications(tag_spec(ResourceType::Instance, &req.tags))
                .tag_specifications(tag_spec(ResourceType::Volume, &req.tags))
                .set_launch_template(req.launch_template.as_ref().map(|(id, version)| {
                    aws_sdk_ec2::types::LaunchTemplateSpecification::builder()
                        .launch_template_id(id)
                        .version(version)
                        .build()
                }))
                .set_iam_instance_profile(req.instance_profile.as_ref().map(|p| {
                    let b = aws_sdk_ec2::types::IamInstanceProfileSpecification::builder();
                    if p.starts_with("arn:") {
                        b.arn(p).build()
                    } else {
                        b.name(p).build()
                    }
                }))
                .set_metadata_options(req.imds_v2.then(|| {
                    aws_sdk_ec2::types::InstanceMetadataOptionsRequest::builder()
                        .http_tokens(aws_sdk_ec2::types::HttpTokensState::Required)
                        .http_endpoint(aws_sdk_ec2::types::InstanceMetadataEndpointState::Enabled)
                        .build()
                }))
                .send()
                .await
                .map_err(|e| ec2_err("RunInstances", &e))?;
            out.instances()
                .first()
                .and_then(|i| i.instance_id().map(String::from))
                .ok_or_else(|| {
                    ec2_error(
                        "RunInstances",
                        ErrorKind::Invalid,
                        None,
                        "no instance in the answer",
                    )
                })
        }

        async fn terminate_instances(&self, ids: &[String]) -> Result<(), CloudError> {
            if ids.is_empty() {
                return Ok(());
            }
            self.client
                .terminate_instances()
                .set_instance_ids(Some(ids.to_vec()))
                .send()
                .await
                .map_err(|e| ec2_err("TerminateInstances", &e))?;
            Ok(())
        }

        async fn deregister_image(&self, id: &str) -> Result<(), CloudError> {
            self.client
                .deregister_image()
                .image_id(id)
                .send()
                .await
                .map_err(|e| ec2_err("DeregisterImage", &e))?;
            Ok(())
        }

        async fn delete_snapshot(&self, id: &str) -> Result<(), CloudError> {
            self.client
                .delete_snapshot()
                .snapshot_id(id)
                .send()
                .await
                .map_err(|e| ec2_err("DeleteSnapshot", &e))?;
            Ok(())
        }

        async fn create_tags(
            &self,
            ids: &[String],
            tags: &[(String, String)],
        ) -> Result<(), CloudError> {
            if ids.is_empty() {
                return Ok(());
            }
            self.client
                .create_tags()
                .set_resources(Some(ids.to_vec()))
                .set_tags(Some(ec2_tags(tags)))
                .send()
                .await
                .map_err(|e| ec2_err("CreateTags", &e))?;
            Ok(())
        }

        async fn register_image(&self, req: &RegisterRequest) -> Result<String, CloudError> {
            use aws_sdk_ec2::types::{
                ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice,
                ImdsSupportValues, ResourceType, VolumeType,
            };
            req.check()?;
            let mappings = req
                .mappings
                .iter()
                .map(|m| {
                    BlockDeviceMapping::builder()
                        .device_name(&m.device_name)
                        .ebs(
                            EbsBlockDevice::builder()
                                .snapshot_id(&m.snapshot_id)
                                .volume_type(VolumeType::from(m.volume_type.as_str()))
                                .delete_on_termination(m.delete_on_termination)
                                .build(),
                        )
                        .build()
                })
                .collect();
            let out = self
                .client
                .register_image()
                .name(&req.name)
                .description(&req.description)
                .root_device_name(&req.root_device_name)
                .set_block_device_mappings(Some(mappings))
                .architecture(ArchitectureValues::from(req.architecture.as_str()))
                .virtualization_type("hvm")
                .set_boot_mode(req.boot_mode.as_deref().map(BootModeValues::from))
                .ena_support(req.ena_support)
                .set_imds_support(req.imds_v2.then_some(ImdsSupportValues::V20))
                .tag_specifications(tag_spec(ResourceType::Image, &req.tags))
                .send()
                .await
                .map_err(|e| ec2_err("RegisterImage", &e))?;
            out.image_id.ok_or_else(|| {
                ec2_error(
                    "RegisterImage",
                    ErrorKind::Invalid,
                    None,
                    "no ImageId in the answer",
                )
            })
        }

        async fn find_image(&self, name: &str) -> Result<Option<String>, CloudError> {
            let out = self
                .client
                .describe_images()
                .owners("self")
                .filters(
                    aws_sdk_ec2::types::Filter::builder()
                        .name("name")
                        .values(name)
                        .build(),
                )
                .send()
                .await
                .map_err(|e| ec2_err("DescribeImages", &e))?;
            Ok(out
                .images()
                .iter()
                .find(|i| i.name() == Some(name))
                .and_then(|i| i.image_id().map(String::from)))
        }

        async fn instance_health(&self, id: &str) -> Result<Option<InstanceHealth>, CloudError> {
            let out = match self
                .client
                .describe_instance_status()
                .instance_ids(id)
                .include_all_instances(true)
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) => {
                    let e = ec2_err("DescribeInstanceStatus", &e);
                    // Right after RunInstances EC2 may not know the id yet.
                    if e.code.as_deref() == Some("InvalidInstanceID.NotFound") {
                        return Ok(None);
                    }
                    return Err(e);
                }
            };
            Ok(out.instance_statuses().first().map(|s| InstanceHealth {
                state: s
                    .instance_state()
                    .and_then(|st| st.name())
                    .map_or("unknown".into(), |n| n.as_str().to_string()),
                instance_status: s
                    .instance_status()
                    .and_then(|x| x.status())
                    .map_or("insufficient-data".into(), |n| n.as_str().to_string()),
                system_status: s
                    .system_status()
                    .and_then(|x| x.status())
                    .map_or("insufficient-data".into(), |n| n.as_str().to_string()),
            }))
        }

        async fn instance_profile(&self, id: &str) -> Result<Option<String>, CloudError> {
            let out = self
                .client
                .describe_instances()
                .instance_ids(id)
                .send()
                .await
                .map_err(|e| ec2_err("DescribeInstances", &e))?;
            Ok(out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .find(|i| i.instance_id() == Some(id))
                .and_then(|i| i.iam_instance_profile())
                .and_then(|p| p.arn().map(String::from)))
        }

        async fn ssm_ping(&self, id: &str) -> Result<Option<String>, CloudError> {
            #[cfg(feature = "ssm")]
            if let Some(ssm) = &self.ssm {
                let out = ssm
                    .describe_instance_information()
                    .filters(
                        aws_sdk_ssm::types::InstanceInformationStringFilter::builder()
                            .key("InstanceIds")
                            .values(id)
                            .build()
                            .map_err(|e| {
                                ec2_error(
                                    "DescribeInstanceInformation",
                                    ErrorKind::Invalid,
                                    None,
                                    e.to_string(),
                                )
                            })?,
                    )
                    .send()
                    .await
                    .map_err(|e| from_sdk("SSM", "DescribeInstanceInformation", "", &e))?;
                return Ok(out
                    .instance_information_list()
                    .iter()
                    .find(|i| i.instance_id() == Some(id))
                    .and_then(|i| i.ping_status())
                    .map(|p| p.as_str().to_string()));
            }
            let _ = id;
            Err(ec2_error(
                "DescribeInstanceInformation",
                ErrorKind::Invalid,
                None,
                "built without SSM (feature `ssm`)",
            ))
        }

        async fn console_output(&self, id: &str) -> Result<Option<String>, CloudError> {
            use base64::Engine;
            // GetConsoleOutput API reference, Latest: "When enabled, retrieves the latest
            // console output for the instance" (default: the last buffered one, which on
            // Nitro can be stale or empty). Instance types that do not support it refuse
            // the parameter: ask again without it.
            let ask = |latest: bool| {
                self.client
                    .get_console_output()
                    .instance_id(id)
                    .latest(latest)
                    .send()
            };
            let out = match ask(true).await {
                Ok(out) => out,
                Err(e) if ec2_err("GetConsoleOutput", &e).kind == ErrorKind::Invalid => ask(false)
                    .await
                    .map_err(|e| ec2_err("GetConsoleOutput", &e))?,
                Err(e) => return Err(ec2_err("GetConsoleOutput", &e)),
            };
            Ok(out.output().map(|b64| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .unwrap_or_else(|_| b64.as_bytes().to_vec());
                String::from_utf8_lossy(&bytes).into_owned()
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    fn launch(token: &str, kind: &str) -> LaunchRequest {
        LaunchRequest {
            image_id: "ami-1".into(),
            instance_type: kind.into(),
            subnet_id: None,
            security_group_ids: vec![],
            private_ip: None,
            tags: vec![],
            client_token: token.into(),
            launch_template: None,
            imds_v2: false,
            instance_profile: None,
        }
    }

    fn import_request(disks: &[&str]) -> ImportRequest {
        ImportRequest {
            disks: disks
                .iter()
                .map(|k| ("b".to_string(), k.to_string()))
                .collect(),
            role_name: "vmimport".into(),
            boot_mode: None,
            license_type: None,
            description: String::new(),
            tags: vec![],
            encrypted: true,
            kms_key_id: None,
            client_token: "run-1-import".into(),
        }
    }

    #[test]
    fn an_import_request_is_checked_as_ec2_does() {
        let ok = ImportRequest {
            kms_key_id: Some("arn:aws:kms:us-east-1:1:key/k".into()),
            ..import_request(&["k"])
        };
        ok.check().unwrap();
        let no_flag = ImportRequest {
            encrypted: false,
            ..ok.clone()
        };
        assert!(no_flag
            .check()
            .unwrap_err()
            .to_string()
            .contains("Encrypted"));
        let long = ImportRequest {
            client_token: "x".repeat(65),
            ..ok
        };
        assert!(long.check().is_err());
    }

    #[test]
    fn an_import_walks_the_documented_states_and_makes_an_image() {
        let ec2 = MemoryEc2::default();
        let req = import_request(&["d0", "d1"]);
        block_on(async {
            let id = ec2.import_image(&req).await.unwrap();
            assert_eq!(
                ec2.import_image(&req).await.unwrap(),
                id,
                "same token, same task"
            );
            let mut seen = vec![];
            let done = loop {
                let t = ec2.describe_import_image_task(&id).await.unwrap();
                if t.status != "active" {
                    break t;
                }
                seen.push(t.status_message.unwrap());
            };
            assert_eq!(seen, ["pending", "converting", "updating", "preparing ami"]);
            assert_eq!(done.status, "completed");
            assert_eq!(done.snapshot_ids.len(), 2);
            assert!(ec2.snapshot().images.contains_key(&done.image_id.unwrap()));
            // Told to fail: deleted, with the message.
            lock(&ec2.state).fail_imports = Some("ClientError: Unknown OS".into());
            let other = ImportRequest {
                client_token: "run-2-import".into(),
                ..req
            };
            let id = ec2.import_image(&other).await.unwrap();
            let mut last = ImportTask::default();
            for _ in 0..=IMPORT_FAILS_AFTER {
                last = ec2.describe_import_image_task(&id).await.unwrap();
            }
            assert_eq!(last.status, "deleted");
            assert_eq!(
                last.status_message.as_deref(),
                Some("ClientError: Unknown OS")
            );
            assert!(ec2
                .describe_import_image_task("import-ami-nope")
                .await
                .unwrap_err()
                .is_not_found());
        });
    }

    #[test]
    fn a_repeated_launch_with_its_token_starts_no_second_instance() {
        let ec2 = MemoryEc2::default();
        block_on(async {
            let a = ec2
                .run_instance(&launch("run-1-launch", "t3.micro"))
                .await
                .unwrap();
            let b = ec2
                .run_instance(&launch("run-1-launch", "t3.micro"))
                .await
                .unwrap();
            assert_eq!(a, b);
            assert_eq!(ec2.snapshot().instances.len(), 1);
            let e = ec2
                .run_instance(&launch("run-1-launch", "m5.large"))
                .await
                .unwrap_err();
            assert_eq!(e.code.as_deref(), Some("IdempotentParameterMismatch"));
            assert!(ec2.run_instance(&launch("", "t3.micro")).await.is_err());
            let c = ec2
                .run_instance(&launch("run-2-launch", "t3.micro"))
                .await
                .unwrap();
            assert_ne!(a, c);
        });
    }
}
