//! The receiver loop: S3 events from SQS in, generations applied in order per disk.
//!
//! Events are at-least-once, unordered, duplicated, late, or lost. The engine keeps, per
//! disk, the manifests it has seen but not applied and the messages that announced them.
//! A generation is applied when its parent is the applied one (or it is a base); its
//! messages are deleted only after the image is fsynced and the state saved. Listing the
//! bucket (at start and every few minutes) finds manifests whose events were lost.
//!
//! Message dispositions: `s3:TestEvent` and data-object events are deleted; manifest
//! events are deleted once their generation is applied; anything malformed or not ours
//! (bad JSON, another bucket, a key outside the prefix or not a pilotlight key, an invalid
//! manifest) is logged and left alone, so the queue's redrive moves it to the
//! dead-letter queue, where the DLQ alarm makes the misconfiguration visible.
//!
//! Export requests (`x/{id}/request.json`, written by the DR Lambda) wait until the
//! image holds exactly the requested generation; the export runs on the disk's own turn,
//! before any newer generation is applied, so it is never half-applied. Its outcome goes
//! to `x/{id}/result.json`; the request's messages are deleted after that.

use crate::apply::{apply, store_prefetched, ApplyOptions};
use crate::export::{export_image, ExportOptions};
use crate::image::FileImage;
use crate::queue::{Message, Queue};
use crate::state::{self, DiskPaths, DiskState};
use crate::store::{ObjectSink, ObjectSource};
use chrono::Utc;
use pilotlight_protocol::keys::{EXPORT_REQUEST_FILE, EXPORT_RESULT_FILE, MANIFEST_FILE};
use pilotlight_protocol::{
    parse_notification, DiskId, ExportRequest, ExportResult, ExportStatus, Manifest, Name,
    ObjectKey, Prefix, S3Notification, EXPORT_VERSION, MAX_EXPORT_DOC_BYTES, MAX_MANIFEST_BYTES,
    MAX_OBJECT_LIMIT,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
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
}

/// What to do with one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    Delete(&'static str),
    /// Leave it: malformed or not ours. The reason is logged.
    Leave(String),
    /// Manifest events: delete once each generation is applied.
    Manifests(Vec<(DiskId, u64)>),
    /// Data-object events (disk, generation, offset): prefetch, then delete.
    Data(Vec<(DiskId, u64, u64)>),
    /// Export requests: delete once each is answered.
    Exports(Vec<(DiskId, Name)>),
}

/// Classifies a message body without I/O.
pub fn classify(cfg: &EngineConfig, body: &str) -> Disposition {
    let n = match parse_notification(body.as_bytes()) {
        Ok(n) => n,
        Err(e) => return Disposition::Leave(format!("malformed event: {e}")),
    };
    let records = match n {
        S3Notification::Test { .. } => return Disposition::Delete("s3:TestEvent"),
        S3Notification::Records(r) => r,
    };
    let mut manifests = Vec::new();
    let mut data = Vec::new();
    let mut exports = Vec::new();
    let mut export_outputs = 0;
    for r in records {
        if r.bucket != cfg.bucket {
            return Disposition::Leave(format!(
                "event for bucket {:?}, not {:?}: check the bucket notification",
                r.bucket, cfg.bucket
            ));
        }
        if !r.is_object_created() {
            continue;
        }
        match ObjectKey::parse(&cfg.prefix, &r.key) {
            Ok(ObjectKey::Manifest { disk, generation }) => manifests.push((disk, generation)),
            Ok(ObjectKey::Data {
                disk,
                generation,
                offset,
            }) => data.push((disk, generation, offset)),
            Ok(ObjectKey::ExportRequest { disk, id }) => exports.push((disk, id)),
            // What a receiver's export writes comes back as events too.
            Ok(ObjectKey::ExportImage { .. } | ObjectKey::ExportResult { .. }) => {
                export_outputs += 1
            }
            Err(e) => return Disposition::Leave(format!("rejected key: {e}")),
        }
    }
    if !exports.is_empty() {
        Disposition::Exports(exports)
    } else if !manifests.is_empty() {
        Disposition::Manifests(manifests)
    } else if !data.is_empty() {
        Disposition::Data(data)
    } else if export_outputs > 0 {
        Disposition::Delete("export output written by a receiver")
    } else {
        Disposition::Delete("no object-created records")
    }
}

