//! The receiver loop: S3 events from SQS in, generations applied in order per disk.
//!
//! Events are at-least-once, unordered, duplicated, late, or lost. The engine keeps, per
//! disk, the manifests it has seen but not applied and the messages that announced them.
//! A generation is applied when its parent is the applied one (or it is a base); its
//! messages are deleted only after the image is fsynced and the state saved. Listing the
//! bucket (at start and every few minutes) finds manifests whose events were lost.
//!
//! Message dispositions ([`classify`]): `s3:TestEvent` and data-object events are
//! deleted; manifest events are deleted once their generation is applied; anything
//! malformed or not ours (bad JSON, another bucket, a key outside the prefix or not a
//! pilotlight key, an invalid manifest) is logged and left alone, so the queue's redrive
//! moves it to the dead-letter queue, where the DLQ alarm makes it visible. A manifest
//! the bucket could not serve for now (throttling, 5xx, timeout) is not a rejection: its
//! message is held and the manifest read again after a back-off.
//!
//! The jobs, one file each: [`classify`] (what a message is), [`disk`] (per-disk order
//! and the apply), [`point_task`] (each disk's recovery point as a task of its own, and
//! pruning rounds), [`prefetch`], [`exports`], [`lifetime`] (holding, extending and
//! deleting messages).

pub mod classify;
pub mod context;
pub mod disk;
pub mod exports;
pub mod lifetime;
pub mod point_task;
pub mod prefetch;
pub mod stage;

pub use crate::status::{disk_status, known_disks, local_status, DiskStatus};
pub use classify::{classify, is_control_key, Disposition};
pub use context::{read_manifest, Disk, EngineConfig, LearnError, PendingExport, Turn};

use crate::points::PointWriter;
use disk::drive_disk;
use futures::StreamExt;
use lifetime::{delete_messages, extend_due, hold};
use pilotlight_cloud::ebs::{EbsApi, NoEbs};
use pilotlight_cloud::{CloudError, Message, ObjectStore, Queue};
use pilotlight_protocol::keys::{EXPORT_REQUEST_FILE, EXPORT_RESULT_FILE, MANIFEST_FILE};
use pilotlight_protocol::{DiskId, ObjectKey};
use prefetch::Prefetcher;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Receives made at once, after a full one, when the queue is busy.
const EXTRA_RECEIVES: usize = 3;
/// Replication counts as busy (staged points wait) this long after a receive brought
/// messages.
const INTAKE_QUIET: Duration = Duration::from_secs(5);
/// Manifests of one batch read at once.
const MANIFEST_READS: usize = 8;

pub struct Engine<S, Q, E = NoEbs> {
    cfg: EngineConfig,
    src: S,
    queue: Q,
    /// Recovery points (none: off).
    points: Option<PointWriter<E>>,
    disks: BTreeMap<DiskId, Disk>,
    last_reconcile: Option<Instant>,
    prefetcher: Prefetcher,
    /// Handled messages to delete (`flush_deletes`).
    to_delete: Vec<String>,
    /// Notified when a disk's point task ends.
    point_done: Arc<tokio::sync::Notify>,
    last_prune: Option<Instant>,
    /// When a receive last brought messages.
    last_intake: Option<Instant>,
}

impl<S, Q, E> std::fmt::Debug for Engine<S, Q, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cfg", &self.cfg)
            .field("disks", &self.disks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<S: ObjectStore + Clone + 'static, Q: Queue + Clone + 'static> Engine<S, Q> {
    /// An engine without recovery points (see [`Engine::with_points`]).
    pub fn new(cfg: EngineConfig, src: S, queue: Q) -> Self {
        let prefetcher = Prefetcher::new(cfg.concurrency, cfg.budget.clone());
        Self {
            cfg,
            src,
            queue,
            points: None,
            disks: BTreeMap::new(),
            last_reconcile: None,
            prefetcher,
            to_delete: Vec::new(),
            point_done: Default::default(),
            last_prune: None,
            last_intake: None,
        }
    }

    /// The same engine, recovery points off, typed to hold an `E` (a binary's engine has one
    /// type whether points are on or off).
    pub fn without_points<E: EbsApi + 'static>(self) -> Engine<S, Q, E> {
        self.convert(None)
    }

    /// The same engine, writing a recovery point after each applied generation.
    pub fn with_points<E: EbsApi + 'static>(self, points: PointWriter<E>) -> Engine<S, Q, E> {
        self.convert(Some(points))
    }

    fn convert<E: EbsApi + 'static>(self, points: Option<PointWriter<E>>) -> Engine<S, Q, E> {
        Engine {
            cfg: self.cfg,
            src: self.src,
            queue: self.queue,
            points,
            disks: self.disks,
            last_reconcile: self.last_reconcile,
            prefetcher: self.prefetcher,
            to_delete: self.to_delete,
            point_done: self.point_done,
            last_prune: self.last_prune,
            last_intake: self.last_intake,
        }
    }
}

