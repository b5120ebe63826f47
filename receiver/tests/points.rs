//! Recovery points against the faithful in-memory EBS: every point reads back (over its
//! chain, through ListSnapshotBlocks/GetSnapshotBlock) as the image was at its generation,
//! through throttling storms, crashes mid-point, snapshots going to `error`, parents
//! deleted behind the receiver's back; retention with a simulated clock; permanent
//! failures that give a point up while replication goes on.
#![allow(clippy::unwrap_used)]

mod common;

use chrono::{DateTime, Duration as Age, DurationRound, Utc};
use common::*;
use pilotlight_cloud::ebs::{EbsApi, MemoryEbs, SnapshotFilter, SnapshotStatus};
use pilotlight_cloud::{ErrorKind, Fault, MemoryQueue, MemoryStore, ObjectStore};
use pilotlight_protocol::points::{tag, Point, Tiers};
use pilotlight_protocol::{DiskId, ObjectKey};
use pilotlight_receiver::engine::Engine;
use pilotlight_receiver::points::{PointDue, PointWriter, PointsConfig};
use pilotlight_receiver::state::{self, DiskPaths};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// 8 blocks and a partial ninth: writes cross block boundaries, the last block is padded.
const DISK_SECTORS: u64 = 8 * 1024 + 128;

fn keep_everything() -> Tiers {
    Tiers {
        keep_all: Age::days(100_000),
        keep_hourly: Age::days(100_000),
        keep_daily: Age::days(100_000),
    }
}

fn points_config() -> PointsConfig {
    let mut c = PointsConfig::new("test-stack");
    c.tiers = keep_everything();
    c.retry_base = Duration::from_millis(1);
    c.call_attempts = 4;
    c.concurrency = 4;
    c.settle_timeout = Duration::from_secs(5);
    // The twin is consistent at once: a snapshot it does not list is gone.
    c.visibility_window = Duration::from_millis(20);
    c
}

fn twin() -> Arc<MemoryEbs> {
    Arc::new(MemoryEbs {
        page_size: 3,
        settle_describes: 1,
        ..MemoryEbs::new()
    })
}

type PointsEngine = Engine<Arc<MemoryStore>, Arc<MemoryQueue>, Arc<MemoryEbs>>;

fn engine(
    root: &Path,
    store: &Arc<MemoryStore>,
    ebs: &Arc<MemoryEbs>,
    cfg: PointsConfig,
) -> PointsEngine {
    Engine::new(
        config(root),
        store.clone(),
        Arc::new(MemoryQueue::default()),
    )
    .with_points(PointWriter::new(ebs.clone(), cfg))
}

/// Syncs until every committed generation is applied and no point is due.
async fn settle(engine: &mut PointsEngine, root: &Path, disks: &[DiskId], want: &[u64]) {
    let cfg = config(root);
    for _ in 0..50 {
        engine.sync_once().await;
        let done = disks.iter().zip(want).all(|(id, w)| {
            let st = state::load(&DiskPaths::new(&cfg.image_dir, &cfg.state_dir, id), id).unwrap();
            st.applied == Some(*w) && st.point_due.is_none()
        });
        if done {
            return;
        }
    }
    panic!("points never settled");
}

#[derive(Debug, Clone)]
enum Trouble {
    None,
    /// PutSnapshotBlock throttled this many times in a row (a storm).
    Throttle(u64),
    /// The receiver dies after this many blocks of the point, and comes back.
    CrashMidPoint(u64),
    /// The sealed snapshot goes to `error`.
    SnapshotError,
    /// The disk's newest point is deleted by someone else before the next one.
    DeleteParent,
}

fn trouble() -> impl Strategy<Value = Trouble> {
    prop_oneof![
        3 => Just(Trouble::None),
        1 => (1u64..12).prop_map(Trouble::Throttle),
        1 => (0u64..6).prop_map(Trouble::CrashMidPoint),
        1 => Just(Trouble::SnapshotError),
        1 => Just(Trouble::DeleteParent),
    ]
}

