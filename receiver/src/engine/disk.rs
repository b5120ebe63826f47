//! One disk's turn: which generation comes next (its parent applied, else the newest
//! base), applying it, saving the state, and only then deleting its messages.

use super::exports::{run_exports, PendingExport};
use super::lifetime::{delete_messages, Held, KeepAlive};
use super::prefetch::{prefetch_dir, remove_prefetched_up_to};
use super::EngineConfig;
use crate::apply::{apply, ApplyOptions};
use crate::image::FileImage;
use crate::points::{PointDue, PointWriter, MAX_POINT_ATTEMPTS};
use crate::state::{self, DiskPaths, DiskState};
use chrono::Utc;
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::{CloudError, ErrorKind, ObjectStore, Queue};
use pilotlight_protocol::{DiskId, Manifest, Name, ObjectKey, Prefix, MAX_MANIFEST_BYTES};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a manifest could not be taken up.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    /// The bucket did not answer as it should: transient (throttling, 5xx, timeout) or
    /// not (missing, access denied).
    #[error("{0}")]
    Read(CloudError),
    /// The manifest itself is wrong: it goes to the dead-letter queue.
    #[error("{key}: {detail}")]
    Invalid { key: String, detail: String },
    /// The receiver's own disk (directories, state file).
    #[error("disk {disk}: {detail}")]
    Local { disk: String, detail: String },
}

impl LearnError {
    /// True when trying again later may succeed with nobody changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            LearnError::Read(e) => e.is_transient(),
            LearnError::Invalid { .. } => false,
            LearnError::Local { .. } => true,
        }
    }
}

/// Reads and validates one manifest.
pub async fn read_manifest<S: ObjectStore>(
    src: &S,
    prefix: &Prefix,
    id: &DiskId,
    generation: u64,
) -> Result<Manifest, LearnError> {
    let key = ObjectKey::Manifest {
        disk: id.clone(),
        generation,
    };
    let k = key.to_key(prefix);
    // get_if_exists: to this role S3 answers a missing key 403, not 404 (its ListBucket
    // is conditioned on the prefix); a manifest gone is "not found", not "denied".
    let bytes = src
        .get_if_exists(&k, MAX_MANIFEST_BYTES as u64)
        .await
        .map_err(LearnError::Read)?
        .ok_or_else(|| {
            LearnError::Read(CloudError::new(
                "S3",
                "GetObject",
                format!("s3://{}/{k}", src.bucket()),
                ErrorKind::NotFound,
                "no such manifest (expired, deleted, or announced by an event from elsewhere)",
            ))
        })?;
    let invalid = |detail: String| LearnError::Invalid {
        key: k.clone(),
        detail,
    };
    let m = Manifest::from_json(&bytes).map_err(|e| invalid(e.to_string()))?;
    m.check_key(&key).map_err(|e| invalid(e.to_string()))?;
    Ok(m)
}

#[derive(Debug)]
pub struct Disk {
    pub paths: DiskPaths,
    /// Export requests not answered yet, by id.
    pub exports: BTreeMap<Name, PendingExport>,
    pub state: DiskState,
    pub pending: BTreeMap<u64, Arc<Manifest>>,
    /// Messages to delete once the generation (key) is applied.
    pub messages: BTreeMap<u64, Vec<Held>>,
    /// Manifests announced but not read yet because the bucket failed transiently: read
    /// again at the instant given, their messages held meanwhile.
    pub unread: BTreeMap<u64, (Instant, u32)>,
    /// After a failed apply: no retry before this.
    pub retry_after: Option<Instant>,
    pub failures: u32,
    /// The generation being (or last) applied: queued prefetches at or below it give
    /// up, since the apply fetches what it does not find.
    pub prefetch_floor: Arc<AtomicU64>,
    /// Objects (generation, offset) prefetched or being prefetched.
    pub prefetched: std::collections::BTreeSet<(u64, u64)>,
    /// Bytes written and seconds spent applying since the metrics last took them.
    pub applied_since: crate::metrics::ApplyTotals,
}

