//! Upgrades keep data: every persisted format this project has shipped, as the build of
//! its time wrote it (`tests/fixtures/golden/`, see its README), loads in this build.
//! The durable state files are read through the same `load` the sender and receiver
//! use, so their checksums are checked as a running receiver checks them.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use pilotlight_dr::model::{DrRequest, GroupRecord, Method, Phase, Run, SnapshotReady, VmSettings};
use pilotlight_protocol::{ExportRequest, ExportResult, ExportStatus, Manifest, Name};
use std::path::PathBuf;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/golden")
        .join(name)
}

fn bytes(name: &str) -> Vec<u8> {
    std::fs::read(golden(name)).unwrap()
}

#[test]
fn sender_state_files_load() {
    let st: pilotlight_sender::state::DiskState = pilotlight_durable::load(
        &golden("sender-state-v1.json"),
        pilotlight_sender::state::STATE_VERSION,
    )
    .unwrap()
    .unwrap();
    assert_eq!(st.last_committed, Some(4));
    let p = st.pending.unwrap();
    assert_eq!(
        (p.generation, p.phase),
        (5, pilotlight_sender::state::Phase::Committing)
    );
    let ids: pilotlight_sender::vsphere::ChangeIds =
        pilotlight_durable::load(&golden("sender-vsphere-change-ids-v1.json"), 1)
            .unwrap()
            .unwrap();
    assert_eq!(ids.disks["disk1"], "52 de 3c 11-52/9");
}

/// A state file from before recovery points: what a receiver upgraded past #15 finds on
/// every protected disk. Refusing it would mean a full re-seed of each.
#[test]
fn receiver_state_files_of_every_version_load() {
    use pilotlight_receiver::state::{DiskState, STATE_VERSION};
    let load = |name: &str| -> DiskState {
        pilotlight_durable::load(&golden(name), STATE_VERSION)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .unwrap()
    };
    let before = load("receiver-state-v1-before-points.json");
    assert_eq!((before.applied, before.disk_size), (Some(3), 17179869184));
    assert!(before.points.is_empty() && before.point_due.is_none());
    assert!(!before.points_need_full);

    let points = load("receiver-state-v1-points.json");
    assert_eq!(points.points.len(), 2);
    let due = points.point_due.unwrap();
    assert_eq!((due.generation, due.parent_snapshot), (6, None));
    assert_eq!(
        points.point_error.as_deref(),
        Some("StartSnapshot: throttled")
    );

    let current = load("receiver-state-v1-current.json");
    let due = current.point_due.unwrap();
    assert_eq!(
        due.parent_snapshot.as_deref(),
        Some("snap-0123456789abcdef1")
    );
    assert_eq!(due.token_salt.as_deref(), Some("5f3a9c0e12d4b7a8"));
}

/// Today's state files are written exactly as the golden ones: the same bytes back, so
/// the files above are what a build writes, not a hand-made approximation.
#[test]
fn todays_state_is_written_as_the_golden_file() {
    use pilotlight_receiver::state::{DiskState, STATE_VERSION};
    let path = golden("receiver-state-v1-current.json");
    let st: DiskState = pilotlight_durable::load(&path, STATE_VERSION)
        .unwrap()
        .unwrap();
    let again = pilotlight_durable::encode(&path, STATE_VERSION, &st).unwrap();
    assert_eq!(
        String::from_utf8(again).unwrap(),
        String::from_utf8(bytes("receiver-state-v1-current.json")).unwrap()
    );
}

/// Staged points (#35): a point under way and two queued behind it, each staged. Loads,
/// and is written back byte for byte.
#[test]
fn a_state_with_staged_points_queued_loads_and_is_written_as_the_golden_file() {
    use pilotlight_receiver::state::{DiskState, STATE_VERSION};
    let path = golden("receiver-state-v1-staged.json");
    let st: DiskState = pilotlight_durable::load(&path, STATE_VERSION)
        .unwrap()
        .unwrap();
    assert_eq!(st.applied, Some(9));
    assert_eq!(
        st.point_due.as_ref().map(|p| (p.generation, p.staged)),
        Some((7, true))
    );
    assert_eq!(
        st.points_queued
            .iter()
            .map(|p| (p.generation, p.staged))
            .collect::<Vec<_>>(),
        [(8, true), (9, true)]
    );
    assert_eq!(st.newest_due().map(|p| p.generation), Some(9));
    let again = pilotlight_durable::encode(&path, STATE_VERSION, &st).unwrap();
    assert_eq!(
        String::from_utf8(again).unwrap(),
        String::from_utf8(bytes("receiver-state-v1-staged.json")).unwrap()
    );
}

#[test]
fn manifests_v1_and_v2_load() {
    let v1 = Manifest::from_json(&bytes("manifest-v1.json")).unwrap();
    assert_eq!(
        (v1.format_version, v1.generation, v1.parent),
        (1, 2, Some(1))
    );
    assert_eq!(v1.objects.len(), 2);
    let v2 = Manifest::from_json(&bytes("manifest-v2.json")).unwrap();
    assert_eq!(v2.format_version, 2);
    assert_eq!(v2.objects[0].pieces.len(), 2);
}