async fn run_case(specs: Vec<Vec<GenSpec>>, troubles: Vec<Trouble>) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let chains: Vec<Chain> = specs
        .iter()
        .enumerate()
        .map(|(d, s)| build_chain(d, s, DISK_SECTORS))
        .collect();
    let ids: Vec<DiskId> = (0..chains.len()).map(disk).collect();
    let store = Arc::new(MemoryStore::new("b"));
    let ebs = twin();
    let mut eng = engine(root, &store, &ebs, points_config());
    let mut deleted: std::collections::BTreeSet<(usize, u64)> = Default::default();
    let rounds = chains.iter().map(|c| c.manifests.len()).max().unwrap();
    let mut want = vec![0u64; chains.len()];
    for r in 0..rounds {
        let t = troubles[r % troubles.len()].clone();
        for (d, c) in chains.iter().enumerate() {
            if r < c.manifests.len() {
                commit(&store, c, r);
                want[d] = r as u64 + 1;
            }
        }
        match &t {
            Trouble::None => {}
            Trouble::Throttle(n) => ebs
                .faults
                .add(Fault::on("PutSnapshotBlock").times(*n).throttle()),
            Trouble::CrashMidPoint(after) => {
                ebs.faults.add(
                    Fault::on("PutSnapshotBlock")
                        .after(*after)
                        .always()
                        .unreachable(),
                );
                eng.sync_once().await;
                ebs.faults.clear();
                eng = engine(root, &store, &ebs, points_config());
            }
            Trouble::SnapshotError => ebs.fail_completions.store(1, Ordering::SeqCst),
            Trouble::DeleteParent => {
                for (d, id) in ids.iter().enumerate() {
                    if let Some((g, ps)) = points_of(&ebs, id).await.into_iter().next_back() {
                        ebs.delete_snapshot(&ps[0].snapshot_id).await.unwrap();
                        deleted.insert((d, g));
                    }
                }
            }
        }
        settle(&mut eng, root, &ids, &want).await;
        ebs.faults.clear();
    }
    for (d, c) in chains.iter().enumerate() {
        let points = points_of(&ebs, &ids[d]).await;
        let size = c.images[0].len();
        for (i, image) in c.images.iter().enumerate() {
            let g = i as u64 + 1;
            let ps = points.get(&g).cloned().unwrap_or_default();
            prop_assert!(
                ps.len() <= 1,
                "disk {d} generation {g}: {} points",
                ps.len()
            );
            let Some(p) = ps.first() else {
                // Only a point the test deleted may be missing.
                prop_assert!(
                    deleted.contains(&(d, g)),
                    "disk {d} generation {g} has no point"
                );
                continue;
            };
            let got = read_point(&ebs, &p.snapshot_id, size).await;
            prop_assert!(
                &got == image,
                "disk {d}: point of generation {g} differs from the image at {g}"
            );
        }
        // Nothing unfinished is left behind.
        let all = ebs
            .describe_snapshots(&SnapshotFilter::default().tag(tag::DISK, ids[d].disk.as_str()))
            .await
            .unwrap();
        prop_assert!(
            all.iter().all(|s| s.status == SnapshotStatus::Completed),
            "{all:?}"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random generation sequences of a two-disk VM (and a third disk), troubles between
    /// them: every point reads back as its disk was at its generation.
    #[test]
    fn every_point_reads_back_as_its_generation(
        specs in prop::collection::vec(prop::collection::vec(gen_strategy(DISK_SECTORS, 2500, 1..4), 1..6), 2..4),
        troubles in prop::collection::vec(trouble(), 1..6),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_case(specs, troubles))?;
    }
}

/// Each trouble alone, on a fixed three-generation VM (the property test mixes them):
/// a throttling storm longer than one call's retries, a crash after some blocks, a
/// sealed snapshot that goes to `error`, the parent point deleted behind the receiver's
/// back. Each still ends with every point reading back as its generation.
#[tokio::test]
async fn each_fault_alone_still_ends_with_correct_points() {
    let gen = |g: u64| GenSpec {
        base: false,
        writes: vec![w(g * 1700, 1500, g as u8 + 1), w(8000, 200, 3)],
    };
    let specs = vec![(0..4).map(gen).collect::<Vec<_>>(); 2];
    for t in [
        Trouble::Throttle(11),
        Trouble::CrashMidPoint(3),
        Trouble::SnapshotError,
        Trouble::DeleteParent,
    ] {
        // The trouble strikes at generation 2 and 4 (rounds 1 and 3).
        let troubles = vec![Trouble::None, t.clone()];
        run_case(specs.clone(), troubles)
            .await
            .unwrap_or_else(|e| panic!("{t:?}: {e}"));
    }
}

