//! The snapshot method: RegisterImage from a point's snapshots, `auto`, verification with
//! SSM.

use super::*;

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
    assert!(!cleaned
        .removed
        .iter()
        .any(|r| r.kind == pilotlight_dr::model::ResourceKind::Snapshot));
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
