//! Reading a recovery point back as a user's tools would: ListSnapshotBlocks (every page)
//! and GetSnapshotBlock of that one snapshot, its inherited blocks included (the emulator
//! keeps parent chains through the test kit's moto extension).

use pilotlight_cloud::ebs::{EbsApi, SdkEbs};

const BLOCK: usize = 512 * 1024;

/// The first `size` bytes of `snapshot`'s disk (blocks past `size` are left out).
pub async fn read_back(ebs: &SdkEbs, snapshot: &str, size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size];
    for b in ebs
        .list_snapshot_blocks(snapshot)
        .await
        .expect("ListSnapshotBlocks")
    {
        let data = ebs
            .get_snapshot_block(snapshot, &b)
            .await
            .expect("GetSnapshotBlock");
        assert_eq!(data.len(), BLOCK, "block {} of {snapshot}", b.index);
        let at = b.index as usize * BLOCK;
        if at < size {
            let n = (size - at).min(BLOCK);
            out[at..at + n].copy_from_slice(&data[..n]);
        }
    }
    out
}
