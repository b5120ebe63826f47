//! After the cutover: where the site's disk may differ from the disk as it was at the
//! recovery point, so that protection resumes with one incremental generation instead of
//! a full upload. The sender adds the generations it sent after the point (the replica
//! holds them, the site's disk went back to the point's bytes there) and sends that
//! union, read from the site's disk.

use crate::state::{FailbackState, Mode};
use crate::FailbackError;
use pilotlight_cloud::ebs::{EbsApi, BLOCK_SIZE};
use pilotlight_protocol::extent::coalesce;
use pilotlight_protocol::Extent;

/// Byte extents `(offset, length)`, sorted and merged, clipped to `size`.
pub fn merge(extents: impl IntoIterator<Item = (u64, u64)>, size: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<Extent> = extents
        .into_iter()
        .map(|(o, l)| Extent::new(o.min(size), o.saturating_add(l).min(size) - o.min(size)))
        .collect();
    v.sort_unstable();
    coalesce(v)
        .into_iter()
        .map(|e| (e.offset, e.length))
        .collect()
}

/// Where the site's disk, after the failback's last round, may differ from the point:
/// the blocks the recovered instance changed (ListChangedBlocks from the point to the
/// last round's snapshot; the whole disk when a round crossed lineages) and the site's
/// own changes after the point (the first round's list). Fails unless a round finished
/// and none is under way.
pub async fn changed_since_point<E: EbsApi>(
    ebs: &E,
    st: &FailbackState,
    size: u64,
) -> Result<Vec<(u64, u64)>, FailbackError> {
    let (Some(last), None) = (&st.applied, &st.round) else {
        return Err(FailbackError::NotFinished {
            disk: st.disk.to_string(),
            why: if st.round.is_some() {
                "a round is under way: run failback again to finish it".into()
            } else {
                "no round finished yet".into()
            },
        });
    };
    let to_bytes = |(s, e): (u64, u64)| (s * BLOCK_SIZE, (e - s) * BLOCK_SIZE);
    let site = st
        .rounds
        .iter()
        .flat_map(|r| r.site.iter().copied())
        .map(to_bytes);
    if st.rounds.iter().any(|r| r.mode == Mode::Full) {
        return Ok(merge([(0, size)], size));
    }
    let blocks: Vec<(u64, u64)> = ebs
        .list_changed_blocks(&st.point, last)
        .await?
        .iter()
        .map(|b| (b.index, b.index + 1))
        .collect();
    Ok(merge(blocks.into_iter().map(to_bytes).chain(site), size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// `merge` covers exactly the bytes the extents cover, inside the disk, in order
        /// and without overlaps or touching neighbours.
        #[test]
        fn merge_covers_exactly_the_union(
            extents in proptest::collection::vec((0u64..200, 0u64..50), 0..20),
            size in 1u64..220,
        ) {
            let mut model = vec![false; size as usize];
            for &(o, l) in &extents {
                for b in o..(o + l).min(size) {
                    model[b as usize] = true;
                }
            }
            let merged = merge(extents.clone(), size);
            let mut got = vec![false; size as usize];
            let mut last_end = None;
            for &(o, l) in &merged {
                prop_assert!(l > 0 && o + l <= size);
                if let Some(e) = last_end {
                    prop_assert!(o > e, "{merged:?}");
                }
                last_end = Some(o + l);
                for b in o..o + l {
                    got[b as usize] = true;
                }
            }
            prop_assert_eq!(got, model);
        }
    }
}
