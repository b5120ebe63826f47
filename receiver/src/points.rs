//! Recovery points: after a generation is applied, the 512 KiB blocks it touched are read
//! back from the image and written into a new EBS snapshot whose parent is the disk's
//! previous point (EBS direct APIs). A point holds exactly its generation: it is written
//! before the disk's next generation is applied.
//!
//! Crash safety: the disk's state says which point is due (saved atomically with
//! "applied N"), each attempt (saved before StartSnapshot, so a retry after a crash uses
//! a new client token), the snapshot under way and whether it was sealed. After a restart
//! a sealed snapshot is recorded once `completed` (waited for while `pending`); an unsealed
//! one, whatever its state, is deleted and the point written again. A point is recorded
//! only once EBS reports it `completed`; pruning deletes what a crash orphaned.

mod retention;
mod settle;

pub use settle::{Phase, PointCalls, PointPhases};

use crate::state::{self, DiskPaths, DiskState};
pub use crate::state::{PointDue, PointRecord};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use pilotlight_cloud::ebs::{
    block_checksum, linear_checksum, EbsApi, LockMode, SnapshotFilter, SnapshotInfo,
    SnapshotStatus, StartSnapshot, BLOCK_SIZE,
};
use pilotlight_cloud::CloudError;
use pilotlight_protocol::points::{retained, tag, Point, PointInfo, Tiers};
use pilotlight_protocol::{DiskId, Extent, Manifest};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

/// After this many failed attempts a point is given up (replication goes on; the next
/// point is a full one).
pub const MAX_POINT_ATTEMPTS: u32 = 10;

/// Point records the disk's state keeps (newest first to go last).
pub const RECENT_POINTS: usize = 8;

/// How recovery points are written and kept.
#[derive(Debug, Clone)]
pub struct PointsConfig {
    /// The receiver's stack name: tagged on every point; pruning touches only its own.
    pub stack: String,
    /// Encrypt points with this KMS key (the stack's); without, EBS's account default.
    pub kms_key_arn: Option<String>,
    pub tiers: Tiers,
    /// PutSnapshotBlock requests in flight per disk.
    pub concurrency: usize,
    /// A snapshot not completed within this goes to `error` on EBS's side (10 to 4 320).
    pub timeout_minutes: u32,
    /// How long to wait for a sealed snapshot to become `completed`.
    pub settle_timeout: Duration,
    /// First back-off after a throttled or failed call; doubles, up to 20 s.
    pub retry_base: Duration,
    /// Attempts per call (the SDK's own retries come on top).
    pub call_attempts: u32,
    /// Lock each day's kept point (EBS Snapshot Lock) until it leaves the daily tier.
    pub lock: Option<LockMode>,
    /// How long after StartSnapshot or CompleteSnapshot "no such snapshot" is taken for
    /// eventual consistency and retried, not believed (coldsnap: about 2 minutes).
    pub visibility_window: Duration,
    /// How often the engine prunes (one listing of the stack's points for every disk).
    pub prune_every: Duration,
    /// 512 KiB blocks held in memory at once by all the disks' points together (each
    /// read from the image until its PutSnapshotBlock returns): points of many disks
    /// run at once, and `concurrency` alone would let 100 disks hold 800 MiB.
    pub blocks_in_flight: usize,
    /// A disk's staged points (queued, and the one being written) hold at most this many
    /// bytes: a generation applied is staged (its blocks copied out of the image) when it
    /// fits, so the image takes the next generation while the point is written; one that
    /// does not (a base, a huge change, a long queue) is read from the image, and the
    /// disk's next generation waits for it.
    pub stage_max_bytes: u64,
    /// Blocks in flight for all points together while replication has work at hand.
    pub blocks_while_replicating: usize,
    /// A staged point waits this long at most for replication to have nothing at hand
    /// before it starts (then goes in the slow lane): a snapshot started is not left
    /// pending for long (EBS puts one not completed within `timeout_minutes` in error).
    pub yield_max: Duration,
    /// Points written at once by all disks together: each is a snapshot pending until
    /// completed, and the account's quota of pending snapshots (100, "Amazon EBS
    /// endpoints and quotas", AWS General Reference) is shared with everything else that
    /// snapshots in it (AWS Backup, Data Lifecycle Manager, the user's own; "take note
    /// of other workloads that might be running in the account", EBS direct APIs FAQ).
    pub points_at_once: usize,
}

