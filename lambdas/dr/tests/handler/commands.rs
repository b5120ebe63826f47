//! The commands: the Lambda entry and the schedule, cleanup, several VMs, reports.

use super::*;

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
    let scheduled: Value =
        serde_json::from_str(include_str!("../fixtures/scheduled.json")).unwrap();
    let v = pilotlight_dr::handle(&env, scheduled).await.unwrap();
    assert_eq!(v["advanced"], json!([run.run_id]));
    let status_req: Value = serde_json::from_str(include_str!("../fixtures/status.json")).unwrap();
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
