//! Bytes in flight: how much object data the receiver holds in memory at once.
//!
//! Fetching an object holds its stored bytes, and a zstd object its decoded bytes too,
//! until they are on local disk. With packed objects every object is up to `max_object`
//! (8 MiB), so "N objects at once" alone let memory grow to N x 2 x 8 MiB. One budget,
//! shared by the apply and the prefetch, bounds the bytes instead: an object waits until
//! its bytes fit; one larger than the whole budget waits until it has all of it (so it
//! still goes through, alone). The object count limit (`--concurrency`) still applies.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The default: four default-size objects (8 MiB) fetched at once, or two of zstd.
pub const DEFAULT_IN_FLIGHT: u64 = 32 * 1024 * 1024;

/// Permits count KiB (a semaphore counts in u32).
const UNIT: u64 = 1024;

#[derive(Debug, Clone)]
pub struct Budget {
    permits: Arc<Semaphore>,
    units: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new(DEFAULT_IN_FLIGHT)
    }
}

impl Budget {
    /// A budget of `bytes` (at least one KiB).
    pub fn new(bytes: u64) -> Self {
        let units = (bytes / UNIT).clamp(1, u64::from(u32::MAX >> 4)) as u32;
        Budget {
            permits: Arc::new(Semaphore::new(units as usize)),
            units,
        }
    }

    /// The budget's size in bytes.
    pub fn bytes(&self) -> u64 {
        u64::from(self.units) * UNIT
    }

    /// Waits until `bytes` fit (all of the budget, if more), and holds them until the
    /// permit is dropped.
    pub async fn acquire(&self, bytes: u64) -> OwnedSemaphorePermit {
        let want = bytes.div_ceil(UNIT).clamp(1, u64::from(self.units)) as u32;
        // The semaphore is never closed, so acquiring cannot fail.
        match self.permits.clone().acquire_many_owned(want).await {
            Ok(p) => p,
            Err(_) => unreachable!("the budget's semaphore is never closed"),
        }
    }

    /// Bytes not held right now.
    pub fn available(&self) -> u64 {
        self.permits.available_permits() as u64 * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_bytes_until_dropped_and_lets_a_larger_object_through_alone() {
        let b = Budget::new(32 << 20);
        let a = b.acquire(8 << 20).await;
        let c = b.acquire(20 << 20).await;
        assert_eq!(b.available(), 4 << 20);
        // 8 MiB does not fit in the 4 left: it waits; it fits once 8 are given back.
        use futures::FutureExt;
        assert!(b.acquire(8 << 20).now_or_never().is_none());
        drop(a);
        let got = b.acquire(8 << 20).now_or_never().expect("fits now");
        assert_eq!(b.available(), 4 << 20);
        drop((got, c));
        // Larger than the budget: takes all of it.
        let all = b.acquire(100 << 20).await;
        assert_eq!(b.available(), 0);
        drop(all);
        assert_eq!(b.available(), 32 << 20);
        assert_eq!(b.bytes(), 32 << 20);
    }
}
