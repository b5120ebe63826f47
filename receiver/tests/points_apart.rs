//! Recovery points never hold replication back (#35): each disk's point is written by a
//! task of its own, so a slow point holds back only its own disk's next generation (the
//! point reads its blocks from the image), never the engine or another disk; pruning is
//! a round on a timer, not a listing per point.
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
    let pw = PointWriter::new(ebs.clone(), points_config());
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
