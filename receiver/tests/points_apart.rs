//! Recovery points never hold replication back (#35): each disk's point is written by a
//! task of its own, so a slow point read from the image holds back only its own disk's
//! next generation, never the engine or another disk; a staged point (its blocks copied
//! out of the image when applied) holds back nothing, and the disk's newer points queue
//! behind it; pruning is a round on a timer, not a listing per point.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use pilotlight_cloud::ebs::MemoryEbs;
use pilotlight_cloud::{MemoryQueue, MemoryStore};
use pilotlight_receiver::engine::Engine;
use pilotlight_receiver::points::{PointCalls, PointWriter, PointsConfig};
use pilotlight_receiver::state::{self, DiskPaths, DiskState};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DISK_SECTORS: u64 = 8 * 1024 + 128;

fn points_config() -> PointsConfig {
    let mut c = PointsConfig::new("test-stack");
    // Every point kept: the test reads them all back.
    c.tiers = pilotlight_protocol::points::Tiers {
        keep_all: chrono::Duration::days(100_000),
        keep_hourly: chrono::Duration::days(100_000),
        keep_daily: chrono::Duration::days(100_000),
    };
    c.retry_base = Duration::from_millis(1);
    c.call_attempts = 4;
    c.settle_timeout = Duration::from_secs(20);
    c.visibility_window = Duration::from_millis(200);
    c
}

fn state_of(root: &Path, id: &pilotlight_protocol::DiskId) -> DiskState {
    let cfg = config(root);
    state::load(&DiskPaths::new(&cfg.image_dir, &cfg.state_dir, id), id).unwrap()
}

fn caught_up(st: &DiskState, generation: u64) -> bool {
    st.applied == Some(generation) && st.point_due.is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_point_holds_back_only_its_own_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let specs: Vec<GenSpec> = (0..3u64)
        .map(|g| GenSpec {
            base: false,
            writes: vec![w(g * 2000, 1500, g as u8 + 1), w(8000, 100, 7)],
        })
        .collect();
    let ids = [disk(0), disk(1)];
    let chains: Vec<Chain> = (0..2)
        .map(|d| build_chain(d, &specs, DISK_SECTORS))
        .collect();
    let store = Arc::new(MemoryStore::new("b"));
    let ebs = Arc::new(MemoryEbs {
        settle_describes: 1,
        ..MemoryEbs::new()
    });
    // disk0's points cannot start until the gate opens.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *ebs.held_starts.lock().unwrap() = Some((format!("{} generation", ids[0]), gate.clone()));
    // Nothing staged: every point reads the image, so disk0's next generation waits
    // for its point (the test below stages).
    let mut pc = points_config();
    pc.stage_max_bytes = 0;
    let pw = PointWriter::new(ebs.clone(), pc);
    let calls = pw.calls.clone();
    let mut eng = Engine::new(
        config(root),
        store.clone(),
        Arc::new(MemoryQueue::default()),
    )
    .with_points(pw);
    for g in 0..3 {
        for c in &chains {
            commit(&store, c, g);
        }
    }
    eng.reconcile().await.unwrap();

    // disk1 goes through all three generations and their points while disk0's first
    // point is held.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !caught_up(&state_of(root, &ids[1]), 3) {
        // A drive that waited for disk0's point would never return.
        tokio::time::timeout(Duration::from_secs(10), eng.drive())
            .await
            .expect("the engine waits for no point");
        assert!(
            Instant::now() < deadline,
            "disk1 held back: {:?}",
            state_of(root, &ids[1])
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // polling with a deadline
    }
    let s0 = state_of(root, &ids[0]);
    assert_eq!(s0.applied, Some(1), "disk0's image waits for its point");
    assert_eq!(s0.point_due.as_ref().map(|p| p.generation), Some(1));
    let cfg = config(root);
    let image0 = DiskPaths::new(&cfg.image_dir, &cfg.state_dir, &ids[0]).image;
    assert_eq!(std::fs::read(&image0).unwrap(), chains[0].images[0]);

    // Opened: disk0 catches up, and every point of both disks reads back as its
    // generation.
    gate.add_permits(1 << 20);
    while !caught_up(&state_of(root, &ids[0]), 3) {
        eng.sync_once().await;
        assert!(
            Instant::now() < deadline,
            "disk0 never caught up: {:?}",
            state_of(root, &ids[0])
        );
    }
    for (i, id) in ids.iter().enumerate() {
        let points = points_of(&ebs, id).await;
        assert_eq!(
            points.keys().copied().collect::<Vec<_>>(),
            [1, 2, 3],
            "{id}"
        );
        for (g, p) in &points {
            assert_eq!(p.len(), 1, "one point per generation");
            let image = &chains[i].images[*g as usize - 1];
            assert_eq!(
                &read_point(&ebs, &p[0].snapshot_id, image.len()).await,
                image
            );
        }
    }
    // No listing per point: pruning ran once per `sync` (the timer of `run` is 10 min).
    assert_eq!(PointCalls::get(&calls.points), 6);
    assert!(PointCalls::get(&calls.prune_rounds) <= 3, "{calls:?}");
}

