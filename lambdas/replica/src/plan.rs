//! Which 512 KiB blocks a generation's point writes, how they are cut into shards, and how
//! one block is made from the generation's bytes and, where it touches the block only
//! partly, the parent point's block. Pure: no I/O, deterministic, so every invocation
//! that plans the same manifest gets the same shards.

use pilotlight_cloud::ebs::BLOCK_SIZE;
use pilotlight_protocol::{Extent, Manifest};
use std::collections::BTreeSet;
use std::ops::Range;

/// One disk range of a generation: bytes of object `object` from `at` in its decoded
/// bytes, or zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub extent: Extent,
    /// `None`: a zero range.
    pub object: Option<usize>,
    pub at: u64,
}

/// Everything a generation writes, sorted by disk offset (the manifest guarantees the
/// ranges are disjoint).
#[derive(Debug, Clone)]
pub struct Layout {
    pub parts: Vec<Part>,
    pub disk_size: u64,
}

impl Layout {
    pub fn of(m: &Manifest) -> Layout {
        let mut parts = Vec::new();
        for (i, o) in m.objects.iter().enumerate() {
            let mut at = 0;
            for e in o.parts() {
                parts.push(Part {
                    extent: e,
                    object: Some(i),
                    at,
                });
                at += e.length;
            }
        }
        parts.extend(m.zero_ranges.iter().map(|&z| Part {
            extent: z,
            object: None,
            at: 0,
        }));
        parts.sort_unstable_by_key(|p| p.extent.offset);
        Layout {
            parts,
            disk_size: m.disk_size,
        }
    }

    /// The parts that overlap `[lo, hi)`, in disk order.
    pub fn within(&self, lo: u64, hi: u64) -> impl Iterator<Item = &Part> + '_ {
        let first = self.parts.partition_point(|p| p.extent.end() <= lo);
        self.parts[first..]
            .iter()
            .take_while(move |p| p.extent.offset < hi)
    }

    /// The disk bytes of block `i` (the last block of a disk may be short).
    pub fn block_span(&self, i: u64) -> (u64, u64) {
        let lo = i * BLOCK_SIZE;
        (lo, (lo + BLOCK_SIZE).min(self.disk_size))
    }

    /// True when the generation writes every byte of block `i` that lies on the disk: the
    /// parent's block is not needed.
    pub fn covers(&self, i: u64) -> bool {
        let (lo, hi) = self.block_span(i);
        let mut pos = lo;
        for p in self.within(lo, hi) {
            if p.extent.offset > pos {
                return false;
            }
            pos = pos.max(p.extent.end());
        }
        pos >= hi
    }

    /// The objects whose bytes land in blocks `[first, last]`.
    pub fn objects_in(&self, first: u64, last: u64) -> BTreeSet<usize> {
        let (lo, hi) = (first * BLOCK_SIZE, (last + 1) * BLOCK_SIZE);
        self.within(lo, hi).filter_map(|p| p.object).collect()
    }
}

/// The blocks a point writes, ascending: for a full point (no parent) those the objects
/// touch (the rest of a base is zeroes, which a new snapshot already reads as); for a
/// child every block the objects or zero ranges touch (it would inherit the parent's
/// bytes otherwise).
pub fn touched_blocks(layout: &Layout, full: bool) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for p in &layout.parts {
        if full && p.object.is_none() {
            continue;
        }
        let first = p.extent.offset / BLOCK_SIZE;
        let end = p.extent.end().div_ceil(BLOCK_SIZE);
        let from = match out.last() {
            Some(&l) if l >= first => l + 1,
            _ => first,
        };
        out.extend(from..end);
    }
    out
}

/// How a point's blocks are cut into shards: at most `max_blocks` blocks each, and a new
/// shard once the objects a shard needs reach `max_bytes` (what one invocation holds in
/// memory), whichever comes first. Ranges of indices into [`touched_blocks`].
pub fn shards(
    layout: &Layout,
    m: &Manifest,
    blocks: &[u64],
    max_blocks: u64,
    max_bytes: u64,
) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    let mut seen: BTreeSet<usize> = BTreeSet::new();
    for (n, &i) in blocks.iter().enumerate() {
        let (lo, hi) = layout.block_span(i);
        let new: Vec<usize> = layout
            .within(lo, hi)
            .filter_map(|p| p.object)
            .filter(|o| !seen.contains(o))
            .collect();
        let add: u64 = new.iter().map(|&o| m.objects[o].length).sum();
        let full = (n - start) as u64 >= max_blocks.max(1);
        if n > start && (full || bytes + add > max_bytes) {
            out.push(start..n);
            start = n;
            seen.clear();
            // The block's objects count towards the new shard.
            let all: Vec<usize> = layout.within(lo, hi).filter_map(|p| p.object).collect();
            bytes = all.iter().map(|&o| m.objects[o].length).sum();
            seen.extend(all);
            continue;
        }
        bytes += add;
        seen.extend(new);
    }
    if start < blocks.len() {
        out.push(start..blocks.len());
    }
    out
}

