//! Failback's AWS side in memory: return snapshots of a real recovery's instance on a
//! schedule, the documents the sender reads, pruning, cutover and its end.

use super::*;
use pilotlight_cloud::ec2::{Ec2Api, SnapshotsRequest};
use pilotlight_dr::failback::{self, FailbackPhase, TAG_RETURN, TAG_RETURN_SET};
use pilotlight_dr::model::FailbackStart;
use pilotlight_protocol::{ReturnDoc, RoundDoc, FAILBACK_VERSION};

/// A real (not drill) snapshot-method recovery of db-01, done.
async fn recovered<'a>(
    store: &'a MemoryStore,
    ebs: &Arc<MemoryEbs>,
) -> (Env<'a, Arc<MemoryEbs>>, Run) {
    points_of_db01(store, ebs).await;
    let env = snapshot_env(store, ebs);
    let mut req = db01_request("snapshot", json!("latest"));
    req["drill"] = json!(false);
    let mut run = start(&env, req).await.unwrap();
    advance_until_final(&env, &mut run).await;
    assert_eq!(run.phase, Phase::Done, "{:?}", run.reason);
    assert!(!run.drill);
    (env, run)
}

fn begin(run: &Run) -> FailbackStart {
    FailbackStart {
        run_id: run.run_id.clone(),
        every_seconds: Some(300),
        keep: Some(2),
    }
}

fn return_doc(store: &MemoryStore, run: &str, disk: &str) -> Option<ReturnDoc> {
    let key = format!("dr/site1/db-01/{disk}/b/{run}/return.json");
    store.object(&key).map(|b| {
        ReturnDoc::from_json(
            &b,
            &Name::new(run).unwrap(),
            &DiskId::new("site1", "db-01", disk).unwrap(),
        )
        .unwrap()
    })
}

/// What the sender writes after a round.
async fn sender_round(
    store: &MemoryStore,
    run: &str,
    disk: &str,
    snapshot: &str,
    fin: bool,
    verified: bool,
) {
    let doc = RoundDoc {
        version: FAILBACK_VERSION,
        run_id: Name::new(run).unwrap(),
        disk: DiskId::new("site1", "db-01", disk).unwrap(),
        snapshot_id: snapshot.into(),
        r#final: fin,
        verified,
        blocks_written: 7,
        bytes_written: 7 << 19,
        target: "/dev/sdb".into(),
        drill: false,
        seconds: 1.0,
        finished_at: chrono::Utc::now(),
        disk_bytes: Some(1 << 30),
        rounds: Some(1),
        total_bytes_written: Some(7 << 19),
        whole_disk_sha256: None,
    };
    pilotlight_store::failback::write_round(store, &Prefix::new("dr").unwrap(), &doc)
        .await
        .unwrap();
}