struct Waiting {
    /// The SQS message id: a re-delivered message replaces its older receipt handle,
    /// since only the newest one can delete it or change its visibility.
    id: String,
    receipt: String,
    extended: Instant,
}

struct PendingExport {
    req: ExportRequest,
    messages: Vec<Waiting>,
}

struct Disk {
    paths: DiskPaths,
    /// Export requests not answered yet, by id.
    exports: BTreeMap<Name, PendingExport>,
    state: DiskState,
    pending: BTreeMap<u64, Arc<Manifest>>,
    /// Messages to delete once the generation (key) is applied.
    messages: BTreeMap<u64, Vec<Waiting>>,
    /// After a failed apply: no retry before this.
    retry_after: Option<Instant>,
    failures: u32,
    /// The generation being (or last) applied: queued prefetches at or below it give
    /// up, since the apply fetches what it does not find.
    prefetch_floor: Arc<AtomicU64>,
    /// Objects (generation, offset) prefetched or being prefetched.
    prefetched: std::collections::BTreeSet<(u64, u64)>,
}

impl Disk {
    /// The next generation to apply: the one whose parent is applied, else the newest
    /// base (which needs nothing before it).
    fn next(&self) -> Option<u64> {
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
}

/// Per-disk summary for `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskStatus {
    pub disk: String,
    pub applied: Option<u64>,
    pub snapshot_time: Option<chrono::DateTime<Utc>>,
    pub lag_seconds: Option<i64>,
    pub pending: Vec<u64>,
    pub image: String,
    pub disk_size: u64,
    pub allocated_bytes: u64,
}

pub struct Engine<S, Q> {
    cfg: EngineConfig,
    src: S,
    queue: Q,
    disks: BTreeMap<DiskId, Disk>,
    last_reconcile: Option<Instant>,
    prefetches: tokio::task::JoinSet<()>,
    /// Handled messages to delete (`flush_deletes`).
    to_delete: Vec<String>,
    /// Prefetches fetching at once (memory: this many objects at most).
    prefetch_permits: Arc<tokio::sync::Semaphore>,
}

