//! Sample disks for tests and the demo: sparse files with many extents of mixed sizes.

use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const MIB: u64 = 1 << 20;

/// What was written into a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Written {
    pub offset: u64,
    pub length: u64,
    pub zero: bool,
}

/// Creates (or extends) a sparse file of `size` bytes.
pub fn create_sparse(path: &Path, size: u64) -> File {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .expect("create disk");
    f.set_len(size).expect("set_len");
    f
}

/// Writes `count` extents of mixed sizes at random sector-aligned places: most small
/// (512 B to 256 KiB), some medium (up to 4 MiB), a few larger than 8 MiB; about one
/// in eight written as explicit zeroes (allocated, but all zero). Data is part random,
/// part compressible. Returns what was written, sorted.
pub fn scribble(f: &File, size: u64, count: usize, seed: u64) -> Vec<Written> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let sectors: u64 = match i % 100 {
            0..=2 => rng.gen_range(16_384..=24_576), // 8..12 MiB
            3..=12 => rng.gen_range(512..=8192),     // 256 KiB..4 MiB
            _ => rng.gen_range(1..=512),             // 512 B..256 KiB
        };
        let length = sectors * 512;
        let offset = rng.gen_range(0..(size - length) / 512) * 512;
        let zero = rng.gen_ratio(1, 8);
        let mut buf = vec![0u8; length as usize];
        if !zero {
            if rng.gen_bool(0.5) {
                rng.fill(&mut buf[..]);
            } else {
                let byte: u8 = rng.gen_range(1..=255);
                for (j, b) in buf.iter_mut().enumerate() {
                    *b = if j % 7 == 0 {
                        byte
                    } else {
                        (j / 512) as u8 | 1
                    };
                }
            }
        }
        f.write_all_at(&buf, offset).expect("write extent");
        out.push(Written {
            offset,
            length,
            zero,
        });
    }
    out.sort();
    out
}

/// Sorted, merged "offset length" lines of the written extents, as PowerCLI prints them.
pub fn powercli_list(written: &[Written]) -> String {
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for w in written {
        match merged.last_mut() {
            Some((o, l)) if w.offset <= *o + *l => *l = (*l).max(w.offset + w.length - *o),
            _ => merged.push((w.offset, w.length)),
        }
    }
    merged
        .iter()
        .map(|(o, l)| format!("{o:>15} {l:>15}  \n"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// SHA-256 of bytes in memory.
pub fn sha256_bytes(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// SHA-256 of a whole file, read in 4 MiB blocks.
pub fn sha256_file(path: &Path) -> [u8; 32] {
    let f = File::open(path).expect("open for hashing");
    let len = f.metadata().expect("metadata").len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut pos = 0;
    while pos < len {
        let n = ((len - pos) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], pos)
            .expect("read for hashing");
        h.update(&buf[..n]);
        pos += n as u64;
    }
    h.finalize().into()
}