/// Five generations of a two-disk VM, then the VM's points: five, each disk reading back
/// as it was; a deleted middle point leaves the later ones whole.
#[tokio::test]
async fn five_generations_of_a_two_disk_vm_are_five_vm_points() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let specs: Vec<GenSpec> = (0..5)
        .map(|g| GenSpec {
            base: false,
            writes: vec![w(g * 1500, 1100, g as u8 + 3), w(7000, 10, 9)],
        })
        .collect();
    let chains: Vec<Chain> = (0..2)
        .map(|d| build_chain(d, &specs, DISK_SECTORS))
        .collect();
    let ids = [disk(0), disk(1)];
    let store = Arc::new(MemoryStore::new("b"));
    let ebs = twin();
    let mut eng = engine(root, &store, &ebs, points_config());
    for g in 0..5 {
        for c in &chains {
            commit(&store, c, g);
        }
        settle(&mut eng, root, &ids, &[g as u64 + 1; 2]).await;
    }
    let vm = pilotlight_store::points::list(&ebs, Some("s"), Some("vm0"))
        .await
        .unwrap();
    assert_eq!(vm.len(), 5, "{vm:?}");
    for p in &vm {
        assert_eq!(p.disks.len(), 2);
        for d in &p.disks {
            let i = ids.iter().position(|x| *x == d.disk).unwrap();
            let image = &chains[i].images[d.generation as usize - 1];
            assert_eq!(&read_point(&ebs, &d.snapshot_id, image.len()).await, image);
        }
    }
    // Incremental: generation 2's point wrote only the blocks generation 2 touched.
    let g2 = &vm[3].disks[0];
    assert_eq!(g2.generation, 2);
    let snap = ebs.get(&g2.snapshot_id).unwrap();
    assert!(snap.parent.is_some());
    assert_eq!(
        snap.written.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 6]
    );
    assert_eq!(
        g2.blocks_written,
        Some(3),
        "the listing says what the point wrote"
    );
    // Deleting generation 3's points (a parent) leaves 4 and 5 reading back whole.
    for d in &vm[2].disks {
        ebs.delete_snapshot(&d.snapshot_id).await.unwrap();
    }
    for p in &vm[..2] {
        for d in &p.disks {
            let i = ids.iter().position(|x| *x == d.disk).unwrap();
            let image = &chains[i].images[d.generation as usize - 1];
            assert_eq!(&read_point(&ebs, &d.snapshot_id, image.len()).await, image);
        }
    }
    // A sixth generation of disk0 only: the newest VM point stays at the fifth.
    let more = build_chain(
        0,
        &[specs.clone(), vec![specs[0].clone()]].concat(),
        DISK_SECTORS,
    );
    commit(&store, &more, 5);
    settle(&mut eng, root, &ids, &[6, 5]).await;
    let vm = pilotlight_store::points::list(&ebs, Some("s"), Some("vm0"))
        .await
        .unwrap();
    assert_eq!(
        vm[0].disks.iter().map(|d| d.generation).collect::<Vec<_>>(),
        [5, 5]
    );
}

/// No EBS permission: the point is given up with a clear error in the disk's status,
/// replication goes on; once permitted, the next point is a full one and reads back.
#[tokio::test]
async fn without_ebs_permission_replication_goes_on_and_says_points_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let specs: Vec<GenSpec> = (0..3)
        .map(|g| GenSpec {
            base: false,
            writes: vec![w(g * 2000, 900, g as u8 + 1)],
        })
        .collect();
    let chain = build_chain(0, &specs, DISK_SECTORS);
    let id = disk(0);
    let store = Arc::new(MemoryStore::new("b"));
    let ebs = twin();
    ebs.faults.add(
        Fault::on("StartSnapshot")
            .always()
            .kind(ErrorKind::AccessDenied, Some("AccessDeniedException")),
    );
    let mut eng = engine(root, &store, &ebs, points_config());
    commit(&store, &chain, 0);
    commit(&store, &chain, 1);
    settle(&mut eng, root, std::slice::from_ref(&id), &[2]).await;
    let st = &eng.status()[0];
    assert_eq!(st.applied, Some(2), "replication goes on");
    assert_eq!(st.newest_point, None);
    assert!(st.points_failed >= 1);
    let why = st.point_error.clone().unwrap();
    assert!(
        why.contains("StartSnapshot") && why.contains("access denied"),
        "{why}"
    );
    assert!(ebs
        .describe_snapshots(&SnapshotFilter::default())
        .await
        .unwrap()
        .is_empty());
    // Permission granted: generation 3's point cannot build on a missing one: full.
    ebs.faults.clear();
    commit(&store, &chain, 2);
    settle(&mut eng, root, std::slice::from_ref(&id), &[3]).await;
    let ps = points_of(&ebs, &id).await;
    let p = &ps[&3][0];
    assert_eq!(p.parent, None);
    assert_eq!(
        read_point(&ebs, &p.snapshot_id, chain.images[2].len()).await,
        chain.images[2]
    );
    assert_eq!(eng.status()[0].point_error, None);
}