impl<S, Q> std::fmt::Debug for Engine<S, Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cfg", &self.cfg)
            .field("disks", &self.disks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<S: ObjectSource + ObjectSink + Clone + 'static, Q: Queue + Clone + 'static> Engine<S, Q> {
    pub fn new(cfg: EngineConfig, src: S, queue: Q) -> Self {
        let permits = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency.max(1)));
        Self {
            cfg,
            src,
            queue,
            disks: BTreeMap::new(),
            last_reconcile: None,
            prefetches: tokio::task::JoinSet::new(),
            to_delete: Vec::new(),
            prefetch_permits: permits,
        }
    }

    /// Starts fetching a data object of a generation not applied yet into the disk's
    /// prefetch directory (temp file, then rename: only complete files appear there).
    fn prefetch(&mut self, id: &DiskId, generation: u64, offset: u64) -> Result<(), String> {
        let prefix = self.cfg.prefix.clone();
        let d = self.disk(id)?;
        if d.state.applied.is_some_and(|a| generation <= a) {
            return Ok(());
        }
        // Once per object (events are duplicated); forgotten when its generation applies.
        if !d.prefetched.insert((generation, offset)) {
            return Ok(());
        }
        let dir = prefetch_dir(&d.paths, generation);
        let key = ObjectKey::Data {
            disk: id.clone(),
            generation,
            offset,
        }
        .to_key(&prefix);
        let floor = d.prefetch_floor.clone();
        let (src, permits) = (self.src.clone(), self.prefetch_permits.clone());
        self.prefetches.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            if floor.load(Ordering::Relaxed) >= generation {
                return;
            }
            let body = match src.get(&key, MAX_OBJECT_LIMIT).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(%key, "prefetch failed, the apply will fetch it: {e}");
                    return;
                }
            };
            // Decoding and hashing here, while the sender still uploads, is what makes
            // the apply a plain copy once the manifest arrives.
            match tokio::task::spawn_blocking(move || store_prefetched(&dir, offset, &body)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%key, "prefetch not stored, the apply will fetch it: {e}")
                }
                Err(e) => tracing::debug!(%key, "prefetch task failed: {e}"),
            }
        });
        Ok(())
    }

    fn disk(&mut self, id: &DiskId) -> Result<&mut Disk, String> {
        if !self.disks.contains_key(id) {
            let paths = DiskPaths::new(&self.cfg.image_dir, &self.cfg.state_dir, id);
            paths
                .create_dirs()
                .map_err(|e| format!("cannot create directories for {id}: {e}"))?;
            let state = state::load(&paths, id).map_err(|e| e.to_string())?;
            self.disks.insert(
                id.clone(),
                Disk {
                    paths,
                    exports: BTreeMap::new(),
                    state,
                    pending: BTreeMap::new(),
                    messages: BTreeMap::new(),
                    retry_after: None,
                    failures: 0,
                    prefetch_floor: Arc::new(AtomicU64::new(0)),
                    prefetched: Default::default(),
                },
            );
        }
        self.disks
            .get_mut(id)
            .ok_or_else(|| format!("disk {id} vanished"))
    }

    /// Fetches and validates a manifest and records it as pending. Already applied or
    /// already pending generations are not fetched again.
    async fn learn(&mut self, id: &DiskId, generation: u64) -> Result<(), String> {
        let d = self.disk(id)?;
        if d.state.applied.is_some_and(|a| generation <= a) || d.pending.contains_key(&generation) {
            return Ok(());
        }
        let key = ObjectKey::Manifest {
            disk: id.clone(),
            generation,
        };
        let k = key.to_key(&self.cfg.prefix);
        let bytes = self
            .src
            .get(&k, MAX_MANIFEST_BYTES as u64)
            .await
            .map_err(|e| e.to_string())?;
        let m = Manifest::from_json(&bytes).map_err(|e| format!("{k}: {e}"))?;
        m.check_key(&key).map_err(|e| format!("{k}: {e}"))?;
        let d = self.disk(id)?;
        if m.parent.is_some() && m.parent != d.state.applied {
            tracing::info!(disk = %id, generation, parent = ?m.parent, applied = ?d.state.applied, "manifest waits for its parent");
        }
        d.pending.insert(generation, Arc::new(m));
        Ok(())
    }

    /// Takes up an export request. Returns whether it now waits (its message is kept
    /// until it is answered); a request already answered, or one answered at once with a
    /// failure, does not wait.
    async fn learn_export(&mut self, disk: &DiskId, id: &Name, msg: Option<&Message>) -> bool {
        let prefix = self.cfg.prefix.clone();
        let waiting = msg.map(|m| Waiting {
            id: m.id.clone(),
            receipt: m.receipt.clone(),
            extended: Instant::now(),
        });
        let d = match self.disk(disk) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(%disk, export = %id, "{e}");
                return true;
            }
        };
        if let Some(p) = d.exports.get_mut(id) {
            if let Some(w) = waiting {
                p.messages.retain(|m| m.id != w.id);
                p.messages.push(w);
            }
            return true;
        }
        let result_key = ObjectKey::ExportResult {
            disk: disk.clone(),
            id: id.clone(),
        }
        .to_key(&prefix);
        if self
            .src
            .get(&result_key, MAX_EXPORT_DOC_BYTES as u64)
            .await
            .is_ok()
        {
            tracing::debug!(%disk, export = %id, "export already answered");
            return false;
        }
        let req_key = ObjectKey::ExportRequest {
            disk: disk.clone(),
            id: id.clone(),
        }
        .to_key(&prefix);
        let req = match self.src.get(&req_key, MAX_EXPORT_DOC_BYTES as u64).await {
            Ok(b) => ExportRequest::from_json(&b, id).map_err(|e| format!("{req_key}: {e}")),
            // Transient: keep the message; it comes back and is tried again.
            Err(e @ crate::store::FetchError::Other { .. }) => {
                tracing::warn!(%disk, export = %id, "{e}; will retry");
                return true;
            }
            Err(e) => Err(e.to_string()),
        };
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                self.answer_failed(disk, id, None, format!("export request refused: {e}"))
                    .await;
                return false;
            }
        };
        let applied = self.disks.get(disk).and_then(|d| d.state.applied);
        if applied.is_some_and(|a| a > req.generation) {
            let why = superseded(req.generation, applied);
            self.answer_failed(disk, id, applied, why).await;
            return false;
        }
        if let Err(e) = self.learn(disk, req.generation).await {
            let why = format!(
                "generation {} is not available for {disk}: {e}",
                req.generation
            );
            self.answer_failed(disk, id, applied, why).await;
            return false;
        }
        tracing::info!(%disk, export = %id, generation = req.generation, run = ?req.run_id, "export requested; it runs when the image holds that generation");
        if let Ok(d) = self.disk(disk) {
            d.exports.insert(
                id.clone(),
                PendingExport {
                    req,
                    messages: waiting.into_iter().collect(),
                },
            );
        }
        true
    }

    async fn answer_failed(&self, disk: &DiskId, id: &Name, generation: Option<u64>, why: String) {
        tracing::error!(%disk, export = %id, "export failed: {why}");
        let r = failed_result(id, generation, why, 0.0);
        write_result(&self.src, &self.cfg.prefix, disk, &r).await;
    }

    /// Handles one received message; what it deletes waits for `flush_deletes`.
    async fn handle(&mut self, msg: &Message) {
        match classify(&self.cfg, &msg.body) {
            Disposition::Delete(why) => {
                tracing::debug!(id = %msg.id, why, "deleting message");
                self.delete(&msg.receipt);
            }
            Disposition::Data(refs) => {
                if self.cfg.prefetch {
                    for (id, g, offset) in refs {
                        if let Err(e) = self.prefetch(&id, g, offset) {
                            tracing::debug!(disk = %id, "no prefetch: {e}");
                        }
                    }
                }
                self.delete(&msg.receipt);
            }
            Disposition::Leave(why) => {
                tracing::warn!(id = %msg.id, receive_count = msg.receive_count, "{why}; message left for the dead-letter queue");
            }
            Disposition::Exports(refs) => {
                let mut keep = false;
                for (disk, id) in refs {
                    keep |= self.learn_export(&disk, &id, Some(msg)).await;
                }
                if !keep {
                    self.delete(&msg.receipt);
                }
            }
            Disposition::Manifests(refs) => {
                let mut wait_for: Option<(DiskId, u64)> = None;
                for (id, g) in refs {
                    if let Err(e) = self.learn(&id, g).await {
                        tracing::error!(id = %msg.id, disk = %id, generation = g, "manifest rejected: {e}; message left for the dead-letter queue");
                        return;
                    }
                    let applied = self.disks.get(&id).and_then(|d| d.state.applied);
                    if applied.is_none_or(|a| g > a)
                        && wait_for.as_ref().is_none_or(|(_, w)| g > *w)
                    {
                        wait_for = Some((id, g));
                    }
                }
                match wait_for {
                    None => {
                        tracing::debug!(id = %msg.id, "manifest already applied (duplicate or late event)");
                        self.delete(&msg.receipt);
                    }
                    Some((id, g)) => {
                        if let Ok(d) = self.disk(&id) {
                            let waiting = d.messages.entry(g).or_default();
                            waiting.retain(|w| w.id != msg.id);
                            waiting.push(Waiting {
                                id: msg.id.clone(),
                                receipt: msg.receipt.clone(),
                                extended: Instant::now(),
                            });
                        }
                    }
                }
            }
        }
    }

    /// Deletes a handled message, with the others of its batch (see `flush_deletes`).
    fn delete(&mut self, receipt: &str) {
        self.to_delete.push(receipt.to_string());
    }

    /// Deletes the handled messages, ten per request: one request per message made
    /// deleting, not applying, the receiver's pace for data-object events.
    async fn flush_deletes(&mut self) {
        let receipts = std::mem::take(&mut self.to_delete);
        delete_messages(&self.queue, &receipts).await;
    }

    /// Lists the bucket and learns every manifest newer than what is applied.
    pub async fn reconcile(&mut self) {
        self.last_reconcile = Some(Instant::now());
        let keys = match self
            .src
            .list(&self.cfg.prefix.key_start(), is_control_key)
            .await
        {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("reconcile: {e}");
                return;
            }
        };
        let answered: std::collections::BTreeSet<&str> = keys
            .iter()
            .filter_map(|k| k.strip_suffix(EXPORT_RESULT_FILE))
            .collect();
        for k in keys.iter().filter(|k| k.ends_with(EXPORT_REQUEST_FILE)) {
            let dir = k.trim_end_matches(EXPORT_REQUEST_FILE);
            if answered.contains(dir) {
                continue;
            }
            if let Ok(ObjectKey::ExportRequest { disk, id }) = ObjectKey::parse(&self.cfg.prefix, k)
            {
                self.learn_export(&disk, &id, None).await;
            }
        }
        for k in keys.iter().filter(|k| k.ends_with(MANIFEST_FILE)) {
            match ObjectKey::parse(&self.cfg.prefix, k) {
                Ok(ObjectKey::Manifest { disk, generation }) => {
                    if let Err(e) = self.learn(&disk, generation).await {
                        tracing::warn!(key = %k, "reconcile: manifest rejected: {e}");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("reconcile: {e}"),
            }
        }
    }

    /// Applies every generation that can be applied now; disks in parallel, each disk's
    /// generations in order. Returns how many generations were applied.
    pub async fn drive(&mut self) -> usize {
        let (src, queue, cfg) = (&self.src, &self.queue, &self.cfg);
        let results = futures::future::join_all(
            self.disks
                .iter_mut()
                .map(|(id, d)| drive_disk(id, d, src, queue, cfg)),
        )
        .await;
        results.into_iter().sum()
    }

    /// Keeps waiting messages invisible, so a manifest waiting for its parent is not
    /// redriven to the dead-letter queue.
    pub async fn keep_waiting_invisible(&mut self) {
        let half = Duration::from_secs((self.cfg.visibility_secs / 2).max(1) as u64);
        let mut due = Vec::new();
        for d in self.disks.values_mut() {
            let exports = d.exports.values_mut().flat_map(|p| p.messages.iter_mut());
            for w in d.messages.values_mut().flatten().chain(exports) {
                if w.extended.elapsed() >= half {
                    w.extended = Instant::now();
                    due.push(w.receipt.clone());
                }
            }
        }
        for r in due {
            if let Err(e) = self.queue.extend(&r, self.cfg.visibility_secs).await {
                tracing::warn!("{e}");
            }
        }
    }

    /// Reconciles once and applies everything possible (the `sync` command).
    pub async fn sync_once(&mut self) -> usize {
        self.reconcile().await;
        let mut total = 0;
        loop {
            let n = self.drive().await;
            total += n;
            if n == 0 {
                return total;
            }
        }
    }

    /// One loop iteration: receive a batch, handle it, apply what is ready.
    pub async fn step(&mut self) -> Result<usize, crate::queue::QueueError> {
        if let Some(every) = self.cfg.reconcile_every {
            if self.last_reconcile.is_none_or(|t| t.elapsed() >= every) {
                self.reconcile().await;
            }
        }
        // Reap finished prefetches.
        while self.prefetches.try_join_next().is_some() {}
        let msgs = self.queue.receive(10, self.cfg.wait).await?;
        for m in &msgs {
            self.handle(m).await;
        }
        self.flush_deletes().await;
        let applied = self.drive().await;
        self.keep_waiting_invisible().await;
        Ok(applied)
    }

    pub fn status(&self) -> Vec<DiskStatus> {
        self.disks
            .iter()
            .map(|(id, d)| disk_status(id, &d.state, &d.paths, d.pending.keys().copied().collect()))
            .collect()
    }

    /// Loads every disk that has a state file (for `status`).
    pub fn load_known_disks(&mut self) {
        for id in known_disks(&self.cfg.state_dir) {
            let _ = self.disk(&id);
        }
    }
}

