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

type Env<'a, B = NoEbs> = DrEnv<&'a MemoryStore, SimulatedImport<MemoryEc2, &'a MemoryStore>, B>;

fn env<'a>(store: &'a MemoryStore, fail: Option<&str>) -> Env<'a> {
    env_with(store, fail, NoEbs)
}

fn env_with<'a, B>(store: &'a MemoryStore, fail: Option<&str>, ebs: B) -> Env<'a, B> {
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

fn disk() -> DiskId {
    DiskId::parse("site1/vm1/disk0").unwrap()
}

/// A replicated disk: generations 1..=n committed, generation g snapshotted at minute g.
fn replicated(store: &MemoryStore, n: u64) {
    for g in 1..=n {
        commit(store, &disk(), g, g as i64);
    }
}

/// Commits generation `g` of `disk`, snapshotted `minute` minutes after 10:00: a
/// manifest (what `start` reads) and a data object.
fn commit(store: &MemoryStore, disk: &DiskId, g: u64, minute: i64) {
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

fn at(minute: i64) -> chrono::DateTime<chrono::Utc> {
    "2026-11-29T10:00:00Z"
        .parse::<chrono::DateTime<chrono::Utc>>()
        .unwrap()
        + chrono::Duration::minutes(minute)
}

/// A two-disk VM whose data disk has a newer generation than its log disk (still
/// uploading): the run never mixes snapshot times, whatever is asked.
#[tokio::test]
async fn a_run_never_mixes_the_snapshot_times_of_a_vms_disks() {
    let store = MemoryStore::default();
    let d0 = DiskId::parse("site1/db-01/disk0").unwrap();
    let d1 = DiskId::parse("site1/db-01/disk1").unwrap();
    commit(&store, &d0, 1, 0);
    commit(&store, &d0, 2, 15);
    commit(&store, &d1, 1, 0);
    let env = env(&store, None);
    let resolve = |rp: Value| {
        let mut req = request();
        req["vm"] = json!("db-01");
        req["disks"] = json!(["disk0", "disk1"]);
        req["dry_run"] = json!(true);
        req["recovery_point"] = rp;
        let env = &env;
        async move { start(env, req).await.unwrap() }
    };
    let gens = |r: &Run| r.disks.iter().map(|d| d.generation).collect::<Vec<_>>();
    // Latest: 10:00 for both (disk1 has no 10:15 yet).
    let run = resolve(json!("latest")).await;
    assert_eq!(run.phase, Phase::Planned, "{:?}", run.reason);
    assert_eq!(gens(&run), [1, 1]);
    // At 10:20: still 10:00. At 10:00 exactly: 10:00.
    assert_eq!(gens(&resolve(json!({"at": at(20)})).await), [1, 1]);
    assert_eq!(gens(&resolve(json!({"at": at(0)})).await), [1, 1]);
    // Before anything: refused, naming a disk.
    let run = resolve(json!({"at": at(-5)})).await;
    assert_eq!(run.phase, Phase::Failed);
    let why = run.reason.unwrap();
    assert!(
        why.contains("site1/db-01/disk0") && why.contains("09:55"),
        "{why}"
    );
    // The boot disk's generation 2 names 10:15, which disk1 lacks: refused, naming it.
    let run = resolve(json!({"generation": 2})).await;
    assert_eq!(run.phase, Phase::Failed);
    let why = run.reason.unwrap();
    assert!(
        why.contains("site1/db-01/disk1") && why.contains("10:15"),
        "{why}"
    );
    // disk1's 10:15 arrives: latest is 10:15 for both.
    commit(&store, &d1, 2, 15);
    assert_eq!(gens(&resolve(json!("latest")).await), [2, 2]);
    assert_eq!(gens(&resolve(json!({"generation": 2})).await), [2, 2]);
}

fn request() -> Value {
    serde_json::from_str(include_str!("fixtures/start.json")).unwrap()
}

/// What the receiver does on an export request: answer with the result.
async fn receiver_answers(store: &MemoryStore, run: &Run, ok: bool) {
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

async fn advance_until_final<B: EbsApi>(env: &Env<'_, B>, run: &mut Run) -> Vec<String> {
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

#[tokio::test]
async fn a_drill_runs_to_done_and_cleanup_removes_exactly_what_it_made() {
    let store = MemoryStore::default();
    replicated(&store, 3);
    let env = env(&store, None);
    // Something the drill did not make: it must survive the cleanup.
    store
        .put(
            "dr/site1/vm1/disk0/x/other/image.raw",
            Bytes::from_static(b"keep"),
            PutOptions::default(),
        )
        .await
        .unwrap();

    let mut run = start(&env, request()).await.unwrap();
    assert_eq!(run.phase, Phase::Exporting, "{:?}", run.reason);
    assert_eq!(run.disks[0].generation, 3, "latest");
    // Nothing happens until the receiver answers.
    advance(&env, &mut run).await.unwrap();
    assert_eq!(run.phase, Phase::Exporting);
    receiver_answers(&store, &run, true).await;
    let seen = advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Done, "{:?}", run.reason);
    assert!(
        seen.iter()
            .any(|s| s.contains("converting") && s.contains("28")),
        "{seen:?}"
    );
    assert!(seen.last().unwrap().starts_with("completed"), "{seen:?}");
    let phases: Vec<Phase> = run.phases.iter().map(|p| p.phase).collect();
    assert_eq!(
        phases,
        [
            Phase::Exporting,
            Phase::Importing,
            Phase::Launching,
            Phase::Verifying
        ]
    );
    assert!(run.phases.iter().all(|p| p.seconds.is_some()));
    // No recovery points here: auto chose import, and says why.
    assert_eq!(run.method, Some(Method::Import));
    assert!(
        run.method_reason
            .as_deref()
            .unwrap()
            .contains("auto chose import"),
        "{:?}",
        run.method_reason
    );
    assert!(run.verification.as_ref().unwrap().passed);
    // An import run never marks the VM snapshot-ready.
    assert!(store
        .get_if_exists("pilotlight-dr/ready/site1/vm1.json", 1 << 20)
        .await
        .unwrap()
        .is_none());

    // The launch: drill subnet and groups, the request's tags plus ours.
    let ec2 = env.ec2.inner.snapshot();
    let (id, launched) = ec2.instances.iter().next().unwrap();
    assert_eq!(&run.instance_ids, std::slice::from_ref(id));
    assert_eq!(launched.subnet_id.as_deref(), Some("subnet-0d1e2f3a"));
    assert_eq!(launched.security_group_ids, ["sg-0abc1234"]);
    assert_eq!(launched.instance_type, "t3.medium");
    for tag in [
        ("team", "ops"),
        ("pilotlight:drill", "true"),
        ("Name", "vm1-recovered"),
    ] {
        assert!(
            launched.tags.contains(&(tag.0.into(), tag.1.into())),
            "{tag:?}"
        );
    }
    assert!(launched
        .tags
        .contains(&("pilotlight:dr-run".into(), run.run_id.clone())));

    // The record in the bucket is what was returned.
    let stored: Run = serde_json::from_slice(
        &store
            .get(&format!("pilotlight-dr/runs/{}.json", run.run_id), 1 << 20)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(stored, run);

    let cleaned = cleanup(&env, &run.run_id).await.unwrap();
    assert_eq!(cleaned.phase, Phase::CleanedUp, "{:?}", cleaned.reason);
    let ec2 = env.ec2.inner.snapshot();
    assert_eq!(ec2.terminated, run.instance_ids);
    assert!(ec2.images.is_empty() && ec2.snapshots.is_empty());
    let left = store.list("dr/site1/vm1/disk0/x/", |_| true).await.unwrap();
    assert_eq!(
        left,
        ["dr/site1/vm1/disk0/x/other/image.raw"],
        "only the drill's exports go"
    );
    let kinds: Vec<&str> = cleaned.removed.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "instance",
            "image",
            "snapshot",
            "s3-object",
            "s3-object",
            "s3-object"
        ]
    );
}

async fn failed_start(store: &MemoryStore, edit: impl FnOnce(&mut Value)) -> Run {
    let env = env(store, None);
    let mut req = request();
    edit(&mut req);
    let run = start(&env, req).await.unwrap();
    assert_eq!(run.phase, Phase::Failed);
    // Recorded, with the reason.
    let stored = store
        .head(&format!("pilotlight-dr/runs/{}.json", run.run_id))
        .await
        .unwrap();
    assert!(stored.is_some(), "a failed start is recorded");
    assert!(
        store
            .list("dr/site1/vm1/disk0/x/", |_| true)
            .await
            .unwrap()
            .is_empty(),
        "nothing requested"
    );
    run
}

#[tokio::test]
async fn bad_starts_fail_with_a_clear_reason_and_request_nothing() {
    let store = MemoryStore::default();
    replicated(&store, 2);
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "unknown VM site1/nope",
            Box::new(|r| r["vm"] = json!("nope")),
        ),
        (
            "unknown disk site1/vm1/disk9",
            Box::new(|r| r["disks"] = json!(["disk9"])),
        ),
        (
            "generation 7 is not available",
            Box::new(|r| r["recovery_point"] = json!({"generation": 7})),
        ),
        (
            "instance_type",
            Box::new(|r| r["launch"]["instance_type"] = json!("huge")),
        ),
        (
            "subnet_id",
            Box::new(|r| r["launch"]["subnet_id"] = json!("subnet-xyz")),
        ),
        (
            "security group",
            Box::new(|r| r["launch"]["security_group_ids"] = json!(["default"])),
        ),
        (
            "reserved prefix",
            Box::new(|r| r["launch"]["tags"] = json!({"aws:x": "y"})),
        ),
        (
            "private_ip needs",
            Box::new(|r| {
                r["drill"] = json!(false);
                r["launch"]["private_ip"] = json!("10.0.0.5")
            }),
        ),
        (
            "not valid",
            Box::new(|r| r["launch"]["private_ip"] = json!("10.0.0.999")),
        ),
        (
            "not valid",
            Box::new(|r| r["launch"]["boot_mode"] = json!("floppy")),
        ),
        (
            "listed twice",
            Box::new(|r| r["disks"] = json!(["disk0", "disk0"])),
        ),
        (
            "EC2 image import does not support it",
            Box::new(|r| {
                r["method"] = json!("import");
                r["launch"]["boot_mode"] = json!("uefi-preferred")
            }),
        ),
        ("vm \"../x\"", Box::new(|r| r["vm"] = json!("../x"))),
    ];
    for (want, edit) in cases {
        let run = failed_start(&store, edit).await;
        let reason = run.reason.unwrap();
        assert!(reason.contains(want), "{want}: {reason}");
    }
}

