//! Failback rounds against the in-memory EBS twin (small pages with empty pages between,
//! so every listing pages) and real files as targets.
#![allow(clippy::unwrap_used)]

use crate::state::{Mode, Phase};
use crate::*;
use bytes::Bytes;
use pilotlight_cloud::ebs::{
    block_checksum, linear_checksum, EbsApi, MemoryEbs, StartSnapshot, BLOCK_SIZE,
};
use pilotlight_cloud::fault::Fault;
use pilotlight_protocol::DiskId;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

const B: usize = BLOCK_SIZE as usize;

fn ebs() -> MemoryEbs {
    MemoryEbs {
        page_size: 3,
        empty_pages: true,
        ..MemoryEbs::new()
    }
}

fn disk() -> DiskId {
    DiskId::parse("site1/vm1/disk0").unwrap()
}

/// A block of `byte`s; 0 is a block of zeroes (written, so it is in the snapshot).
fn block(byte: u8) -> Vec<u8> {
    let mut v = vec![byte; B];
    if byte != 0 {
        v[7] = byte.wrapping_mul(31); // not one repeated byte: offsets matter
    }
    v
}

/// A new pending snapshot on `parent` (1 GiB).
async fn start(ebs: &MemoryEbs, parent: Option<&str>) -> String {
    let token = format!("t{}", ebs.state.lock().unwrap().snapshots.len());
    ebs.start_snapshot(&StartSnapshot {
        volume_size_gib: 1,
        parent: parent.map(String::from),
        description: "test".into(),
        tags: vec![],
        client_token: token,
        encrypted: None,
        kms_key_arn: None,
        timeout_minutes: 60,
    })
    .await
    .unwrap()
}

/// Writes `blocks` (index, bytes) into `id` and completes it.
async fn put_all(ebs: &MemoryEbs, id: &str, blocks: Vec<(u64, Vec<u8>)>) {
    let mut digests = BTreeMap::new();
    for (i, data) in blocks {
        let d: [u8; 32] = Sha256::digest(&data).into();
        ebs.put_snapshot_block(id, i, Bytes::from(data), &block_checksum(&d))
            .await
            .unwrap();
        digests.insert(i, d);
    }
    ebs.complete_snapshot(id, digests.len() as u64, &linear_checksum(digests.values()))
        .await
        .unwrap();
}

/// A completed snapshot on `parent` with `blocks` written.
async fn snapshot(ebs: &MemoryEbs, parent: Option<&str>, blocks: &[(u64, u8)]) -> String {
    let id = start(ebs, parent).await;
    put_all(
        ebs,
        &id,
        blocks.iter().map(|&(i, b)| (i, block(b))).collect(),
    )
    .await;
    id
}

/// The first `size` bytes of a snapshot (zeroes where it has no block).
fn content(ebs: &MemoryEbs, id: &str, size: u64) -> Vec<u8> {
    let mut all = ebs.read_all(id).unwrap();
    all.truncate(size as usize);
    all
}

async fn file_target(path: &Path, bytes: &[u8]) -> Target {
    std::fs::write(path, bytes).unwrap();
    Target::open(path.to_str().unwrap()).await.unwrap()
}

fn request(point: &str, snapshot: &str, site: Vec<(u64, u64)>) -> RoundRequest {
    RoundRequest {
        disk: disk(),
        point: point.into(),
        snapshot: snapshot.into(),
        site_changes: site,
        compare: false,
    }
}

const SIZE: u64 = 12 * BLOCK_SIZE + 4096; // the last block is partial

