#![allow(clippy::unwrap_used)]

//! Exports in snapshots mode fanned out over invocations: a point larger than one range
//! is uploaded as one multipart upload whose ranges of parts many invocations write; the
//! image reads back equal to the disk at that generation, whatever is killed, duplicated
//! or lost on the way.

mod kit;

use kit::*;
use pilotlight_cloud::sqs::Queue;
use pilotlight_cloud::ObjectStore;
use pilotlight_protocol::replica_export::{composite_sha256, ExportPlan, MAX_PLAN_BYTES};
use pilotlight_protocol::{
    ExportFormat, ExportRequest, ExportResult, ExportStatus, Name, ObjectKey, Sha256Hex,
    EXPORT_VERSION,
};
use pilotlight_replica::Outcome;
use pilotlight_store::exports;
use sha2::{Digest, Sha256};
use std::time::Duration;

const PART: u64 = 5 << 20;

/// A world whose exports fan out: 5 MiB parts (S3's smallest), two parts a range.
fn world() -> World {
    let mut w = World::new(64);
    w.r.cfg.export_part_bytes = PART;
    w.r.cfg.export_range_bytes = 2 * PART;
    w
}

/// Every generation of one 20-30 MiB disk written into points.
async fn with_points(w: &World, seed: u64, gens: u64) -> Model {
    let case = Case {
        big: true,
        ..Case::fixed(seed, gens)
    };
    let model = w.publish(&case);
    w.deliver_all(&case);
    w.run(2, None, 2000).await;
    assert_eq!(w.verify(&model).await.points, gens as usize);
    model
}

fn id(s: &str) -> Name {
    Name::new(s).unwrap()
}

/// Writes an export request for generation `g` and returns its event.
async fn request(w: &World, id: &Name, g: u64) -> String {
    let req = ExportRequest {
        version: EXPORT_VERSION,
        id: id.clone(),
        generation: g,
        format: ExportFormat::Raw,
        run_id: Some("run1".into()),
        requested_at: w.now(),
    };
    let key = exports::write_request(&*w.store, &prefix(), &disk_id(0), &req)
        .await
        .unwrap();
    event("b", &key)
}

async fn result(w: &World, id: &Name) -> ExportResult {
    exports::read_result(&*w.store, &prefix(), &disk_id(0), id)
        .await
        .unwrap()
}

/// The composite checksum of `bytes` in parts of `PART`, computed here independently.
fn composite_of(bytes: &[u8]) -> String {
    let digests: Vec<Sha256Hex> = bytes
        .chunks(PART as usize)
        .map(|c| Sha256Hex(Sha256::digest(c).into()))
        .collect();
    composite_sha256(digests.iter())
}

#[test]
fn a_large_export_fans_out_over_invocations_and_reads_back_equal() {
    paused(async {
        let w = world();
        let model = with_points(&w, 41, 2).await;
        let want = &model[&(disk_id(0), 1)];
        let parts = want.len().div_ceil(PART as usize);
        assert!(parts >= 4, "{parts} parts");
        // The request arrives twice; every fourth invocation is killed part way.
        let x = id("run1-d0");
        let ev = request(&w, &x, 1).await;
        w.events.send(ev.clone());
        w.events.send(ev);
        w.run(3, Some(4), 4000).await;
        let r = result(&w, &x).await;
        assert_eq!(r.status, ExportStatus::Done, "{r:?}");
        let image = exports::image_key(&prefix(), &disk_id(0), &x);
        assert_eq!(r.image_key.as_deref(), Some(image.as_str()));
        assert_eq!(r.size, Some(want.len() as u64));
        assert!(w.store.object(&image).unwrap() == want[..], "image differs");
        // No one invocation saw the whole image: the composite of its parts' digests.
        assert_eq!(r.sha256, None);
        assert_eq!(r.parts_sha256, Some(composite_of(want)));
        assert_eq!(r.part_size, Some(PART));
        assert_eq!(
            r.checksum().unwrap(),
            format!("parts of {PART} bytes: {}", composite_of(want))
        );
        // It was fanned out: a plan of several ranges, one upload, none left open.
        let plan_key = ObjectKey::ExportPlan {
            disk: disk_id(0),
            id: x.clone(),
        }
        .to_key(&prefix());
        let plan = ExportPlan::from_json(
            &w.store.get(&plan_key, MAX_PLAN_BYTES as u64).await.unwrap(),
            &x,
        )
        .unwrap();
        assert_eq!(plan.parts as usize, parts);
        assert!(plan.ranges() >= 2, "{plan:?}");
        assert_eq!(w.store.faults.calls("CreateMultipartUpload"), 1);
        assert!(w.store.faults.calls("UploadPart") >= parts as u64);
        assert_eq!(w.store.open_uploads(), 0);
        // A request answered is not exported again.
        let before = w.store.faults.calls("UploadPart");
        assert!(w.handle(&request(&w, &x, 1).await).await.is_delete());
        assert_eq!(w.store.faults.calls("UploadPart"), before);
    });
}