impl PointsConfig {
    pub fn new(stack: impl Into<String>) -> Self {
        PointsConfig {
            stack: stack.into(),
            kms_key_arn: None,
            tiers: Tiers::default(),
            concurrency: 16,
            timeout_minutes: 60,
            settle_timeout: Duration::from_secs(1800),
            retry_base: Duration::from_millis(250),
            call_attempts: 8,
            lock: None,
            visibility_window: Duration::from_secs(120),
            prune_every: Duration::from_secs(600),
            blocks_in_flight: 64,
            stage_max_bytes: 1 << 30,
            blocks_while_replicating: 1,
            yield_max: Duration::from_secs(60),
            points_at_once: 32,
        }
    }
}

impl PointDue {
    /// The point of an applied generation: every block its objects and zero ranges touch.
    pub fn for_manifest(m: &Manifest) -> PointDue {
        let extents = m
            .objects
            .iter()
            .flat_map(|o| o.parts())
            .chain(m.zero_ranges.iter().copied());
        PointDue {
            generation: m.generation,
            parent_generation: m.parent,
            snapshot_time: m.snapshot_time,
            consistency: m.consistency,
            change_id: m.source_change_id.clone(),
            disk_size: m.disk_size,
            blocks: block_ranges(extents),
            attempt: 0,
            snapshot_id: None,
            sealed: false,
            parent_snapshot: None,
            token_salt: Some(new_token_salt()),
            staged: false,
        }
    }
}

/// 64 random bits, hex.
fn new_token_salt() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The 512 KiB block index ranges covering `extents`, sorted and merged.
pub fn block_ranges(extents: impl IntoIterator<Item = Extent>) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = extents
        .into_iter()
        .filter(|e| e.length > 0)
        .map(|e| (e.offset / BLOCK_SIZE, e.end().div_ceil(BLOCK_SIZE)))
        .collect();
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (s, e) in r {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Whole GiB a snapshot of `disk_size` bytes needs (EBS sizes are whole GiB, at least 1).
pub fn volume_gib(disk_size: u64) -> u64 {
    disk_size.div_ceil(1 << 30).max(1)
}

/// Why a point could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PointError {
    #[error("{0}")]
    Cloud(#[from] CloudError),
    /// The image cannot be read as the point needs it (removed, truncated): no point
    /// is better than a point of the wrong bytes.
    #[error("image {path}: {detail}; no point written")]
    Image { path: String, detail: String },
    /// EBS refused the sealed snapshot (it went to `error`); it was deleted.
    #[error("snapshot {id} went to the error state after CompleteSnapshot; deleted, the point is written again")]
    Failed { id: String },
    /// The parent point's snapshot is gone (deleted outside pilotlight).
    #[error("the parent point {id} no longer exists; the point is written again in full")]
    ParentGone { id: String },
    #[error("state: {0}")]
    State(String),
    /// A staged point whose parent point is missing: it would have to be a full point,
    /// and its generation is no longer whole in the image.
    #[error("the point of generation {generation} was staged to be written on the point before it, which is missing; given up, and a full point is written of the image")]
    Unbuildable { generation: u64 },
    #[error("snapshot {id} not completed within {secs} s of sealing it; waiting again later")]
    Unsettled { id: String, secs: u64 },
    /// Sealed, but DescribeSnapshots has not listed it within the visibility window.
    #[error("snapshot {id} was sealed but is still not listed after {secs} s; the point is written again")]
    Vanished { id: String, secs: u64 },
}

/// How a sealed snapshot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sealed {
    Completed,
    /// EBS put it in `error`.
    Failed,
    /// Not listed within the visibility window.
    Vanished,
}