impl Disk {
    pub fn open(cfg: &EngineConfig, id: &DiskId) -> Result<Disk, LearnError> {
        let local = |detail: String| LearnError::Local {
            disk: id.to_string(),
            detail,
        };
        let paths = DiskPaths::new(&cfg.image_dir, &cfg.state_dir, id);
        paths
            .create_dirs()
            .map_err(|e| local(format!("cannot create its directories: {e}")))?;
        let state = state::load(&paths, id).map_err(|e| local(e.to_string()))?;
        Ok(Disk {
            paths,
            exports: BTreeMap::new(),
            state,
            pending: BTreeMap::new(),
            messages: BTreeMap::new(),
            unread: BTreeMap::new(),
            retry_after: None,
            failures: 0,
            prefetch_floor: Arc::new(AtomicU64::new(0)),
            prefetched: Default::default(),
            applied_since: Default::default(),
        })
    }

    /// Whether generation `g` is already in the image.
    pub fn is_applied(&self, g: u64) -> bool {
        self.state.applied.is_some_and(|a| g <= a)
    }

    /// The next generation to apply: the one whose parent is applied, else the newest
    /// base (which needs nothing before it).
    pub fn next(&self) -> Option<u64> {
        let applied = self.state.applied;
        let above = |g: &u64| applied.is_none_or(|a| *g > a);
        if let Some((g, _)) = self
            .pending
            .iter()
            .find(|(g, m)| above(g) && m.parent.is_some() && m.parent == applied)
        {
            return Some(*g);
        }
        self.pending
            .iter()
            .rev()
            .find(|(g, m)| above(g) && m.parent.is_none())
            .map(|(g, _)| *g)
    }

    /// Remembers a manifest to read again after a transient failure.
    pub fn read_later(&mut self, g: u64, base: Duration) {
        let tries = self.unread.get(&g).map_or(0, |(_, n)| *n) + 1;
        let wait = (base * 2u32.saturating_pow(tries.min(6))).min(Duration::from_secs(60));
        self.unread.insert(g, (Instant::now() + wait, tries));
    }

    /// Every held message (for keeping them invisible).
    pub fn held_mut(&mut self) -> impl Iterator<Item = &mut Held> {
        let exports = self
            .exports
            .values_mut()
            .flat_map(|p| p.messages.iter_mut());
        self.messages.values_mut().flatten().chain(exports)
    }

    pub fn backoff(&mut self, base: Duration) {
        self.failures += 1;
        let wait = (base * 2u32.saturating_pow(self.failures.min(8))).min(Duration::from_secs(300));
        self.retry_after = Some(Instant::now() + wait);
    }
}