#[tokio::test]
async fn nothing_committed_yet_is_its_own_reason() {
    let store = MemoryStore::default();
    let p = Prefix::new("dr").unwrap();
    let d = ObjectKey::Data {
        disk: disk(),
        generation: 1,
        offset: 0,
    }
    .to_key(&p);
    store
        .put(&d, Bytes::from_static(b"x"), PutOptions::default())
        .await
        .unwrap();
    let run = failed_start(&store, |_| {}).await;
    assert!(run.reason.unwrap().contains("nothing committed yet"));
}

#[tokio::test]
async fn a_dry_run_resolves_and_writes_nothing() {
    let store = MemoryStore::default();
    replicated(&store, 2);
    let env = env(&store, None);
    let mut req = request();
    req["dry_run"] = json!(true);
    req["recovery_point"] = json!({"generation": 1});
    let before = store.list("", |_| true).await.unwrap();
    let run = start(&env, req).await.unwrap();
    assert_eq!(run.phase, Phase::Planned);
    assert_eq!(run.disks[0].generation, 1);
    assert_eq!(store.list("", |_| true).await.unwrap(), before);
}

#[tokio::test]
async fn export_timeout_and_export_failure_fail_the_run() {
    let store = MemoryStore::default();
    replicated(&store, 1);
    let mut env = env(&store, None);
    env.cfg.export_timeout = Duration::ZERO;
    let mut run = start(&env, request()).await.unwrap();
    advance(&env, &mut run).await.unwrap();
    assert_eq!(run.phase, Phase::Failed);
    let reason = run.reason.clone().unwrap();
    assert!(
        reason.contains("export timeout") && reason.contains("site1/vm1/disk0 (generation 1)"),
        "{reason}"
    );
    assert_eq!(
        run.created.len(),
        1,
        "the export request is on record: {:?}",
        run.created
    );

    env.cfg.export_timeout = Duration::from_secs(3600);
    let mut run = start(&env, request()).await.unwrap();
    receiver_answers(&store, &run, false).await;
    advance(&env, &mut run).await.unwrap();
    assert_eq!(run.phase, Phase::Failed);
    assert!(run.reason.unwrap().contains("disk full on the receiver"));
}