/// The image was removed under the receiver: no point of zeroes, the point is given up
/// with the reason, nothing pending is left on EBS.
#[tokio::test]
async fn a_point_for_a_removed_image_is_refused_not_written_as_zeroes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let chain = build_chain(
        0,
        &[GenSpec {
            base: true,
            writes: vec![w(0, 100, 5)],
        }],
        DISK_SECTORS,
    );
    let id = disk(0);
    let cfg = config(root);
    let paths = DiskPaths::new(&cfg.image_dir, &cfg.state_dir, &id);
    paths.create_dirs().unwrap();
    // The state says generation 1 is applied and its point due; the image is gone.
    let mut st = state::DiskState::new(&id);
    st.applied = Some(1);
    st.point_due = Some(PointDue::for_manifest(&chain.manifests[0]));
    state::save(&paths, &st).unwrap();
    let ebs = twin();
    let pw = PointWriter::new(ebs.clone(), points_config());
    let e = pw.write_due(&id, &mut st, &paths).await.unwrap_err();
    assert!(!e.is_transient());
    assert!(e.to_string().contains("cannot open it"), "{e}");
    pw.give_up(&mut st, &paths, &e).await.unwrap();
    let st = state::load(&paths, &id).unwrap();
    assert_eq!(st.point_due, None);
    assert!(st.points_need_full);
    assert!(ebs
        .describe_snapshots(&SnapshotFilter::default())
        .await
        .unwrap()
        .is_empty());
}

