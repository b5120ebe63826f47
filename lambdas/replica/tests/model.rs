#![allow(clippy::unwrap_used)]
//! Snapshots mode against a byte model: random generations (partial blocks, zero ranges,
//! packed and compressed objects, a last block past the disk's end) published into the
//! in-memory bucket, their events delivered shuffled and twice, handled by several
//! "invocations" at once, some of them killed at a random moment (a Lambda timeout),
//! with transient EBS and S3 failures. Every generation must end with exactly one
//! completed point that reads back equal to the model's disk.

mod kit;

use kit::*;
use pilotlight_cloud::ebs::SnapshotStatus;
use pilotlight_cloud::Fault;
use proptest::prelude::*;

fn check(case: &Case) -> Result<(), TestCaseError> {
    paused(async {
        let w = World::new(case.shard_blocks);
        let model = w.publish(case);
        if case.faults {
            w.ebs
                .faults
                .add(Fault::on("PutSnapshotBlock").transient().nth(3));
            w.ebs
                .faults
                .add(Fault::on("StartSnapshot").throttle().nth(2));
            w.store
                .faults
                .add(Fault::on("GetObject").transient().nth(5));
            w.store
                .faults
                .add(Fault::on("PutObject").transient().nth(7));
        }
        for _ in 0..case.duplicates {
            w.deliver_all(case);
        }
        w.run(case.parallel, case.kill_every, 4000).await;
        let stats = w.verify(&model).await;
        prop_assert_eq!(stats.points, model.len());
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn every_point_reads_back_equal_to_its_disk(case in case_strategy()) {
        check(&case)?;
    }
}

#[test]
fn a_sealed_snapshot_ebs_puts_in_error_is_written_again_as_a_new_attempt() {
    paused(async {
        let case = Case::fixed(7, 3);
        let w = World::new(2);
        let model = w.publish(&case);
        w.ebs
            .fail_completions
            .store(1, std::sync::atomic::Ordering::SeqCst);
        w.deliver_all(&case);
        w.run(1, None, 2000).await;
        let stats = w.verify(&model).await;
        assert_eq!(stats.points, 3);
        let head = w.head(&case).await;
        assert_eq!(head.attempts_failed, 1, "{head:?}");
        // The failed attempt's snapshot is gone: one snapshot per generation is left.
        let all = w.ebs_snapshots().await;
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(all.iter().all(|s| s.1 == SnapshotStatus::Completed));
    });
}

#[test]
fn a_generations_event_writes_its_unwritten_parents_first_and_waits_for_an_uncommitted_one() {
    paused(async {
        let case = Case::fixed(11, 4);
        let w = World::new(4);
        let model = w.publish(&case);
        // Generation 1 alone: its point.
        assert!(w.handle(&w.manifest_event(&case, 1)).await.is_delete());
        // Generation 3's manifest before generation 2's was committed (a sender mid-run
        // cannot do this, a hand-copied bucket can): it waits, writing nothing.
        let key2 = w.manifest_key(&disk_id(0), 2);
        let m2 = w.store.remove(&key2).unwrap();
        let before = w.ebs.faults.calls("StartSnapshot");
        let out = w.handle(&w.manifest_event(&case, 3)).await;
        assert!(
            matches!(&out, pilotlight_replica::Outcome::Retry(why) if why.contains("not committed")),
            "{out:?}"
        );
        assert_eq!(
            w.ebs.faults.calls("StartSnapshot"),
            before,
            "nothing started"
        );
        // Generation 2 committed, its event lost: generation 4's event writes 2, 3 and 4.
        w.store.insert(&key2, m2);
        let out = w.handle(&w.manifest_event(&case, 4)).await;
        assert!(out.is_delete(), "{out:?}");
        assert_eq!(w.verify(&model).await.points, 4);
        // A duplicate of an applied generation's event: done, nothing written.
        let before = w.ebs.faults.calls("StartSnapshot");
        let out = w.handle(&w.manifest_event(&case, 2)).await;
        assert!(out.is_delete(), "{out:?}");
        assert_eq!(w.ebs.faults.calls("StartSnapshot"), before);
    });
}

#[test]
fn a_tampered_object_writes_no_point_and_says_which_object() {
    paused(async {
        let case = Case::fixed(5, 1);
        let w = World::new(4);
        w.publish(&case);
        let key = w
            .store
            .keys()
            .into_iter()
            .find(|k| k.contains("/d/"))
            .unwrap();
        let mut body = w.store.object(&key).unwrap().to_vec();
        body[0] ^= 1;
        w.store.insert(&key, body);
        let out = w.handle(&w.manifest_event(&case, 1)).await;
        match out {
            pilotlight_replica::Outcome::Reject(why) => {
                assert!(why.contains(&key) && why.contains("SHA-256"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // The attempt's snapshot was started but never sealed: no completed point.
        assert!(w
            .ebs_snapshots()
            .await
            .iter()
            .all(|s| s.1 != SnapshotStatus::Completed));
    });
}

#[test]
fn malformed_messages_are_refused_with_the_reason() {
    paused(async {
        let w = World::new(4);
        for (body, want) in [
            ("not json", "malformed event"),
            (
                r#"{"kind":"pilotlight.replica.shard","disk":7}"#,
                "malformed shard task",
            ),
            (
                &event(
                    "other-bucket",
                    "pl/s/v/d/g/00000000000000000001/manifest.json",
                ),
                "not \"b\"",
            ),
            (
                &event("b", "pl/s/v/../g/00000000000000000001/manifest.json"),
                "rejected key",
            ),
        ] {
            match w.handle(body).await {
                pilotlight_replica::Outcome::Reject(why) => assert!(why.contains(want), "{why}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        // A manifest that is not there: refused (the sender commits the manifest last, so
        // an event for one that is missing does not become valid by waiting).
        let out = w
            .handle(&event("b", "pl/s/v/d/g/00000000000000000001/manifest.json"))
            .await;
        assert!(
            matches!(out, pilotlight_replica::Outcome::Reject(_)),
            "{out:?}"
        );
        let out = w
            .handle(r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"b"}"#)
            .await;
        assert!(out.is_delete(), "{out:?}");
    });
}

#[test]
fn pruning_keeps_the_tiers_the_chain_head_and_held_points_and_the_chain_goes_on() {
    paused(async {
        use chrono::TimeZone;
        use pilotlight_cloud::ebs::EbsApi;
        use pilotlight_protocol::points::{tag, Point};
        let case = Case::fixed(23, 5);
        let w = World::new(4);
        let model = w.publish(&case);
        w.deliver_all(&case);
        w.run(1, None, 2000).await;
        assert_eq!(w.verify(&model).await.points, 5);
        // Generations 1-5 are an hour apart on 2026-12-01; a DR run holds generation 3.
        let points: Vec<Point> = w
            .ebs_snapshots()
            .await
            .iter()
            .filter_map(|(id, _, tags)| Point::from_tags(id, tags))
            .collect();
        let id_of = |g: u64| {
            points
                .iter()
                .find(|p| p.generation == g)
                .unwrap()
                .snapshot_id
                .clone()
        };
        w.ebs
            .create_tags(&id_of(3), &[(tag::hold("run-1"), "1".into())])
            .await
            .unwrap();
        // Nine days later only the first point of the day (1), the newest (5, the chain
        // head) and the held one (3) are kept.
        let now = chrono::Utc.with_ymd_and_hms(2026, 12, 10, 0, 0, 0).unwrap();
        let pruned = pilotlight_replica::prune::prune(&w.r, &w.r.cfg.tiers, now)
            .await
            .unwrap();
        let mut deleted = pruned.deleted.clone();
        deleted.sort();
        let mut want = vec![id_of(2), id_of(4)];
        want.sort();
        assert_eq!(deleted, want, "{pruned:?}");
        // Pruning again deletes nothing more.
        let again = pilotlight_replica::prune::prune(&w.r, &w.r.cfg.tiers, now)
            .await
            .unwrap();
        assert!(again.deleted.is_empty(), "{again:?}");
        // The kept points still read back whole (their parents are gone).
        for g in [1, 3, 5] {
            let disk = disk_id(0);
            let want = &model[&(disk, g)];
            assert!(
                w.read_point(&id_of(g), want.len() as u64).await == *want,
                "generation {g}"
            );
        }
    });
}

/// Snapshot Lock in snapshots mode (the stack's `PointLock`): each day's kept point is
/// locked until it leaves the daily tier and tagged with the lock's end; while locked it
/// is never offered for deletion, even when the tiers no longer keep it.
#[test]
fn daily_points_are_locked_and_never_pruned_while_locked() {
    paused(async {
        use chrono::TimeZone;
        use pilotlight_cloud::ebs::LockMode;
        use pilotlight_protocol::points::{tag, Point};
        let case = Case::fixed(29, 5);
        let mut w = World::new(4);
        w.r.cfg.lock = Some(LockMode::Governance);
        let model = w.publish(&case);
        w.deliver_all(&case);
        w.run(1, None, 2000).await;
        assert_eq!(w.verify(&model).await.points, 5);
        let points: Vec<Point> = w
            .ebs_snapshots()
            .await
            .iter()
            .filter_map(|(id, _, tags)| Point::from_tags(id, tags))
            .collect();
        let id_of = |g: u64| {
            points
                .iter()
                .find(|p| p.generation == g)
                .unwrap()
                .snapshot_id
                .clone()
        };
        // Nine days after 2026-12-01 (points an hour apart): generation 1 is the day's
        // kept point, locked for what is left of its daily tier (30 days): 21 days and
        // some hours, 22 whole days.
        let now = chrono::Utc.with_ymd_and_hms(2026, 12, 10, 0, 0, 0).unwrap();
        let pruned = pilotlight_replica::prune::prune(&w.r, &w.r.cfg.tiers, now)
            .await
            .unwrap();
        assert_eq!(pruned.locked, vec![id_of(1)], "{pruned:?}");
        let s = w.ebs.get(&id_of(1)).unwrap();
        assert_eq!(s.lock, Some((LockMode::Governance, 22)));
        assert_eq!(
            s.tags.get(tag::LOCKED_UNTIL).map(String::as_str),
            Some("2027-01-01T00:00:00Z")
        );
        let mut deleted = pruned.deleted.clone();
        deleted.sort();
        let mut want = vec![id_of(2), id_of(3), id_of(4)];
        want.sort();
        assert_eq!(deleted, want, "{pruned:?}");
        // Locked once: the next run locks nothing again. With the daily tier cut to two
        // days the tiers no longer keep generation 1, but its lock does (no delete tried).
        let mut short = w.r.cfg.tiers;
        short.keep_daily = chrono::Duration::days(2);
        let again = pilotlight_replica::prune::prune(&w.r, &short, now)
            .await
            .unwrap();
        assert!(again.locked.is_empty(), "{again:?}");
        assert!(again.deleted.is_empty() && again.failed == 0, "{again:?}");
        // After the lock's end it goes like any point the tiers drop.
        w.ebs.expire_lock(&id_of(1));
        let later = chrono::Utc.with_ymd_and_hms(2027, 1, 5, 0, 0, 0).unwrap();
        let last = pilotlight_replica::prune::prune(&w.r, &short, later)
            .await
            .unwrap();
        assert_eq!(last.deleted, vec![id_of(1)], "{last:?}");
        assert!(last.locked.is_empty(), "{last:?}");
    });
}

#[test]
fn the_schedules_sweep_writes_points_whose_events_were_all_lost() {
    paused(async {
        let case = Case::fixed(31, 3);
        let w = World::new(4);
        let model = w.publish(&case);
        // Only generation 1's event arrives; 2 and 3's are lost.
        assert!(w.handle(&w.manifest_event(&case, 1)).await.is_delete());
        let start = w.start;
        let now = move || {
            chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 12, 5, 0, 0, 0).unwrap()
                + chrono::Duration::from_std(start.elapsed()).unwrap_or_default()
        };
        let tick = pilotlight_replica::schedule::tick(&w.r, now).await.unwrap();
        assert_eq!(tick.swept.len(), 1, "{tick:?}");
        assert_eq!(w.verify(&model).await.points, 3);
        // The same run publishes the disk's lag (from generation 3's snapshot time, not
        // 1's) and the stack's largest.
        let lines: Vec<serde_json::Value> = tick
            .lag_lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let heads = pilotlight_replica::chain::all(&w.r.store, &w.r.cfg.prefix, now())
            .await
            .unwrap();
        let newest = heads[0].point.as_ref().unwrap();
        assert_eq!(newest.generation, 3);
        let want = (now() - newest.snapshot_time).num_milliseconds() as f64 / 1000.0;
        assert_eq!(lines.len(), 2, "{lines:?}");
        let lag = lines[0]["ReplicationLagSeconds"].as_f64().unwrap();
        assert!(lag <= want && lag > want - 60.0, "{lag} vs {want}");
        assert_eq!(
            lines[1]["MaxReplicationLagSeconds"],
            lines[0]["ReplicationLagSeconds"]
        );
        // Nothing left to do: the next sweep touches nothing.
        assert!(pilotlight_replica::drive::sweep(&w.r, now)
            .await
            .unwrap()
            .is_empty());
    });
}