#[tokio::test]
async fn a_failed_import_task_fails_the_run_with_its_status_message() {
    let store = MemoryStore::default();
    replicated(&store, 1);
    let env = env(
        &store,
        Some("ClientError: Unsupported kernel version 2.6.18"),
    );
    let mut run = start(&env, request()).await.unwrap();
    receiver_answers(&store, &run, true).await;
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Failed);
    let reason = run.reason.clone().unwrap();
    assert!(reason.contains("Unsupported kernel version"), "{reason}");
    let kinds: Vec<&str> = run.created.iter().map(|c| c.kind.as_str()).collect();
    assert_eq!(kinds, ["s3-object", "s3-object", "import-image-task"]);
    assert!(env.ec2.inner.snapshot().instances.is_empty());
    // A failed drill can be cleaned up too: its exports go.
    let cleaned = cleanup(&env, &run.run_id).await.unwrap();
    assert_eq!(cleaned.phase, Phase::CleanedUp);
    assert!(store
        .list("dr/site1/vm1/disk0/x/", |_| true)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_failed_launch_keeps_the_ami_on_record() {
    let store = MemoryStore::default();
    replicated(&store, 1);
    let mut env = env(&store, None);
    env.cfg.drill_subnet_id = Some("subnet-00000000".into());
    let mut run = start(&env, request()).await.unwrap();
    receiver_answers(&store, &run, true).await;
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Failed);
    assert!(
        run.reason
            .clone()
            .unwrap()
            .contains("InvalidSubnetID.NotFound"),
        "{:?}",
        run.reason
    );
    assert!(run.created.iter().any(|c| c.kind == "image"));
}

#[tokio::test]
async fn cleanup_refuses_real_recoveries_and_unfinished_runs() {
    let store = MemoryStore::default();
    replicated(&store, 1);
    let env = env(&store, None);
    let run = start(&env, request()).await.unwrap();
    let e = cleanup(&env, &run.run_id).await.unwrap_err();
    assert!(
        matches!(e, DrError::Refused(_)) && e.to_string().contains("wait"),
        "{e}"
    );
    let mut req = request();
    req["drill"] = json!(false);
    let real = start(&env, req).await.unwrap();
    let e = cleanup(&env, &real.run_id).await.unwrap_err();
    assert!(e.to_string().contains("not a drill"), "{e}");
    assert!(matches!(
        cleanup(&env, "nope").await,
        Err(DrError::NoSuchRun(_))
    ));
    assert!(matches!(
        cleanup(&env, "../etc").await,
        Err(DrError::NoSuchRun(_))
    ));
}

#[tokio::test]
async fn the_lambda_entry_takes_requests_and_the_schedule() {
    let store = MemoryStore::default();
    replicated(&store, 1);
    let env = env(&store, None);
    let v = pilotlight_dr::handle(&env, request()).await.unwrap();
    let run: Run = serde_json::from_value(v).unwrap();
    assert_eq!(run.phase, Phase::Exporting);
    receiver_answers(&store, &run, true).await;
    // The schedule advances every unfinished run, one step each time.
    let scheduled: Value = serde_json::from_str(include_str!("fixtures/scheduled.json")).unwrap();
    let v = pilotlight_dr::handle(&env, scheduled).await.unwrap();
    assert_eq!(v["advanced"], json!([run.run_id]));
    let status_req: Value = serde_json::from_str(include_str!("fixtures/status.json")).unwrap();
    let runs: Vec<Run> =
        serde_json::from_value(pilotlight_dr::handle(&env, status_req).await.unwrap()).unwrap();
    assert_eq!(runs[0].phase, Phase::Importing);
    for bad in [
        json!({"action": "explode"}),
        json!({"hello": 1}),
        json!([1, 2]),
    ] {
        let e = pilotlight_dr::handle(&env, bad.clone()).await.unwrap_err();
        assert!(matches!(e, DrError::BadRequest(_)), "{bad}: {e}");
    }
    // Finished runs are not listed by a bare status.
    let mut run = runs[0].clone();
    advance_until_final(&env, &mut run).await;
    assert!(status(&env, None).await.unwrap().is_empty());
}

/// Two advancers on one run (the schedule and a CLI `status`, or a retry after a Lambda
/// timeout that came after the EC2 call but before the save): each EC2 create call carries
/// a token derived from the run and step, so the repeated import finds the same task and
/// the repeated launch the same instance.
#[tokio::test]
async fn a_step_repeated_by_a_second_advancer_creates_nothing_twice() {
    let store = MemoryStore::default();
    replicated(&store, 3);
    let env = env(&store, None);
    let mut run = start(&env, request()).await.unwrap();
    receiver_answers(&store, &run, true).await;
    // The import starts twice from the same exporting record.
    let mut stale = run.clone();
    advance(&env, &mut run).await.unwrap();
    advance(&env, &mut stale).await.unwrap();
    assert_eq!(run.phase, Phase::Importing, "{:?}", run.reason);
    let task = run.import.as_ref().unwrap().task_id.clone();
    assert_eq!(
        stale.import.as_ref().unwrap().task_id,
        task,
        "one import task"
    );
    let tasks = store
        .list("pilotlight-dr/simulated-imports/", |_| true)
        .await
        .unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    // The step that completes the import launches the instance; it runs twice from the
    // same importing record.
    let mut stale = run.clone();
    for _ in 0..20 {
        if run.phase != Phase::Importing {
            break;
        }
        stale = run.clone();
        advance(&env, &mut run).await.unwrap();
    }
    assert_eq!(run.phase, Phase::Done, "{:?}", run.reason);
    assert_eq!(stale.phase, Phase::Importing);
    advance(&env, &mut stale).await.unwrap();
    assert_eq!(stale.phase, Phase::Done, "{:?}", stale.reason);
    assert_eq!(run.instance_ids.len(), 1);
    assert_eq!(run.instance_ids, stale.instance_ids, "the same instance");
    assert_eq!(env.ec2.inner.snapshot().instances.len(), 1, "one instance");
}

/// How many times EC2 was asked to launch (not how many instances exist: the token
/// would hide a second call).
fn launches(env: &Env<'_>) -> usize {
    calls(env, "RunInstances")
}

/// How often the EC2 twin was called with `op`.
fn calls<B>(env: &Env<'_, B>, op: &str) -> usize {
    env.ec2
        .inner
        .snapshot()
        .calls
        .iter()
        .filter(|c| *c == op)
        .count()
}

fn run_key(run: &Run) -> String {
    format!("pilotlight-dr/runs/{}.json", run.run_id)
}

