//! Staging a generation's point: right after the generation is applied (the image
//! fsynced), the 512 KiB blocks its point needs are copied out of the image into a
//! sparse file of the disk's size, at the same offsets, and fsynced, before the state
//! says "applied". The point is then written from that file, and the image may take the
//! next generation at once (#35). Only a child point, or a fresh image's first
//! generation, is staged (a full point of an image with older generations reads the
//! whole image), and only up to `PointsConfig::stage_max_bytes` per disk.

use crate::points::PointDue;
use crate::state::{DiskState, PointRecord};
use pilotlight_cloud::ebs::BLOCK_SIZE;
use pilotlight_durable::sparse::data_segments;
use pilotlight_protocol::Extent;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Whether `due` (the point of the generation just applied on top of `st`) is to be
/// staged: it builds on the newest point written or due, or it is the disk's first
/// generation (a fresh image holds nothing else: its full point is its own blocks), and
/// with the disk's points staged already it holds at most `max_bytes`.
pub fn should_stage(st: &DiskState, due: &PointDue, first: bool, max_bytes: u64) -> bool {
    let newest = st
        .newest_due()
        .map(|p| p.generation)
        .or_else(|| st.points.iter().map(|p: &PointRecord| p.generation).max());
    let staged: u64 = st
        .point_due
        .iter()
        .chain(&st.points_queued)
        .filter(|p| p.staged)
        .map(bytes)
        .fold(0, u64::saturating_add);
    let first_point = first && st.points.is_empty() && st.newest_due().is_none();
    let child = due.parent_generation.is_some() && due.parent_generation == newest;
    !st.points_need_full && (child || first_point) && staged.saturating_add(bytes(due)) <= max_bytes
}

/// The bytes of a point's blocks.
fn bytes(due: &PointDue) -> u64 {
    due.blocks
        .iter()
        .map(|(s, e)| e.saturating_sub(*s).saturating_mul(BLOCK_SIZE))
        .fold(0, u64::saturating_add)
}

/// Copies `due`'s blocks from `image` into `staged` (made anew) and fsyncs it and its
/// directory. Only the image's data segments are read and written: its holes stay
/// holes (they read back as zeroes; a full point skips them as it skips the image's).
pub fn stage(image: &Path, staged: &Path, due: &PointDue) -> std::io::Result<()> {
    let dir = staged.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let src = std::fs::File::open(image)?;
    let dst = std::fs::File::create(staged)?;
    dst.set_len(due.disk_size)?;
    let mut buf = vec![0u8; COPY_CHUNK];
    for &(s, e) in &due.blocks {
        let start = s.saturating_mul(BLOCK_SIZE).min(due.disk_size);
        let end = e.saturating_mul(BLOCK_SIZE).min(due.disk_size);
        if start >= end {
            continue;
        }
        for seg in data_segments(&src, Extent::new(start, end - start))? {
            let mut at = seg.offset;
            while at < seg.end() {
                let n = (seg.end() - at).min(COPY_CHUNK as u64) as usize;
                src.read_exact_at(&mut buf[..n], at)?;
                dst.write_all_at(&buf[..n], at)?;
                at += n as u64;
            }
        }
    }
    dst.sync_all()?;
    std::fs::File::open(dir)?.sync_all()
}

const COPY_CHUNK: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn due(generation: u64, parent: Option<u64>, blocks: Vec<(u64, u64)>) -> PointDue {
        PointDue {
            generation,
            parent_generation: parent,
            snapshot_time: Utc::now(),
            consistency: pilotlight_protocol::Consistency::Crash,
            change_id: None,
            disk_size: 3 * BLOCK_SIZE + 4096,
            blocks,
            attempt: 0,
            snapshot_id: None,
            sealed: false,
            parent_snapshot: None,
            token_salt: None,
            staged: false,
        }
    }

    #[test]
    fn staged_blocks_hold_the_image_at_their_offsets_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("i.raw");
        let d = due(2, Some(1), vec![(1, 2), (3, 4)]);
        let mut bytes: Vec<u8> = (0..d.disk_size).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&image, &bytes).unwrap();
        // A hole in the image inside a staged block: staged as a hole, read as zeroes.
        let hole = BLOCK_SIZE as usize + 64 * 1024;
        bytes[hole..hole + 64 * 1024].fill(0);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        pilotlight_durable::sparse::punch_or_zero(&f, hole as u64, 64 * 1024).unwrap();
        let staged = tmp.path().join("points").join("2.raw");
        stage(&image, &staged, &d).unwrap();
        let got = std::fs::read(&staged).unwrap();
        assert_eq!(got.len() as u64, d.disk_size);
        let b = BLOCK_SIZE as usize;
        assert_eq!(&got[b..2 * b], &bytes[b..2 * b]);
        // The last block is partial: the disk ends 4 KiB into it.
        assert_eq!(&got[3 * b..], &bytes[3 * b..]);
        assert!(
            got[..b].iter().all(|&x| x == 0),
            "untouched blocks stay holes"
        );
        assert!(got[2 * b..3 * b].iter().all(|&x| x == 0));
    }

    #[test]
    fn only_a_child_of_the_newest_point_within_the_cap_is_staged() {
        let mut st = DiskState::new(&pilotlight_protocol::DiskId::new("s", "v", "d").unwrap());
        let d2 = due(2, Some(1), vec![(0, 2)]);
        // No point yet: a full point, read from the image, unless it is the disk's
        // first generation (the image holds nothing else).
        assert!(!should_stage(&st, &d2, false, 1 << 30));
        let base = due(1, None, vec![(0, 8)]);
        assert!(should_stage(&st, &base, true, 1 << 30));
        assert!(
            !should_stage(&st, &base, false, 1 << 30),
            "a base on an older image"
        );
        st.point_due = Some(due(1, None, vec![(0, 4)]));
        assert!(should_stage(&st, &d2, false, 1 << 30));
        assert!(!should_stage(&st, &d2, false, BLOCK_SIZE), "over the cap");
        // A base on top: full.
        assert!(!should_stage(
            &st,
            &due(2, None, vec![(0, 2)]),
            false,
            1 << 30
        ));
        // A point given up: the next is full.
        st.points_need_full = true;
        assert!(!should_stage(&st, &d2, false, 1 << 30));
        st.points_need_full = false;
        // Queued points: the newest queued is the parent.
        st.points_queued.push(due(2, Some(1), vec![(0, 1)]));
        assert!(
            !should_stage(&st, &d2, false, 1 << 30),
            "parent is 1, newest due is 2"
        );
        assert!(should_stage(
            &st,
            &due(3, Some(2), vec![(0, 1)]),
            false,
            1 << 30
        ));
        // The disk's staged points count against the cap.
        st.points_queued[0].staged = true;
        let d3 = due(3, Some(2), vec![(0, 1)]);
        assert!(
            should_stage(&st, &d3, false, 2 * BLOCK_SIZE),
            "staged: 1 block, this one: 1"
        );
        st.points_queued[0].blocks = vec![(0, 2)];
        assert!(
            !should_stage(&st, &d3, false, 2 * BLOCK_SIZE),
            "staged: 2 blocks already"
        );
    }
}