/// Disks with a state file under `state_dir` (`site/vm/disk.json`).
pub fn known_disks(state_dir: &std::path::Path) -> Vec<DiskId> {
    let mut out = Vec::new();
    let dirs = |p: &std::path::Path| -> Vec<(String, PathBuf)> {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (site, sp) in dirs(state_dir) {
        for (vm, vp) in dirs(&sp) {
            for (file, _) in dirs(&vp) {
                if let Some(disk) = file.strip_suffix(".json") {
                    if let Ok(id) = DiskId::new(&site, &vm, disk) {
                        out.push(id);
                    }
                }
            }
        }
    }
    out.sort();
    out
}

pub fn disk_status(
    id: &DiskId,
    st: &DiskState,
    paths: &DiskPaths,
    pending: Vec<u64>,
) -> DiskStatus {
    DiskStatus {
        disk: id.to_string(),
        applied: st.applied,
        snapshot_time: st.snapshot_time,
        lag_seconds: st.snapshot_time.map(|t| (Utc::now() - t).num_seconds()),
        pending,
        image: paths.image.display().to_string(),
        disk_size: st.disk_size,
        allocated_bytes: crate::image::allocated_bytes(&paths.image).unwrap_or(0),
    }
}

async fn drive_disk<S: ObjectSource + ObjectSink, Q: Queue + Clone + 'static>(
    id: &DiskId,
    d: &mut Disk,
    src: &S,
    queue: &Q,
    cfg: &EngineConfig,
) -> usize {
    let mut applied = 0;
    if d.retry_after.is_some_and(|t| Instant::now() < t) {
        return 0;
    }
    loop {
        // Exports at this boundary run before anything newer is applied.
        run_exports(id, d, src, queue, cfg).await;
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
                backoff(d);
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
        let keepalive = {
            let (q, secs) = (queue.clone(), cfg.visibility_secs);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs((secs / 2).max(1) as u64));
                loop {
                    tick.tick().await;
                    for r in &receipts {
                        let _ = q.extend(r, secs).await;
                    }
                }
            })
        };
        let opts = ApplyOptions {
            concurrency: cfg.concurrency,
            staging_dir: d.paths.staging_dir.clone(),
            image_name: d.paths.image.display().to_string(),
            prefetch_dir: Some(prefetch_dir(&d.paths, g)),
        };
        tracing::info!(disk = %id, generation = g, parent = ?m.parent, objects = m.objects.len(), "applying");
        d.prefetch_floor.fetch_max(g, Ordering::Relaxed);
        let res = apply(src, &cfg.prefix, &m, image, &opts).await;
        keepalive.abort();
        match res {
            Ok(report) => {
                let mut st = d.state.clone();
                st.applied = Some(g);
                st.snapshot_time = Some(m.snapshot_time);
                st.applied_at = Some(Utc::now());
                st.disk_size = m.disk_size;
                if let Err(e) = state::save(&d.paths, &st) {
                    tracing::error!(disk = %id, generation = g, "image written but state not saved: {e}; will re-apply");
                    backoff(d);
                    break;
                }
                d.state = st;
                remove_prefetched_up_to(&d.paths, g);
                d.prefetched = d.prefetched.split_off(&(g + 1, 0));
                d.failures = 0;
                d.retry_after = None;
                applied += 1;
                let lag = (Utc::now() - m.snapshot_time).num_seconds();
                tracing::info!(
                    disk = %id, generation = g, objects = report.objects, bytes = report.bytes_written,
                    zeroed = report.bytes_zeroed, prefetched = report.objects_prefetched, fetch_seconds = report.fetch_seconds, write_seconds = report.write_seconds, seconds = report.seconds, lag_seconds = lag, "applied"
                );
                // Everything at or below g is done: drop it, delete its messages.
                let keep_pending = d.pending.split_off(&(g + 1));
                d.pending = keep_pending;
                let keep_msgs = d.messages.split_off(&(g + 1));
                let done = std::mem::replace(&mut d.messages, keep_msgs);
                let receipts: Vec<String> =
                    done.into_values().flatten().map(|w| w.receipt).collect();
                delete_messages(queue, &receipts).await;
            }
            Err(e) => {
                tracing::error!(disk = %id, generation = g, transient = e.is_transient(), "apply failed, state unchanged: {e}");
                if !e.is_transient() {
                    // The generation itself is bad: forget it so its messages are not
                    // kept alive; they go to the dead-letter queue.
                    d.pending.remove(&g);
                    d.messages.remove(&g);
                }
                backoff(d);
                break;
            }
        }
    }
    applied
}

