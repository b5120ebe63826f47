//! The DR handler against in-memory fakes: the bucket in memory, EC2 in memory with a
//! simulated image import walking the documented task states. (The end-to-end test in
//! `tests/` runs the same flow through the SDK against the emulator.)
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use pilotlight_cloud::ebs::{EbsApi, MemoryEbs, NoEbs};
use pilotlight_cloud::ec2::MemoryEc2;
use pilotlight_cloud::{ErrorKind, Fault, MemoryStore, ObjectStore, PutOptions};
use pilotlight_dr::handler::{advance, cleanup, report, start, status, DrConfig, DrEnv, DrError};
use pilotlight_dr::model::{Method, Phase, Run};
use pilotlight_dr::sim::SimulatedImport;
use pilotlight_protocol::{
    DiskId, ExportRequest, ExportResult, ExportStatus, Manifest, Name, ObjectKey, Prefix,
    Sha256Hex, EXPORT_VERSION,
};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

mod automation;
mod commands;
mod failback;
mod plan;
mod plans;
mod snapshot;
mod steps;

pub(crate) type Env<'a, B = NoEbs> =
    DrEnv<&'a MemoryStore, SimulatedImport<MemoryEc2, &'a MemoryStore>, B>;

pub(crate) fn env<'a>(store: &'a MemoryStore, fail: Option<&str>) -> Env<'a> {
    env_with(store, fail, NoEbs)
}

pub(crate) fn env_with<'a, B>(store: &'a MemoryStore, fail: Option<&str>, ebs: B) -> Env<'a, B> {
    let mut cfg = DrConfig::new("memory", Prefix::new("dr").unwrap());
    cfg.drill_subnet_id = Some("subnet-0d1e2f3a".into());
    cfg.drill_security_group_ids = vec!["sg-0abc1234".into()];
    DrEnv {
        store,
        ec2: SimulatedImport {
            inner: MemoryEc2::default(),
            store,
            prefix: "pilotlight-dr/simulated-imports/".into(),
            fail: fail.map(String::from),
        },
        ebs,
        cfg,
    }
}

pub(crate) fn disk() -> DiskId {
    DiskId::parse("site1/vm1/disk0").unwrap()
}

/// A replicated disk: generations 1..=n committed, generation g snapshotted at minute g.
pub(crate) fn replicated(store: &MemoryStore, n: u64) {
    for g in 1..=n {
        commit(store, &disk(), g, g as i64);
    }
}

/// Commits generation `g` of `disk`, snapshotted `minute` minutes after 10:00: a
/// manifest (what `start` reads) and a data object.
pub(crate) fn commit(store: &MemoryStore, disk: &DiskId, g: u64, minute: i64) {
    let p = Prefix::new("dr").unwrap();
    let m = Manifest::new(
        disk.clone(),
        g,
        (g > 1).then(|| g - 1),
        1 << 20,
        at(minute),
        "test",
    );
    let key = ObjectKey::Manifest {
        disk: disk.clone(),
        generation: g,
    }
    .to_key(&p);
    store.insert(&key, m.to_json());
    let d = ObjectKey::Data {
        disk: disk.clone(),
        generation: g,
        offset: 0,
    }
    .to_key(&p);
    store.insert(&d, Bytes::from_static(b"x"));
}

pub(crate) fn at(minute: i64) -> chrono::DateTime<chrono::Utc> {
    "2026-11-29T10:00:00Z"
        .parse::<chrono::DateTime<chrono::Utc>>()
        .unwrap()
        + chrono::Duration::minutes(minute)
}

pub(crate) fn request() -> Value {
    serde_json::from_str(include_str!("../fixtures/start.json")).unwrap()
}

/// What the receiver does on an export request: answer with the result.
pub(crate) async fn receiver_answers(store: &MemoryStore, run: &Run, ok: bool) {
    let p = Prefix::new("dr").unwrap();
    for d in &run.disks {
        let id = Name::new(&d.export_id).unwrap();
        let disk = DiskId::parse(&d.disk).unwrap();
        let req_key = ObjectKey::ExportRequest {
            disk: disk.clone(),
            id: id.clone(),
        }
        .to_key(&p);
        let req: ExportRequest =
            ExportRequest::from_json(&store.get(&req_key, 1 << 20).await.unwrap(), &id).unwrap();
        let image_key = ObjectKey::ExportImage {
            disk: disk.clone(),
            id: id.clone(),
        }
        .to_key(&p);
        store
            .put(
                &image_key,
                Bytes::from(vec![7u8; 4096]),
                PutOptions::default(),
            )
            .await
            .unwrap();
        let r = ExportResult {
            version: EXPORT_VERSION,
            id: id.clone(),
            status: if ok {
                ExportStatus::Done
            } else {
                ExportStatus::Failed
            },
            generation: Some(req.generation),
            image_key: ok.then(|| image_key.clone()),
            size: ok.then_some(4096),
            sha256: ok.then_some(Sha256Hex([1; 32])),
            parts_sha256: None,
            part_size: None,
            reason: (!ok).then(|| "disk full on the receiver".into()),
            seconds: 0.1,
            finished_at: chrono::Utc::now(),
        };
        let key = ObjectKey::ExportResult { disk, id }.to_key(&p);
        store
            .put(
                &key,
                serde_json::to_vec(&r).unwrap().into(),
                PutOptions::json(),
            )
            .await
            .unwrap();
    }
}