/// A week of 5-minute generations with a simulated clock: exactly the tiers' points are
/// left (every point of the last day, one per hour before that for three days, one per day
/// before that), plus the held ones; every kept point reads back as its generation.
#[tokio::test]
async fn a_week_of_five_minute_points_leaves_exactly_the_tiers() {
    // Two thousand points save the disk's state (fsynced) a few times each: in memory
    // where the machine has it.
    let tmp = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let root = tmp.path();
    let id = disk(0);
    let cfg = config(root);
    let paths = DiskPaths::new(&cfg.image_dir, &cfg.state_dir, &id);
    paths.create_dirs().unwrap();
    let tiers = Tiers {
        keep_all: Age::hours(24),
        keep_hourly: Age::days(3),
        keep_daily: Age::days(6),
    };
    let mut pc = points_config();
    pc.tiers = tiers;
    let ebs = Arc::new(MemoryEbs::new());
    let pw = PointWriter::new(ebs.clone(), pc);
    let size: u64 = 1 << 20;
    let image = std::fs::File::create(&paths.image).unwrap();
    image.set_len(size).unwrap();
    let start: DateTime<Utc> = "2026-11-01T00:02:00Z".parse().unwrap();
    let gens = 7 * 24 * 12;
    let mut st = state::DiskState::new(&id);
    // The image at each generation: the number last written into each block's first bytes.
    let mut images: BTreeMap<u64, [u64; 2]> = BTreeMap::new();
    let mut last = [0u64; 2];
    let mut held = vec![];
    let mut now = start;
    for g in 1..=gens as u64 {
        now = start + Age::minutes(5 * (g as i64 - 1));
        let p = sim_point(&pw, &mut st, &paths, &image, g, now).await;
        last[(g % 2) as usize] = g;
        images.insert(g, last);
        // A DR run holds a point now and then (two days' worth in the past).
        if g % 500 == 0 {
            ebs.create_tags(&p.snapshot_id, &[(tag::HOLD.into(), "run-x".into())])
                .await
                .unwrap();
            held.push(g);
        }
        pw.prune(&id, &mut st, &paths, now).await.unwrap();
    }
    let kept: BTreeMap<u64, Vec<Point>> = points_of(&ebs, &id).await;
    let times: BTreeMap<DateTime<Utc>, u64> = kept
        .iter()
        .map(|(g, ps)| (ps[0].snapshot_time, *g))
        .collect();
    let hour = |t: DateTime<Utc>| t.duration_trunc(Age::hours(1)).unwrap();
    let day = |t: DateTime<Utc>| t.duration_trunc(Age::days(1)).unwrap();
    // Every point of the last day.
    let all_recent = (0..gens as i64)
        .map(|i| start + Age::minutes(5 * i))
        .filter(|t| now - *t < tiers.keep_all)
        .count();
    let recent = times.keys().filter(|t| now - **t < tiers.keep_all).count();
    assert_eq!(recent, all_recent);
    // One per whole hour between a day and three days old, one per whole day between
    // three and six days old, none older (except holds).
    let mut per_hour: BTreeMap<DateTime<Utc>, usize> = BTreeMap::new();
    let mut per_day: BTreeMap<DateTime<Utc>, usize> = BTreeMap::new();
    for (t, g) in &times {
        let age = now - *t;
        if held.contains(g) {
            continue;
        }
        if age >= tiers.keep_all && age < tiers.keep_hourly {
            *per_hour.entry(hour(*t)).or_default() += 1;
        } else if age >= tiers.keep_hourly && age < tiers.keep_daily {
            *per_day.entry(day(*t)).or_default() += 1;
        } else {
            assert!(
                age < tiers.keep_all,
                "generation {g} at {t} is older than every tier"
            );
        }
    }
    let whole_hours: Vec<_> = per_hour
        .keys()
        .filter(|h| now - **h < tiers.keep_hourly && now - (**h + Age::hours(1)) >= tiers.keep_all)
        .collect();
    assert!(whole_hours.len() >= 47, "{}", whole_hours.len());
    for h in whole_hours {
        assert_eq!(per_hour[h], 1, "hour {h}");
    }
    let whole_days: Vec<_> = per_day
        .keys()
        .filter(|d| now - **d < tiers.keep_daily && now - (**d + Age::days(1)) >= tiers.keep_hourly)
        .collect();
    assert!(whole_days.len() >= 2, "{}", whole_days.len());
    for d in whole_days {
        assert_eq!(per_day[d], 1, "day {d}");
    }
    for g in &held {
        assert!(kept.contains_key(g), "held generation {g} was deleted");
    }
    assert!(
        kept.len() < 288 + 2 * 24 + 3 + 2 + held.len() + 3,
        "{}",
        kept.len()
    );
    // Every kept point (its parents long deleted) reads back as its generation.
    for (g, ps) in &kept {
        let got = read_point(&ebs, &ps[0].snapshot_id, size as usize).await;
        let mut want = vec![0u8; size as usize];
        for (b, v) in images[g].iter().enumerate() {
            if *v > 0 {
                want[b * 512 * 1024..][..8].copy_from_slice(&v.to_le_bytes());
            }
        }
        assert!(got == want, "generation {g}");
    }
    // Pruning again changes nothing.
    assert_eq!(pw.prune(&id, &mut st, &paths, now).await.unwrap(), 0);
}

/// Generation `g` at `now` of a two-block image: it rewrites the first 8 bytes of block
/// `g % 2` with `g`; its point is written.
async fn sim_point(
    pw: &PointWriter<Arc<MemoryEbs>>,
    st: &mut state::DiskState,
    paths: &DiskPaths,
    image: &std::fs::File,
    g: u64,
    now: DateTime<Utc>,
) -> pilotlight_receiver::points::PointRecord {
    let size = image.metadata().unwrap().len();
    let at = (g % 2) * 512 * 1024;
    std::os::unix::fs::FileExt::write_all_at(image, &g.to_le_bytes(), at).unwrap();
    let mut due = PointDue::for_manifest(&pilotlight_protocol::Manifest::new(
        st.disk.clone(),
        g,
        (g > 1).then(|| g - 1),
        size,
        now,
        "test",
    ));
    due.blocks = vec![(g % 2, g % 2 + 1)];
    st.applied = Some(g);
    st.point_due = Some(due);
    let id = st.disk.clone();
    pw.write_due(&id, st, paths).await.unwrap().unwrap()
}