fn superseded(wanted: u64, applied: Option<u64>) -> String {
    format!(
        "generation {wanted} is no longer available: the image already holds generation {} \
         (the receiver keeps only the newest applied generation); ask for that one or the latest",
        applied.map_or("none".into(), |a| a.to_string())
    )
}

fn failed_result(id: &Name, generation: Option<u64>, why: String, seconds: f64) -> ExportResult {
    ExportResult {
        version: EXPORT_VERSION,
        id: id.clone(),
        status: ExportStatus::Failed,
        generation,
        image_key: None,
        size: None,
        sha256: None,
        reason: Some(why),
        seconds,
        finished_at: Utc::now(),
    }
}

/// Writes an export's outcome. A failure to write it is logged: the request stays
/// unanswered, so listing finds it again and the export is retried.
async fn write_result<S: ObjectSink>(
    src: &S,
    prefix: &Prefix,
    disk: &DiskId,
    r: &ExportResult,
) -> bool {
    let key = ObjectKey::ExportResult {
        disk: disk.clone(),
        id: r.id.clone(),
    }
    .to_key(prefix);
    let body = match serde_json::to_vec_pretty(r) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(%key, "cannot encode export result: {e}");
            return false;
        }
    };
    match src.put(&key, body.into()).await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(%key, "export result not written: {e}");
            false
        }
    }
}