#[test]
fn range_tasks_that_were_lost_are_sent_again_by_the_schedule() {
    paused(async {
        let w = world();
        let model = with_points(&w, 43, 1).await;
        let x = id("run2-d0");
        assert!(w.handle(&request(&w, &x, 1).await).await.is_delete());
        // Every range task is lost (a dead-letter queue, a purge).
        let lost = w.tasks.receive(10, Duration::ZERO).await.unwrap();
        assert!(lost.len() >= 2, "{lost:?}");
        let receipts: Vec<String> = lost.iter().map(|m| m.receipt.clone()).collect();
        w.tasks.delete_batch(&receipts).await.unwrap();
        let start = w.start;
        let now = move || {
            chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 12, 5, 0, 0, 0).unwrap()
                + chrono::Duration::from_std(start.elapsed()).unwrap_or_default()
        };
        // Within the redispatch window nothing is sent again (the tasks may be in flight).
        let tick = pilotlight_replica::schedule::tick(&w.r, now).await.unwrap();
        assert_eq!(tick.exports.len(), 1, "{tick:?}");
        assert!(w.tasks.is_empty());
        tokio::time::advance(Duration::from_secs(17 * 60)).await;
        let tick = pilotlight_replica::schedule::tick(&w.r, now).await.unwrap();
        assert!(tick.exports[0].contains("sent as tasks"), "{tick:?}");
        assert_eq!(w.tasks.len(), lost.len());
        w.run(2, None, 2000).await;
        let r = result(&w, &x).await;
        assert_eq!(r.status, ExportStatus::Done, "{r:?}");
        let image = exports::image_key(&prefix(), &disk_id(0), &x);
        assert!(w.store.object(&image).unwrap() == model[&(disk_id(0), 1)][..]);
        // Answered: the schedule leaves it alone.
        let tick = pilotlight_replica::schedule::tick(&w.r, now).await.unwrap();
        assert!(tick.exports.is_empty(), "{tick:?}");
    });
}

