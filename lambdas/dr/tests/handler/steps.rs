//! The phase machine with the import method: export, import, launch, verify; claims and
//! client tokens when callers race; timeouts and failures.

use super::*;

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
    assert!(run.created.iter().any(|c| c.kind.as_str() == "image"));
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
            .filter(|c| c.kind.as_str() == "instance")
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