#[tokio::test]
async fn two_advancers_racing_on_one_run_make_one_import_one_instance_and_one_record() {
    let store = MemoryStore::default();
    replicated(&store, 2);
    let env = env(&store, None);
    let mut a = start(&env, request()).await.unwrap();
    receiver_answers(&store, &a, true).await;
    // Two callers (the schedule and `dr status`) holding the same version, every step.
    let mut b = a.clone();
    for _ in 0..20 {
        let (ra, rb) = tokio::join!(advance(&env, &mut a), advance(&env, &mut b));
        ra.unwrap();
        rb.unwrap();
        if a.phase.is_final() && b.phase.is_final() {
            break;
        }
        // Whoever lost a race holds the winner's version now; both go again.
        if a.updated_at > b.updated_at {
            b = a.clone();
        } else {
            a = b.clone();
        }
    }
    assert_eq!(a.phase, Phase::Done, "{:?}", a.reason);
    assert_eq!(launches(&env), 1, "one RunInstances call");
    assert_eq!(env.ec2.inner.snapshot().instances.len(), 1);
    let tasks = store
        .list("pilotlight-dr/simulated-imports/", |_| true)
        .await
        .unwrap();
    assert_eq!(tasks.len(), 1, "one import task: {tasks:?}");
    let stored: Run =
        serde_json::from_slice(&store.get(&run_key(&a), 1 << 20).await.unwrap()).unwrap();
    assert_eq!(stored, a, "one consistent record");
    assert_eq!(stored.instance_ids.len(), 1);
    assert_eq!(
        stored
            .created
            .iter()
            .filter(|c| c.kind == "instance")
            .count(),
        1
    );
    assert!(stored.claim.is_none(), "no claim left behind");
}

#[tokio::test]
async fn a_claimed_launch_waits_for_its_claimer_and_is_taken_over_when_the_claim_expires() {
    let store = MemoryStore::default();
    replicated(&store, 1);
    let env = env(&store, None);
    let mut run = start(&env, request()).await.unwrap();
    receiver_answers(&store, &run, true).await;
    // Up to the launch, which fails for now: the claim is released, the run waits.
    env.ec2
        .inner
        .faults
        .add(Fault::on("RunInstances").throttle());
    for _ in 0..20 {
        advance(&env, &mut run).await.unwrap();
        if run.phase == Phase::Launching {
            break;
        }
    }
    assert_eq!(run.phase, Phase::Launching, "{:?}", run.reason);
    assert!(run.claim.is_none(), "a failed call releases its claim");
    assert!(
        run.reason.as_deref().unwrap_or("").contains("retried"),
        "{:?}",
        run.reason
    );
    env.ec2.inner.faults.clear();

    // Another caller claimed it and is (as far as anyone knows) still calling.
    let mut record: Value =
        serde_json::from_slice(&store.get(&run_key(&run), 1 << 20).await.unwrap()).unwrap();
    let until = chrono::Utc::now() + chrono::Duration::seconds(120);
    record["claim"] = json!({"step": "launch", "until": until});
    store.insert(&run_key(&run), serde_json::to_vec(&record).unwrap());
    let mut seen = status(&env, Some(&run.run_id)).await.unwrap().remove(0);
    assert_eq!(seen.phase, Phase::Launching);
    let before = launches(&env);
    advance(&env, &mut seen).await.unwrap();
    assert_eq!(launches(&env), before, "a held claim is left alone");

    // The claimer died: once the claim expires, the next caller launches.
    record["claim"] =
        json!({"step": "launch", "until": chrono::Utc::now() - chrono::Duration::seconds(1)});
    store.insert(&run_key(&run), serde_json::to_vec(&record).unwrap());
    let done = status(&env, Some(&run.run_id)).await.unwrap().remove(0);
    assert_eq!(done.phase, Phase::Done, "{:?}", done.reason);
    assert_eq!(env.ec2.inner.snapshot().instances.len(), 1);
}

#[tokio::test]
async fn a_missing_export_result_answered_403_keeps_the_run_waiting_until_the_export_timeout() {
    // The DR role's ListBucket is conditioned on s3:prefix, so S3 answers its GET of a
    // result the receiver has not written yet with 403, not 404.
    let store = MemoryStore::default();
    replicated(&store, 1);
    store.deny_missing_keys(true);
    let mut env = env(&store, None);
    let mut run = start(&env, request()).await.unwrap();
    for _ in 0..3 {
        advance(&env, &mut run).await.unwrap();
        assert_eq!(run.phase, Phase::Exporting, "{:?}", run.reason);
    }
    // Scheduled calls keep going (a bare status lists it, no error).
    let runs = status(&env, None).await.unwrap();
    assert_eq!(runs.len(), 1);
    // The receiver never answers: the timeout fails the run, with the reason.
    env.cfg.export_timeout = Duration::ZERO;
    advance(&env, &mut run).await.unwrap();
    assert_eq!(run.phase, Phase::Failed);
    assert!(
        run.reason.as_deref().unwrap().contains("export timeout"),
        "{:?}",
        run.reason
    );

    // A real denial (the listing is denied too) is an error, never "not yet".
    env.cfg.export_timeout = Duration::from_secs(3600);
    let mut run = start(&env, request()).await.unwrap();
    store.faults.add(
        Fault::on("ListObjectsV2")
            .always()
            .kind(ErrorKind::AccessDenied, Some("AccessDenied")),
    );
    let e = advance(&env, &mut run).await.unwrap_err();
    assert!(e.to_string().contains("s3:ListBucket"), "{e}");
    assert_eq!(run.phase, Phase::Exporting);
}

#[tokio::test]
async fn an_export_result_naming_another_object_is_not_imported() {
    let store = MemoryStore::default();
    replicated(&store, 1);
    let env = env(&store, None);
    let mut run = start(&env, request()).await.unwrap();
    receiver_answers(&store, &run, true).await;
    // Someone rewrites the result to point at an object of their choosing.
    let p = Prefix::new("dr").unwrap();
    let id = Name::new(&run.disks[0].export_id).unwrap();
    let key = ObjectKey::ExportResult { disk: disk(), id }.to_key(&p);
    let mut r: Value = serde_json::from_slice(&store.get(&key, 1 << 20).await.unwrap()).unwrap();
    r["image_key"] = json!("dr/site1/vm1/disk0/x/other/image.raw");
    store.insert(&key, serde_json::to_vec(&r).unwrap());
    advance(&env, &mut run).await.unwrap();
    assert_eq!(run.phase, Phase::Failed);
    assert!(
        run.reason
            .as_deref()
            .unwrap()
            .contains("not the image this run asked for"),
        "{:?}",
        run.reason
    );
    let tasks = store
        .list("pilotlight-dr/simulated-imports/", |_| true)
        .await
        .unwrap();
    assert!(tasks.is_empty(), "nothing imported");
}

#[tokio::test]
async fn imports_are_encrypted_with_the_stack_key_and_what_they_make_is_tagged_for_cleanup() {
    let store = MemoryStore::default();
    replicated(&store, 1);
    let mut env = env(&store, None);
    env.cfg.kms_key_id =
        Some("arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab".into());
    let mut run = start(&env, request()).await.unwrap();
    receiver_answers(&store, &run, true).await;
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Done, "{:?}", run.reason);
    let task: Value = serde_json::from_slice(
        &store
            .get(
                &format!(
                    "pilotlight-dr/simulated-imports/{}.json",
                    run.import.as_ref().unwrap().task_id
                ),
                1 << 20,
            )
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(task["encrypted"], json!(true));
    assert_eq!(task["kms_key_id"], json!(env.cfg.kms_key_id));
    // The AMI and its snapshots carry the run's tag (cleanup's permission requires it).
    let ec2 = env.ec2.inner.snapshot();
    let mut made = vec![run.image_id.clone().unwrap()];
    made.extend(run.snapshot_ids.clone());
    for id in made {
        let tags = ec2.tags.get(&id).unwrap_or_else(|| panic!("{id} untagged"));
        assert_eq!(tags.get("pilotlight:dr-run"), Some(&run.run_id), "{id}");
        assert_eq!(
            tags.get("pilotlight:drill").map(String::as_str),
            Some("true"),
            "{id}"
        );
    }
}