/// Moves every recorded set's request time back by `minutes` (time passing).
async fn age_sets(store: &MemoryStore, run: &str, minutes: i64) {
    let key = format!("pilotlight-dr/runs/failback/{run}.json");
    let mut v: Value = serde_json::from_slice(&store.object(&key).unwrap()).unwrap();
    for s in v["sets"].as_array_mut().unwrap() {
        let t: chrono::DateTime<chrono::Utc> = s["requested_at"].as_str().unwrap().parse().unwrap();
        s["requested_at"] = json!(t - chrono::Duration::minutes(minutes));
    }
    store
        .put(
            &key,
            Bytes::from(serde_json::to_vec(&v).unwrap()),
            PutOptions::json(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn return_sets_follow_the_schedule_reach_the_sender_and_are_pruned() {
    let store = MemoryStore::default();
    let ebs = Arc::new(MemoryEbs::new());
    let (env, run) = recovered(&store, &ebs).await;
    let points: Vec<String> = run
        .disks
        .iter()
        .map(|d| d.snapshot_id.clone().unwrap())
        .collect();

    let fb = failback::start(&env, begin(&run)).await.unwrap();
    assert_eq!(fb.phase, FailbackPhase::Returning);
    assert_eq!(fb.disks.len(), 2);
    assert_eq!(fb.disks[0].device, "/dev/xvda");
    assert_eq!(fb.disks[1].device, "/dev/sdf");
    assert_eq!(fb.disks[0].point_snapshot, points[0]);
    assert_eq!(fb.sets.len(), 1);
    assert_eq!(fb.sets[0].state, "pending");
    assert_eq!(fb.sets[0].snapshots.len(), 2, "a snapshot per volume");
    // Tagged at creation: the run, the set, and the stack and site the sender's policy
    // reads by.
    let ec2 = env.ec2.inner.snapshot();
    let tags = &ec2.volume_snapshots[&fb.sets[0].snapshots[0].1].tags;
    assert_eq!(tags[TAG_RETURN], run.run_id);
    assert_eq!(tags[TAG_RETURN_SET], fb.sets[0].set_id);
    assert_eq!(tags["pilotlight:stack"], "stack-1");
    assert_eq!(tags["pilotlight:site"], "site1");
    assert!(
        !tags.contains_key("pilotlight:point"),
        "never a recovery point"
    );
    // Nothing for the sender until the set completes.
    assert!(return_doc(&store, &run.run_id, "disk0").is_none());
    // Starting again is the same failback.
    let again = failback::start(&env, begin(&run)).await.unwrap();
    assert_eq!(again.sets.len(), 1);

    let fb = failback::status(&env, Some(&run.run_id))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(fb.sets[0].state, "completed");
    for (i, d) in ["disk0", "disk1"].iter().enumerate() {
        let doc = return_doc(&store, &run.run_id, d).unwrap();
        assert_eq!(doc.point_snapshot, points[i]);
        assert_eq!(doc.volume_id, fb.disks[i].volume_id);
        assert_eq!(doc.returns.len(), 1);
        assert_eq!(doc.newest().unwrap().snapshot_id, fb.sets[0].snapshots[i].1);
        assert!(!doc.newest().unwrap().r#final);
    }
    // Not due yet: no second set.
    let fb = failback::status(&env, Some(&run.run_id))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(fb.sets.len(), 1);

    // The sender brings disk0 to set 1; then time passes, sets 2 and 3 complete: set 1
    // is beyond keep (2) but disk0's next round starts from it, so it stays; set 2 goes
    // once disk0 moved on.
    sender_round(
        &store,
        &run.run_id,
        "disk0",
        &fb.sets[0].snapshots[0].1,
        false,
        true,
    )
    .await;
    for _ in 0..2 {
        age_sets(&store, &run.run_id, 10).await;
        failback::status(&env, Some(&run.run_id)).await.unwrap();
        failback::status(&env, Some(&run.run_id)).await.unwrap();
    }
    let fb = failback::status(&env, Some(&run.run_id))
        .await
        .unwrap()
        .remove(0);
    let states: Vec<&str> = fb.sets.iter().map(|s| s.state.as_str()).collect();
    assert_eq!(
        states,
        ["completed", "completed", "completed"],
        "{:?}",
        fb.log
    );
    assert!(fb.disks[0].round.is_some(), "the sender's round is read");
    sender_round(
        &store,
        &run.run_id,
        "disk0",
        &fb.sets[2].snapshots[0].1,
        false,
        true,
    )
    .await;
    let fb = failback::status(&env, Some(&run.run_id))
        .await
        .unwrap()
        .remove(0);
    let states: Vec<&str> = fb.sets.iter().map(|s| s.state.as_str()).collect();
    assert_eq!(states, ["pruned", "completed", "completed"], "{:?}", fb.log);
    let live = env.ec2.inner.snapshot().snapshots;
    assert!(
        fb.sets[0].snapshots.iter().all(|(_, s)| !live.contains(s)),
        "deleted"
    );
    assert!(
        points.iter().all(|p| ebs.get(p).is_some()),
        "points are never touched"
    );
    let doc = return_doc(&store, &run.run_id, "disk1").unwrap();
    assert_eq!(doc.returns.len(), 2, "only live sets are offered");
    // The schedule advances failbacks too.
    let out = pilotlight_dr::handle(&env, json!({"detail-type": "Scheduled Event", "source": "aws.events", "id": "1", "version": "0", "account": "1", "time": "2026-12-04T00:00:00Z", "region": "us-east-1", "resources": [], "detail": {}}))
        .await
        .unwrap();
    assert_eq!(out["failbacks"], json!([run.run_id]));
}

#[tokio::test]
async fn cutover_stops_the_instance_takes_a_final_set_and_ends_when_every_disk_verified_it() {
    let store = MemoryStore::default();
    let ebs = Arc::new(MemoryEbs::new());
    let (env, run) = recovered(&store, &ebs).await;
    failback::start(&env, begin(&run)).await.unwrap();
    let fb = failback::cutover(&env, &run.run_id).await.unwrap();
    assert_eq!(fb.phase, FailbackPhase::Stopping, "{:?}", fb.log);
    assert_eq!(env.ec2.inner.snapshot().stopped, run.instance_ids);
    // Stopped: the final set is taken with the instance stopped.
    let fb = failback::status(&env, Some(&run.run_id))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(fb.phase, FailbackPhase::FinalSnapshot, "{:?}", fb.log);
    let fin = fb.sets.last().unwrap().clone();
    assert!(fin.r#final);
    // Pending first: nothing final offered to the sender yet.
    let fb = failback::status(&env, Some(&run.run_id))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(fb.phase, FailbackPhase::FinalSnapshot, "{:?}", fb.log);
    assert!(return_doc(&store, &run.run_id, "disk1")
        .unwrap()
        .returns
        .iter()
        .all(|r| !r.r#final));
    let fb = failback::status(&env, Some(&run.run_id))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(fb.phase, FailbackPhase::FinalRound, "{:?}", fb.log);
    let doc = return_doc(&store, &run.run_id, "disk1").unwrap();
    assert!(doc.newest().unwrap().r#final);
    assert_eq!(doc.newest().unwrap().snapshot_id, fin.snapshots[1].1);

    // A round on another snapshot, or not verified, or only one disk: not returned.
    sender_round(
        &store,
        &run.run_id,
        "disk0",
        &fin.snapshots[0].1,
        true,
        true,
    )
    .await;
    sender_round(
        &store,
        &run.run_id,
        "disk1",
        &fin.snapshots[1].1,
        true,
        false,
    )
    .await;
    let fb = failback::status(&env, Some(&run.run_id))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(fb.phase, FailbackPhase::FinalRound);
    // Garbage where a round should be is ignored, not a failure.
    store.insert(
        &format!("dr/site1/db-01/disk1/b/{}/round.json", run.run_id),
        b"{garbage".to_vec(),
    );
    let fb = failback::status(&env, Some(&run.run_id))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(fb.phase, FailbackPhase::FinalRound);
    sender_round(
        &store,
        &run.run_id,
        "disk1",
        &fin.snapshots[1].1,
        true,
        true,
    )
    .await;
    let fb = failback::status(&env, Some(&run.run_id))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(fb.phase, FailbackPhase::Returned, "{:?}", fb.log);
    assert!(fb.cutover_at.is_some() && fb.returned_at >= fb.cutover_at);
    // Its report is kept beside the record: the outcome, each disk's final round.
    let html = String::from_utf8(
        store
            .object(&format!("pilotlight-dr/runs/failback/{}.html", run.run_id))
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(html.contains("Returned: every disk"), "{html}");
    assert!(html.contains("Cutover took"));
    assert!(html.contains(&fin.snapshots[1].1) && html.contains("site1/db-01/disk1"));
    // What the sender reported is escaped.
    let mut evil = fb.clone();
    evil.disks[0].round.as_mut().unwrap().target = "<script>alert(1)</script>".into();
    let html = pilotlight_dr::report::failback::render(&evil, chrono::Utc::now());
    assert!(!html.contains("<script>") && html.contains("&lt;script&gt;"));
    // Cutover of a returned failback changes nothing; it is no longer unfinished.
    let again = failback::cutover(&env, &run.run_id).await.unwrap();
    assert_eq!(again.phase, FailbackPhase::Returned);
    assert!(failback::status(&env, None).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_lost_create_snapshots_answer_is_found_by_its_tag_never_made_twice() {
    let store = MemoryStore::default();
    let ebs = Arc::new(MemoryEbs::new());
    let (env, run) = recovered(&store, &ebs).await;
    env.ec2
        .inner
        .faults
        .add(Fault::on("CreateSnapshots").times(1).transient());
    assert!(failback::start(&env, begin(&run)).await.is_err());
    // The set was recorded before the call; the call "happened" (its answer lost).
    let fb = failback::load_failback(&env, &run.run_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fb.sets[0].state, "requesting");
    let set_id = fb.sets[0].set_id.clone();
    env.ec2
        .inner
        .create_snapshots(&SnapshotsRequest {
            instance_id: run.instance_ids[0].clone(),
            description: "lost answer".into(),
            tags: vec![(TAG_RETURN_SET.into(), set_id.clone())],
        })
        .await
        .unwrap();
    let fb = failback::status(&env, Some(&run.run_id))
        .await
        .unwrap()
        .remove(0);
    let calls = env.ec2.inner.snapshot().calls;
    assert_eq!(
        calls.iter().filter(|c| *c == "CreateSnapshots").count(),
        1,
        "adopted, not made again"
    );
    assert_eq!(fb.sets.len(), 1);
    assert_eq!(fb.sets[0].snapshots.len(), 2);
    // A set never made at all is made on the next call.
    let store2 = MemoryStore::default();
    let ebs2 = Arc::new(MemoryEbs::new());
    let (env2, run2) = recovered(&store2, &ebs2).await;
    env2.ec2
        .inner
        .faults
        .add(Fault::on("CreateSnapshots").times(1).transient());
    assert!(failback::start(&env2, begin(&run2)).await.is_err());
    let fb = failback::status(&env2, Some(&run2.run_id))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(fb.sets.len(), 1);
    assert_eq!(fb.sets[0].state, "pending");
    assert_eq!(fb.sets[0].snapshots.len(), 2);
}

#[tokio::test]
async fn failback_is_refused_for_drills_unfinished_runs_unknown_runs_and_bad_settings() {
    let store = MemoryStore::default();
    let ebs = Arc::new(MemoryEbs::new());
    points_of_db01(&store, &ebs).await;
    let env = snapshot_env(&store, &ebs);
    let mut drill = start(&env, db01_request("snapshot", json!("latest")))
        .await
        .unwrap();
    advance_until_final(&env, &mut drill).await;
    assert!(drill.drill);
    let e = failback::start(&env, begin(&drill)).await.unwrap_err();
    assert!(e.to_string().contains("drill"), "{e}");
    let e = failback::start(
        &env,
        FailbackStart {
            run_id: "dr-nope".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(e, DrError::NoSuchRun(_)), "{e}");
    for (every, keep, what) in [
        (Some(60), None, "every_seconds"),
        (None, Some(1), "keep"),
        (None, Some(99), "keep"),
    ] {
        let e = failback::start(
            &env,
            FailbackStart {
                run_id: drill.run_id.clone(),
                every_seconds: every,
                keep,
            },
        )
        .await
        .unwrap_err();
        assert!(
            matches!(e, DrError::BadRequest(_)) && e.to_string().contains(what),
            "{e}"
        );
    }
    let e = failback::cutover(&env, &drill.run_id).await.unwrap_err();
    assert!(e.to_string().contains("no failback"), "{e}");
    // Through the Lambda's entry: unknown fields are refused.
    let e = pilotlight_dr::handle(
        &env,
        json!({"action": "failback_start", "run_id": drill.run_id, "evry_seconds": 300}),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, DrError::BadRequest(_)), "{e}");
}
