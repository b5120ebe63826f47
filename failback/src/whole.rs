//! The optional whole-disk check after a final round: the SHA-256 of every byte of the
//! target against the SHA-256 of the snapshot's bytes over the same length (its blocks,
//! zeroes where it has none). It reads the whole target and every block of the snapshot
//! (GetSnapshotBlock: the egress of a full copy), so it is opt-in.

use crate::{FailbackError, Target};
use pilotlight_cloud::ebs::{EbsApi, BLOCK_SIZE};
use sha2::{Digest, Sha256};

/// Both digests, hex: `(target, snapshot)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WholeDisk {
    pub target: String,
    pub snapshot: String,
}

impl WholeDisk {
    pub fn equal(&self) -> bool {
        self.target == self.snapshot
    }
}

/// Hashes the target and the snapshot over the target's size, block by block in order.
pub async fn whole_disk_sha256<E: EbsApi>(
    ebs: &E,
    target: &Target,
    snapshot: &str,
) -> Result<WholeDisk, FailbackError> {
    let size = target.size();
    let blocks = size.div_ceil(BLOCK_SIZE);
    let listed = ebs.list_snapshot_blocks(snapshot).await?;
    let mut listed = listed.into_iter().filter(|b| b.index < blocks).peekable();
    let (mut t, mut s) = (Sha256::new(), Sha256::new());
    let zero = vec![0u8; BLOCK_SIZE as usize];
    for i in 0..blocks {
        let off = i * BLOCK_SIZE;
        let len = (size - off).min(BLOCK_SIZE) as usize;
        t.update(target.read(off, len).await?);
        match listed.next_if(|b| b.index == i) {
            Some(b) => {
                let data = ebs.get_snapshot_block(snapshot, &b).await?;
                if data.len() < len {
                    return Err(FailbackError::BadBlock {
                        snapshot: snapshot.into(),
                        index: i,
                        len: data.len(),
                    });
                }
                s.update(&data[..len]);
            }
            None => s.update(&zero[..len]),
        }
    }
    Ok(WholeDisk {
        target: hex::encode(t.finalize()),
        snapshot: hex::encode(s.finalize()),
    })
}