/// Recovery points of a two-disk VM in the in-memory EBS: generations 1..=4 of disk0 and
/// disk1, generation g snapshotted at minute 15 * g. Returns each (disk, generation)'s
/// snapshot id.
async fn points_of_db01(
    store: &MemoryStore,
    ebs: &MemoryEbs,
) -> std::collections::BTreeMap<(String, u64), String> {
    use pilotlight_cloud::ebs::{SnapshotStatus, StartSnapshot};
    use pilotlight_protocol::points::PointInfo;
    let mut ids = std::collections::BTreeMap::new();
    for d in ["disk0", "disk1"] {
        let disk = DiskId::new("site1", "db-01", d).unwrap();
        let mut parent: Option<String> = None;
        for g in 1..=4u64 {
            commit(store, &disk, g, 15 * g as i64);
            let info = PointInfo {
                disk: disk.clone(),
                generation: g,
                snapshot_time: at(15 * g as i64),
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
            ids.insert((d.to_string(), g), id.clone());
            parent = Some(id);
        }
    }
    ids
}

fn db01_request(method: &str, point: Value) -> Value {
    let mut req = request();
    req["vm"] = json!("db-01");
    req["disks"] = json!(["disk0", "disk1"]);
    req["method"] = json!(method);
    req["recovery_point"] = point;
    req
}

fn snapshot_env<'a>(store: &'a MemoryStore, ebs: &Arc<MemoryEbs>) -> Env<'a, Arc<MemoryEbs>> {
    let mut env = env_with(store, None, ebs.clone());
    env.cfg.stack = Some("stack-1".into());
    env
}

/// The acceptance case in memory: a drill with the snapshot method at generation 2's
/// time registers an AMI with a mapping per disk from exactly that point's snapshots,
/// launches it, passes verification, marks the VM snapshot-ready, holds the point while
/// it runs; cleanup removes exactly its AMI and instance and releases the hold.
#[tokio::test]
async fn a_snapshot_drill_at_a_past_point_registers_that_points_snapshots_and_verifies() {
    let store = MemoryStore::default();
    let ebs = Arc::new(MemoryEbs::new());
    let ids = points_of_db01(&store, &ebs).await;
    let env = snapshot_env(&store, &ebs);
    // A bystander AMI and instance: cleanup leaves them.
    env.ec2.inner.create_snapshot().unwrap();
    let bystander_ami = env.ec2.inner.register_image("bystander", "snap-x").unwrap();

    let mut run = start(&env, db01_request("snapshot", json!({"at": at(35)})))
        .await
        .unwrap();
    assert_eq!(run.method, Some(Method::Snapshot), "{:?}", run.reason);
    let gens: Vec<u64> = run.disks.iter().map(|d| d.generation).collect();
    assert_eq!(gens, [2, 2], "10:35 resolves to the 10:30 point");
    assert_eq!(run.point_time, Some(at(30)));
    assert!(run.point_age_seconds.unwrap() > 0.0);
    // Held while it runs.
    let want = [
        ids[&("disk0".into(), 2)].clone(),
        ids[&("disk1".into(), 2)].clone(),
    ];
    assert_eq!(run.held, want);
    for id in &want {
        assert_eq!(
            ebs.get(id)
                .unwrap()
                .tags
                .get(&format!("pilotlight:hold:{}", run.run_id))
                .map(String::as_str),
            Some("1")
        );
    }
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Done, "{:?}", run.reason);
    let phases: Vec<Phase> = run.phases.iter().map(|p| p.phase).collect();
    assert_eq!(
        phases,
        [Phase::Registering, Phase::Launching, Phase::Verifying]
    );
    assert!(run.phases.iter().all(|p| p.seconds.is_some()));

    // The RegisterImage request as made: boot disk first, a mapping per disk from the
    // generation-2 snapshots, Nitro settings.
    let ec2 = env.ec2.inner.snapshot();
    let ami = run.image_id.clone().unwrap();
    let reg = &ec2.registered[&ami];
    let maps: Vec<(&str, &str)> = reg
        .mappings
        .iter()
        .map(|m| (m.device_name.as_str(), m.snapshot_id.as_str()))
        .collect();
    assert_eq!(
        maps,
        [
            ("/dev/xvda", want[0].as_str()),
            ("/dev/sdf", want[1].as_str())
        ]
    );
    assert_eq!(reg.root_device_name, "/dev/xvda");
    assert!(reg.ena_support && reg.imds_v2);
    assert_eq!(reg.boot_mode.as_deref(), Some("uefi"));
    assert_eq!(reg.architecture, "x86_64");
    assert!(reg.name.contains("db-01") && reg.name.contains(&run.run_id));
    assert!(reg
        .tags
        .contains(&("pilotlight:dr-run".into(), run.run_id.clone())));
    // Launched from that AMI, verified.
    let inst = &ec2.instances[&run.instance_ids[0]];
    assert_eq!(inst.image_id, ami);
    let v = run.verification.clone().unwrap();
    assert!(v.passed && v.instance_status == "ok" && v.system_status == "ok");
    // Marked snapshot-ready.
    let ready: pilotlight_dr::model::SnapshotReady = serde_json::from_slice(
        &store
            .get("pilotlight-dr/ready/site1/db-01.json", 1 << 20)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(ready.run_id, run.run_id);

    let cleaned = cleanup(&env, &run.run_id).await.unwrap();
    assert_eq!(cleaned.phase, Phase::CleanedUp, "{:?}", cleaned.reason);
    let ec2 = env.ec2.inner.snapshot();
    assert_eq!(ec2.terminated, run.instance_ids);
    assert_eq!(
        ec2.images.keys().collect::<Vec<_>>(),
        [&bystander_ami],
        "only the drill's AMI goes"
    );
    // The point snapshots are the receiver's: never deleted by a cleanup, hold released.
    for id in &want {
        let snap = ebs.get(id).unwrap();
        assert!(!snap.tags.keys().any(|k| k.starts_with("pilotlight:hold")));
    }
    assert!(cleaned.held.is_empty());
    assert!(!cleaned.removed.iter().any(|r| r.kind == "snapshot"));
}