impl<S: ObjectStore + Clone + 'static, Q: Queue + Clone + 'static, E: EbsApi + 'static>
    Engine<S, Q, E>
{
    fn disk(&mut self, id: &DiskId) -> Result<&mut Disk, LearnError> {
        if !self.disks.contains_key(id) {
            let d = Disk::open(&self.cfg, id)?;
            self.disks.insert(id.clone(), d);
        }
        self.disks.get_mut(id).ok_or_else(|| LearnError::Local {
            disk: id.to_string(),
            detail: "vanished".into(),
        })
    }

    /// Fetches and validates a manifest and records it as pending. Already applied or
    /// already pending generations are not fetched again.
    async fn learn(&mut self, id: &DiskId, generation: u64) -> Result<(), LearnError> {
        let d = self.disk(id)?;
        if d.is_applied(generation) || d.pending.contains_key(&generation) {
            return Ok(());
        }
        let res = read_manifest(&self.src, &self.cfg.prefix, id, generation).await;
        let base = self.cfg.retry_base;
        let d = self.disk(id)?;
        let m = match res {
            Ok(m) => m,
            Err(e) => {
                if e.is_transient() {
                    d.read_later(generation, base);
                } else {
                    d.unread.remove(&generation);
                }
                return Err(e);
            }
        };
        d.unread.remove(&generation);
        if m.parent.is_some() && m.parent != d.state.applied {
            tracing::info!(disk = %id, generation, parent = ?m.parent, applied = ?d.state.applied, "manifest waits for its parent");
        }
        d.pending.insert(generation, Arc::new(m));
        Ok(())
    }

    /// Reads the manifests a batch of messages names, several at once, and records
    /// those that are new and valid as pending; `handle` then finds them known (one
    /// manifest GET after another was the receiver's pace when the queue was busy). A
    /// manifest that fails here is left to `handle`, which reads it again and decides
    /// (held for later, or rejected) as it always did.
    async fn learn_batch(&mut self, msgs: &[Message]) {
        let mut wanted: Vec<(DiskId, u64)> = Vec::new();
        for m in msgs {
            if let Disposition::Manifests(refs) = classify(&self.cfg, &m.body) {
                for (id, g) in refs {
                    let Ok(d) = self.disk(&id) else { continue };
                    let known = d.is_applied(g) || d.pending.contains_key(&g);
                    if !known && !wanted.contains(&(id.clone(), g)) {
                        wanted.push((id, g));
                    }
                }
            }
        }
        if wanted.len() < 2 {
            return;
        }
        let (src, prefix) = (&self.src, &self.cfg.prefix);
        let read: Vec<_> = futures::stream::iter(wanted)
            .map(|(id, g)| async move {
                let r = read_manifest(src, prefix, &id, g).await;
                (id, g, r)
            })
            .buffer_unordered(MANIFEST_READS)
            .collect()
            .await;
        for (id, g, r) in read {
            let Ok(m) = r else { continue };
            if let Ok(d) = self.disk(&id) {
                if m.parent.is_some() && m.parent != d.state.applied {
                    tracing::info!(disk = %id, generation = g, parent = ?m.parent, applied = ?d.state.applied, "manifest waits for its parent");
                }
                d.unread.remove(&g);
                d.pending.insert(g, Arc::new(m));
            }
        }
    }

    /// Reads again the manifests a transient failure left unread, once their back-off
    /// has passed (`force`: now). Returns how many it read.
    async fn retry_unread(&mut self, force: bool) -> usize {
        let now = Instant::now();
        let due: Vec<(DiskId, u64)> = self
            .disks
            .iter()
            .flat_map(|(id, d)| {
                d.unread
                    .iter()
                    .filter(move |(_, (at, _))| force || *at <= now)
                    .map(move |(g, _)| (id.clone(), *g))
            })
            .collect();
        let mut read = 0;
        for (id, g) in due {
            match self.learn(&id, g).await {
                Ok(()) => read += 1,
                Err(e) if e.is_transient() => {
                    tracing::warn!(disk = %id, generation = g, "manifest still unreadable, will retry: {e}")
                }
                Err(e) => {
                    tracing::error!(disk = %id, generation = g, "manifest rejected: {e}; its messages are left for the dead-letter queue");
                    if let Some(d) = self.disks.get_mut(&id) {
                        d.messages.remove(&g);
                    }
                }
            }
        }
        read
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
                        if let Err(e) = self.disk(&id) {
                            tracing::debug!(disk = %id, "no prefetch: {e}");
                            continue;
                        }
                        if let Some(d) = self.disks.get_mut(&id) {
                            self.prefetcher
                                .start(&self.src, &self.cfg.prefix, &id, d, g, offset);
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
                // The message is deleted when the newest generation it names is applied.
                let mut wait_for: Option<(DiskId, u64)> = None;
                for (id, g) in refs {
                    if let Err(e) = self.learn(&id, g).await {
                        if e.is_transient() {
                            tracing::warn!(id = %msg.id, disk = %id, generation = g, "manifest not readable for now, held and read again later: {e}");
                        } else {
                            tracing::error!(id = %msg.id, disk = %id, generation = g, "manifest rejected: {e}; message left for the dead-letter queue");
                            return;
                        }
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
                            hold(d.messages.entry(g).or_default(), msg);
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
    pub async fn reconcile(&mut self) -> Result<(), CloudError> {
        self.last_reconcile = Some(Instant::now());
        let keys = self
            .src
            .list(&self.cfg.prefix.key_start(), is_control_key)
            .await?;
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
                        tracing::warn!(key = %k, transient = e.is_transient(), "reconcile: manifest not taken up: {e}");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("reconcile: {e}"),
            }
        }
        Ok(())
    }

    /// Applies every generation that can be applied now; disks in parallel, each disk's
    /// generations in order. Returns how many generations were applied.
    pub async fn drive(&mut self) -> usize {
        self.drive_except(&Default::default()).await
    }

    /// [`Self::drive`], leaving out the disks in `skip`.
    async fn drive_except(&mut self, skip: &std::collections::BTreeSet<DiskId>) -> usize {
        self.mark_replicating();
        let (src, queue, cfg) = (&self.src, &self.queue, &self.cfg);
        let points = self.points.as_ref();
        let point_done = &self.point_done;
        let disks = self.disks.iter_mut().filter(|(id, _)| !skip.contains(*id));
        let results = futures::future::join_all(disks.map(|(id, d)| async move {
            let turn = Turn {
                id,
                cfg,
                src,
                queue,
                points,
                point_done,
            };
            drive_disk(&turn, d).await
        }))
        .await;
        self.mark_replicating();
        results.into_iter().sum()
    }

    /// Tells the point tasks whether replication has work at hand (a generation ready
    /// to apply, or messages lately: an empty receive between two busy ones is not the
    /// end of a burst): staged points then wait, or go in the slow lane (#35).
    fn mark_replicating(&self) {
        if let Some(pw) = self.points.as_ref() {
            let lately = self.last_intake.is_some_and(|t| t.elapsed() < INTAKE_QUIET);
            let ready = lately || self.disks.values().any(|d| d.next().is_some());
            pw.replicating
                .send_if_modified(|busy| std::mem::replace(busy, ready) != ready);
        }
    }

    /// Keeps held messages invisible, so a manifest waiting for its parent (or for the
    /// bucket) is not redriven to the dead-letter queue.
    pub async fn keep_waiting_invisible(&mut self) {
        let secs = self.cfg.visibility_secs;
        let held = self.disks.values_mut().flat_map(|d| d.held_mut());
        extend_due(&self.queue, held, secs).await;
    }

    /// Reconciles once and applies everything possible (the `sync` command). Manifests
    /// the bucket failed to serve are read again a few times first.
    pub async fn sync_once(&mut self) -> usize {
        if let Err(e) = self.reconcile().await {
            tracing::warn!("reconcile: {e}");
        }
        let mut total = 0;
        let mut retries = 0;
        // A disk that fails (an apply, a point) is tried once per sync, as before points
        // were tasks: its back-off is for `run`, and `sync` does not hammer.
        let mut failed = std::collections::BTreeSet::new();
        loop {
            let before: BTreeMap<DiskId, u32> = self
                .disks
                .iter()
                .map(|(id, d)| (id.clone(), d.failures))
                .collect();
            let n = self.drive_except(&failed).await;
            failed.extend(
                self.disks
                    .iter()
                    .filter(|(id, d)| before.get(*id).is_some_and(|f| d.failures > *f))
                    .map(|(id, _)| id.clone()),
            );
            total += n;
            if n > 0 {
                continue;
            }
            // Points under way: the disks behind them go on when they end.
            if self.points_under_way() {
                point_task::any_point_done(&self.point_done).await;
                continue;
            }
            let unread = self.disks.values().any(|d| !d.unread.is_empty());
            if !unread || retries >= 5 {
                self.prune().await;
                return total;
            }
            retries += 1;
            tokio::time::sleep(Duration::from_secs(1 << retries)).await;
            self.retry_unread(true).await;
        }
    }

    /// One loop iteration: receive a batch, handle it, apply what is ready.
    pub async fn step(&mut self) -> Result<usize, CloudError> {
        if let Some(every) = self.cfg.reconcile_every {
            if self.last_reconcile.is_none_or(|t| t.elapsed() >= every) {
                if let Err(e) = self.reconcile().await {
                    tracing::warn!("reconcile: {e}");
                }
            }
        }
        if self.points.as_ref().is_some_and(|pw| {
            self.last_prune
                .is_none_or(|t| t.elapsed() >= pw.cfg.prune_every)
        }) {
            self.prune().await;
        }
        self.prefetcher.reap();
        self.retry_unread(false).await;
        // While points are written, the loop comes back soon for the disks behind them
        // (at once when one has ended), rather than after a whole long poll.
        let wait = if self.points_ended() {
            Duration::ZERO
        } else if self.points_under_way() {
            self.cfg.wait.min(Duration::from_secs(1))
        } else {
            self.cfg.wait
        };
        let mut msgs = self.queue.receive(10, wait).await?;
        if msgs.len() == 10 {
            // A full batch: the queue is busy; a few more receives at once (ten is
            // ReceiveMessage's most per call), so a backlog of events drains at the pace
            // of the applies, not of one request per ten messages.
            let more = futures::future::join_all(
                (0..EXTRA_RECEIVES).map(|_| self.queue.receive(10, Duration::ZERO)),
            )
            .await;
            for r in more {
                match r {
                    Ok(m) => msgs.extend(m),
                    Err(e) => tracing::warn!("receive: {e}"),
                }
            }
        }
        if !msgs.is_empty() {
            self.last_intake = Some(Instant::now());
        }
        self.learn_batch(&msgs).await;
        for m in &msgs {
            self.handle(m).await;
        }
        self.flush_deletes().await;
        let applied = self.drive().await;
        self.keep_waiting_invisible().await;
        Ok(applied)
    }

    fn points_under_way(&self) -> bool {
        self.disks.values().any(|d| d.point_task.is_some())
    }

    fn points_ended(&self) -> bool {
        self.disks
            .values()
            .any(|d| d.point_task.as_ref().is_some_and(|t| t.is_finished()))
    }

    /// One pruning round over every disk with a state (see [`point_task::prune_round`]).
    pub async fn prune(&mut self) {
        if self.points.is_none() {
            return;
        }
        self.last_prune = Some(Instant::now());
        for id in known_disks(&self.cfg.state_dir) {
            if let Err(e) = self.disk(&id) {
                tracing::warn!(disk = %id, "not pruned: {e}");
            }
        }
        let Some(pw) = self.points.as_ref() else {
            return;
        };
        if let Err(e) = point_task::prune_round(&mut self.disks, pw).await {
            tracing::warn!("pruning recovery points failed, tried again at the next round: {e}");
        }
    }

    pub fn status(&self) -> Vec<DiskStatus> {
        self.disks
            .iter()
            .map(|(id, d)| disk_status(id, &d.state, &d.paths, d.pending.keys().copied().collect()))
            .collect()
    }

    /// What each disk applied since the last call (bytes, seconds), for the metrics.
    pub fn take_applied(&mut self) -> BTreeMap<String, crate::metrics::ApplyTotals> {
        self.disks
            .iter_mut()
            .map(|(id, d)| (id.to_string(), std::mem::take(&mut d.applied_since)))
            .collect()
    }

    /// Loads every disk that has a state file (for `status`).
    pub fn load_known_disks(&mut self) {
        for id in known_disks(&self.cfg.state_dir) {
            let _ = self.disk(&id);
        }
    }
}