#[tokio::test]
async fn two_rounds_make_the_target_equal_each_snapshot_moving_only_what_changed() {
    let ebs = ebs();
    let tmp = tempfile::tempdir().unwrap();
    let point = snapshot(&ebs, None, &[(0, 1), (1, 1), (2, 1), (5, 1), (12, 0)]).await;
    // The instance's writes: two blocks rewritten, one new, one zeroed by a write of
    // zeroes, and the partial last block (zeroes past the disk's end, as a snapshot of
    // the disk has there).
    let r1 = snapshot(&ebs, Some(&point), &[(1, 2), (3, 2), (5, 0)]).await;
    let r1 = {
        let mut last = vec![0u8; B];
        last[..4096].fill(9);
        put_raw(&ebs, Some(&r1), 12, last).await
    };
    let path = tmp.path().join("site.raw");
    let target = file_target(&path, &content(&ebs, &point, SIZE)).await;
    let state = tmp.path().join("state");
    let opts = Options::default();

    let done = apply(
        &ebs,
        &target,
        &state,
        &request(&point, &r1, vec![]),
        &opts,
        &(),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), content(&ebs, &r1, SIZE));
    assert_eq!(done.len(), 1);
    let s = &done[0];
    assert_eq!(s.mode, Mode::Changed);
    // Blocks 1, 3, 5 (zeroes, written), 12 (partial): only those.
    assert_eq!(s.counters.blocks_written, 4, "{s:?}");
    assert_eq!(s.counters.bytes_written, 3 * BLOCK_SIZE + 4096);
    assert_eq!(s.counters.blocks_verified, 4);

    // Round 2: only what changed since round 1's snapshot.
    let r2 = snapshot(&ebs, Some(&r1), &[(7, 3)]).await;
    let done = apply(
        &ebs,
        &target,
        &state,
        &request(&point, &r2, vec![]),
        &opts,
        &(),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), content(&ebs, &r2, SIZE));
    assert_eq!(done[0].counters.blocks_written, 1);
    assert_eq!(done[0].base, r1);
    // Again: nothing to do.
    let done = apply(
        &ebs,
        &target,
        &state,
        &request(&point, &r2, vec![]),
        &opts,
        &(),
    )
    .await
    .unwrap();
    assert!(done.is_empty());
    let st = state::load(&state::path(&state, &disk())).unwrap().unwrap();
    assert_eq!(st.applied.as_deref(), Some(r2.as_str()));
    assert_eq!(st.rounds.len(), 2);
    assert!(st.round.is_none());
}

/// Writes one raw block (any bytes) into a new snapshot on `parent`.
async fn put_raw(ebs: &MemoryEbs, parent: Option<&str>, index: u64, data: Vec<u8>) -> String {
    let id = start(ebs, parent).await;
    put_all(ebs, &id, vec![(index, data)]).await;
    id
}

#[tokio::test]
async fn the_sites_own_changes_after_the_point_are_rewritten_from_the_snapshot() {
    let ebs = ebs();
    let tmp = tempfile::tempdir().unwrap();
    let point = snapshot(&ebs, None, &[(0, 1), (2, 1), (4, 1)]).await;
    let r1 = snapshot(&ebs, Some(&point), &[(0, 2)]).await;
    // The site kept running after the point: it wrote blocks 2 (the snapshot has it),
    // 6 and 7 (the snapshot has none: zeroes), none of which AWS changed.
    let mut site = content(&ebs, &point, SIZE);
    for i in [2usize, 6, 7] {
        site[i * B + 100..i * B + 300].fill(0xee);
    }
    let site_changes = vec![
        (2 * BLOCK_SIZE + 100, 200),
        (6 * BLOCK_SIZE, 2 * BLOCK_SIZE),
    ];
    for (with, name) in [(false, "without"), (true, "with")] {
        let path = tmp.path().join(format!("{name}.raw"));
        let target = file_target(&path, &site).await;
        let state = tmp.path().join(format!("state-{name}"));
        let req = request(
            &point,
            &r1,
            if with { site_changes.clone() } else { vec![] },
        );
        let done = apply(&ebs, &target, &state, &req, &Options::default(), &())
            .await
            .unwrap();
        let equal = std::fs::read(&path).unwrap() == content(&ebs, &r1, SIZE);
        // Without the site's changes the target keeps them: the feature is what fixes it.
        assert_eq!(equal, with, "{name} the site's changes");
        if with {
            assert_eq!(done[0].site_blocks, 3);
            assert_eq!(done[0].counters.bytes_zeroed, 2 * BLOCK_SIZE);
        }
    }
}