/// `auto` takes import for a VM never verified with the snapshot method, snapshot after a
/// passed snapshot drill, and says so; a failed snapshot-method verification clears it.
#[tokio::test]
async fn auto_chooses_import_until_a_snapshot_drill_passed_and_says_why() {
    let store = MemoryStore::default();
    let ebs = Arc::new(MemoryEbs::new());
    points_of_db01(&store, &ebs).await;
    let env = snapshot_env(&store, &ebs);
    let dry = |method: &str| {
        let mut r = db01_request(method, json!("latest"));
        r["dry_run"] = json!(true);
        r
    };
    let run = start(&env, dry("auto")).await.unwrap();
    assert_eq!(run.method, Some(Method::Import));
    let why = run.method_reason.unwrap();
    assert!(
        why.contains("auto chose import") && why.contains("site1/db-01"),
        "{why}"
    );
    // Latest is generation 4 of both, with its snapshots.
    assert_eq!(run.disks[1].generation, 4);
    assert!(run.disks.iter().all(|d| d.snapshot_id.is_some()));

    let mut drill = start(&env, db01_request("snapshot", json!("latest")))
        .await
        .unwrap();
    advance_until_final(&env, &mut drill).await;
    assert_eq!(drill.phase, Phase::Done, "{:?}", drill.reason);

    let run = start(&env, dry("auto")).await.unwrap();
    assert_eq!(run.method, Some(Method::Snapshot));
    let why = run.method_reason.unwrap();
    assert!(
        why.contains("auto chose snapshot") && why.contains(&drill.run_id),
        "{why}"
    );

    // A snapshot-method run whose instance fails its checks: failed, console tail
    // recorded, the mark cleared, so auto goes back to import.
    {
        let mut s = env.ec2.inner.state.lock().unwrap();
        s.health.insert(
            "*".into(),
            pilotlight_cloud::ec2::InstanceHealth {
                state: "running".into(),
                instance_status: "impaired".into(),
                system_status: "ok".into(),
            },
        );
        let mut console = (1..=100)
            .map(|i| format!("boot line {i}\n"))
            .collect::<String>();
        console.push_str("VFS: Unable to mount root fs on unknown-block(0,0)\n");
        s.console.insert("*".into(), console);
    }
    let mut bad = start(&env, db01_request("snapshot", json!("latest")))
        .await
        .unwrap();
    advance_until_final(&env, &mut bad).await;
    assert_eq!(bad.phase, Phase::Failed);
    let why = bad.reason.clone().unwrap();
    assert!(
        why.contains("verification failed") && why.contains("impaired"),
        "{why}"
    );
    let tail = bad.verification.clone().unwrap().console_tail.unwrap();
    assert!(tail.contains("Unable to mount root fs"), "{tail}");
    assert!(
        !tail.contains("boot line 50\n"),
        "only the last lines: {tail}"
    );
    let run = start(&env, dry("auto")).await.unwrap();
    assert_eq!(run.method, Some(Method::Import), "{:?}", run.method_reason);
}

/// Each failure of the snapshot method is a failed run with its reason.
#[tokio::test]
async fn snapshot_method_failures_fail_the_run_with_the_reason() {
    let store = MemoryStore::default();
    let ebs = Arc::new(MemoryEbs::new());
    let ids = points_of_db01(&store, &ebs).await;
    let env = snapshot_env(&store, &ebs);

    // No point at or before the time.
    let run = start(&env, db01_request("snapshot", json!({"at": at(5)})))
        .await
        .unwrap();
    assert_eq!(run.phase, Phase::Failed);
    assert!(run.reason.unwrap().contains("at or before"));

    // Not exactly a point's time with "point".
    let run = start(&env, db01_request("snapshot", json!({"point": at(40)})))
        .await
        .unwrap();
    assert_eq!(run.phase, Phase::Failed);
    let why = run.reason.unwrap();
    assert!(
        why.contains("no VM recovery point at") && why.contains("10:30"),
        "{why}"
    );
    // Each disk that lacks it is named, with its newest generation before.
    assert!(
        why.contains("disks are lacking it")
            && why.contains("site1/db-01/disk0 (its newest before is generation 2 at")
            && why.contains("site1/db-01/disk1 (its newest before is generation 2 at"),
        "{why}"
    );

    // A point whose snapshot was deleted: the snapshot method refuses, naming the disk.
    ebs.delete_snapshot(&ids[&("disk1".into(), 3)])
        .await
        .unwrap();
    let run = start(&env, db01_request("snapshot", json!({"point": at(45)})))
        .await
        .unwrap();
    assert_eq!(run.phase, Phase::Failed);
    let why = run.reason.unwrap();
    assert!(
        why.contains("site1/db-01/disk1 generation 3") && why.contains("--method import"),
        "{why}"
    );
    // ... and auto falls back to import, saying why.
    let mut r = db01_request("auto", json!({"point": at(45)}));
    r["dry_run"] = json!(true);
    let run = start(&env, r).await.unwrap();
    assert_eq!(run.method, Some(Method::Import));
    assert!(run.method_reason.unwrap().contains("disk1 generation 3"));

    // RegisterImage refused (a permanent error): failed, nothing launched, hold given
    // back only at cleanup for a drill.
    env.ec2.inner.faults.add(
        Fault::on("RegisterImage")
            .times(1)
            .kind(ErrorKind::AccessDenied, Some("UnauthorizedOperation")),
    );
    let mut run = start(&env, db01_request("snapshot", json!("latest")))
        .await
        .unwrap();
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Failed);
    let why = run.reason.clone().unwrap();
    assert!(
        why.contains("RegisterImage refused") && why.contains("UnauthorizedOperation"),
        "{why}"
    );
    assert!(run.instance_ids.is_empty());

    // A throttled RegisterImage is retried, and a second registration of the same run
    // finds the AMI by its name instead of making another.
    env.ec2
        .inner
        .faults
        .add(Fault::on("RegisterImage").times(2).throttle());
    let mut run = start(&env, db01_request("snapshot", json!("latest")))
        .await
        .unwrap();
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Done, "{:?}", run.reason);

    // A launch template that does not exist.
    let mut r = db01_request("snapshot", json!("latest"));
    r["launch"]["launch_template"] = json!("lt-0123456789abcdef0:3");
    let mut run = start(&env, r).await.unwrap();
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Failed);
    let why = run.reason.clone().unwrap();
    assert!(why.contains("InvalidLaunchTemplateId.NotFound"), "{why}");
    // A real recovery that failed gives its point back to retention.
    let mut r = db01_request("snapshot", json!("latest"));
    r["drill"] = json!(false);
    r["launch"]["launch_template"] = json!("lt-0123456789abcdef0");
    let mut run = start(&env, r).await.unwrap();
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Failed);
    assert!(run.held.is_empty(), "released: {:?}", run.held);
    let hold = format!("pilotlight:hold:{}", run.run_id);
    for d in ["disk0", "disk1"] {
        let snap = ebs.get(&ids[&(d.into(), 4)]).unwrap();
        assert!(!snap.tags.contains_key(&hold), "{d}: {:?}", snap.tags);
    }
    // ... while the failed drills before it still hold theirs.
    let snap = ebs.get(&ids[&("disk0".into(), 4)]).unwrap();
    assert!(snap.tags.keys().any(|k| k.starts_with("pilotlight:hold:")));
    // An existing template is used as the base, with the version given.
    env.ec2
        .inner
        .state
        .lock()
        .unwrap()
        .launch_templates
        .push("lt-0123456789abcdef0".into());
    let mut r = db01_request("snapshot", json!("latest"));
    r["launch"]["launch_template"] = json!("lt-0123456789abcdef0:3");
    let mut run = start(&env, r).await.unwrap();
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Done, "{:?}", run.reason);
    let inst = &env.ec2.inner.snapshot().instances[&run.instance_ids[0]];
    assert_eq!(
        inst.launch_template,
        Some(("lt-0123456789abcdef0".into(), "3".into()))
    );
}