#[test]
fn export_documents_load() {
    let id = Name::new("x-0123abcd").unwrap();
    let req = ExportRequest::from_json(&bytes("export-request-v1.json"), &id).unwrap();
    assert_eq!(req.generation, 4);
    let done = ExportResult::from_json(&bytes("export-result-v1.json"), &id).unwrap();
    assert_eq!(
        (done.status, done.size),
        (ExportStatus::Done, Some(268435456))
    );
    let failed = ExportResult::from_json(&bytes("export-result-v1-failed.json"), &id).unwrap();
    assert_eq!(failed.status, ExportStatus::Failed);
}

/// Run records of the first DR build and of today load, and so does the start request
/// kept inside each (the steps parse it again on every advance).
#[test]
fn dr_run_records_of_every_version_load() {
    for (name, phase, method) in [
        ("dr-run-v1-first.json", Phase::Done, None),
        (
            "dr-run-v1-current.json",
            Phase::CleanedUp,
            Some(Method::Snapshot),
        ),
    ] {
        let run: Run =
            serde_json::from_slice(&bytes(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((run.phase, run.method), (phase, method), "{name}");
        match serde_json::from_value::<DrRequest>(run.request.clone()) {
            Ok(DrRequest::Start(s)) => assert_eq!(s.site, "site1", "{name}"),
            other => panic!("{name}: its request does not parse: {other:?}"),
        }
    }
    let first: Run = serde_json::from_slice(&bytes("dr-run-v1-first.json")).unwrap();
    assert!(first.held.is_empty() && first.verification.is_none() && first.group.is_none());
    assert_eq!(first.disks[0].snapshot_id, None);
}

#[test]
fn ready_marks_vm_settings_and_groups_load() {
    let ready: SnapshotReady = serde_json::from_slice(&bytes("ready-mark.json")).unwrap();
    assert_eq!(ready.vm, "db-01");
    let settings: VmSettings = serde_json::from_slice(&bytes("vm-settings.json")).unwrap();
    assert_eq!(settings.disks, ["disk0", "disk1"]);
    let older: VmSettings =
        serde_json::from_slice(&bytes("vm-settings-without-method.json")).unwrap();
    assert_eq!(older.method, Method::Auto);
    let group: GroupRecord = serde_json::from_slice(&bytes("dr-group.json")).unwrap();
    assert_eq!(group.runs.len(), 2);
}

#[test]
fn failback_documents_load() {
    use pilotlight_dr::failback::{Failback, FailbackPhase};
    use pilotlight_protocol::{DiskId, ReturnDoc, RoundDoc};
    let fb: Failback = serde_json::from_slice(&bytes("failback-v1.json")).unwrap();
    assert_eq!(fb.phase, FailbackPhase::FinalRound);
    assert_eq!(fb.disks[0].round.as_ref().unwrap().blocks_written, 12);
    assert!(fb.sets[1].r#final);
    let run = Name::new("dr-20261204t231934-61b0c6f8").unwrap();
    let disk = DiskId::parse("site1/db-01/disk0").unwrap();
    let ret = ReturnDoc::from_json(&bytes("failback-return-v1.json"), &run, &disk).unwrap();
    assert_eq!(ret.newest().unwrap().snapshot_id, "snap-0ddddddddddddddd1");
    let round = RoundDoc::from_json(&bytes("failback-round-v1.json"), &run, &disk).unwrap();
    assert!(round.r#final && round.verified);
}

#[test]
fn plan_runs_and_automation_states_load() {
    use pilotlight_dr::plans::automation::{AutoPhase, AutomationState};
    use pilotlight_dr::plans::run::{PlanPhase, PlanRun};
    let r: PlanRun = serde_json::from_slice(&bytes("plan-run-v1.json")).unwrap();
    assert_eq!(r.plan.name, "shop");
    assert_eq!(r.waves.len(), 2);
    assert_eq!(r.phase, PlanPhase::Running);
    assert!(!r.automation.is_empty());
    let s: AutomationState = serde_json::from_slice(&bytes("plan-automation-v1.json")).unwrap();
    assert_eq!(s.phase, AutoPhase::Ran);
    assert_eq!(s.plan_run_id.as_deref(), Some(r.plan_run_id.as_str()));
    // The plan files are kept as written: the example in docs/plans.md parses.
    let doc = std::fs::read_to_string(golden("../../../docs/plans.md")).unwrap();
    let toml = doc
        .split("```toml\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let plan = pilotlight_dr::plans::parse(toml).unwrap();
    assert_eq!(
        plan.waves,
        vec![
            vec!["db-01".to_string()],
            vec!["app-01".into(), "web-01".into()]
        ]
    );
}

#[test]
fn replica_chain_heads_and_shard_records_load() {
    use pilotlight_protocol::replica::{ChainHead, ShardDoc};
    use pilotlight_protocol::DiskId;
    let disk = DiskId::parse("site1/vm1/disk0").unwrap();
    let h = ChainHead::from_json(&bytes("replica-head-v1.json"), &disk).unwrap();
    assert_eq!(h.point.as_ref().unwrap().generation, 4);
    let p = h.pending.unwrap();
    assert_eq!((p.generation, p.attempt, p.shards), (5, 2, 3));
    assert!(p.sealed_at.is_none());
    let s = ShardDoc::from_json(&bytes("replica-shard-v1.json"), &disk, 5, 2, 1).unwrap();
    assert_eq!(s.blocks.len(), 2);
    assert_eq!(s.blocks[1].index, 2051);
}
