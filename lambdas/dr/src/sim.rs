//! A stand-in for what the emulator lacks (EMULATOR ONLY: never used unless asked for).
//!
//! moto does not implement `ImportImage` or `DescribeImportImageTasks` (HTTP 500).
//! [`SimulatedImport`] walks an import task through the documented states, the same walk
//! as the in-memory EC2 ([`IMPORT_STEPS`]: `active` with the status messages `pending`,
//! `converting`, `updating`, `preparing ami` and rising progress, then `completed`; or
//! `deleted` with a `StatusMessage` when told to fail),
//! one step per describe call, keeping the task in the bucket so separate invocations see
//! it. On completion it makes a real snapshot and AMI through the backend (moto's EC2
//! for the end-to-end tests), so `RunInstances` and a drill cleanup run for real.
//! Every other call goes to the wrapped client. It is never used unless asked for
//! (`--simulate-import` / `PILOTLIGHT_DR_SIMULATE_IMPORT`).

use pilotlight_cloud::ec2::{
    Ec2Api, ImportRequest, ImportTask, InstanceHealth, InstanceVolumes, LaunchRequest, MemoryEc2,
    RegisterRequest, SdkEc2, SnapshotsRequest, VolumeSnapshot, IMPORT_FAILS_AFTER, IMPORT_STEPS,
};
use pilotlight_cloud::s3::SdkS3;
use pilotlight_cloud::{CloudError, ErrorKind, ObjectStore, PutOptions};
use serde::{Deserialize, Serialize};
use std::future::Future;

/// Simulated task records are small JSON documents.
const MAX_TASK_DOC: u64 = 1 << 20;