/// Several VMs by name: each from its saved settings, each independently. One VM without
/// a recovery point at the time fails with its reason; one never configured fails saying
/// so; the other recovers; the group names each.
#[tokio::test]
async fn several_vms_recover_independently_from_their_saved_settings() {
    use pilotlight_dr::handler::{configure, recover};
    use pilotlight_dr::model::{Group, RecoverRequest, VmSettings};
    let store = MemoryStore::default();
    let ebs = Arc::new(MemoryEbs::new());
    points_of_db01(&store, &ebs).await;
    // web-01: one disk, committed only at 10:40 (no point at 10:35 or before).
    let web = DiskId::parse("site1/web-01/disk0").unwrap();
    commit(&store, &web, 1, 40);
    let env = snapshot_env(&store, &ebs);
    let launch: pilotlight_dr::model::LaunchSettings =
        serde_json::from_value(request()["launch"].clone()).unwrap();
    for (vm, disks) in [("db-01", vec!["disk0", "disk1"]), ("web-01", vec!["disk0"])] {
        configure(
            &env,
            VmSettings {
                site: "site1".into(),
                vm: vm.into(),
                disks: disks.into_iter().map(String::from).collect(),
                launch: launch.clone(),
                method: Method::Snapshot,
            },
        )
        .await
        .unwrap();
    }
    // Settings are checked as a start would be.
    let mut bad = launch.clone();
    bad.instance_type = "huge".into();
    let e = configure(
        &env,
        VmSettings {
            site: "site1".into(),
            vm: "db-01".into(),
            disks: vec!["disk0".into()],
            launch: bad,
            method: Method::Auto,
        },
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("instance_type"), "{e}");

    let group: Group = recover(
        &env,
        RecoverRequest {
            site: "site1".into(),
            vms: vec!["db-01".into(), "web-01".into(), "mail-01".into()],
            recovery_point: pilotlight_dr::model::RecoveryPoint::At(at(35)),
            method: None,
            drill: true,
            dry_run: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(group.runs.len(), 3);
    assert!(group
        .runs
        .iter()
        .all(|r| r.group.as_deref() == Some(group.group.as_str())));
    let (db, web, mail) = (&group.runs[0], &group.runs[1], &group.runs[2]);
    assert_eq!(db.phase, Phase::Done, "{:?}", db.reason);
    assert_eq!(db.method, Some(Method::Snapshot), "the saved method");
    assert_eq!(db.disks.len(), 2, "the saved disks");
    assert_eq!(web.phase, Phase::Failed);
    let why = web.reason.clone().unwrap();
    assert!(
        why.contains("site1/web-01/disk0") && why.contains("10:35"),
        "{why}"
    );
    assert_eq!(mail.phase, Phase::Failed);
    assert!(mail
        .reason
        .clone()
        .unwrap()
        .contains("pilotlight-dr configure"));
    // Each run is recorded, failed ones too, and found by status.
    for r in &group.runs {
        assert!(store
            .get_if_exists(&format!("pilotlight-dr/runs/{}.json", r.run_id), 1 << 20)
            .await
            .unwrap()
            .is_some());
    }
    // One report for the group: a summary line per VM, then each VM's report with its
    // headings one level down; stored beside the runs, since every run has ended.
    let r = report(&env, &group.group).await.unwrap();
    assert_eq!(r.key, format!("pilotlight-dr/runs/{}.html", group.group));
    let html = &r.html;
    assert!(
        html.contains("3 VMs, each recovered independently; 1 without failure"),
        "{html}"
    );
    let summary = &html[..html.find("<h2>").unwrap()];
    for run in &group.runs {
        assert!(summary.contains(&run.run_id), "{summary}");
    }
    for vm in ["site1/db-01", "site1/web-01", "site1/mail-01"] {
        assert!(html.contains(&format!("<h2>{vm}</h2>")), "{vm}");
    }
    assert!(html.contains("<h3>Timeline (RTO per phase)</h3>") && !html.contains("<h2>Timeline"));
    assert!(html.contains("pilotlight-dr configure"), "mail-01's reason");
    assert!(store.head(&r.key).await.unwrap().is_some());
    assert!(matches!(
        report(&env, "grp-nope").await,
        Err(DrError::NoSuchRun(_))
    ));
    // Through the Lambda's entry, as the CLI sends it.
    let v = pilotlight_dr::handle(
        &env,
        json!({"action": "recover", "site": "site1", "vms": ["db-01"], "dry_run": true}),
    )
    .await
    .unwrap();
    let g: Group = serde_json::from_value(v).unwrap();
    assert_eq!(g.runs[0].phase, Phase::Planned, "{:?}", g.runs[0].reason);
    // A dry run records no group.
    let groups = store
        .list("pilotlight-dr/runs/groups/", |_| true)
        .await
        .unwrap();
    assert_eq!(
        groups,
        [format!("pilotlight-dr/runs/groups/{}.json", group.group)]
    );
    // Bad lists are refused as a whole.
    let e = pilotlight_dr::handle(
        &env,
        json!({"action": "recover", "site": "site1", "vms": ["a", "a"]}),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
}

/// A caller that died after RegisterImage and before saving its outcome: the next caller
/// registers again, EC2 refuses the run's AMI name as a duplicate, and the run takes the
/// AMI made the first time (DescribeImages by name) instead of a second; the launch's
/// client token returns the first instance.
#[tokio::test]
async fn a_registration_repeated_after_a_crash_finds_the_first_ami() {
    let store = MemoryStore::default();
    let ebs = Arc::new(MemoryEbs::new());
    points_of_db01(&store, &ebs).await;
    let env = snapshot_env(&store, &ebs);
    let mut run = start(&env, db01_request("snapshot", json!("latest")))
        .await
        .unwrap();
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Done, "{:?}", run.reason);
    let (ami, instance) = (run.image_id.clone().unwrap(), run.instance_ids[0].clone());
    // The record as it was saved before the registration's outcome.
    let mut stale = run.clone();
    stale.image_id = None;
    stale.instance_ids.clear();
    stale.verification = None;
    stale.created.clear();
    stale.phases.truncate(1);
    stale.phases[0].ended_at = None;
    stale.phases[0].seconds = None;
    stale.phase = Phase::Registering;
    stale.claim = None;
    advance_until_final(&env, &mut stale).await;
    assert_eq!(stale.phase, Phase::Done, "{:?}", stale.reason);
    assert_eq!(stale.image_id.as_deref(), Some(ami.as_str()));
    assert_eq!(stale.instance_ids, [instance]);
    let ec2 = env.ec2.inner.snapshot();
    assert_eq!(ec2.registered.len(), 1, "one AMI");
    assert_eq!(ec2.instances.len(), 1, "one instance");
    let registers = calls(&env, "RegisterImage");
    assert_eq!(registers, 2, "the second call was made and refused");
}

/// With an instance profile the instance may run the SSM agent: verification also waits
/// for SSM's ping to be `Online`; `ConnectionLost` fails at once, never registering fails
/// when the verify timeout runs out; without a profile SSM is not asked.
#[tokio::test]
async fn with_an_instance_profile_verification_waits_for_the_ssm_agent() {
    let store = MemoryStore::default();
    let ebs = Arc::new(MemoryEbs::new());
    points_of_db01(&store, &ebs).await;
    let mut env = snapshot_env(&store, &ebs);
    let with_profile = || {
        let mut r = db01_request("snapshot", json!("latest"));
        r["launch"]["instance_profile"] = json!("pilotlight-recovered");
        r
    };
    // Not registered yet: the run waits in verifying, saying why.
    let mut run = start(&env, with_profile()).await.unwrap();
    assert_eq!(run.phase, Phase::Verifying, "{:?}", run.reason);
    assert!(
        run.reason.as_deref().unwrap().contains("SSM agent"),
        "{:?}",
        run.reason
    );
    let inst = &env.ec2.inner.snapshot().instances[&run.instance_ids[0]];
    assert_eq!(
        inst.instance_profile.as_deref(),
        Some("pilotlight-recovered")
    );
    // Online: passed, recorded.
    env.ec2
        .inner
        .state
        .lock()
        .unwrap()
        .ssm
        .insert(run.instance_ids[0].clone(), "Online".into());
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Done, "{:?}", run.reason);
    assert_eq!(
        run.verification.unwrap().ssm_ping.as_deref(),
        Some("Online")
    );
    // ConnectionLost: failed at once, with the reason.
    env.ec2
        .inner
        .state
        .lock()
        .unwrap()
        .ssm
        .insert("*".into(), "ConnectionLost".into());
    let mut run = start(&env, with_profile()).await.unwrap();
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Failed);
    assert!(run.reason.unwrap().contains("SSM agent ConnectionLost"));
    // Never registered: failed when the verify timeout runs out.
    env.ec2.inner.state.lock().unwrap().ssm.clear();
    env.cfg.verify_timeout = Duration::ZERO;
    let mut run = start(&env, with_profile()).await.unwrap();
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Failed);
    let why = run.reason.unwrap();
    assert!(
        why.contains("SSM agent not registered") && why.contains("timeout"),
        "{why}"
    );
    // Without a profile SSM is not asked.
    let before = calls(&env, "DescribeInstanceInformation");
    let mut run = start(&env, db01_request("snapshot", json!("latest")))
        .await
        .unwrap();
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Done, "{:?}", run.reason);
    assert_eq!(run.verification.unwrap().ssm_ping, None);
    let after = calls(&env, "DescribeInstanceInformation");
    assert_eq!(before, after);
}