/// Runs the exports that want the generation the image holds now; fails those that want
/// an older one.
async fn run_exports<S: ObjectSource + ObjectSink, Q: Queue + Clone + 'static>(
    id: &DiskId,
    d: &mut Disk,
    src: &S,
    queue: &Q,
    cfg: &EngineConfig,
) {
    let applied = d.state.applied;
    let ready: Vec<Name> = d
        .exports
        .iter()
        .filter(|(_, p)| applied.is_some_and(|a| p.req.generation <= a))
        .map(|(n, _)| n.clone())
        .collect();
    for name in ready {
        let Some(p) = d.exports.get(&name) else {
            continue;
        };
        let g = p.req.generation;
        let result = if applied != Some(g) {
            failed_result(&name, applied, superseded(g, applied), 0.0)
        } else {
            let key = ObjectKey::ExportImage {
                disk: id.clone(),
                id: name.clone(),
            }
            .to_key(&cfg.prefix);
            let receipts: Vec<String> = p.messages.iter().map(|w| w.receipt.clone()).collect();
            let keepalive = {
                let (q, secs) = (queue.clone(), cfg.visibility_secs);
                tokio::spawn(async move {
                    let mut tick =
                        tokio::time::interval(Duration::from_secs((secs / 2).max(1) as u64));
                    loop {
                        tick.tick().await;
                        for r in &receipts {
                            let _ = q.extend(r, secs).await;
                        }
                    }
                })
            };
            tracing::info!(disk = %id, export = %name, generation = g, %key, "exporting");
            let opts = ExportOptions {
                concurrency: cfg.concurrency.clamp(1, 8),
                ..ExportOptions::default()
            };
            let started = Instant::now();
            let res = export_image(src, &d.paths.image, &key, &opts).await;
            keepalive.abort();
            match res {
                Ok(r) => {
                    tracing::info!(disk = %id, export = %name, generation = g, bytes = r.size, parts = r.parts, seconds = r.seconds, "exported");
                    ExportResult {
                        version: EXPORT_VERSION,
                        id: name.clone(),
                        status: ExportStatus::Done,
                        generation: Some(g),
                        image_key: Some(key),
                        size: Some(r.size),
                        sha256: Some(r.sha256),
                        reason: None,
                        seconds: r.seconds,
                        finished_at: Utc::now(),
                    }
                }
                Err(e) => failed_result(
                    &name,
                    applied,
                    format!("export of generation {g} failed: {e}"),
                    started.elapsed().as_secs_f64(),
                ),
            }
        };
        if result.status == ExportStatus::Failed {
            tracing::error!(disk = %id, export = %name, "export failed: {}", result.reason.as_deref().unwrap_or(""));
        }
        if !write_result(src, &cfg.prefix, id, &result).await {
            continue;
        }
        if let Some(p) = d.exports.remove(&name) {
            let receipts: Vec<String> = p.messages.into_iter().map(|w| w.receipt).collect();
            delete_messages(queue, &receipts).await;
        }
    }
}