#[tokio::test]
async fn snapshots_of_different_lineages_fall_back_to_every_block_and_zeroes() {
    let ebs = ebs();
    let tmp = tempfile::tempdir().unwrap();
    let point = snapshot(&ebs, None, &[(0, 1), (1, 1)]).await;
    // An instance launched by the import method: its volumes come from other snapshots.
    let other = snapshot(&ebs, None, &[(1, 5), (4, 5), (9, 5)]).await;
    let path = tmp.path().join("site.raw");
    // Garbage everywhere: a full round leaves none of it.
    let target = file_target(&path, &vec![0x5a; SIZE as usize]).await;
    let done = apply(
        &ebs,
        &target,
        &tmp.path().join("state"),
        &request(&point, &other, vec![(0, 4096)]),
        &Options::default(),
        &(),
    )
    .await
    .unwrap();
    assert_eq!(done[0].mode, Mode::Full);
    assert_eq!(done[0].counters.blocks_written, 3);
    assert_eq!(std::fs::read(&path).unwrap(), content(&ebs, &other, SIZE));
}

#[tokio::test]
async fn a_target_smaller_than_the_snapshots_data_is_refused_and_nothing_is_claimed() {
    let ebs = ebs();
    let tmp = tempfile::tempdir().unwrap();
    let point = snapshot(&ebs, None, &[(0, 1)]).await;
    let r1 = snapshot(&ebs, Some(&point), &[(1, 2), (20, 2)]).await;
    let path = tmp.path().join("small.raw");
    let target = file_target(&path, &content(&ebs, &point, SIZE)).await;
    let state = tmp.path().join("state");
    let e = apply(
        &ebs,
        &target,
        &state,
        &request(&point, &r1, vec![]),
        &Options::default(),
        &(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, FailbackError::TooSmall { .. }), "{e}");
    assert!(e.to_string().contains("as large as the disk"), "{e}");
    let st = state::load(&state::path(&state, &disk())).unwrap().unwrap();
    assert_eq!(st.applied, None);
    // A site-change extent outside the disk, and another failback's state, are refused.
    let e = apply(
        &ebs,
        &target,
        &tmp.path().join("s2"),
        &request(&point, &r1, vec![(SIZE - 512, 1024)]),
        &Options::default(),
        &(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, FailbackError::SiteExtent { .. }), "{e}");
    let e = apply(
        &ebs,
        &target,
        &state,
        &request(&r1, &r1, vec![]),
        &Options::default(),
        &(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, FailbackError::OtherFailback { .. }), "{e}");
}

/// A round cut short (a failed GetSnapshotBlock, as a crash would) leaves every block
/// equal to the base's or the snapshot's; asked for a newer snapshot next, the applier
/// first finishes the interrupted round against its own snapshot, then the new one, and
/// the target equals the newest.
#[tokio::test]
async fn an_interrupted_round_is_finished_against_its_own_snapshot_first() {
    let ebs = ebs();
    let tmp = tempfile::tempdir().unwrap();
    let point = snapshot(&ebs, None, &[(0, 1), (1, 1), (2, 1), (3, 1)]).await;
    let r1 = snapshot(
        &ebs,
        Some(&point),
        &(0..12).map(|i| (i, 2)).collect::<Vec<_>>(),
    )
    .await;
    // R2 writes block 3 back to the point's bytes: its delta from R1 includes it, but
    // the delta from the point would not.
    let r2 = snapshot(&ebs, Some(&r1), &[(3, 1), (8, 4)]).await;
    let path = tmp.path().join("site.raw");
    let target = file_target(&path, &content(&ebs, &point, SIZE)).await;
    let state = tmp.path().join("state");
    let opts = Options {
        concurrency: 2,
        checkpoint_blocks: 2,
        call_attempts: 1,
        ..Options::default()
    };
    ebs.faults.add(Fault::on("GetSnapshotBlock").nth(7));
    let e = apply(
        &ebs,
        &target,
        &state,
        &request(&point, &r1, vec![]),
        &opts,
        &(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, FailbackError::Cloud(_)), "{e}");
    assert!(e.to_string().contains("resumes"), "{e}");
    let (base, snap, now) = (
        content(&ebs, &point, SIZE),
        content(&ebs, &r1, SIZE),
        std::fs::read(&path).unwrap(),
    );
    let mut partly = false;
    for (i, c) in now.chunks(B).enumerate() {
        let (a, b) = (&base[i * B..i * B + c.len()], &snap[i * B..i * B + c.len()]);
        assert!(
            c == a || c == b,
            "block {i} is neither the base's nor the snapshot's"
        );
        partly |= c == a && a != b;
    }
    assert!(partly, "the round was cut short");
    let st = state::load(&state::path(&state, &disk())).unwrap().unwrap();
    let round = st.round.clone().unwrap();
    assert_eq!(
        (round.snapshot.as_str(), round.phase),
        (r1.as_str(), Phase::Delta)
    );
    assert!(round.next_index > 0, "{round:?}");

    let done = apply(
        &ebs,
        &target,
        &state,
        &request(&point, &r2, vec![]),
        &opts,
        &(),
    )
    .await
    .unwrap();
    assert_eq!(done.len(), 2);
    assert_eq!(
        (done[0].snapshot.as_str(), done[1].snapshot.as_str()),
        (r1.as_str(), r2.as_str())
    );
    assert_eq!(std::fs::read(&path).unwrap(), content(&ebs, &r2, SIZE));
}