/// A staged point holds back nothing, not even its own disk: while disk0's point of
/// generation 2 is held, the image takes generations 3 and 4 and their points queue
/// behind it; the receiver then dies (its point tasks with it) and a new one writes
/// the three queued points from their staged blocks, each reading back as its
/// generation, one per generation, and leaves no staged file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_goes_on_while_its_own_points_queue_and_a_crash_keeps_the_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let specs: Vec<GenSpec> = (0..4u64)
        .map(|g| GenSpec {
            base: false,
            writes: vec![w(g * 1900, 1500, g as u8 + 1), w(8000, 100, g as u8 + 9)],
        })
        .collect();
    let id = disk(0);
    let chain = build_chain(0, &specs, DISK_SECTORS);
    let store = Arc::new(MemoryStore::new("b"));
    let ebs = Arc::new(MemoryEbs::new());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *ebs.held_starts.lock().unwrap() = Some((format!("{id} generation 2 at"), gate.clone()));
    let engine = |ebs: &Arc<MemoryEbs>| {
        Engine::new(
            config(root),
            store.clone(),
            Arc::new(MemoryQueue::default()),
        )
        .with_points(PointWriter::new(ebs.clone(), points_config()))
    };
    let mut eng = engine(&ebs);
    for g in 0..4 {
        commit(&store, &chain, g);
    }
    eng.reconcile().await.unwrap();
    let cfg = config(root);
    let paths = DiskPaths::new(&cfg.image_dir, &cfg.state_dir, &id);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::timeout(Duration::from_secs(10), eng.drive())
            .await
            .expect("the engine waits for no point");
        let st = state_of(root, &id);
        // ... and point 2 started (its progress saved), held at StartSnapshot.
        if st.applied == Some(4) && st.points_queued.len() == 2 && paths.point_progress().exists() {
            break;
        }
        assert!(Instant::now() < deadline, "the image waited: {st:?}");
        tokio::time::sleep(Duration::from_millis(5)).await; // polling with a deadline
    }
    assert_eq!(std::fs::read(&paths.image).unwrap(), chain.images[3]);
    let st = state_of(root, &id);
    assert_eq!(st.point_due.as_ref().map(|p| p.generation), Some(2));
    assert!(st
        .point_due
        .iter()
        .chain(&st.points_queued)
        .all(|p| p.staged));
    for g in 2..=4 {
        assert!(paths.staged_point(g).exists(), "generation {g} staged");
    }
    // The receiver dies with point 2 held (its progress file left behind).
    drop(eng);
    assert!(paths.point_progress().exists());
    let stray = paths.staged_point(99);
    std::fs::write(&stray, b"left by a crash").unwrap();
    // `status` opens the disks and changes nothing: a running receiver may own them.
    let mut looking = engine(&ebs);
    looking.load_known_disks();
    assert_eq!(looking.status()[0].point_due, Some(2));
    drop(looking);
    assert!(paths.point_progress().exists() && stray.exists());
    // The next receiver takes the disk over and writes the queue.
    gate.add_permits(1 << 20);
    let mut eng = engine(&ebs);
    while !caught_up(&state_of(root, &id), 4) || !state_of(root, &id).points_queued.is_empty() {
        eng.sync_once().await;
        assert!(
            Instant::now() < deadline,
            "the queue was not written: {:?}",
            state_of(root, &id)
        );
    }
    let points = points_of(&ebs, &id).await;
    assert_eq!(points.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4]);
    for (g, p) in &points {
        assert_eq!(p.len(), 1, "one point per generation");
        let image = &chain.images[*g as usize - 1];
        assert_eq!(
            &read_point(&ebs, &p[0].snapshot_id, image.len()).await,
            image,
            "generation {g}"
        );
    }
    let st = state_of(root, &id);
    assert_eq!(st.points_failed, 0, "{st:?}");
    assert!(!paths.point_progress().exists());
    for g in 1..=4 {
        assert!(
            !paths.staged_point(g).exists(),
            "generation {g}'s staged blocks removed"
        );
    }
    assert!(!stray.exists(), "staged blocks no point refers to removed");
}

/// Points written at once are capped (`points_at_once`), so a receiver of many disks
/// never asks for more pending snapshots than its share of the account's quota (100
/// pending snapshots per account: "Amazon Elastic Block Store endpoints and quotas",
/// AWS General Reference; "take note of other workloads that might be running in the
/// account", EBS direct APIs FAQ): with
/// the twin holding 6 pending at most (EBS: 100 per account, here scaled down) and 24
/// disks writing points, a cap of 4 is never refused; every point is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_at_once_stay_under_the_pending_snapshot_quota() {
    use pilotlight_cloud::ebs::Limits;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let specs: Vec<GenSpec> = (0..2u64)
        .map(|g| GenSpec {
            base: false,
            writes: vec![w(g * 1900, 1500, g as u8 + 1)],
        })
        .collect();
    let ids: Vec<_> = (0..24).map(disk).collect();
    let chains: Vec<Chain> = (0..ids.len())
        .map(|d| build_chain(d, &specs, DISK_SECTORS))
        .collect();
    let store = Arc::new(MemoryStore::new("b"));
    let ebs = Arc::new(MemoryEbs {
        limits: Some(Limits {
            pending: 6,
            start_per_second: 10_000,
            complete_per_second: 10_000,
            ..Limits::default()
        }),
        ..MemoryEbs::new().with_latency(Duration::from_millis(2))
    });
    let mut pc = points_config();
    pc.points_at_once = 4;
    let mut eng = Engine::new(
        config(root),
        store.clone(),
        Arc::new(MemoryQueue::default()),
    )
    .with_points(PointWriter::new(ebs.clone(), pc));
    for g in 0..2 {
        for c in &chains {
            commit(&store, c, g);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ids.iter().all(|id| caught_up(&state_of(root, id), 2)) {
        eng.sync_once().await;
        assert!(Instant::now() < deadline, "points not written");
    }
    for id in &ids {
        assert_eq!(
            points_of(&ebs, id)
                .await
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [1, 2]
        );
    }
    let st = ebs.state.lock().unwrap();
    assert_eq!(
        st.throttled.get("StartSnapshot"),
        None,
        "{:?}",
        st.throttled
    );
}
