//! Prefetch: data objects fetched, decoded and hashed as their events arrive, before
//! their manifest, so the apply that follows the manifest is a local copy.

use super::context::Disk;
use crate::apply::store_prefetched;
use crate::budget::Budget;
use crate::state::DiskPaths;
use pilotlight_cloud::ObjectStore;
use pilotlight_protocol::{DiskId, ObjectKey, Prefix, DEFAULT_MAX_OBJECT};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The prefetches under way, at most `concurrency` fetching at once, within the
/// engine's bytes-in-flight budget.
#[derive(Debug)]
pub struct Prefetcher {
    tasks: tokio::task::JoinSet<()>,
    permits: Arc<tokio::sync::Semaphore>,
    budget: Budget,
}

/// What one prefetch holds: an object of up to the default size and its decoded copy.
/// The encoding and size are not known before the manifest, so a larger object is not
/// prefetched (the GET refuses it; the apply fetches it, budgeted by its real size).
const PREFETCH_MAX: u64 = DEFAULT_MAX_OBJECT;

impl Prefetcher {
    pub fn new(concurrency: usize, budget: Budget) -> Self {
        Prefetcher {
            tasks: tokio::task::JoinSet::new(),
            permits: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
            budget,
        }
    }

    /// Forgets finished prefetches.
    pub fn reap(&mut self) {
        while self.tasks.try_join_next().is_some() {}
    }

    /// Starts fetching a data object of a generation not applied yet into the disk's
    /// prefetch directory (temp file, then rename: only complete files appear there).
    pub fn start<S: ObjectStore + Clone + 'static>(
        &mut self,
        src: &S,
        prefix: &Prefix,
        id: &DiskId,
        d: &mut Disk,
        generation: u64,
        offset: u64,
    ) {
        if d.state.applied.is_some_and(|a| generation <= a) {
            return;
        }
        // Once per object (events are duplicated); forgotten when its generation applies.
        if !d.prefetched.insert((generation, offset)) {
            return;
        }
        let dir = prefetch_dir(&d.paths, generation);
        let key = ObjectKey::Data {
            disk: id.clone(),
            generation,
            offset,
        }
        .to_key(prefix);
        let floor = d.prefetch_floor.clone();
        let (src, permits, budget) = (src.clone(), self.permits.clone(), self.budget.clone());
        self.tasks.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let _bytes = budget.acquire(2 * PREFETCH_MAX).await;
            // The apply has started (or passed) this generation: it fetches what it needs.
            if floor.load(Ordering::Relaxed) >= generation {
                return;
            }
            let body = match src.get(&key, PREFETCH_MAX).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(%key, "prefetch failed, the apply will fetch it: {e}");
                    return;
                }
            };
            // Decoding and hashing here, while the sender still uploads, is what makes
            // the apply a plain copy once the manifest arrives.
            match tokio::task::spawn_blocking(move || {
                store_prefetched(&dir, offset, &body, PREFETCH_MAX)
            })
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%key, "prefetch not stored, the apply will fetch it: {e}")
                }
                Err(e) => tracing::debug!(%key, "prefetch task failed: {e}"),
            }
        });
    }
}

/// Where prefetched objects of one generation wait for their manifest.
pub fn prefetch_dir(paths: &DiskPaths, generation: u64) -> PathBuf {
    paths
        .staging_dir
        .join("prefetch")
        .join(format!("g{generation:020}"))
}

/// Drops prefetched objects of generations up to `applied`: they are not needed again.
pub fn remove_prefetched_up_to(paths: &DiskPaths, applied: u64) {
    let Ok(entries) = std::fs::read_dir(paths.staging_dir.join("prefetch")) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let g = name
            .to_str()
            .and_then(|n| n.strip_prefix('g'))
            .and_then(|n| n.parse::<u64>().ok());
        if g.is_some_and(|g| g <= applied) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