/// Throttling (ConcurrentLimitExceededException is not retried by the SDK) and 5xx are
/// retried with back-off; a round gives up only after `call_attempts`.
#[tokio::test]
async fn throttled_calls_are_retried() {
    let ebs = ebs();
    let tmp = tempfile::tempdir().unwrap();
    let point = snapshot(&ebs, None, &[(0, 1)]).await;
    let r1 = snapshot(&ebs, Some(&point), &[(1, 2), (2, 2)]).await;
    let path = tmp.path().join("site.raw");
    let target = file_target(&path, &content(&ebs, &point, SIZE)).await;
    let opts = Options {
        retry_base: std::time::Duration::from_millis(1),
        ..Options::default()
    };
    ebs.faults
        .add(Fault::on("GetSnapshotBlock").throttle().times(3));
    ebs.faults
        .add(Fault::on("ListChangedBlocks").nth(2).transient());
    let before = ebs.faults.calls("GetSnapshotBlock");
    apply(
        &ebs,
        &target,
        &tmp.path().join("s"),
        &request(&point, &r1, vec![]),
        &opts,
        &(),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), content(&ebs, &r1, SIZE));
    assert_eq!(ebs.faults.calls("GetSnapshotBlock") - before, 2 + 3);
    // Past the attempts: the error, and the round resumes next time.
    let r2 = snapshot(&ebs, Some(&r1), &[(3, 2)]).await;
    ebs.faults
        .add(Fault::on("GetSnapshotBlock").throttle().always());
    let e = apply(
        &ebs,
        &target,
        &tmp.path().join("s"),
        &request(&point, &r2, vec![]),
        &opts,
        &(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("throttled"), "{e}");
}

/// A drill fails back into a sparse copy of the site's disk: the copy ends equal to the
/// snapshot, the site's disk is untouched, and the copy kept its holes.
#[tokio::test]
async fn a_drill_fails_back_into_a_sparse_copy_and_leaves_the_site_alone() {
    use std::os::unix::fs::MetadataExt;
    let ebs = ebs();
    let tmp = tempfile::tempdir().unwrap();
    let point = snapshot(&ebs, None, &[(0, 1), (9, 1)]).await;
    let r1 = snapshot(&ebs, Some(&point), &[(3, 2)]).await;
    let site = tmp.path().join("site.raw");
    {
        let f = std::fs::File::create(&site).unwrap();
        f.set_len(SIZE).unwrap();
        use std::os::unix::fs::FileExt;
        for i in [0u64, 9] {
            f.write_all_at(&block(1), i * BLOCK_SIZE).unwrap();
        }
    }
    let before = std::fs::read(&site).unwrap();
    let drill = tmp.path().join("drill.raw");
    let copied = crate::target::sparse_copy(&site, &drill).unwrap();
    assert_eq!(copied, 2 * BLOCK_SIZE);
    assert!(
        crate::target::sparse_copy(&site, &drill).is_err(),
        "never over a file"
    );
    let target = Target::open(drill.to_str().unwrap()).await.unwrap();
    apply(
        &ebs,
        &target,
        &tmp.path().join("s"),
        &request(&point, &r1, vec![]),
        &Options::default(),
        &(),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&drill).unwrap(), content(&ebs, &r1, SIZE));
    assert_eq!(std::fs::read(&site).unwrap(), before);
    let allocated = std::fs::metadata(&drill).unwrap().blocks() * 512;
    assert!(
        allocated <= 4 * BLOCK_SIZE,
        "the copy kept its holes ({allocated} bytes allocated)"
    );
}

