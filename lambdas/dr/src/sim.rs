//! Stand-ins for what the emulator lacks, and in-memory fakes for unit tests.
//!
//! moto does not implement `ImportImage` or `DescribeImportImageTasks` (HTTP 500).
//! [`SimulatedImport`] walks an import task through the documented states (`active` with
//! the status messages `pending`, `converting`, `updating`, `preparing ami` and rising
//! progress, then `completed`; or `deleted` with a `StatusMessage` when told to fail),
//! one step per describe call, keeping the task in the bucket so separate invocations see
//! it. On completion it makes a real snapshot and AMI through the backend (moto's EC2
//! for the end-to-end tests), so `RunInstances` and a drill cleanup run for real.
//! Every other call goes to the wrapped client. It is never used unless asked for
//! (`--simulate-import` / `PILOTLIGHT_DR_SIMULATE_IMPORT`).

use crate::api::{
    Ec2Api, Ec2Error, ImportRequest, ImportTask, LaunchRequest, ObjectStore, SdkEc2, StoreError,
};
use crate::model::BootMode;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;

/// What the simulator needs to make an imported image real.
pub trait SimBackend: Send + Sync {
    /// A snapshot of a volume of `size_gib`; returns its id.
    fn make_snapshot(&self, size_gib: i32)
        -> impl Future<Output = Result<String, Ec2Error>> + Send;
    /// An AMI whose root device is `snapshot`; returns its id.
    fn make_image(
        &self,
        name: &str,
        snapshot: &str,
        boot_mode: Option<BootMode>,
    ) -> impl Future<Output = Result<String, Ec2Error>> + Send;
}

/// The steps a simulated task walks, one per describe call.
const STEPS: &[(&str, Option<&str>, Option<u32>)] = &[
    ("active", Some("pending"), Some(0)),
    ("active", Some("converting"), Some(28)),
    ("active", Some("updating"), Some(57)),
    ("active", Some("preparing ami"), Some(85)),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SimTask {
    task_id: String,
    polls: usize,
    disks: Vec<(String, String)>,
    sizes: Vec<u64>,
    boot_mode: Option<BootMode>,
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

fn sim_err(op: &'static str, detail: impl Into<String>) -> Ec2Error {
    Ec2Error {
        op,
        code: None,
        detail: detail.into(),
    }
}

fn store_err(op: &'static str, e: StoreError) -> Ec2Error {
    sim_err(op, format!("simulated import state: {e}"))
}

impl<E: Ec2Api + SimBackend, S: ObjectStore> SimulatedImport<E, S> {
    fn key(&self, task_id: &str) -> String {
        format!("{}{task_id}.json", self.prefix)
    }

    async fn save(&self, t: &SimTask) -> Result<(), Ec2Error> {
        let body = serde_json::to_vec(t).map_err(|e| sim_err("simulate", e.to_string()))?;
        self.store
            .put(&self.key(&t.task_id), body.into())
            .await
            .map_err(|e| store_err("simulate", e))
    }
}

impl<E: Ec2Api + SimBackend, S: ObjectStore> Ec2Api for SimulatedImport<E, S> {
    async fn import_image(&self, req: &ImportRequest) -> Result<String, Ec2Error> {
        // What the real call checks first: disks present and readable.
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
                .size(key)
                .await
                .map_err(|e| store_err("ImportImage", e))?
            {
                Some(n) => sizes.push(n),
                None => {
                    return Err(Ec2Error {
                        op: "ImportImage",
                        code: Some("InvalidParameter".into()),
                        detail: format!("S3 object s3://{bucket}/{key} does not exist"),
                    })
                }
            }
        }
        let n = self
            .store
            .list(&self.prefix)
            .await
            .map_err(|e| store_err("ImportImage", e))?
            .len();
        let t = SimTask {
            task_id: format!("import-ami-{:017x}", 0x0123_4567_0000_0000u64 + n as u64),
            polls: 0,
            disks: req.disks.clone(),
            sizes,
            boot_mode: req.boot_mode,
            fail: self.fail.clone(),
            image_id: None,
            snapshot_ids: Vec::new(),
        };
        self.save(&t).await?;
        Ok(t.task_id)
    }

    async fn describe_import_image_task(&self, task_id: &str) -> Result<ImportTask, Ec2Error> {
        const OP: &str = "DescribeImportImageTasks";
        let body = self
            .store
            .get(&self.key(task_id))
            .await
            .map_err(|e| store_err(OP, e))?
            .ok_or_else(|| Ec2Error {
                op: OP,
                code: Some("InvalidConversionTaskId.Malformed".into()),
                detail: format!("import task {task_id} does not exist"),
            })?;
        let mut t: SimTask =
            serde_json::from_slice(&body).map_err(|e| sim_err(OP, e.to_string()))?;
        t.polls += 1;
        let step = t.polls - 1;
        let mut out = ImportTask {
            task_id: task_id.into(),
            ..ImportTask::default()
        };
        if let Some(why) = t.fail.clone().filter(|_| step >= 2) {
            out.status = "deleted".into();
            out.status_message = Some(why);
        } else if let Some((status, msg, progress)) = STEPS.get(step) {
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
                t.image_id = Some(self.inner.make_image(task_id, &root, t.boot_mode).await?);
            }
            out.status = "completed".into();
            out.progress = Some(100);
            out.image_id = t.image_id.clone();
            out.snapshot_ids = t.snapshot_ids.clone();
        }
        self.save(&t).await?;
        Ok(out)
    }

    async fn run_instance(&self, req: &LaunchRequest) -> Result<String, Ec2Error> {
        self.inner.run_instance(req).await
    }

    async fn terminate_instances(&self, ids: &[String]) -> Result<(), Ec2Error> {
        self.inner.terminate_instances(ids).await
    }

    async fn deregister_image(&self, id: &str) -> Result<(), Ec2Error> {
        self.inner.deregister_image(id).await
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), Ec2Error> {
        self.inner.delete_snapshot(id).await
    }
}