impl PointError {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            PointError::Cloud(e) => e.is_transient(),
            PointError::Image { .. } | PointError::Unbuildable { .. } => false,
            _ => true,
        }
    }
}

/// Writes, resumes and prunes recovery points.
#[derive(Debug)]
pub struct PointWriter<E> {
    pub ebs: Arc<E>,
    pub cfg: PointsConfig,
    /// Sealed snapshots whose status is polled together (clones share it).
    settling: Arc<settle::Settling>,
    /// The calls points have made since this writer was made (clones share them).
    pub calls: Arc<PointCalls>,
    /// Permits for [`PointsConfig::blocks_in_flight`] (clones share them).
    blocks: Arc<tokio::sync::Semaphore>,
    /// Set by the engine while replication has work at hand (messages coming in, a
    /// generation ready to apply): points then go in the slow lane (clones share it).
    pub replicating: Arc<tokio::sync::watch::Sender<bool>>,
    /// Permits for [`PointsConfig::blocks_while_replicating`].
    slow_lane: Arc<tokio::sync::Semaphore>,
    /// Permits for [`PointsConfig::points_at_once`].
    at_once: Arc<tokio::sync::Semaphore>,
}

// Not derived: that would ask `E: Clone`, and the client is shared, not cloned.
impl<E> Clone for PointWriter<E> {
    fn clone(&self) -> Self {
        PointWriter {
            ebs: self.ebs.clone(),
            cfg: self.cfg.clone(),
            settling: self.settling.clone(),
            calls: self.calls.clone(),
            blocks: self.blocks.clone(),
            replicating: self.replicating.clone(),
            slow_lane: self.slow_lane.clone(),
            at_once: self.at_once.clone(),
        }
    }
}

fn client_token(stack: &str, id: &DiskId, due: &PointDue) -> String {
    let (generation, attempt) = (due.generation, due.attempt);
    let salt = due.token_salt.as_deref().unwrap_or("");
    let h = Sha256::digest(format!("{stack}\n{id}\n{generation}\n{attempt}\n{salt}"));
    format!("pl-{}", &hex::encode(h)[..48])
}

fn save(paths: &DiskPaths, st: &DiskState) -> Result<(), PointError> {
    state::save(paths, st).map_err(|e| PointError::State(e.to_string()))
}