/// One disk's files under `root` for [`sim_point`]: its paths, a 1 MiB image, a fresh
/// state.
fn sim_disk(root: &Path, id: &DiskId) -> (DiskPaths, std::fs::File, state::DiskState) {
    let cfg = config(root);
    let paths = DiskPaths::new(&cfg.image_dir, &cfg.state_dir, id);
    paths.create_dirs().unwrap();
    let image = std::fs::File::create(&paths.image).unwrap();
    image.set_len(1 << 20).unwrap();
    (paths, image, state::DiskState::new(id))
}

/// With a lock mode, each day's kept point is locked (EBS Snapshot Lock) until it would
/// leave the daily tier, tagged with that time, and never offered for deletion before
/// (the twin refuses to delete a locked snapshot, which would fail the pruning); once its
/// lock has run out it goes like any other.
#[tokio::test]
async fn daily_points_are_locked_until_they_leave_the_daily_tier() {
    let tmp = tempfile::tempdir().unwrap();
    let id = disk(0);
    let (paths, image, mut st) = sim_disk(tmp.path(), &id);
    let mut pc = points_config();
    pc.tiers = Tiers {
        keep_all: Age::hours(2),
        keep_hourly: Age::hours(6),
        keep_daily: Age::days(3),
    };
    pc.lock = Some(pilotlight_cloud::ebs::LockMode::Governance);
    let ebs = Arc::new(MemoryEbs::new());
    let pw = PointWriter::new(ebs.clone(), pc);
    let start: DateTime<Utc> = "2026-11-01T00:10:00Z".parse().unwrap();
    for g in 1..=(5 * 48) {
        let now = start + Age::minutes(30 * (g as i64 - 1));
        sim_point(&pw, &mut st, &paths, &image, g, now).await;
        // AWS lifts a lock when it runs out; the twin has no clock.
        for (_, ps) in points_of(&ebs, &id).await {
            if ps[0].locked_until.is_some_and(|t| t <= now) {
                ebs.expire_lock(&ps[0].snapshot_id);
            }
        }
        pw.prune(&id, &mut st, &paths, now).await.unwrap();
    }
    let kept = points_of(&ebs, &id).await;
    let day_firsts: Vec<&Point> = kept
        .values()
        .map(|ps| &ps[0])
        .filter(|p| p.snapshot_time.time() == start.time())
        .collect();
    // Days 3, 4 and 5 (younger than three days) keep their first point, locked.
    assert_eq!(day_firsts.len(), 3, "{day_firsts:?}");
    for p in &day_firsts {
        let snap = ebs.get(&p.snapshot_id).unwrap();
        assert!(snap.lock.is_some(), "{} not locked", p.snapshot_id);
        let until = p.locked_until.unwrap();
        assert!(until >= p.snapshot_time + Age::days(3) && until <= p.snapshot_time + Age::days(4));
    }
    // Locked points are the daily ones only.
    let locked = kept
        .values()
        .filter(|ps| ps[0].locked_until.is_some())
        .count();
    assert_eq!(locked, 3);
    assert!(
        ebs.faults.calls("LockSnapshot") >= 5,
        "every day's point was locked once"
    );
}

/// Puts an export request for `generation` of `id` and syncs until it is answered.
async fn export_answer(
    eng: &mut PointsEngine,
    store: &MemoryStore,
    id: &DiskId,
    name: &str,
    generation: u64,
) -> pilotlight_protocol::ExportResult {
    use pilotlight_protocol::{ExportFormat, ExportRequest, ExportResult, Name, EXPORT_VERSION};
    let name = Name::new(name).unwrap();
    let req = ExportRequest {
        version: EXPORT_VERSION,
        id: name.clone(),
        generation,
        format: ExportFormat::Raw,
        run_id: Some("dr-test".into()),
        requested_at: Utc::now(),
    };
    let key = ObjectKey::ExportRequest {
        disk: id.clone(),
        id: name.clone(),
    }
    .to_key(&prefix());
    store.insert(&key, serde_json::to_vec(&req).unwrap());
    let result = ObjectKey::ExportResult {
        disk: id.clone(),
        id: name.clone(),
    }
    .to_key(&prefix());
    for _ in 0..20 {
        eng.sync_once().await;
        if let Some(b) = store.get_if_exists(&result, 1 << 20).await.unwrap() {
            return ExportResult::from_json(&b, &name).unwrap();
        }
    }
    panic!("export {name} never answered");
}

