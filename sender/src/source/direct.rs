//! Unbuffered (`O_DIRECT`) reads of a disk file or block device, with the buffered read
//! as the fallback.
//!
//! A buffered read copies every byte from the page cache into the sender's buffer (10 %
//! of the sender's CPU on incompressible data, perf, scripts/bench-sender, 2026-12-05)
//! and leaves a snapshot's bytes, read once, in the host's cache in place of what the
//! host uses. `open(2)`: with `O_DIRECT` "the user buffer, file offset, and length must
//! all be suitably aligned to the logical block size of the underlying storage
//! (typically 512 bytes)"; a file system that does not support it fails the open, or a
//! read, with `EINVAL`. Either way the read falls back to the buffered file: an
//! unaligned request on its own; the handle as a whole when an aligned one is refused.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Alignment the first request assumes (the usual logical block size).
const FIRST_ALIGN: usize = 512;
/// The largest logical block size Linux uses; refused at this, the handle is not used.
const MAX_ALIGN: usize = 4096;
/// `align` once direct reads are known not to work.
const OFF: usize = 0;
/// Smaller reads stay buffered: an unbuffered read is one device request of its own
/// (no read-ahead), whose fixed cost outweighs the copy it saves on small extents
/// (scripts/bench-sender, scattered 64-128 KiB extents: 1.64 -> 1.81 CPU-s per GiB
/// with every read unbuffered).
pub const MIN_DIRECT: usize = 256 * 1024;

#[derive(Debug)]
pub struct DirectFile {
    file: File,
    /// The alignment requests must have to be tried unbuffered, or [`OFF`].
    align: AtomicUsize,
}

impl DirectFile {
    /// The file `file` has open, opened again for unbuffered reads (through
    /// `/proc/self/fd`, so it is the same file even if its path now names another);
    /// `None` where that is refused.
    pub fn reopen(file: &File) -> Option<Self> {
        use std::os::fd::AsRawFd;
        Self::open(Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())))
    }

    /// Opens `path` for unbuffered reads; `None` where that is refused (tmpfs, some FUSE
    /// and network file systems).
    pub fn open(path: &Path) -> Option<Self> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(path)
            .ok()?;
        Some(DirectFile {
            file,
            align: AtomicUsize::new(FIRST_ALIGN),
        })
    }

    /// Reads `buf` at `offset` unbuffered when the request is aligned enough and at
    /// least [`MIN_DIRECT`] long; `None` when it was not tried or was refused (the caller
    /// reads it buffered).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Option<std::io::Result<()>> {
        let align = self.align.load(Ordering::Relaxed);
        if align == OFF || buf.len() < MIN_DIRECT || !aligned(buf, offset, align) {
            return None;
        }
        match self.file.read_exact_at(buf, offset) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                // Refused: the storage wants more alignment, or takes no direct reads.
                let next = after_refusal(align);
                self.align.store(next, Ordering::Relaxed);
                tracing::debug!(align, next, "unbuffered read refused");
                None
            }
            other => Some(other),
        }
    }

    /// The alignment asked of a request now; 0 once unbuffered reads are off (tests).
    pub fn align(&self) -> usize {
        self.align.load(Ordering::Relaxed)
    }
}

/// The alignment to ask for after a request aligned to `align` was refused.
fn after_refusal(align: usize) -> usize {
    if align < MAX_ALIGN {
        MAX_ALIGN
    } else {
        OFF
    }
}

fn aligned(buf: &[u8], offset: u64, align: usize) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(align)
        && buf.len().is_multiple_of(align)
        && offset.is_multiple_of(align as u64)
        && !buf.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read_buf::BufferPool;

    fn disk(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("disk.raw");
        let bytes: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        path
    }

    #[test]
    fn aligned_reads_are_direct_and_return_the_files_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = disk(dir.path());
        let opened = File::open(&path).unwrap();
        // The path now names another file: the reopened handle still reads the first.
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let Some(d) = DirectFile::reopen(&opened) else {
            eprintln!("skipped: {} takes no O_DIRECT opens", dir.path().display());
            return;
        };
        let pool = BufferPool::new(1, 1 << 20);
        let mut buf = pool.take(MIN_DIRECT);
        let got = d.read_exact_at(&mut buf, 4096).expect("aligned: tried");
        got.unwrap();
        let want: Vec<u8> = (4096..4096 + MIN_DIRECT as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        assert_eq!(&buf[..], &want[..]);
        // Small, or unaligned in memory, length or offset: not tried, left to the
        // buffered read.
        let n = MIN_DIRECT - 4096;
        assert!(d.read_exact_at(&mut buf[..n], 0).is_none());
        let mut big = pool.take(2 * MIN_DIRECT);
        assert!(d.read_exact_at(&mut big[1..MIN_DIRECT + 1], 0).is_none());
        assert!(d.read_exact_at(&mut big[..MIN_DIRECT + 100], 0).is_none());
        assert!(d.read_exact_at(&mut big[..MIN_DIRECT], 100).is_none());
        assert_eq!(d.align(), 512, "nothing was refused");
    }

    #[test]
    fn a_refusal_asks_for_pages_then_turns_direct_reads_off() {
        assert_eq!(after_refusal(FIRST_ALIGN), MAX_ALIGN);
        assert_eq!(after_refusal(MAX_ALIGN), OFF);
        let dir = tempfile::tempdir().unwrap();
        let Some(d) = DirectFile::open(&disk(dir.path())) else {
            return;
        };
        let pool = BufferPool::new(1, 1 << 20);
        let mut buf = pool.take(2 * MIN_DIRECT);
        d.align.store(MAX_ALIGN, Ordering::Relaxed);
        let (a, b) = (MIN_DIRECT + 512, MIN_DIRECT + 4096);
        assert!(
            d.read_exact_at(&mut buf[..a], 512).is_none(),
            "not page aligned"
        );
        assert!(d.read_exact_at(&mut buf[..b], 4096).is_some());
        d.align.store(OFF, Ordering::Relaxed);
        assert!(d.read_exact_at(&mut buf, 0).is_none(), "off: never tried");
        // Past the end: tried, and an error of its own, not a refusal.
        d.align.store(FIRST_ALIGN, Ordering::Relaxed);
        let past = d.read_exact_at(&mut buf, 2 << 20).expect("aligned: tried");
        assert_eq!(past.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(d.align(), FIRST_ALIGN);
    }
}
