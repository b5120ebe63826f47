//! [`MemoryEc2`]: the in-memory twin of EC2, following AWS's documented behaviour, with
//! faults on demand.

use super::*;

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
    /// Instances stopped by StopInstances.
    pub stopped: Vec<String>,
    /// Snapshots made by CreateSnapshots, by id.
    pub volume_snapshots: BTreeMap<String, MadeSnapshot>,
}

/// A snapshot [`MemoryEc2`] made with CreateSnapshots.
#[derive(Debug, Clone)]
pub struct MadeSnapshot {
    pub volume_id: String,
    /// DescribeSnapshots calls that have seen it (pending on the first, completed after).
    pub seen: usize,
    pub tags: BTreeMap<String, String>,
    pub at: chrono::DateTime<chrono::Utc>,
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

/// The volume of an instance's `i`th mapping (this twin's volumes are named by both).
fn volume_id(instance: &str, i: usize) -> String {
    format!("vol-{}{i:02}", instance.trim_start_matches("i-"))
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
    async fn instance_volumes(&self, id: &str) -> Result<Option<InstanceVolumes>, CloudError> {
        self.call("DescribeInstances", |s| {
            let launch = s.instances.get(id)?;
            let state = if s.terminated.iter().any(|t| t == id) {
                "terminated"
            } else if s.stopped.iter().any(|t| t == id) {
                "stopped"
            } else {
                "running"
            };
            // The instance has a volume per mapping of its AMI (RegisterImage's), else a
            // root volume.
            let devices: Vec<String> = match s.registered.get(&launch.image_id) {
                Some(r) => r.mappings.iter().map(|m| m.device_name.clone()).collect(),
                None => vec!["/dev/xvda".into()],
            };
            Some(InstanceVolumes {
                state: state.into(),
                volumes: devices
                    .into_iter()
                    .enumerate()
                    .map(|(i, d)| (d, volume_id(id, i)))
                    .collect(),
            })
        })
    }
    async fn create_snapshots(
        &self,
        req: &SnapshotsRequest,
    ) -> Result<Vec<VolumeSnapshot>, CloudError> {
        const OP: &str = "CreateSnapshots";
        let volumes = match self.instance_volumes(&req.instance_id).await? {
            // A terminated instance has no volumes left to snapshot.
            Some(v) if v.state != "terminated" => v.volumes,
            _ => {
                return Err(ec2_error(
                    OP,
                    ErrorKind::NotFound,
                    Some("InvalidInstanceID.NotFound"),
                    format!("The instance ID '{}' does not exist", req.instance_id),
                ))
            }
        };
        self.call(OP, |s| {
            let now = chrono::Utc::now();
            let tags: BTreeMap<String, String> = req.tags.iter().cloned().collect();
            volumes
                .into_iter()
                .map(|(_, vol)| {
                    let sid = format!("snap-{:017x}", s.snapshots.len() + 1);
                    s.snapshots.push(sid.clone());
                    s.volume_snapshots.insert(
                        sid.clone(),
                        MadeSnapshot {
                            volume_id: vol.clone(),
                            seen: 0,
                            tags: tags.clone(),
                            at: now,
                        },
                    );
                    VolumeSnapshot {
                        snapshot_id: sid,
                        volume_id: vol,
                        state: "pending".into(),
                        start_time: Some(now),
                    }
                })
                .collect()
        })
    }
    async fn snapshots_tagged(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<VolumeSnapshot>, CloudError> {
        self.call("DescribeSnapshots", |s| {
            let live = s.snapshots.clone();
            s.volume_snapshots
                .iter_mut()
                .filter(|(id, m)| live.contains(id) && m.tags.get(key).is_some_and(|v| v == value))
                .map(|(id, m)| {
                    // EBS User Guide, "Create Amazon EBS snapshots": "Snapshots occur
                    // asynchronously ... the status of the snapshot is pending until the
                    // snapshot is complete": pending when first seen, completed after.
                    m.seen += 1;
                    VolumeSnapshot {
                        snapshot_id: id.clone(),
                        volume_id: m.volume_id.clone(),
                        state: if m.seen > 1 { "completed" } else { "pending" }.into(),
                        start_time: Some(m.at),
                    }
                })
                .collect()
        })
    }
    async fn instance_address(&self, id: &str) -> Result<Option<String>, CloudError> {
        self.call("DescribeInstances", |s| {
            let n = s.instances.keys().position(|k| k == id)?;
            let launch = &s.instances[id];
            // The address asked for at launch, else one of the subnet's.
            Some(
                launch
                    .private_ip
                    .clone()
                    .unwrap_or_else(|| format!("10.0.{}.{}", n / 250, n % 250 + 4)),
            )
        })
    }
    async fn stop_instances(&self, ids: &[String]) -> Result<(), CloudError> {
        self.call("StopInstances", |s| {
            for id in ids {
                if !s.stopped.contains(id) {
                    s.stopped.push(id.clone());
                }
            }
        })
    }
}