impl SimBackend for SdkEc2 {
    async fn make_snapshot(&self, size_gib: i32) -> Result<String, Ec2Error> {
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
        boot_mode: Option<BootMode>,
    ) -> Result<String, Ec2Error> {
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
            .set_boot_mode(boot_mode.map(|b| BootModeValues::from(b.as_str())))
            .send()
            .await
            .map_err(|e| sim_err("RegisterImage", e.to_string()))?;
        out.image_id
            .ok_or_else(|| sim_err("RegisterImage", "no image id"))
    }
}

/// A bucket in memory (unit tests).
#[derive(Debug, Default)]
pub struct MemoryStore {
    pub objects: Mutex<BTreeMap<String, Bytes>>,
}

impl MemoryStore {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Bytes>> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ObjectStore for MemoryStore {
    fn bucket(&self) -> &str {
        "memory"
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        Ok(self.map().get(key).cloned())
    }
    async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.map().get(key).map(|b| b.len() as u64))
    }
    async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        self.map().insert(key.into(), body);
        Ok(())
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .map()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.map().remove(key);
        Ok(())
    }
}

impl<T: ObjectStore> ObjectStore for &T {
    fn bucket(&self) -> &str {
        (**self).bucket()
    }
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Bytes>, StoreError>> + Send {
        (**self).get(key)
    }
    fn size(&self, key: &str) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send {
        (**self).size(key)
    }
    fn put(&self, key: &str, body: Bytes) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).put(key, body)
    }
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send {
        (**self).list(prefix)
    }
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).delete(key)
    }
}

/// What [`MemoryEc2`] holds.
#[derive(Debug, Default, Clone)]
pub struct MemoryEc2State {
    pub instances: BTreeMap<String, LaunchRequest>,
    pub terminated: Vec<String>,
    pub images: BTreeMap<String, String>,
    pub snapshots: Vec<String>,
    pub calls: Vec<String>,
}

/// EC2 in memory (unit tests). Like the emulator, it has no `ImportImage`: wrap it in
/// [`SimulatedImport`]. A launch into subnet `subnet-00000000` fails, as an unknown
/// subnet does.
#[derive(Debug, Default)]
pub struct MemoryEc2 {
    pub state: Mutex<MemoryEc2State>,
}

impl MemoryEc2 {
    pub fn snapshot(&self) -> MemoryEc2State {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn with<T>(&self, call: &str, f: impl FnOnce(&mut MemoryEc2State) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.calls.push(call.into());
        f(&mut s)
    }
}

impl Ec2Api for MemoryEc2 {
    async fn import_image(&self, _req: &ImportRequest) -> Result<String, Ec2Error> {
        Err(sim_err("ImportImage", "not implemented"))
    }
    async fn describe_import_image_task(&self, _id: &str) -> Result<ImportTask, Ec2Error> {
        Err(sim_err("DescribeImportImageTasks", "not implemented"))
    }
    async fn run_instance(&self, req: &LaunchRequest) -> Result<String, Ec2Error> {
        if req.subnet_id.as_deref() == Some("subnet-00000000") {
            return Err(Ec2Error {
                op: "RunInstances",
                code: Some("InvalidSubnetID.NotFound".into()),
                detail: "The subnet ID 'subnet-00000000' does not exist".into(),
            });
        }
        Ok(self.with("RunInstances", |s| {
            let id = format!("i-{:017x}", s.instances.len() + 1);
            s.instances.insert(id.clone(), req.clone());
            id
        }))
    }
    async fn terminate_instances(&self, ids: &[String]) -> Result<(), Ec2Error> {
        self.with("TerminateInstances", |s| {
            s.terminated.extend(ids.iter().cloned())
        });
        Ok(())
    }
    async fn deregister_image(&self, id: &str) -> Result<(), Ec2Error> {
        self.with("DeregisterImage", |s| s.images.remove(id));
        Ok(())
    }
    async fn delete_snapshot(&self, id: &str) -> Result<(), Ec2Error> {
        self.with("DeleteSnapshot", |s| s.snapshots.retain(|x| x != id));
        Ok(())
    }
}

impl SimBackend for MemoryEc2 {
    async fn make_snapshot(&self, _size_gib: i32) -> Result<String, Ec2Error> {
        Ok(self.with("CreateSnapshot", |s| {
            let id = format!("snap-{:017x}", s.snapshots.len() + 1);
            s.snapshots.push(id.clone());
            id
        }))
    }
    async fn make_image(
        &self,
        name: &str,
        snapshot: &str,
        _boot_mode: Option<BootMode>,
    ) -> Result<String, Ec2Error> {
        Ok(self.with("RegisterImage", |s| {
            let id = format!("ami-{:017x}", s.images.len() + 1);
            s.images.insert(id.clone(), format!("{name} {snapshot}"));
            id
        }))
    }
}