/// Import from any point: after generation 4 was applied, an export of generation 2 is
/// read from its recovery point (blocks at their offsets, holes as zeroes, the partial
/// last block cut at the disk's end) and equals the disk at generation 2, SHA-256
/// included; the newest generation still comes from the image; a generation whose point
/// is gone fails with the reason.
#[tokio::test]
async fn an_export_of_an_older_generation_is_read_from_its_recovery_point() {
    use sha2::{Digest, Sha256};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let specs: Vec<GenSpec> = (0..4)
        .map(|g| GenSpec {
            base: false,
            writes: vec![w(g * 1700, 900, g as u8 + 11), w(8 * 1024 + 100, 20, 5)],
        })
        .collect();
    let chain = build_chain(0, &specs, DISK_SECTORS);
    let id = disk(0);
    let store = Arc::new(MemoryStore::new("b"));
    let ebs = twin();
    let mut eng = engine(root, &store, &ebs, points_config());
    for g in 0..4 {
        commit(&store, &chain, g);
        settle(&mut eng, root, std::slice::from_ref(&id), &[g as u64 + 1]).await;
    }
    for (name, g) in [("old", 2u64), ("new", 4)] {
        let r = export_answer(&mut eng, &store, &id, name, g).await;
        assert_eq!(
            r.status,
            pilotlight_protocol::ExportStatus::Done,
            "{:?}",
            r.reason
        );
        let want = &chain.images[g as usize - 1];
        assert_eq!(r.generation, Some(g));
        assert_eq!(r.size, Some(want.len() as u64));
        assert_eq!(r.sha256.unwrap().0, <[u8; 32]>::from(Sha256::digest(want)));
        let got = store
            .get_if_exists(&r.image_key.unwrap(), 1 << 30)
            .await
            .unwrap()
            .unwrap();
        assert!(got[..] == want[..], "generation {g} exported byte for byte");
    }
    // Generation 2 differs from 4: the point was used, not the image.
    assert_ne!(chain.images[1], chain.images[3]);
    // Generation 1's point deleted: refused, saying why.
    for p in &points_of(&ebs, &id).await[&1] {
        ebs.delete_snapshot(&p.snapshot_id).await.unwrap();
    }
    let r = export_answer(&mut eng, &store, &id, "gone", 1).await;
    assert_eq!(r.status, pilotlight_protocol::ExportStatus::Failed);
    let why = r.reason.unwrap();
    assert!(why.contains("has no recovery point"), "{why}");
}

/// A pruned point that cannot be deleted (EC2 `InvalidSnapshot.InUse`: an AMI registered
/// from it) is logged and kept; the points after it are pruned all the same, and it goes
/// once it can.
#[tokio::test]
async fn a_point_in_use_never_keeps_pruning_from_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let id = disk(0);
    let (paths, image, mut st) = sim_disk(tmp.path(), &id);
    let mut pc = points_config();
    pc.tiers = Tiers {
        keep_all: Age::hours(1),
        keep_hourly: Age::hours(1),
        keep_daily: Age::hours(1),
    };
    let ebs = Arc::new(MemoryEbs::new());
    let pw = PointWriter::new(ebs.clone(), pc);
    let start: DateTime<Utc> = "2026-11-01T00:10:00Z".parse().unwrap();
    let mut ids = vec![];
    for g in 1..=4 {
        let p = sim_point(
            &pw,
            &mut st,
            &paths,
            &image,
            g,
            start + Age::minutes(g as i64),
        )
        .await;
        ids.push(p.snapshot_id);
    }
    // The oldest is in use; a day later all four are past every tier but the newest.
    ebs.faults.add(
        Fault::on("DeleteSnapshot")
            .resource_contains(ids[0].clone())
            .kind(ErrorKind::Invalid, Some("InvalidSnapshot.InUse"))
            .always(),
    );
    let later = start + Age::days(1);
    let deleted = pw.prune(&id, &mut st, &paths, later).await.unwrap();
    assert_eq!(deleted, 2, "the two after the one in use");
    let left: Vec<String> = points_of(&ebs, &id)
        .await
        .into_values()
        .map(|ps| ps[0].snapshot_id.clone())
        .collect();
    assert_eq!(left, [ids[0].clone(), ids[3].clone()]);
    assert!(
        st.points.iter().any(|p| p.snapshot_id == ids[0]),
        "still recorded"
    );
    // Its AMI deregistered: the next pruning deletes it.
    ebs.faults.clear();
    assert_eq!(pw.prune(&id, &mut st, &paths, later).await.unwrap(), 1);
    assert!(ebs.get(&ids[0]).is_none());
}