/// The state's first format loads (golden file: fields only ever grow).
#[test]
fn the_first_state_format_loads() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/state-v1.json");
    let st = state::load(&golden).unwrap().unwrap();
    assert_eq!(st.disk, disk());
    assert_eq!(st.point, "snap-0123456789abcdef0");
    let r = st.round.unwrap();
    assert_eq!(
        (r.mode, r.phase, r.next_index),
        (Some(Mode::Changed), Phase::Delta, 42)
    );
    assert_eq!(st.rounds[0].counters.blocks_written, 300);
}

mod model {
    //! Random snapshots, random cuts: the target always ends equal to the newest.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn rounds_with_random_cuts_converge_on_the_newest_snapshot(
            point in proptest::collection::btree_map(0u64..12, 1u8..4, 0..8),
            chain in proptest::collection::vec(proptest::collection::btree_map(0u64..12, 0u8..6, 0..6), 1..4),
            site in proptest::collection::vec((0u64..12, 1u64..3), 0..3),
            cuts in proptest::collection::vec(1u64..20, 0..3),
            unrelated in any::<bool>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let ebs = ebs();
                let tmp = tempfile::tempdir().unwrap();
                let size = 12 * BLOCK_SIZE;
                let p: Vec<(u64, u8)> = point.into_iter().collect();
                let point = snapshot(&ebs, None, &p).await;
                let mut site_disk = content(&ebs, &point, size);
                let site: Vec<(u64, u64)> = site.iter().map(|&(i, n)| {
                    let n = n.min(12 - i);
                    site_disk[(i * BLOCK_SIZE) as usize..((i + n) * BLOCK_SIZE) as usize].fill(0xcc);
                    (i * BLOCK_SIZE, n * BLOCK_SIZE)
                }).collect();
                let path = tmp.path().join("t.raw");
                let target = file_target(&path, &site_disk).await;
                let state = tmp.path().join("state");
                let opts = Options { concurrency: 3, checkpoint_blocks: 2, call_attempts: 1, ..Options::default() };
                let mut parent = if unrelated { None } else { Some(point.clone()) };
                let mut cuts = cuts.into_iter();
                for blocks in chain {
                    let b: Vec<(u64, u8)> = blocks.into_iter().collect();
                    let snap = snapshot(&ebs, parent.as_deref(), &b).await;
                    if let Some(n) = cuts.next() {
                        ebs.faults.add(Fault::on("GetSnapshotBlock").nth(ebs.faults.calls("GetSnapshotBlock") + n));
                        let _ = apply(&ebs, &target, &state, &request(&point, &snap, site.clone()), &opts, &()).await;
                        ebs.faults.clear();
                    }
                    apply(&ebs, &target, &state, &request(&point, &snap, site.clone()), &opts, &()).await.unwrap();
                    assert_eq!(std::fs::read(&path).unwrap(), content(&ebs, &snap, size));
                    parent = Some(snap);
                }
            });
        }

        /// A site that ran after the point without change tracking (`compare`): its
        /// unknown writes (some equal to what was there, some zeroes) are found by
        /// comparing every block, and only differing blocks are written or zeroed.
        #[test]
        fn a_compared_first_round_writes_exactly_the_differing_blocks(
            point in proptest::collection::btree_map(0u64..12, 1u8..4, 0..8),
            unknown in proptest::collection::btree_map(0u64..12, 0u8..4, 0..6),
            instance in proptest::collection::btree_map(0u64..12, 0u8..6, 0..6),
            cut in proptest::option::of(1u64..12),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let ebs = ebs();
                let tmp = tempfile::tempdir().unwrap();
                let size = 12 * BLOCK_SIZE;
                let p: Vec<(u64, u8)> = point.into_iter().collect();
                let point = snapshot(&ebs, None, &p).await;
                let mut site_disk = content(&ebs, &point, size);
                for (&i, &b) in &unknown {
                    let at = (i * BLOCK_SIZE) as usize;
                    site_disk[at..at + B].copy_from_slice(&block(b));
                }
                let b: Vec<(u64, u8)> = instance.into_iter().collect();
                let snap = snapshot(&ebs, Some(&point), &b).await;
                let want = content(&ebs, &snap, size);
                let held: std::collections::BTreeSet<u64> =
                    ebs.list_snapshot_blocks(&snap).await.unwrap().iter().map(|b| b.index).collect();
                let differs = |i: u64| {
                    let r = (i * BLOCK_SIZE) as usize..((i + 1) * BLOCK_SIZE) as usize;
                    site_disk[r.clone()] != want[r]
                };
                let written = (0..12).filter(|&i| held.contains(&i) && differs(i)).count() as u64;
                let zeroed = (0..12).filter(|&i| !held.contains(&i) && differs(i)).count() as u64 * BLOCK_SIZE;
                let path = tmp.path().join("t.raw");
                let target = file_target(&path, &site_disk).await;
                let state = tmp.path().join("state");
                let opts = Options { concurrency: 3, checkpoint_blocks: 2, call_attempts: 1, ..Options::default() };
                let mut req = request(&point, &snap, vec![]);
                req.compare = true;
                let mut rounds = Vec::new();
                if let Some(n) = cut {
                    ebs.faults.add(Fault::on("GetSnapshotBlock").nth(ebs.faults.calls("GetSnapshotBlock") + n));
                    if let Ok(r) = apply(&ebs, &target, &state, &req, &opts, &()).await {
                        rounds.extend(r);
                    }
                    ebs.faults.clear();
                }
                rounds.extend(apply(&ebs, &target, &state, &req, &opts, &()).await.unwrap());
                assert_eq!(std::fs::read(&path).unwrap(), want);
                assert_eq!(rounds.len(), 1, "{rounds:?}");
                assert_eq!(rounds[0].mode, Mode::Compared);
                if cut.is_none() {
                    // Resumed rounds may rewrite blocks past their last mark.
                    assert_eq!(rounds[0].counters.blocks_written, written);
                    assert_eq!(rounds[0].counters.bytes_zeroed, zeroed);
                    let c = &rounds[0].counters;
                    assert_eq!(c.blocks_written + c.blocks_same + c.bytes_zeroed / BLOCK_SIZE, 12, "every block looked at once");
                }
            });
        }
    }
}