/// Block `i` of the point: the parent's block (or zeroes), the generation's parts laid
/// over it, zeroes past the disk's end. `object` gives an object's decoded bytes (each
/// verified before it gets here); `None` for one the caller does not hold is a bug the
/// caller reports, never bytes made up.
pub fn compose<'a>(
    layout: &Layout,
    i: u64,
    parent: Option<&[u8]>,
    object: impl Fn(usize) -> Option<&'a [u8]>,
) -> Result<Vec<u8>, usize> {
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    let (lo, hi) = layout.block_span(i);
    if let Some(p) = parent {
        let n = ((hi - lo) as usize).min(p.len());
        block[..n].copy_from_slice(&p[..n]);
    }
    for p in layout.within(lo, hi) {
        let from = p.extent.offset.max(lo);
        let to = p.extent.end().min(hi);
        let dst = &mut block[(from - lo) as usize..(to - lo) as usize];
        match p.object {
            None => dst.fill(0),
            Some(o) => {
                let data = object(o).ok_or(o)?;
                let at = (p.at + (from - p.extent.offset)) as usize;
                let src = data.get(at..at + dst.len()).ok_or(o)?;
                dst.copy_from_slice(src);
            }
        }
    }
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pilotlight_protocol::{DataObject, DiskId, Encoding, Sha256Hex};

    const K: u64 = 1024;

    fn manifest(size: u64, objects: Vec<DataObject>, zeros: Vec<Extent>) -> Manifest {
        let mut m = Manifest::new(
            DiskId::new("s", "v", "d").unwrap(),
            2,
            Some(1),
            size,
            chrono::Utc::now(),
            "test",
        );
        m.objects = objects;
        m.zero_ranges = zeros;
        m
    }

    fn obj(pieces: &[(u64, u64)]) -> DataObject {
        let len = pieces.iter().map(|p| p.1).sum();
        DataObject {
            offset: pieces[0].0,
            length: len,
            encoding: Encoding::Raw,
            stored_length: len,
            sha256: Sha256Hex([0; 32]),
            pieces: if pieces.len() > 1 {
                pieces.iter().map(|&(o, l)| Extent::new(o, l)).collect()
            } else {
                vec![]
            },
        }
    }

    #[test]
    fn a_child_writes_every_touched_block_a_base_only_the_data_blocks() {
        let m = manifest(
            4 * BLOCK_SIZE,
            vec![obj(&[(0, 4 * K), (2 * BLOCK_SIZE + 512, 512)])],
            vec![Extent::new(BLOCK_SIZE, BLOCK_SIZE)],
        );
        let l = Layout::of(&m);
        assert_eq!(touched_blocks(&l, false), vec![0, 1, 2]);
        assert_eq!(touched_blocks(&l, true), vec![0, 2]);
        assert!(!l.covers(0) && l.covers(1) && !l.covers(2) && !l.covers(3));
    }

    #[test]
    fn compose_lays_the_generation_over_the_parent_and_zeroes_past_the_end() {
        // A disk of 1.5 blocks: block 1 has 256 KiB on the disk.
        let size = BLOCK_SIZE + BLOCK_SIZE / 2;
        let m = manifest(
            size,
            vec![obj(&[(BLOCK_SIZE + 4 * K, 4 * K)])],
            vec![Extent::new(BLOCK_SIZE, 4 * K)],
        );
        let l = Layout::of(&m);
        let data = vec![7u8; 4096];
        let parent = vec![1u8; BLOCK_SIZE as usize];
        let b = compose(&l, 1, Some(&parent), |_| Some(&data[..])).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..8192].iter().all(|&x| x == 7));
        assert!(b[8192..(BLOCK_SIZE / 2) as usize].iter().all(|&x| x == 1));
        assert!(b[(BLOCK_SIZE / 2) as usize..].iter().all(|&x| x == 0));
        assert_eq!(
            compose(&l, 1, None, |_| None),
            Err(0),
            "a missing object is reported"
        );
    }

    #[test]
    fn shards_close_at_the_block_count_or_the_bytes_an_invocation_holds() {
        let objects: Vec<DataObject> = (0..8)
            .map(|i| obj(&[(i * BLOCK_SIZE, BLOCK_SIZE)]))
            .collect();
        let m = manifest(8 * BLOCK_SIZE, objects, vec![]);
        let l = Layout::of(&m);
        let blocks = touched_blocks(&l, false);
        assert_eq!(shards(&l, &m, &blocks, 3, u64::MAX), vec![0..3, 3..6, 6..8]);
        assert_eq!(
            shards(&l, &m, &blocks, 100, 2 * BLOCK_SIZE),
            vec![0..2, 2..4, 4..6, 6..8]
        );
        let one = shards(&l, &m, &blocks, 100, u64::MAX);
        assert_eq!(one, vec![0..8]);
        assert!(shards(&l, &m, &[], 3, 10).is_empty());
    }
}