#[test]
fn a_gone_upload_or_a_garbage_plan_is_answered_failed_and_nothing_panics() {
    paused(async {
        let w = world();
        with_points(&w, 47, 1).await;
        // The upload is aborted under the export (the bucket's lifecycle rule, a person):
        // its range tasks find no upload, and the export is answered failed.
        let x = id("run3-d0");
        assert!(w.handle(&request(&w, &x, 1).await).await.is_delete());
        let plan_key = ObjectKey::ExportPlan {
            disk: disk_id(0),
            id: x.clone(),
        }
        .to_key(&prefix());
        let plan = ExportPlan::from_json(
            &w.store.get(&plan_key, MAX_PLAN_BYTES as u64).await.unwrap(),
            &x,
        )
        .unwrap();
        let image = exports::image_key(&prefix(), &disk_id(0), &x);
        w.store
            .abort_multipart(&image, &plan.upload_id)
            .await
            .unwrap();
        w.run(2, None, 2000).await;
        let r = result(&w, &x).await;
        assert_eq!(r.status, ExportStatus::Failed, "{r:?}");
        assert!(
            r.reason.as_deref().unwrap().contains("NoSuchUpload"),
            "{r:?}"
        );
        assert_eq!(w.store.object(&image), None);
        // Garbage at a plan's key: the export is answered failed, naming the key.
        let y = id("run4-d0");
        let garbage_key = ObjectKey::ExportPlan {
            disk: disk_id(0),
            id: y.clone(),
        }
        .to_key(&prefix());
        w.store
            .insert(&garbage_key, b"{\"version\":1,\"id\":7}".to_vec());
        assert!(w.handle(&request(&w, &y, 1).await).await.is_delete());
        let r = result(&w, &y).await;
        assert_eq!(r.status, ExportStatus::Failed, "{r:?}");
        assert!(r.reason.as_deref().unwrap().contains("plan.json"), "{r:?}");
        // A malformed export task is refused with its reason.
        let bad = r#"{"kind":"pilotlight.replica.export-range","range":"x"}"#;
        match w.handle(bad).await {
            Outcome::Reject(why) => assert!(why.contains("malformed export task"), "{why}"),
            other => panic!("{other:?}"),
        }
        // A task naming a range past the plan's: refused, nothing uploaded.
        let task = pilotlight_protocol::replica_export::ExportTask::new(
            disk_id(0),
            x.clone(),
            999,
            plan.upload_id.clone(),
        );
        let before = w.store.faults.calls("UploadPart");
        assert!(!w.handle(&task.to_json()).await.is_delete());
        assert_eq!(w.store.faults.calls("UploadPart"), before);
    });
}

/// Two deliveries of one range task at once (SQS delivers at least once): the range's
/// lease lets one upload it; the other uploads nothing. Without it both would upload the
/// same parts, and the ETags one record lists might not be the parts' last uploads.
#[test]
fn two_deliveries_of_one_range_task_upload_it_once() {
    paused(async {
        let w = world();
        let model = with_points(&w, 53, 1).await;
        let x = id("run5-d0");
        assert!(w.handle(&request(&w, &x, 1).await).await.is_delete());
        let tasks = w.tasks.receive(10, Duration::ZERO).await.unwrap();
        let body = tasks[0].body.clone();
        let before = w.store.faults.calls("UploadPart");
        let (a, b) = futures::join!(w.handle(&body), w.handle(&body));
        // One uploads; the other finds the range leased and waits (its message comes
        // back) or finds it claimed.
        assert!(a.is_delete() || b.is_delete(), "{a:?} {b:?}");
        assert!(
            [&a, &b]
                .iter()
                .any(|o| format!("{o:?}").contains("another invocation")),
            "{a:?} {b:?}"
        );
        // A range is two parts here: uploaded once.
        assert_eq!(w.store.faults.calls("UploadPart") - before, 2);
        // A third delivery after it is done uploads nothing either.
        assert!(w.handle(&body).await.is_delete());
        assert_eq!(w.store.faults.calls("UploadPart") - before, 2);
        // The other ranges' tasks come back; the export completes equal.
        tokio::time::advance(Duration::from_secs(61)).await;
        w.tasks.advance(Duration::from_secs(61));
        let receipts: Vec<String> = tasks[..1].iter().map(|m| m.receipt.clone()).collect();
        w.tasks.delete_batch(&receipts).await.unwrap();
        w.run(2, None, 2000).await;
        let r = result(&w, &x).await;
        assert_eq!(r.status, ExportStatus::Done, "{r:?}");
        let image = exports::image_key(&prefix(), &disk_id(0), &x);
        assert!(w.store.object(&image).unwrap() == model[&(disk_id(0), 1)][..]);
    });
}