/// Every run that ends has its HTML report beside its record; a cleanup rewrites it with
/// what it removed; a report that could not be written is rendered from the record on
/// request and written then.
#[tokio::test]
async fn an_ended_run_has_its_report_beside_the_record() {
    let store = MemoryStore::default();
    replicated(&store, 3);
    let env = env(&store, None);
    let mut run = start(&env, request()).await.unwrap();
    receiver_answers(&store, &run, true).await;
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Done, "{:?}", run.reason);
    let key = format!("pilotlight-dr/runs/{}.html", run.run_id);
    let stored = |key: String| {
        let store = &store;
        async move { String::from_utf8(store.get(&key, 1 << 22).await.unwrap().to_vec()).unwrap() }
    };
    let html = stored(key.clone()).await;
    for want in [
        "site1/vm1",
        "Drill succeeded: running and verified",
        ">exporting<",
        ">importing<",
        ">launching<",
        ">verifying<",
        run.instance_ids[0].as_str(),
        "t3.medium",
        "Not cleaned up yet",
    ] {
        assert!(html.contains(want), "{want} missing");
    }
    // A report is not a run record: listing runs still reads records only.
    status(&env, None).await.unwrap();
    let asked = report(&env, &run.run_id).await.unwrap();
    assert!(asked.stored && asked.html == html && asked.key == key);

    let cleaned = cleanup(&env, &run.run_id).await.unwrap();
    assert_eq!(cleaned.phase, Phase::CleanedUp);
    let html = stored(key.clone()).await;
    assert!(
        html.contains("Removed by cleanup") && html.contains("cleaned up"),
        "{html}"
    );
    assert!(!html.contains("Not cleaned up yet"));
    let removed = html.split("Removed by cleanup").nth(1).unwrap();
    assert!(removed.contains(run.instance_ids[0].as_str()), "{removed}");

    // A failed start whose report cannot be written now: the run is recorded all the
    // same; the report is rendered from the record when asked, and written then.
    store
        .faults
        .add(Fault::on("PutObject").resource_contains(".html"));
    let mut req = request();
    req["vm"] = json!("nope");
    let failed = start(&env, req).await.unwrap();
    assert_eq!(failed.phase, Phase::Failed);
    let key = format!("pilotlight-dr/runs/{}.html", failed.run_id);
    assert!(store.head(&key).await.unwrap().is_none());
    let asked = report(&env, &failed.run_id).await.unwrap();
    assert!(!asked.stored);
    assert!(
        asked.html.contains("FAILED") && asked.html.contains("nope"),
        "{}",
        asked.html
    );
    assert!(report(&env, &failed.run_id).await.unwrap().stored);
    // No such run: the same error as status.
    assert!(matches!(
        report(&env, "dr-nope").await,
        Err(DrError::NoSuchRun(_))
    ));
}
