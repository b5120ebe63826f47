//! The allocation map of a sparse file: which byte ranges hold data, via SEEK_DATA/SEEK_HOLE.
//!
//! Reading a hole is wasted work: the filesystem already knows it is zero.

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use pilotlight_protocol::{Extent, SECTOR_SIZE};
use std::fs::File;
use std::os::fd::AsRawFd;

/// The data segments of `file` inside `range`, sector aligned outward and clipped to the
/// range. Where the filesystem cannot tell (no SEEK_DATA support), the whole range.
pub fn data_segments(file: &File, range: Extent) -> std::io::Result<Vec<Extent>> {
    let fd = file.as_raw_fd();
    let end = range.end();
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = range.offset;
    while pos < end {
        let data = match lseek(fd, to_off(pos)?, Whence::SeekData) {
            Ok(d) => d as u64,
            // No data at or after pos: the rest is a hole.
            Err(Errno::ENXIO) => break,
            // Filesystem without SEEK_DATA: treat everything as data.
            Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => return Ok(vec![range]),
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = match lseek(fd, to_off(data)?, Whence::SeekHole) {
            Ok(h) => h as u64,
            Err(Errno::ENXIO) => end,
            Err(e) => return Err(e.into()),
        };
        let start = (data - data % SECTOR_SIZE).max(range.offset);
        let stop = hole
            .min(end)
            .div_ceil(SECTOR_SIZE)
            .saturating_mul(SECTOR_SIZE)
            .min(end);
        match out.last_mut() {
            Some(last) if start <= last.end() => last.length = stop.max(last.end()) - last.offset,
            _ => out.push(Extent::new(start, stop - start)),
        }
        pos = stop.max(data + 1);
    }
    Ok(out)
}

fn to_off(v: u64) -> std::io::Result<i64> {
    i64::try_from(v).map_err(|_| std::io::Error::other("offset beyond i64"))
}

/// The parts of `range` not covered by `data` (sorted, inside range).
pub fn holes(range: Extent, data: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut pos = range.offset;
    for d in data {
        if d.offset > pos {
            out.push(Extent::new(pos, d.offset - pos));
        }
        pos = pos.max(d.end());
    }
    if pos < range.end() {
        out.push(Extent::new(pos, range.end() - pos));
    }
    out
}

/// Makes `[offset, offset+len)` of `file` read as zeroes: a punched hole (its blocks
/// freed), or, where the file system or device cannot punch (EOPNOTSUPP, ENODEV), zeroes
/// written in bounded pieces.
pub fn punch_or_zero(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::unix::fs::FileExt;
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(file.as_raw_fd(), flags, to_off(offset)?, to_off(len)?) {
        Ok(()) => Ok(()),
        Err(Errno::EOPNOTSUPP | Errno::ENODEV) => {
            let zeroes = vec![0u8; len.min(1 << 20) as usize];
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(zeroes.len() as u64) as usize;
                file.write_all_at(&zeroes[..n], pos)?;
                pos += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_data_in_a_sparse_file() {
        let f = tempfile::tempfile().unwrap();
        let mib = 1u64 << 20;
        f.set_len(64 * mib).unwrap();
        f.write_all_at(&[1u8; 4096], 8 * mib).unwrap();
        f.write_all_at(&[1u8; 4096], 40 * mib).unwrap();
        let segs = data_segments(&f, Extent::new(0, 64 * mib)).unwrap();
        // Filesystems may allocate more than written, but never miss data.
        assert!(segs
            .iter()
            .any(|s| s.offset <= 8 * mib && s.end() >= 8 * mib + 4096));
        assert!(segs
            .iter()
            .any(|s| s.offset <= 40 * mib && s.end() >= 40 * mib + 4096));
        let covered: u64 = segs.iter().map(|s| s.length).sum();
        assert!(covered < 16 * mib, "most of the file is holes: {segs:?}");
        // A range holding no data yields nothing.
        assert!(data_segments(&f, Extent::new(16 * mib, 8 * mib))
            .unwrap()
            .is_empty());
        let h = holes(Extent::new(0, 64 * mib), &segs);
        let total: u64 = h.iter().map(|e| e.length).sum::<u64>() + covered;
        assert_eq!(total, 64 * mib);
    }
}