/// Deletes handled messages, ten per request. One that cannot be deleted comes back and
/// is handled again (every handling is idempotent).
async fn delete_messages<Q: Queue>(queue: &Q, receipts: &[String]) {
    for batch in receipts.chunks(10) {
        match queue.delete_batch(batch).await {
            Ok(failed) => {
                for why in failed {
                    tracing::warn!(
                        "cannot delete a message ({why}); it will come back and be handled again"
                    );
                }
            }
            Err(e) => tracing::warn!("{e}; the messages will come back and be handled again"),
        }
    }
}

/// The keys reconcile reads: manifests and export requests and results, never the data
/// objects, which are most of a bucket (parsing each key checks it properly).
fn is_control_key(key: &str) -> bool {
    [MANIFEST_FILE, EXPORT_REQUEST_FILE, EXPORT_RESULT_FILE]
        .iter()
        .any(|f| key.strip_suffix(f).is_some_and(|k| k.ends_with('/')))
}

/// Where prefetched objects of one generation wait for their manifest.
fn prefetch_dir(paths: &DiskPaths, generation: u64) -> PathBuf {
    paths
        .staging_dir
        .join("prefetch")
        .join(format!("g{generation:020}"))
}

/// Drops prefetched objects of generations up to `applied`: they are not needed again.
fn remove_prefetched_up_to(paths: &DiskPaths, applied: u64) {
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

fn backoff(d: &mut Disk) {
    d.failures += 1;
    let secs = 2u64.saturating_pow(d.failures.min(8)).min(300);
    d.retry_after = Some(Instant::now() + Duration::from_secs(secs));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> EngineConfig {
        EngineConfig {
            bucket: "b".into(),
            prefix: Prefix::new("dr").unwrap(),
            image_dir: "/nonexistent".into(),
            state_dir: "/nonexistent".into(),
            concurrency: 1,
            wait: Duration::from_secs(0),
            visibility_secs: 60,
            reconcile_every: None,
            prefetch: true,
        }
    }

    fn event(bucket: &str, key: &str) -> String {
        serde_json::json!({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
            "eventTime": "2026-11-23T11:31:26.746", "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1}}}]})
        .to_string()
    }

    #[test]
    fn reconcile_keeps_only_control_keys() {
        let g = "dr/s/v/d/g/00000000000000000002/";
        assert!(is_control_key(&format!("{g}manifest.json")));
        assert!(is_control_key("dr/s/v/d/x/run1/request.json"));
        assert!(is_control_key("dr/s/v/d/x/run1/result.json"));
        assert!(!is_control_key(&format!("{g}d/00000000000000000512")));
        assert!(!is_control_key("dr/s/v/d/x/run1/image.raw"));
        assert!(!is_control_key(&format!("{g}xmanifest.json")));
        // The reconcile path end to end on the in-memory store: data objects are not listed.
        let src = crate::store::MemorySource::default();
        src.put(&format!("{g}manifest.json"), b"{}".to_vec());
        src.put(&format!("{g}d/00000000000000000512"), vec![1; 512]);
        let keys = futures::executor::block_on(src.list("dr/", is_control_key)).unwrap();
        assert_eq!(keys, vec![format!("{g}manifest.json")]);
    }

    #[test]
    fn dispositions() {
        let c = cfg();
        let m = "dr%2Fs%2Fv%2Fd%2Fg%2F00000000000000000002%2Fmanifest.json";
        assert_eq!(
            classify(&c, &event("b", m)),
            Disposition::Manifests(vec![(DiskId::new("s", "v", "d").unwrap(), 2)])
        );
        assert_eq!(
            classify(
                &c,
                &event(
                    "b",
                    "dr/s/v/d/g/00000000000000000002/d/00000000000000000512"
                )
            ),
            Disposition::Data(vec![(DiskId::new("s", "v", "d").unwrap(), 2, 512)])
        );
        assert!(matches!(
            classify(
                &c,
                r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"b"}"#
            ),
            Disposition::Delete(_)
        ));
        assert_eq!(
            classify(&c, &event("b", "dr/s/v/d/x/run-1.d0/request.json")),
            Disposition::Exports(vec![(
                DiskId::new("s", "v", "d").unwrap(),
                Name::new("run-1.d0").unwrap()
            )])
        );
        for output in ["image.raw", "result.json"] {
            assert_eq!(
                classify(&c, &event("b", &format!("dr/s/v/d/x/run-1.d0/{output}"))),
                Disposition::Delete("export output written by a receiver")
            );
        }
        for (body, why) in [
            ("{garbage".to_string(), "malformed"),
            (event("other", m), "bucket"),
            (
                event("b", "dr/s/../d/g/00000000000000000002/manifest.json"),
                "rejected key",
            ),
            (event("b", "dr/s/v/d/g/2/manifest.json"), "rejected key"),
            (event("b", "dr/s/v/d/x/../request.json"), "rejected key"),
            (event("b", "dr/s/v/d/x/id/other.json"), "rejected key"),
            (
                event("b", "elsewhere/s/v/d/g/00000000000000000002/manifest.json"),
                "rejected key",
            ),
        ] {
            match classify(&c, &body) {
                Disposition::Leave(reason) => assert!(reason.contains(why), "{why}: {reason}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }
}