/// What the simulator needs to make an imported image real.
pub trait SimBackend: Send + Sync {
    /// A snapshot of a volume of `size_gib`; returns its id.
    fn make_snapshot(
        &self,
        size_gib: i32,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
    /// An AMI whose root device is `snapshot`; returns its id.
    fn make_image(
        &self,
        name: &str,
        snapshot: &str,
        boot_mode: Option<&str>,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SimTask {
    task_id: String,
    polls: usize,
    disks: Vec<(String, String)>,
    sizes: Vec<u64>,
    boot_mode: Option<String>,
    /// What the import was asked to encrypt with (recorded for tests).
    #[serde(default)]
    encrypted: bool,
    #[serde(default)]
    kms_key_id: Option<String>,
    fail: Option<String>,
    image_id: Option<String>,
    snapshot_ids: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct SimulatedImport<E, S> {
    pub inner: E,
    pub store: S,
    /// Where simulated tasks are kept (`{runs_prefix}/simulated-imports/`).
    pub prefix: String,
    /// Make every task fail with this `StatusMessage`.
    pub fail: Option<String>,
}

fn sim_err(op: &'static str, detail: impl Into<String>) -> CloudError {
    CloudError::new("EC2", op, "", ErrorKind::Invalid, detail)
}

fn store_err(op: &'static str, e: CloudError) -> CloudError {
    CloudError {
        op,
        detail: format!("simulated import state: {e}"),
        ..e
    }
}

impl<E: Ec2Api + SimBackend, S: ObjectStore> SimulatedImport<E, S> {
    fn key(&self, task_id: &str) -> String {
        format!("{}{task_id}.json", self.prefix)
    }

    async fn save(&self, t: &SimTask) -> Result<(), CloudError> {
        let body = serde_json::to_vec(t).map_err(|e| sim_err("simulate", e.to_string()))?;
        self.store
            .put(&self.key(&t.task_id), body.into(), PutOptions::json())
            .await
            .map(|_| ())
            .map_err(|e| store_err("simulate", e))
    }
}

impl<E: Ec2Api + SimBackend, S: ObjectStore> Ec2Api for SimulatedImport<E, S> {
    async fn import_image(&self, req: &ImportRequest) -> Result<String, CloudError> {
        // What the real call checks first: the request, then disks present and readable.
        req.check()?;
        if req.disks.is_empty() {
            return Err(sim_err("ImportImage", "no disk containers"));
        }
        let mut sizes = Vec::new();
        for (bucket, key) in &req.disks {
            if bucket != self.store.bucket() {
                return Err(sim_err(
                    "ImportImage",
                    format!("bucket {bucket} is not simulated"),
                ));
            }
            match self
                .store
                .head(key)
                .await
                .map_err(|e| store_err("ImportImage", e))?
            {
                Some(n) => sizes.push(n),
                None => {
                    return Err(sim_err(
                        "ImportImage",
                        format!("S3 object s3://{bucket}/{key} does not exist"),
                    )
                    .with_code("InvalidParameter"))
                }
            }
        }
        // The task id follows from the client token: the same token finds the same task,
        // as EC2's idempotent ImportImage does.
        let task_id = {
            use sha2::Digest;
            let h = sha2::Sha256::digest(req.client_token.as_bytes());
            format!("import-ami-{}", hex::encode(&h[..8]))
        };
        if self
            .store
            .head(&self.key(&task_id))
            .await
            .map_err(|e| store_err("ImportImage", e))?
            .is_some()
        {
            return Ok(task_id);
        }
        let t = SimTask {
            task_id,
            polls: 0,
            disks: req.disks.clone(),
            sizes,
            boot_mode: req.boot_mode.clone(),
            encrypted: req.encrypted,
            kms_key_id: req.kms_key_id.clone(),
            fail: self.fail.clone(),
            image_id: None,
            snapshot_ids: Vec::new(),
        };
        self.save(&t).await?;
        Ok(t.task_id)
    }

    async fn describe_import_image_task(&self, task_id: &str) -> Result<ImportTask, CloudError> {
        const OP: &str = "DescribeImportImageTasks";
        let body = self
            .store
            .get_if_exists(&self.key(task_id), MAX_TASK_DOC)
            .await
            .map_err(|e| store_err(OP, e))?
            .ok_or_else(|| {
                CloudError::new(
                    "EC2",
                    OP,
                    task_id,
                    ErrorKind::NotFound,
                    format!("import task {task_id} does not exist"),
                )
                .with_code("InvalidConversionTaskId.Malformed")
            })?;
        let mut t: SimTask =
            serde_json::from_slice(&body).map_err(|e| sim_err(OP, e.to_string()))?;
        t.polls += 1;
        let step = t.polls - 1;
        let mut out = ImportTask {
            task_id: task_id.into(),
            ..ImportTask::default()
        };
        if let Some(why) = t.fail.clone().filter(|_| step >= IMPORT_FAILS_AFTER) {
            out.status = "deleted".into();
            out.status_message = Some(why);
        } else if let Some((status, msg, progress)) = IMPORT_STEPS.get(step) {
            out.status = (*status).into();
            out.status_message = msg.map(String::from);
            out.progress = *progress;
        } else {
            if t.image_id.is_none() {
                for size in &t.sizes {
                    let gib = size.div_ceil(1 << 30).max(1);
                    let snap = self
                        .inner
                        .make_snapshot(gib.min(i32::MAX as u64) as i32)
                        .await?;
                    t.snapshot_ids.push(snap);
                }
                let root = t.snapshot_ids.first().cloned().unwrap_or_default();
                t.image_id = Some(
                    self.inner
                        .make_image(task_id, &root, t.boot_mode.as_deref())
                        .await?,
                );
            }
            out.status = "completed".into();
            out.progress = Some(100);
            out.image_id = t.image_id.clone();
            out.snapshot_ids = t.snapshot_ids.clone();
        }
        self.save(&t).await?;
        Ok(out)
    }

    async fn run_instance(&self, req: &LaunchRequest) -> Result<String, CloudError> {
        self.inner.run_instance(req).await
    }

    async fn terminate_instances(&self, ids: &[String]) -> Result<(), CloudError> {
        self.inner.terminate_instances(ids).await
    }

    async fn deregister_image(&self, id: &str) -> Result<(), CloudError> {
        self.inner.deregister_image(id).await
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), CloudError> {
        self.inner.delete_snapshot(id).await
    }
    async fn create_tags(
        &self,
        ids: &[String],
        tags: &[(String, String)],
    ) -> Result<(), CloudError> {
        self.inner.create_tags(ids, tags).await
    }
    async fn register_image(&self, req: &RegisterRequest) -> Result<String, CloudError> {
        self.inner.register_image(req).await
    }
    async fn find_image(&self, name: &str) -> Result<Option<String>, CloudError> {
        self.inner.find_image(name).await
    }
    async fn instance_health(&self, id: &str) -> Result<Option<InstanceHealth>, CloudError> {
        self.inner.instance_health(id).await
    }
    async fn console_output(&self, id: &str) -> Result<Option<String>, CloudError> {
        self.inner.console_output(id).await
    }
    async fn instance_profile(&self, id: &str) -> Result<Option<String>, CloudError> {
        self.inner.instance_profile(id).await
    }
    async fn ssm_ping(&self, id: &str) -> Result<Option<String>, CloudError> {
        self.inner.ssm_ping(id).await
    }
    async fn instance_volumes(&self, id: &str) -> Result<Option<InstanceVolumes>, CloudError> {
        self.inner.instance_volumes(id).await
    }
    async fn create_snapshots(
        &self,
        req: &SnapshotsRequest,
    ) -> Result<Vec<VolumeSnapshot>, CloudError> {
        self.inner.create_snapshots(req).await
    }
    async fn snapshots_tagged(&self, k: &str, v: &str) -> Result<Vec<VolumeSnapshot>, CloudError> {
        self.inner.snapshots_tagged(k, v).await
    }
    async fn stop_instances(&self, ids: &[String]) -> Result<(), CloudError> {
        self.inner.stop_instances(ids).await
    }
    async fn instance_address(&self, id: &str) -> Result<Option<String>, CloudError> {
        self.inner.instance_address(id).await
    }
}

impl SimBackend for SdkEc2 {
    async fn make_snapshot(&self, size_gib: i32) -> Result<String, CloudError> {
        let vol = self
            .client
            .create_volume()
            .availability_zone("us-east-1a")
            .size(size_gib)
            .send()
            .await
            .map_err(|e| sim_err("CreateVolume", e.to_string()))?;
        let vol_id = vol.volume_id.unwrap_or_default();
        let snap = self
            .client
            .create_snapshot()
            .volume_id(&vol_id)
            .description("pilotlight simulated import")
            .send()
            .await
            .map_err(|e| sim_err("CreateSnapshot", e.to_string()))?;
        let _ = self.client.delete_volume().volume_id(&vol_id).send().await;
        snap.snapshot_id
            .ok_or_else(|| sim_err("CreateSnapshot", "no snapshot id"))
    }

    async fn make_image(
        &self,
        name: &str,
        snapshot: &str,
        boot_mode: Option<&str>,
    ) -> Result<String, CloudError> {
        use aws_sdk_ec2::types::{BlockDeviceMapping, BootModeValues, EbsBlockDevice};
        let out = self
            .client
            .register_image()
            .name(name)
            .root_device_name("/dev/xvda")
            .virtualization_type("hvm")
            .block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name("/dev/xvda")
                    .ebs(EbsBlockDevice::builder().snapshot_id(snapshot).build())
                    .build(),
            )
            .set_boot_mode(boot_mode.map(BootModeValues::from))
            .send()
            .await
            .map_err(|e| sim_err("RegisterImage", e.to_string()))?;
        out.image_id
            .ok_or_else(|| sim_err("RegisterImage", "no image id"))
    }
}

impl SimBackend for MemoryEc2 {
    async fn make_snapshot(&self, _size_gib: i32) -> Result<String, CloudError> {
        self.create_snapshot()
    }
    async fn make_image(
        &self,
        name: &str,
        snapshot: &str,
        _boot_mode: Option<&str>,
    ) -> Result<String, CloudError> {
        self.register_image(name, snapshot)
    }
}

/// The real EC2, or the same with a simulated import (emulator only).
#[derive(Debug, Clone)]
pub enum AnyEc2 {
    Sdk(SdkEc2),
    Simulated(SimulatedImport<SdkEc2, SdkS3>),
}

impl AnyEc2 {
    /// The SDK's EC2, wrapped with a simulated import when `mode` is given (`ok`
    /// completes; any other value is the failure's StatusMessage) that keeps its tasks
    /// beside the run records (`runs_prefix`).
    pub fn new(sdk: SdkEc2, store: &SdkS3, runs_prefix: &str, mode: Option<&str>) -> Self {
        match mode {
            None => AnyEc2::Sdk(sdk),
            Some(mode) => AnyEc2::Simulated(SimulatedImport {
                inner: sdk,
                store: store.clone(),
                prefix: format!(
                    "{}simulated-imports/",
                    runs_prefix.trim_end_matches("runs/")
                ),
                fail: (mode != "ok" && !mode.is_empty()).then(|| mode.to_string()),
            }),
        }
    }
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
    async fn instance_volumes(&self, id: &str) -> Result<Option<InstanceVolumes>, CloudError> {
        both!(self, e => e.instance_volumes(id).await)
    }
    async fn create_snapshots(
        &self,
        req: &SnapshotsRequest,
    ) -> Result<Vec<VolumeSnapshot>, CloudError> {
        both!(self, e => e.create_snapshots(req).await)
    }
    async fn snapshots_tagged(&self, k: &str, v: &str) -> Result<Vec<VolumeSnapshot>, CloudError> {
        both!(self, e => e.snapshots_tagged(k, v).await)
    }
    async fn stop_instances(&self, ids: &[String]) -> Result<(), CloudError> {
        both!(self, e => e.stop_instances(ids).await)
    }
    async fn instance_address(&self, id: &str) -> Result<Option<String>, CloudError> {
        both!(self, e => e.instance_address(id).await)
    }
}
