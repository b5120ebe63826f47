//! One disk's context in the engine: the engine's settings, the disk's state and what
//! waits for it (manifests, messages, exports), and reading its manifests.

use super::lifetime::Held;
use crate::metrics::ApplyTotals;
use crate::points::PointWriter;
use crate::state::{self, DiskPaths, DiskState};
use pilotlight_cloud::{CloudError, ErrorKind, ObjectStore};
use pilotlight_protocol::{DiskId, ExportRequest, Manifest, Name, Prefix};
use pilotlight_store::DocError;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub bucket: String,
    pub prefix: Prefix,
    pub image_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Objects fetched and written at once per disk.
    pub concurrency: usize,
    /// SQS long-poll wait.
    pub wait: Duration,
    /// How long messages stay invisible while their generation waits or applies.
    pub visibility_secs: i32,
    /// List the bucket this often to find manifests whose events were lost.
    pub reconcile_every: Option<Duration>,
    /// Fetch data objects as their events arrive, before their manifest: the apply then
    /// finds them on local disk.
    pub prefetch: bool,
    /// First back-off after a failure (a transient read, a failed apply); it doubles
    /// with each failure in a row, up to 5 minutes.
    pub retry_base: Duration,
    /// Bytes of objects held in memory at once, by every disk's apply and the prefetch
    /// together (one budget: clones share it).
    pub budget: crate::budget::Budget,
}

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
    // The store reads with get_if_exists: to this role S3 answers a missing key 403, not
    // 404 (its ListBucket is conditioned on the prefix); a manifest gone is "not found".
    pilotlight_store::manifests::read(src, prefix, id, generation)
        .await
        .map_err(|e| match e {
            DocError::Read(e) => LearnError::Read(e),
            DocError::Missing { key } => LearnError::Read(CloudError::new(
                "S3",
                "GetObject",
                format!("s3://{}/{key}", src.bucket()),
                ErrorKind::NotFound,
                "no such manifest (expired, deleted, or announced by an event from elsewhere)",
            )),
            DocError::Invalid { key, detail } => LearnError::Invalid { key, detail },
        })
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
    pub applied_since: ApplyTotals,
    /// The applied generation's recovery point, while its task runs.
    pub point_task: Option<super::point_task::PointTask>,
    /// A staged point that failed for now is tried again after this (the disk's
    /// generations go on meanwhile).
    pub point_retry_after: Option<Instant>,
    /// The engine has taken the disk's files over (see [`Disk::take_over`]).
    pub owned: bool,
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
        // Read only: `status` opens disks too, while `run` may own them.
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
            point_task: None,
            point_retry_after: None,
            owned: false,
        })
    }

    /// Before the engine first changes anything of the disk: a point task's progress
    /// file (left by a crash) folded into the state file, staged blocks no due point
    /// refers to removed. Not at open: `status` opens disks while `run` may own them.
    pub fn take_over(&mut self, id: &DiskId) {
        if self.owned {
            return;
        }
        // `open` read the progress file's point fields into the state already.
        if self.paths.point_progress().exists() {
            if let Err(e) = state::save(&self.paths, &self.state) {
                tracing::error!(disk = %id, "cannot save the state: {e}");
                return;
            }
            state::remove_progress(&self.paths);
        }
        super::point_task::remove_unreferenced_staged(&self.paths, &self.state);
        self.owned = true;
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

#[derive(Debug)]
pub struct PendingExport {
    pub req: ExportRequest,
    pub messages: Vec<Held>,
}

/// What one disk's turn works with besides the disk itself: its id, the engine's
/// settings, the bucket, the queue and the point writer (none: points off).
#[derive(Debug)]
pub struct Turn<'a, S, Q, E> {
    pub id: &'a DiskId,
    pub cfg: &'a EngineConfig,
    pub src: &'a S,
    pub queue: &'a Q,
    pub points: Option<&'a PointWriter<E>>,
    /// Notified when a point task ends.
    pub point_done: &'a Arc<tokio::sync::Notify>,
}