/// A snapshot just started, or just completed, can read as "does not exist" for a while
/// (EBS and EC2 are eventually consistent; awslabs/coldsnap issue 43): within the
/// visibility window that is retried, and a sealed snapshot DescribeSnapshots does not
/// list yet is waited for, never deleted.
#[tokio::test]
async fn a_snapshot_not_visible_yet_is_retried_not_given_up_or_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let id = disk(0);
    let (paths, image, mut st) = sim_disk(tmp.path(), &id);
    let ebs = Arc::new(MemoryEbs {
        settle_describes: 1,
        ..MemoryEbs::new()
    });
    // Every first PutSnapshotBlock and the first CompleteSnapshot: "does not exist", as
    // the EBS direct APIs answer it (ValidationException, reason INVALID_SNAPSHOT_ID).
    ebs.faults.add(
        Fault::on("PutSnapshotBlock")
            .snapshot_not_visible()
            .times(3),
    );
    ebs.faults.add(
        Fault::on("CompleteSnapshot")
            .snapshot_not_visible()
            .times(1),
    );
    // And DescribeSnapshots lists nothing for a while after completion.
    ebs.faults.add(
        Fault::on("DescribeSnapshots")
            .kind(ErrorKind::NotFound, Some("InvalidSnapshot.NotFound"))
            .times(2),
    );
    let mut pc = points_config();
    pc.visibility_window = Duration::from_secs(30);
    let pw = PointWriter::new(ebs.clone(), pc);
    let start: DateTime<Utc> = "2026-11-01T00:10:00Z".parse().unwrap();
    let p = sim_point(&pw, &mut st, &paths, &image, 1, start).await;
    assert_eq!(
        ebs.get(&p.snapshot_id).unwrap().status,
        SnapshotStatus::Completed
    );
    assert_eq!(ebs.faults.calls("DeleteSnapshot"), 0);
}

/// The longest names a disk can have (three 128-character names) still make points: the
/// description and tags stay within StartSnapshot's limits, which the twin enforces
/// (Description 255, tag values 255, keys 127).
#[tokio::test]
async fn the_longest_disk_names_still_make_points() {
    let tmp = tempfile::tempdir().unwrap();
    let long = |c: char| std::iter::repeat_n(c, 128).collect::<String>();
    let id = DiskId::new(&long('s'), &long('v'), &long('d')).unwrap();
    let (paths, image, mut st) = sim_disk(tmp.path(), &id);
    let ebs = Arc::new(MemoryEbs::new());
    let pw = PointWriter::new(ebs.clone(), points_config());
    let start: DateTime<Utc> = "2026-11-01T00:10:00Z".parse().unwrap();
    let p = sim_point(&pw, &mut st, &paths, &image, 1, start).await;
    let snap = ebs.get(&p.snapshot_id).unwrap();
    assert_eq!(snap.description.chars().count(), 255);
    assert_eq!(snap.tags[tag::VM], long('v'));
}

/// A receiver whose state was lost applies generation 1 again and writes its point
/// again: its StartSnapshot client token is new (a random salt made with the due point),
/// so EBS does not hand back the first receiver's snapshot for it (idempotency returns
/// "the result from the original successful request").
#[tokio::test]
async fn a_receiver_started_over_never_reuses_an_earlier_client_token() {
    let ebs = Arc::new(MemoryEbs::new());
    let id = disk(0);
    let start: DateTime<Utc> = "2026-11-01T00:10:00Z".parse().unwrap();
    let mut ids = vec![];
    for _ in 0..2 {
        let tmp = tempfile::tempdir().unwrap();
        let (paths, image, mut st) = sim_disk(tmp.path(), &id);
        let pw = PointWriter::new(ebs.clone(), points_config());
        ids.push(
            sim_point(&pw, &mut st, &paths, &image, 1, start)
                .await
                .snapshot_id,
        );
    }
    assert_ne!(ids[0], ids[1]);
    assert_eq!(ebs.get(&ids[1]).unwrap().status, SnapshotStatus::Completed);
}