impl<E: EbsApi + 'static> PointWriter<E> {
    pub fn new(ebs: E, cfg: PointsConfig) -> Self {
        PointWriter {
            ebs: Arc::new(ebs),
            blocks: Arc::new(tokio::sync::Semaphore::new(cfg.blocks_in_flight.max(1))),
            replicating: Arc::new(tokio::sync::watch::Sender::new(false)),
            at_once: Arc::new(tokio::sync::Semaphore::new(cfg.points_at_once.max(1))),
            slow_lane: Arc::new(tokio::sync::Semaphore::new(
                cfg.blocks_while_replicating.max(1),
            )),
            cfg,
            settling: Default::default(),
            calls: Default::default(),
        }
    }

    /// Calls `f` until it succeeds, fails for good, or runs out of attempts; throttling
    /// and 5xx back off exponentially.
    async fn retrying<T, F, Fut>(&self, f: F) -> Result<T, CloudError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, CloudError>>,
    {
        retrying(&self.cfg, 0, f).await
    }

    /// Writes the disk's due point, if any; returns it once recorded.
    pub async fn write_due(
        &self,
        id: &DiskId,
        st: &mut DiskState,
        paths: &DiskPaths,
    ) -> Result<Option<PointRecord>, PointError> {
        self.write_due_timed(id, st, paths, &PointPhases::default())
            .await
    }

    /// [`Self::write_due`], counting the calls and time of each phase into `ph`.
    pub async fn write_due_timed(
        &self,
        id: &DiskId,
        st: &mut DiskState,
        paths: &DiskPaths,
        ph: &PointPhases,
    ) -> Result<Option<PointRecord>, PointError> {
        let Some(mut due) = st.point_due.clone() else {
            return Ok(None);
        };
        if st.applied != Some(due.generation) {
            // Left from before points were turned off and on: the image moved on.
            st.point_due = None;
            st.points_need_full = true;
            save(paths, st)?;
            return Ok(None);
        }
        // A snapshot from an earlier attempt (a crash, or a failure after starting it).
        // Only a snapshot this receiver sealed (CompleteSnapshot accepted) can become the
        // point: an unsealed one may hold only some blocks whatever its state says (the
        // emulator even calls it `completed`), so it is deleted and the point rewritten.
        if let Some(sid) = due.snapshot_id.clone() {
            match (due.sealed, self.status_of(&sid).await?) {
                (true, Some(SnapshotStatus::Completed)) => {
                    return self.record(st, paths, &due, sid, None).map(Some)
                }
                // Sealed: it becomes the point once EBS says completed. Not listed (yet)
                // is waited for within the visibility window, never deleted: just after
                // CompleteSnapshot, EC2 may not list it. Still not listed after that: gone.
                (true, Some(SnapshotStatus::Pending) | None) => {
                    match ph
                        .settle
                        .time(self.settle(&sid, self.visible_by(), &ph.settle))
                        .await?
                    {
                        Sealed::Completed => {
                            return self.record(st, paths, &due, sid, None).map(Some)
                        }
                        Sealed::Failed => return Err(self.failed(st, paths, due, &sid).await),
                        Sealed::Vanished => {}
                    }
                }
                (_, Some(_)) => self.delete_quietly(&sid).await,
                (_, None) => {}
            }
            due.snapshot_id = None;
            due.sealed = false;
        }
        let parent = self.parent_for(st, &due);
        due.attempt += 1;
        due.token_salt.get_or_insert_with(new_token_salt);
        due.parent_snapshot = parent.as_ref().map(|p| p.snapshot_id.clone());
        st.point_due = Some(due.clone());
        save(paths, st)?;
        let info = PointInfo {
            disk: id.clone(),
            generation: due.generation,
            snapshot_time: due.snapshot_time,
            consistency: due.consistency.as_str().into(),
            change_id: due.change_id.clone(),
            stack: self.cfg.stack.clone(),
            parent: parent.as_ref().map(|p| p.snapshot_id.clone()),
        };
        let (encrypted, kms_key_arn) =
            StartSnapshot::encryption(info.parent.as_deref(), self.cfg.kms_key_arn.as_deref());
        let req = StartSnapshot {
            volume_size_gib: volume_gib(due.disk_size),
            parent: info.parent.clone(),
            description: pilotlight_protocol::points::at_most(
                &format!(
                    "pilotlight recovery point: {id} generation {} at {}",
                    due.generation,
                    pilotlight_protocol::points::time_tag(due.snapshot_time)
                ),
                pilotlight_protocol::points::MAX_DESCRIPTION,
            ),
            tags: info.tags(),
            client_token: client_token(&self.cfg.stack, id, &due),
            encrypted,
            kms_key_arn,
            timeout_minutes: self.cfg.timeout_minutes,
        };
        let started = ph.start.time(self.retrying(|| {
            ph.start.call();
            PointCalls::add(&self.calls.start_snapshot, 1);
            self.ebs.start_snapshot(&req)
        }));
        let sid = match started.await {
            Ok(s) => s,
            Err(e) if e.is_not_found() && parent.is_some() => {
                let gone = info.parent.clone().unwrap_or_default();
                st.points.retain(|p| p.snapshot_id != gone);
                save(paths, st)?;
                return Err(PointError::ParentGone { id: gone });
            }
            Err(e) => return Err(e.into()),
        };
        // A snapshot just started may read as "does not exist" for a while.
        let visible_by = self.visible_by();
        due.snapshot_id = Some(sid.clone());
        st.point_due = Some(due.clone());
        save(paths, st)?;

        let digests = ph
            .puts
            .time(self.put_blocks(&sid, paths, &due, parent.is_none(), visible_by, &ph.puts))
            .await?;
        let aggregate = linear_checksum(digests.values());
        let status = ph
            .complete
            .time(retrying_with(&self.cfg, 0, Some(visible_by), || {
                ph.complete.call();
                self.ebs
                    .complete_snapshot(&sid, digests.len() as u64, &aggregate)
            }))
            .await?;
        // Sealed: after a crash, it is waited for and recorded, not written again.
        due.sealed = true;
        st.point_due = Some(due.clone());
        save(paths, st)?;
        let settled = match status {
            SnapshotStatus::Completed => Sealed::Completed,
            SnapshotStatus::Error => Sealed::Failed,
            SnapshotStatus::Pending => {
                ph.settle
                    .time(self.settle(&sid, self.visible_by(), &ph.settle))
                    .await?
            }
        };
        match settled {
            Sealed::Completed => {}
            Sealed::Failed => return Err(self.failed(st, paths, due, &sid).await),
            Sealed::Vanished => {
                return Err(PointError::Vanished {
                    id: sid,
                    secs: self.cfg.visibility_window.as_secs(),
                })
            }
        }
        // What it wrote, for `points` (the size of each point); only informational.
        let n = digests.len() as u64;
        let tags = [(tag::BLOCKS.to_string(), n.to_string())];
        let visible_by = self.visible_by();
        let tagged = ph
            .tags
            .time(retrying_with(&self.cfg, 0, Some(visible_by), || {
                ph.tags.call();
                self.ebs.create_tags(&sid, &tags)
            }));
        if let Err(e) = tagged.await {
            tracing::warn!(snapshot = %sid, "cannot tag the point with its block count: {e}");
        }
        self.record(st, paths, &due, sid, Some(n)).map(Some)
    }

    /// A turn among the [`PointsConfig::points_at_once`] points written at once (held
    /// until the point ends; the semaphore is never closed).
    pub async fn point_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.at_once.acquire().await.ok()
    }

    /// Waits while replication has work at hand, up to [`PointsConfig::yield_max`].
    pub async fn yield_to_replication(&self) {
        let mut rx = self.replicating.subscribe();
        let _ = tokio::time::timeout(self.cfg.yield_max, rx.wait_for(|busy| !busy)).await;
    }

    /// Whether `due` would be written in full (no parent point to build on): a full
    /// point reads the whole image, so a staged point cannot be one.
    pub fn needs_full(&self, st: &DiskState, due: &PointDue) -> bool {
        self.parent_for(st, due).is_none()
    }

    /// The previous point, when this point can be written on top of it: it holds exactly
    /// this generation's parent and is not larger than the disk now is.
    fn parent_for(&self, st: &DiskState, due: &PointDue) -> Option<PointRecord> {
        if st.points_need_full {
            return None;
        }
        let last = st.points.iter().max_by_key(|p| p.generation)?;
        (due.parent_generation == Some(last.generation)
            && volume_gib(last.disk_size) <= volume_gib(due.disk_size))
        .then(|| last.clone())
    }

    /// Reads each block from the image and writes it, `concurrency` at once. A full
    /// point (no parent) reads only the image's allocated ranges and skips zero blocks;
    /// a child writes every touched block, zero ones too (it would inherit the
    /// parent's bytes otherwise). Returns the blocks written with their digests.
    async fn put_blocks(
        &self,
        sid: &str,
        paths: &DiskPaths,
        due: &PointDue,
        full: bool,
        visible_by: tokio::time::Instant,
        phase: &Phase,
    ) -> Result<BTreeMap<u64, [u8; 32]>, PointError> {
        let path = paths.image.display().to_string();
        let image_err = |detail: String| PointError::Image {
            path: path.clone(),
            detail,
        };
        let file = std::fs::File::open(&paths.image)
            .map_err(|e| image_err(format!("cannot open it: {e}")))?;
        let len = file.metadata().map_err(|e| image_err(e.to_string()))?.len();
        if len < due.disk_size {
            return Err(image_err(format!(
                "{len} bytes, shorter than the disk ({} bytes)",
                due.disk_size
            )));
        }
        let ranges = if full {
            let data =
                pilotlight_durable::sparse::data_segments(&file, Extent::new(0, due.disk_size))
                    .map_err(|e| image_err(format!("cannot read its allocation map: {e}")))?;
            block_ranges(data)
        } else {
            due.blocks.clone()
        };
        let last_block = due.disk_size.div_ceil(BLOCK_SIZE);
        let file = Arc::new(file);
        let disk_size = due.disk_size;
        let indices = ranges.into_iter().flat_map(|(s, e)| s..e.min(last_block));
        let written: Vec<Option<(u64, [u8; 32])>> = futures::stream::iter(indices)
            .map(|i| {
                let file = file.clone();
                async move {
                    // While replication has work, staged points take the slow lane:
                    // they share the emulator's (or the account's) request rate and the
                    // cores with replication, which comes first (#35). A point read from
                    // the image holds its disk's replication: it does not. Held until
                    // the block is written (the semaphores are never closed).
                    let slow = due.staged && *self.replicating.borrow();
                    let _slow = if slow {
                        self.slow_lane.acquire().await.ok()
                    } else {
                        None
                    };
                    let _block = self.blocks.acquire().await.ok();
                    // Allocated here, on a runtime thread, not on a blocking one: glibc
                    // gives each of the many blocking threads an arena of its own, and
                    // freed blocks kept in a dozen arenas raised the receiver's peak RSS
                    // with many disks' points at once (scripts/soak).
                    let buf = vec![0u8; BLOCK_SIZE as usize];
                    let read = tokio::task::spawn_blocking(move || {
                        read_block_into(&file, i, disk_size, buf)
                    })
                    .await
                    .map_err(|e| image_err(e.to_string()))?
                    .map_err(|e| image_err(format!("block {i}: {e}")))?;
                    let (data, digest) = read;
                    if full && data.iter().all(|&b| b == 0) {
                        return Ok(None);
                    }
                    let sum = block_checksum(&digest);
                    retrying_with(&self.cfg, i, Some(visible_by), || {
                        phase.call();
                        PointCalls::add(&self.calls.put_snapshot_block, 1);
                        self.ebs.put_snapshot_block(sid, i, data.clone(), &sum)
                    })
                    .await?;
                    Ok::<_, PointError>(Some((i, digest)))
                }
            })
            .buffer_unordered(self.cfg.concurrency.max(1))
            .try_collect()
            .await?;
        Ok(written.into_iter().flatten().collect())
    }

    async fn status_of(&self, sid: &str) -> Result<Option<SnapshotStatus>, PointError> {
        let filter = SnapshotFilter::id(sid);
        match self.describe(&filter).await {
            Ok(v) => Ok(v.into_iter().find(|s| s.id == sid).map(|s| s.status)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// When "not listed" stops meaning "not visible yet" for a snapshot sealed now.
    fn visible_by(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.cfg.visibility_window
    }

    /// A sealed snapshot EBS put in `error`: deleted, and forgotten by the due point (its
    /// next attempt starts a new snapshot at once).
    async fn failed(
        &self,
        st: &mut DiskState,
        paths: &DiskPaths,
        mut due: PointDue,
        sid: &str,
    ) -> PointError {
        self.delete_quietly(sid).await;
        due.snapshot_id = None;
        due.sealed = false;
        st.point_due = Some(due);
        if let Err(e) = save(paths, st) {
            return e;
        }
        PointError::Failed { id: sid.into() }
    }

    async fn delete_quietly(&self, sid: &str) {
        match self.delete(sid).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => tracing::warn!(
                snapshot = sid,
                "cannot delete an unfinished point's snapshot (pruning tries again): {e}"
            ),
        }
    }

    fn record(
        &self,
        st: &mut DiskState,
        paths: &DiskPaths,
        due: &PointDue,
        sid: String,
        blocks_written: Option<u64>,
    ) -> Result<PointRecord, PointError> {
        let parent = due.parent_snapshot.clone();
        let rec = PointRecord {
            generation: due.generation,
            snapshot_id: sid,
            snapshot_time: due.snapshot_time,
            disk_size: due.disk_size,
            blocks_written,
            parent,
        };
        st.points.retain(|p| p.generation != rec.generation);
        st.points.push(rec.clone());
        st.points.sort_by_key(|p| p.generation);
        // The state is saved a few times per point: it keeps only the newest (the next
        // parent); `points` lists them all from EBS.
        let excess = st.points.len().saturating_sub(RECENT_POINTS);
        st.points.drain(..excess);
        st.point_due = None;
        st.points_need_full = false;
        st.point_error = None;
        save(paths, st)?;
        Ok(rec)
    }

    /// Gives a point up after a permanent failure (or too many attempts): its snapshot
    /// is deleted, the next point is written in full, replication goes on.
    pub async fn give_up(
        &self,
        st: &mut DiskState,
        paths: &DiskPaths,
        why: &PointError,
    ) -> Result<(), PointError> {
        if let Some(sid) = st.point_due.as_ref().and_then(|d| d.snapshot_id.clone()) {
            self.delete_quietly(&sid).await;
        }
        st.point_due = None;
        st.points_need_full = true;
        st.points_failed += 1;
        st.point_error = Some(why.to_string());
        save(paths, st)
    }
}

impl<E: EbsApi + 'static> PointWriter<E> {
    /// DeleteSnapshot, retried, counted.
    async fn delete(&self, sid: &str) -> Result<(), CloudError> {
        self.retrying(|| {
            PointCalls::add(&self.calls.delete_snapshot, 1);
            self.ebs.delete_snapshot(sid)
        })
        .await
    }
}

