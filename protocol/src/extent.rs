//! Byte ranges on a disk and the alignment rules of protocol v1.

use serde::{Deserialize, Serialize};

/// Every offset and length in protocol v1 is a multiple of this (one disk sector).
pub const SECTOR_SIZE: u64 = 512;

/// Large extents are split into objects at multiples of this absolute offset, so the
/// same changed area always yields the same object keys, run after run.
pub const SPLIT_ALIGN: u64 = 512 * 1024;

/// A byte range `[offset, offset + length)` of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    pub const fn new(offset: u64, length: u64) -> Self {
        Self { offset, length }
    }

    /// The end offset, or `None` when `offset + length` overflows `u64`.
    pub fn checked_end(&self) -> Option<u64> {
        self.offset.checked_add(self.length)
    }

    /// The end offset. Only for extents already known not to overflow.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    pub fn is_sector_aligned(&self) -> bool {
        self.offset.is_multiple_of(SECTOR_SIZE) && self.length.is_multiple_of(SECTOR_SIZE)
    }
}

impl std::fmt::Display for Extent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, +{})", self.offset, self.length)
    }
}

/// Merges extents that touch or overlap into one. Input must be sorted by offset.
pub fn coalesce(sorted: impl IntoIterator<Item = Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in sorted {
        if e.length == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if e.offset <= last.end() => {
                let end = last.end().max(e.end());
                last.length = end - last.offset;
            }
            _ => out.push(e),
        }
    }
    out
}

/// Splits an extent into pieces of at most `max_len` bytes whose inner boundaries fall on
/// multiples of `align` (absolute offsets). `max_len` must be a non-zero multiple of
/// `align`.
pub fn split(extent: Extent, max_len: u64, align: u64) -> Vec<Extent> {
    debug_assert!(align > 0 && max_len >= align && max_len.is_multiple_of(align));
    let mut out = Vec::new();
    let mut pos = extent.offset;
    let end = extent.end();
    while pos < end {
        // The furthest aligned boundary within max_len of pos.
        let limit = pos.saturating_add(max_len);
        let cut = if limit >= end {
            end
        } else {
            let aligned = limit - limit % align;
            if aligned > pos {
                aligned
            } else {
                limit
            }
        };
        out.push(Extent::new(pos, cut - pos));
        pos = cut;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn coalesce_merges_touching_and_overlapping() {
        let v = coalesce([
            Extent::new(0, 512),
            Extent::new(512, 512),
            Extent::new(2048, 512),
            Extent::new(2048, 1024),
        ]);
        assert_eq!(v, vec![Extent::new(0, 1024), Extent::new(2048, 1024)]);
    }

    #[test]
    fn split_cuts_on_alignment() {
        let mib = 1 << 20;
        // Starts off a boundary: first piece ends at the first boundary past max_len.
        let pieces = split(Extent::new(512, 20 * mib), 8 * mib, SPLIT_ALIGN);
        assert_eq!(pieces[0], Extent::new(512, 8 * mib - 512));
        assert!(pieces.iter().all(|p| p.length <= 8 * mib));
        assert!(pieces[1..].iter().all(|p| p.offset % SPLIT_ALIGN == 0));
        assert_eq!(pieces.iter().map(|p| p.length).sum::<u64>(), 20 * mib);
    }

    proptest! {
        #[test]
        fn split_covers_exactly(offset in 0u64..1<<40, len in 1u64..1<<30, k in 1u64..32) {
            let offset = offset / 512 * 512;
            let len = (len / 512 + 1) * 512;
            let max = k * SPLIT_ALIGN;
            let pieces = split(Extent::new(offset, len), max, SPLIT_ALIGN);
            let mut pos = offset;
            for (i, p) in pieces.iter().enumerate() {
                prop_assert_eq!(p.offset, pos);
                prop_assert!(p.length > 0 && p.length <= max);
                if i > 0 { prop_assert_eq!(p.offset % SPLIT_ALIGN, 0); }
                pos = p.end();
            }
            prop_assert_eq!(pos, offset + len);
        }
    }
}
