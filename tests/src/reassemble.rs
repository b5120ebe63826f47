//! An independent reassembler: rebuilds a disk image from the manifests and data objects
//! in S3, verifying each object's length and SHA-256, so tests can compare it with the
//! source. Deliberately simple: it is the reference the real receiver is checked against.

use crate::stack::LocalStack;
use nix::fcntl::{fallocate, FallocateFlags};
use pilotlight_protocol::keys::generation_prefix;
use pilotlight_protocol::{DiskId, Encoding, Manifest, ObjectKey, Prefix};
use sha2::{Digest, Sha256};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Reads and validates every manifest of `disk`, by generation.
pub async fn manifests(stack: &LocalStack, prefix: &Prefix, disk: &DiskId) -> Vec<Manifest> {
    let mut out = Vec::new();
    for key in stack.manifests(&generation_prefix(prefix, disk)).await {
        let parsed = ObjectKey::parse(prefix, &key).expect("manifest key parses");
        let m = Manifest::from_json(&stack.get(&key).await).expect("manifest validates");
        m.check_key(&parsed).expect("manifest matches its key");
        out.push(m);
    }
    out.sort_by_key(|m| m.generation);
    out
}

/// Applies generations 1..=upto of `disk` into a fresh sparse image at `image`.
/// Each generation's parent must be the one applied before it (or none, for a base).
pub async fn reassemble(
    stack: &LocalStack,
    prefix: &Prefix,
    disk: &DiskId,
    upto: u64,
    image: &Path,
) -> Vec<Manifest> {
    let all = manifests(stack, prefix, disk).await;
    let _ = std::fs::remove_file(image);
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(image)
        .expect("create image");
    let mut applied: Option<u64> = None;
    let mut used = Vec::new();
    for m in all.into_iter().filter(|m| m.generation <= upto) {
        match m.parent {
            None => f.set_len(0).expect("reset image for a base"),
            Some(p) => assert_eq!(
                Some(p),
                applied,
                "generation {} applies on {p}",
                m.generation
            ),
        }
        f.set_len(m.disk_size).expect("size image");
        for o in &m.objects {
            let key = ObjectKey::Data {
                disk: disk.clone(),
                generation: m.generation,
                offset: o.offset,
            }
            .to_key(prefix);
            let stored = stack.get(&key).await;
            assert_eq!(
                stored.len() as u64,
                o.stored_length,
                "stored length of {key}"
            );
            let data = match o.encoding {
                Encoding::Raw => stored,
                Encoding::Zstd => zstd::bulk::decompress(&stored, o.length as usize)
                    .unwrap_or_else(|e| panic!("decompress {key}: {e}")),
            };
            assert_eq!(data.len() as u64, o.length, "decoded length of {key}");
            let sha: [u8; 32] = Sha256::digest(&data).into();
            assert_eq!(sha, o.sha256.0, "sha256 of {key}");
            // The decoded bytes fill the object's parts in order (format v2 packing).
            let mut at = 0usize;
            for part in o.parts() {
                let len = part.length as usize;
                f.write_all_at(&data[at..at + len], part.offset)
                    .expect("write object");
                at += len;
            }
        }
        for z in &m.zero_ranges {
            fallocate(
                f.as_raw_fd(),
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                z.offset as i64,
                z.length as i64,
            )
            .expect("punch zero range");
        }
        applied = Some(m.generation);
        used.push(m);
    }
    f.sync_all().expect("fsync image");
    used
}