/// Applies every generation of one disk that can be applied now, in order; runs the
/// exports that wait at each boundary first. Returns how many generations it applied.
pub async fn drive_disk<S: ObjectStore, Q: Queue + Clone + 'static, E: EbsApi + 'static>(
    id: &DiskId,
    d: &mut Disk,
    src: &S,
    queue: &Q,
    cfg: &EngineConfig,
    points: Option<&PointWriter<E>>,
) -> usize {
    let mut applied = 0;
    if d.retry_after.is_some_and(|t| Instant::now() < t) {
        return 0;
    }
    loop {
        // The applied generation's recovery point comes before anything newer.
        if let Some(pw) = points {
            if d.state.point_due.is_some() && !write_point(id, d, pw).await {
                d.backoff(cfg.retry_base);
                break;
            }
        }
        // Exports at this boundary run before anything newer is applied.
        run_exports(id, d, src, queue, cfg, points).await;
        let Some(g) = d.next() else {
            break;
        };
        let Some(m) = d.pending.get(&g).cloned() else {
            break;
        };
        let image = match FileImage::open(&d.paths.image) {
            Ok(i) => Arc::new(i),
            Err(e) => {
                tracing::error!(disk = %id, "cannot open image {}: {e}", d.paths.image.display());
                d.backoff(cfg.retry_base);
                break;
            }
        };
        // Keep this disk's messages invisible while the apply runs.
        let receipts: Vec<String> = d
            .messages
            .values()
            .flatten()
            .map(|w| w.receipt.clone())
            .collect();
        let keepalive = KeepAlive::start(queue, receipts, cfg.visibility_secs);
        let opts = ApplyOptions {
            concurrency: cfg.concurrency,
            staging_dir: d.paths.staging_dir.clone(),
            image_name: d.paths.image.display().to_string(),
            prefetch_dir: Some(prefetch_dir(&d.paths, g)),
        };
        tracing::info!(disk = %id, generation = g, parent = ?m.parent, objects = m.objects.len(), "applying");
        d.prefetch_floor.fetch_max(g, Ordering::Relaxed);
        let res = apply(src, &cfg.prefix, &m, image, &opts).await;
        drop(keepalive);
        match res {
            Ok(report) => {
                let mut st = d.state.clone();
                st.applied = Some(g);
                st.snapshot_time = Some(m.snapshot_time);
                st.applied_at = Some(Utc::now());
                st.disk_size = m.disk_size;
                // Saved with "applied": a crash before the point is written still writes it.
                st.point_due = points.map(|_| PointDue::for_manifest(&m));
                if let Err(e) = state::save(&d.paths, &st) {
                    tracing::error!(disk = %id, generation = g, "image written but state not saved: {e}; will re-apply");
                    d.backoff(cfg.retry_base);
                    break;
                }
                d.state = st;
                remove_prefetched_up_to(&d.paths, g);
                d.prefetched = d.prefetched.split_off(&(g + 1, 0));
                d.failures = 0;
                d.retry_after = None;
                d.applied_since.bytes += report.bytes_written + report.bytes_zeroed;
                d.applied_since.seconds += report.seconds;
                applied += 1;
                let lag = (Utc::now() - m.snapshot_time).num_seconds();
                tracing::info!(
                    disk = %id, generation = g, objects = report.objects, bytes = report.bytes_written,
                    zeroed = report.bytes_zeroed, prefetched = report.objects_prefetched, fetch_seconds = report.fetch_seconds, write_seconds = report.write_seconds, seconds = report.seconds, lag_seconds = lag, "applied"
                );
                // Everything at or below g is done: drop it, delete its messages.
                d.pending = d.pending.split_off(&(g + 1));
                d.unread = d.unread.split_off(&(g + 1));
                let keep_msgs = d.messages.split_off(&(g + 1));
                let done = std::mem::replace(&mut d.messages, keep_msgs);
                let receipts: Vec<String> =
                    done.into_values().flatten().map(|w| w.receipt).collect();
                delete_messages(queue, &receipts).await;
            }
            Err(e) => {
                let transient = e.is_transient();
                if transient {
                    tracing::warn!(disk = %id, generation = g, "apply failed, state unchanged, will retry: {e}");
                } else {
                    // The generation itself is bad: forget it so its messages are not
                    // kept alive; they go to the dead-letter queue.
                    tracing::error!(disk = %id, generation = g, "generation rejected, state unchanged: {e}; its messages are left for the dead-letter queue");
                    d.pending.remove(&g);
                    d.messages.remove(&g);
                }
                d.backoff(cfg.retry_base);
                break;
            }
        }
    }
    applied
}

/// Writes the disk's due recovery point, then prunes its points. Returns false when the
/// point must be tried again before the next generation is applied (a transient failure);
/// a permanent one (no permission, the image unreadable, too many attempts) gives the
/// point up, so replication goes on, and says so in the log and the disk's status.
async fn write_point<E: EbsApi + 'static>(id: &DiskId, d: &mut Disk, pw: &PointWriter<E>) -> bool {
    let generation = d.state.point_due.as_ref().map(|p| p.generation);
    match pw.write_due(id, &mut d.state, &d.paths).await {
        Ok(Some(p)) => {
            tracing::info!(disk = %id, generation = p.generation, snapshot = %p.snapshot_id, parent = ?p.parent, blocks = ?p.blocks_written, "recovery point written");
            match pw.prune(id, &mut d.state, &d.paths, Utc::now()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(disk = %id, deleted = n, "recovery points pruned"),
                Err(e) => {
                    tracing::warn!(disk = %id, "pruning recovery points failed, tried again after the next point: {e}")
                }
            }
            true
        }
        Ok(None) => true,
        Err(e) => {
            let attempts = d.state.point_due.as_ref().map_or(0, |p| p.attempt);
            if e.is_transient() && attempts < MAX_POINT_ATTEMPTS {
                tracing::warn!(disk = %id, generation, attempts, "recovery point not written yet, tried again before the next generation: {e}");
                return false;
            }
            tracing::error!(disk = %id, generation, attempts, "recovery point failed: {e}; given up: replication goes on, the next point is written in full");
            if let Err(e) = pw.give_up(&mut d.state, &d.paths, &e).await {
                tracing::error!(disk = %id, "cannot record the failed point: {e}");
                return false;
            }
            true
        }
    }
}