/// `f` until it succeeds, fails for good, or `cfg.call_attempts` attempts have failed;
/// exponential back-off from `cfg.retry_base` (plus a little per-call jitter `salt`).
async fn retrying<T, F, Fut>(cfg: &PointsConfig, salt: u64, f: F) -> Result<T, CloudError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, CloudError>>,
{
    retrying_with(cfg, salt, None, f).await
}

/// [`retrying`], and until `visible_by` also "no such snapshot" (a snapshot just started
/// or completed is not visible everywhere at once).
async fn retrying_with<T, F, Fut>(
    cfg: &PointsConfig,
    salt: u64,
    visible_by: Option<tokio::time::Instant>,
    f: F,
) -> Result<T, CloudError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, CloudError>>,
{
    pilotlight_cloud::retry::Retry {
        base: cfg.retry_base,
        max_wait: Duration::from_secs(20),
        attempts: cfg.call_attempts.max(1),
    }
    .run(salt, visible_by, f)
    .await
}

/// Block `i` of the image, zero-padded past the disk's end, with its SHA-256.
pub fn read_block(
    file: &std::fs::File,
    i: u64,
    disk_size: u64,
) -> std::io::Result<(Bytes, [u8; 32])> {
    read_block_into(file, i, disk_size, vec![0u8; BLOCK_SIZE as usize])
}

/// [`read_block`] into `buf` (a zeroed block's worth of bytes).
pub fn read_block_into(
    file: &std::fs::File,
    i: u64,
    disk_size: u64,
    mut buf: Vec<u8>,
) -> std::io::Result<(Bytes, [u8; 32])> {
    buf.resize(BLOCK_SIZE as usize, 0);
    let at = i * BLOCK_SIZE;
    let n = (disk_size - at).min(BLOCK_SIZE) as usize;
    file.read_exact_at(&mut buf[..n], at)?;
    let digest: [u8; 32] = Sha256::digest(&buf).into();
    Ok((Bytes::from(buf), digest))
}

#[cfg(test)]
mod tests;