#[tokio::test]
async fn a_second_round_of_the_same_disk_is_refused_while_one_runs() {
    let ebs = ebs();
    let tmp = tempfile::tempdir().unwrap();
    let point = snapshot(&ebs, None, &[(0, 1)]).await;
    let r1 = snapshot(&ebs, Some(&point), &[(1, 2)]).await;
    let path = tmp.path().join("site.raw");
    let target = file_target(&path, &content(&ebs, &point, SIZE)).await;
    let state = tmp.path().join("state");
    // A round under way holds the disk's lock.
    let held = crate::state::lock(&crate::state::path(&state, &disk())).unwrap();
    let before = std::fs::read(&path).unwrap();
    let e = apply(
        &ebs,
        &target,
        &state,
        &request(&point, &r1, vec![]),
        &Options::default(),
        &(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, FailbackError::Busy { .. }), "{e}");
    assert!(e.to_string().contains("another failback round"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
    drop(held);
    apply(
        &ebs,
        &target,
        &state,
        &request(&point, &r1, vec![]),
        &Options::default(),
        &(),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), content(&ebs, &r1, SIZE));
}

#[tokio::test]
async fn the_whole_disk_check_finds_a_change_no_round_knew_of() {
    let ebs = ebs();
    let tmp = tempfile::tempdir().unwrap();
    let point = snapshot(&ebs, None, &[(0, 1), (4, 2)]).await;
    let r1 = snapshot(&ebs, Some(&point), &[(1, 3), (4, 0)]).await;
    let path = tmp.path().join("site.raw");
    let target = file_target(&path, &content(&ebs, &point, SIZE)).await;
    let state = tmp.path().join("state");
    apply(
        &ebs,
        &target,
        &state,
        &request(&point, &r1, vec![]),
        &Options::default(),
        &(),
    )
    .await
    .unwrap();
    let w = crate::whole_disk_sha256(&ebs, &target, &r1).await.unwrap();
    assert!(w.equal(), "{w:?}");
    assert_eq!(
        w.target,
        hex::encode(Sha256::digest(content(&ebs, &r1, SIZE)))
    );
    // A write the rounds never heard of (the last, partial block too).
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&[7], SIZE - 1)
        .unwrap();
    let w = crate::whole_disk_sha256(&ebs, &target, &r1).await.unwrap();
    assert!(!w.equal());
}