pub(crate) async fn advance_until_final<B: EbsApi>(env: &Env<'_, B>, run: &mut Run) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..20 {
        advance(env, run).await.unwrap();
        if let Some(i) = &run.import {
            seen.push(format!(
                "{} {:?} {:?}",
                i.status, i.status_message, i.progress_percent
            ));
        }
        if run.phase.is_final() {
            return seen;
        }
    }
    panic!("run did not finish: {run:?}");
}

/// How many times EC2 was asked to launch (not how many instances exist: the token
/// would hide a second call).
pub(crate) fn launches(env: &Env<'_>) -> usize {
    calls(env, "RunInstances")
}

/// How often the EC2 twin was called with `op`.
pub(crate) fn calls<B>(env: &Env<'_, B>, op: &str) -> usize {
    env.ec2
        .inner
        .snapshot()
        .calls
        .iter()
        .filter(|c| *c == op)
        .count()
}

pub(crate) fn run_key(run: &Run) -> String {
    format!("pilotlight-dr/runs/{}.json", run.run_id)
}

/// Recovery points of a two-disk VM in the in-memory EBS: generations 1..=4 of disk0 and
/// disk1, generation g snapshotted at minute 15 * g. Returns each (disk, generation)'s
/// snapshot id.
pub(crate) async fn points_of_db01(
    store: &MemoryStore,
    ebs: &MemoryEbs,
) -> std::collections::BTreeMap<(String, u64), String> {
    let mut ids = std::collections::BTreeMap::new();
    for d in ["disk0", "disk1"] {
        let disk = DiskId::new("site1", "db-01", d).unwrap();
        let made = write_points(store, ebs, &disk, &[15, 30, 45, 60]).await;
        for (i, id) in made.into_iter().enumerate() {
            ids.insert((d.to_string(), i as u64 + 1), id);
        }
    }
    ids
}

/// Generations 1.. of `disk`, committed at the given minutes after 10:00, each with its
/// completed recovery point (parented on the previous one); their snapshot ids in order.
pub(crate) async fn write_points(
    store: &MemoryStore,
    ebs: &MemoryEbs,
    disk: &DiskId,
    minutes: &[i64],
) -> Vec<String> {
    use pilotlight_cloud::ebs::{SnapshotStatus, StartSnapshot};
    use pilotlight_protocol::points::PointInfo;
    let mut ids = Vec::new();
    let mut parent: Option<String> = None;
    for (i, m) in minutes.iter().enumerate() {
        let g = i as u64 + 1;
        commit(store, disk, g, *m);
        let info = PointInfo {
            disk: disk.clone(),
            generation: g,
            snapshot_time: at(*m),
            consistency: "crash".into(),
            change_id: None,
            stack: "stack-1".into(),
            parent: parent.clone(),
        };
        let id = ebs
            .start_snapshot(&StartSnapshot {
                volume_size_gib: 1,
                parent: parent.clone(),
                description: format!("{disk} g{g}"),
                tags: info.tags(),
                client_token: format!("{disk}-{g}"),
                encrypted: None,
                kms_key_arn: None,
                timeout_minutes: 60,
            })
            .await
            .unwrap();
        ebs.set_status(&id, SnapshotStatus::Completed);
        ids.push(id.clone());
        parent = Some(id);
    }
    ids
}

pub(crate) fn db01_request(method: &str, point: Value) -> Value {
    let mut req = request();
    req["vm"] = json!("db-01");
    req["disks"] = json!(["disk0", "disk1"]);
    req["method"] = json!(method);
    req["recovery_point"] = point;
    req
}

pub(crate) fn snapshot_env<'a>(
    store: &'a MemoryStore,
    ebs: &Arc<MemoryEbs>,
) -> Env<'a, Arc<MemoryEbs>> {
    let mut env = env_with(store, None, ebs.clone());
    env.cfg.stack = Some("stack-1".into());
    env
}
