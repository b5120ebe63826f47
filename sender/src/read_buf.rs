//! Read buffers that come back to their pool when the last upload body made from them is
//! dropped, and whose bytes start on a page boundary (what `O_DIRECT` reads ask for).
//!
//! Measured on incompressible data (perf, scripts/bench-sender, 2026-12-05): buffers
//! given back only when nothing else held them right after the PUT (the SDK may still
//! hold a clone then) were often new, and a new buffer's pages faulted in and zeroed
//! page by page cost 7-9 % of the sender's CPU. Now a buffer made into [`Bytes`] with
//! [`ReadBuf::into_bytes`] returns to the pool from the drop of its last slice, wherever
//! that happens; a new one is an anonymous mapping, zero already, so it is never
//! cleared by us (the pages are faulted in by the first read). Advising transparent huge
//! pages for it was tried and cost more system time than it saved (compaction at fault
//! time, same bench).

use bytes::Bytes;
use memmap2::MmapMut;
use std::sync::{Arc, Mutex};

/// Where a buffer's bytes start: a page, so `O_DIRECT` reads may land in it.
pub const ALIGN: usize = 4096;

/// Buffers kept for reuse, at most `keep`, each of at least `size` bytes (the largest
/// read: `max_object`), so any kept buffer serves any read.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<MmapMut>>,
    keep: usize,
    size: usize,
}

impl BufferPool {
    pub fn new(keep: usize, size: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            free: Mutex::new(Vec::new()),
            keep,
            size: size.max(1),
        })
    }

    /// A buffer of `len` bytes starting on a page. Its bytes are whatever a reused buffer
    /// held (every byte is read over) or zero.
    pub fn take(self: &Arc<Self>, len: usize) -> ReadBuf {
        let reused = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .filter(|m| m.len() >= len);
        let backing = match reused {
            Some(map) => Backing::Map(map),
            None => new_map(len.max(self.size))
                .map(Backing::Map)
                // No mapping to be had: a plain (zeroed, maybe unaligned) buffer.
                .unwrap_or_else(|_| Backing::Vec(vec![0; len])),
        };
        ReadBuf {
            backing,
            len,
            pool: Some(self.clone()),
        }
    }

    fn give_back(&self, map: MmapMut) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.keep {
            free.push(map);
        }
    }

    /// Buffers waiting for reuse (tests).
    pub fn idle(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn new_map(len: usize) -> std::io::Result<MmapMut> {
    MmapMut::map_anon(len.div_ceil(ALIGN) * ALIGN)
}

#[derive(Debug)]
enum Backing {
    Map(MmapMut),
    Vec(Vec<u8>),
}

/// The first `len` bytes of a buffer, owned; a pooled one goes back when dropped.
#[derive(Debug)]
pub struct ReadBuf {
    backing: Backing,
    len: usize,
    pool: Option<Arc<BufferPool>>,
}

impl ReadBuf {
    /// Bytes that came from elsewhere (an NBD reply): not aligned, not pooled.
    pub fn from_vec(vec: Vec<u8>) -> Self {
        ReadBuf {
            len: vec.len(),
            backing: Backing::Vec(vec),
            pool: None,
        }
    }

    /// Keeps the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Shared, cheaply sliced bytes; the buffer returns to its pool when the last of
    /// them is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for ReadBuf {
    fn as_ref(&self) -> &[u8] {
        match &self.backing {
            Backing::Map(m) => &m[..self.len],
            Backing::Vec(v) => &v[..self.len],
        }
    }
}

impl AsMut<[u8]> for ReadBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        match &mut self.backing {
            Backing::Map(m) => &mut m[..self.len],
            Backing::Vec(v) => &mut v[..self.len],
        }
    }
}

impl std::ops::Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_ref()
    }
}

impl std::ops::DerefMut for ReadBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut()
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        if let (Some(pool), Backing::Map(m)) = (
            self.pool.take(),
            std::mem::replace(&mut self.backing, Backing::Vec(Vec::new())),
        ) {
            pool.give_back(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_page_and_come_back_when_the_last_slice_goes() {
        let pool = BufferPool::new(2, 8 << 20);
        for len in [1, 4096, 5000, 8 << 20, 3] {
            let mut b = pool.take(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0, "len {len}");
            b[len - 1] = 7;
            let bytes = b.into_bytes();
            let tail = bytes.slice(len - 1..);
            drop(bytes);
            assert_eq!(pool.idle(), 0, "a slice still holds the buffer");
            assert_eq!(&tail[..], &[7]);
            drop(tail);
            assert_eq!(pool.idle(), 1, "the last slice gave it back");
        }
    }

    #[test]
    fn the_pool_keeps_at_most_its_count() {
        let pool = BufferPool::new(2, 1 << 20);
        let held: Vec<_> = (0..4).map(|_| pool.take(100)).collect();
        drop(held);
        assert_eq!(pool.idle(), 2);
    }

    #[test]
    fn an_unaligned_buffer_truncates_and_reads_back() {
        let mut b = ReadBuf::from_vec(vec![1, 2, 3, 4, 5]);
        b.truncate(4);
        assert_eq!(&b[..], &[1, 2, 3, 4]);
        assert_eq!(&b.into_bytes()[..], &[1, 2, 3, 4]);
    }

    #[test]
    fn a_read_larger_than_the_pools_size_gets_its_own_buffer() {
        let pool = BufferPool::new(2, 1 << 20);
        drop(pool.take(100));
        let big = pool.take(5 << 20);
        assert_eq!(big.len(), 5 << 20);
        assert_eq!(pool.idle(), 0, "the small one was not used (and not kept)");
        assert!(big.iter().all(|&b| b == 0), "a new buffer reads as zero");
    }
}
