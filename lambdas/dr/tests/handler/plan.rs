//! Starting a run: validation, one snapshot time for every disk, dry runs.

use super::*;

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
