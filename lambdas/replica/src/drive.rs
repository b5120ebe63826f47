//! One disk's chain, moved forward: claim a generation (its parent's point complete),
//! start its snapshot, get its shards written (here, or by shard tasks), seal it once
//! every shard is recorded, record the point once EBS says `completed`. Every change of
//! the chain head is a conditional write: an invocation that loses a race reads the head
//! again and decides again, so duplicates, retries and concurrent invocations never
//! advance a disk twice.
//!
//! Crash safety: the head says where an attempt is. Not started: StartSnapshot again with
//! the same client token (the same snapshot). Started: the shards not recorded are written
//! (again; PutSnapshotBlock overwrites). Sealed: waited for; a snapshot EBS put in `error`
//! (including one sealed by an invocation that died before CompleteSnapshot: StartSnapshot's
//! Timeout cancels it) is deleted and the point written again as a new attempt.

use crate::chain::{self, Read};
use crate::error::ReplicaError;
use crate::shard::{self, PointPlan};
use crate::Replica;
use chrono::{DateTime, Utc};
use pilotlight_cloud::ebs::{
    linear_checksum, EbsApi, SnapshotFilter, SnapshotStatus, StartSnapshot, BLOCKS_PER_GIB,
};
use pilotlight_cloud::sqs::{Queue, MAX_BATCH};
use pilotlight_cloud::ObjectStore;
use pilotlight_protocol::points::{at_most, tag, time_tag, PointInfo, MAX_DESCRIPTION};
use pilotlight_protocol::replica::{ChainHead, HeadPoint, PendingPoint, ShardTask};
use pilotlight_protocol::{DiskId, Manifest};
use pilotlight_store::{manifests, DocError};
use sha2::{Digest, Sha256};

/// After this many failed attempts a point is given up: the head keeps the error, the
/// message goes to the dead-letter queue, the alarm fires.
pub const MAX_ATTEMPTS: u32 = 10;

/// What became of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing more to do for it.
    Done(String),
    /// Not yet (a parent's point, shards in flight, EBS still `pending`): try later.
    Wait(String),
}

/// Whole GiB a snapshot of `disk_size` bytes needs (at least 1).
pub fn volume_gib(disk_size: u64) -> u64 {
    disk_size.div_ceil(1 << 30).max(1)
}

enum Progress {
    /// The head changed (or another invocation changed it): read it again.
    Again,
    Wait(String),
    /// The generation's parent (committed) has no point yet: write that one first.
    Parent(u64),
}

/// Moves `disk`'s chain until generation `g` has its point, or says why not yet.
pub async fn generation<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    g: u64,
    now: impl Fn() -> DateTime<Utc>,
) -> Result<Step, ReplicaError> {
    // The generations to write, `g` last: a parent whose point is missing (its own event
    // lost, or gone to the dead-letter queue) is written first, by whoever needs it.
    let mut targets = vec![g];
    // Each round either returns or saw the head change; a bounded number of rounds keeps
    // one invocation from chasing a disk forever.
    for _ in 0..64 {
        let Some(&t) = targets.last() else { break };
        let read = chain::read(&r.store, &r.cfg.prefix, disk, now()).await?;
        let head = &read.head;
        let newest = head.point.as_ref().map_or(0, |p| p.generation);
        if let Some(p) = head.pending.clone() {
            if p.generation > t && newest < t {
                if t != g {
                    targets.pop();
                    continue;
                }
                return Ok(Step::Done(format!(
                    "generation {g} was superseded by full generation {}",
                    p.generation
                )));
            }
            if p.generation <= t {
                match advance(r, &read, p.clone(), &now).await? {
                    Progress::Again => continue,
                    Progress::Wait(why) if p.generation == g => return Ok(Step::Wait(why)),
                    Progress::Wait(why) => {
                        return Ok(Step::Wait(format!(
                            "waits for generation {}'s point: {why}",
                            p.generation
                        )))
                    }
                    Progress::Parent(_) => unreachable_parent()?,
                }
            }
        }
        if newest >= t {
            if t == g {
                return Ok(Step::Done(format!("generation {g} has its point")));
            }
            targets.pop();
            continue;
        }
        match claim(r, &read, t, &now).await? {
            Progress::Again => continue,
            Progress::Wait(why) => return Ok(Step::Wait(why)),
            Progress::Parent(pg) if targets.len() < 32 => targets.push(pg),
            Progress::Parent(pg) => {
                return Ok(Step::Wait(format!(
                    "generation {g} waits for a long chain of unwritten parents (down to {pg})"
                )))
            }
        }
    }
    Ok(Step::Wait(
        "the chain head kept changing; tried again later".into(),
    ))
}

fn unreachable_parent() -> Result<(), ReplicaError> {
    Err(ReplicaError::Internal(
        "a pending point asked for its parent".into(),
    ))
}

/// Claims generation `g` when its parent's point is the head's (or it is a full one).
async fn claim<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    read: &Read,
    g: u64,
    now: &impl Fn() -> DateTime<Utc>,
) -> Result<Progress, ReplicaError> {
    let head = &read.head;
    let m = manifests::read(&r.store, &r.cfg.prefix, &head.disk, g).await?;
    let parent = match (m.parent, &head.point) {
        (None, _) => None,
        (Some(pg), Some(pt)) if pg == pt.generation => Some(pt.clone()),
        (Some(pg), Some(pt)) if pg < pt.generation => {
            return Err(ReplicaError::NoBase {
                generation: g,
                parent: pg,
            })
        }
        (Some(pg), newest) => {
            // The parent's point: written by this chain later, or (a stack switched from
            // image mode, or a head lost) already in EBS.
            if newest.is_none() {
                if let Some(p) = pilotlight_store::points::of_generation(
                    &r.ebs,
                    &head.disk,
                    pg,
                    Some(&r.cfg.stack),
                )
                .await?
                {
                    let mut next = head.clone();
                    next.point = Some(HeadPoint {
                        generation: p.generation,
                        snapshot_id: p.snapshot_id,
                        snapshot_time: p.snapshot_time,
                        disk_size: parent_size(r, &head.disk, pg).await?,
                    });
                    next.updated_at = now();
                    chain::replace(&r.store, &r.cfg.prefix, read, &next).await?;
                    return Ok(Progress::Again);
                }
            }
            return match manifests::read(&r.store, &r.cfg.prefix, &head.disk, pg).await {
                Ok(_) => Ok(Progress::Parent(pg)),
                Err(DocError::Missing { .. }) if newest.is_none() => Err(ReplicaError::NoBase {
                    generation: g,
                    parent: pg,
                }),
                Err(DocError::Missing { .. }) => Ok(Progress::Wait(format!(
                    "parent generation {pg} is not committed yet"
                ))),
                Err(e) => Err(e.into()),
            };
        }
    };
    if let Some(p) = &parent {
        if volume_gib(m.disk_size) < volume_gib(p.disk_size) {
            return Err(ReplicaError::Shrunk {
                generation: g,
                disk_size: m.disk_size,
                parent_gib: volume_gib(p.disk_size),
            });
        }
    }
    let plan = PointPlan::new(&m, parent.is_none(), r.cfg.shard_blocks, r.cfg.shard_bytes);
    let mut next = head.clone();
    next.pending = Some(PendingPoint {
        generation: g,
        parent,
        attempt: 1,
        token_salt: format!("{:016x}", rand::random::<u64>()),
        snapshot_id: None,
        shard_blocks: r.cfg.shard_blocks,
        shard_bytes: r.cfg.shard_bytes,
        shards: plan.shards.len() as u32,
        sealed_at: None,
        claimed_at: now(),
        dispatched_at: None,
    });
    next.updated_at = now();
    chain::replace(&r.store, &r.cfg.prefix, read, &next).await?;
    Ok(Progress::Again)
}

/// Replaces the head read as `read` with its pending point changed by `f`; false when
/// another invocation changed the head first.
async fn replace_pending<S: ObjectStore, E, Q>(
    r: &Replica<S, E, Q>,
    read: &Read,
    now: DateTime<Utc>,
    f: impl FnOnce(&mut PendingPoint),
) -> Result<bool, ReplicaError> {
    let mut next = read.head.clone();
    if let Some(np) = next.pending.as_mut() {
        f(np);
    }
    next.updated_at = now;
    chain::replace(&r.store, &r.cfg.prefix, read, &next).await
}

/// The disk size of generation `pg` (its manifest), for a point found in EBS.
async fn parent_size<S: ObjectStore, E, Q>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    pg: u64,
) -> Result<u64, ReplicaError> {
    Ok(manifests::read(&r.store, &r.cfg.prefix, disk, pg)
        .await?
        .disk_size)
}

/// One step of the pending point.
async fn advance<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    read: &Read,
    p: PendingPoint,
    now: &impl Fn() -> DateTime<Utc>,
) -> Result<Progress, ReplicaError> {
    let disk = &read.head.disk;
    let m = manifests::read(&r.store, &r.cfg.prefix, disk, p.generation).await?;
    let plan = PointPlan::new(&m, p.parent.is_none(), p.shard_blocks, p.shard_bytes);
    if plan.shards.len() as u32 != p.shards {
        return Err(ReplicaError::Internal(format!(
            "generation {} planned in {} shards, now {}",
            p.generation,
            p.shards,
            plan.shards.len()
        )));
    }
    let Some(sid) = p.snapshot_id.clone() else {
        return start(r, read, p, &m, now).await;
    };
    if let Some(sealed_at) = p.sealed_at {
        return settle(r, read, p, &m, &sid, sealed_at, now).await;
    }
    let done = recorded_shards(r, disk, &p).await?;
    let missing: Vec<u32> = (0..p.shards).filter(|n| !done.contains(n)).collect();
    if missing.is_empty() {
        return seal(r, read, p, &m, &sid, now).await;
    }
    if p.shards == 1 {
        // A small point is written here, by the invocation that claimed it.
        return match shard::write(r, &m, &p, &plan, 0).await {
            Ok(_) | Err(ReplicaError::Stale(_)) => Ok(Progress::Again),
            Err(e) => Err(e),
        };
    }
    let since = p.dispatched_at.unwrap_or(p.claimed_at);
    if p.dispatched_at.is_none() || now() - since > r.cfg.redispatch_after {
        dispatch(r, disk, &p, &missing).await?;
        replace_pending(r, read, now(), |np| np.dispatched_at = Some(now())).await?;
    }
    Ok(Progress::Wait(format!(
        "{} of {} shards written",
        p.shards as usize - missing.len(),
        p.shards
    )))
}

/// The shards of this attempt that are recorded (one LIST of the generation's records).
async fn recorded_shards<S: ObjectStore, E, Q>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    p: &PendingPoint,
) -> Result<Vec<u32>, ReplicaError> {
    let under =
        pilotlight_protocol::keys::replica_generation_prefix(&r.cfg.prefix, disk, p.generation);
    let keys = r.store.list(&under, |k| k.ends_with(".json")).await?;
    Ok(keys
        .iter()
        .filter_map(
            |k| match pilotlight_protocol::ObjectKey::parse(&r.cfg.prefix, k) {
                Ok(pilotlight_protocol::ObjectKey::ReplicaShard { attempt, shard, .. })
                    if attempt == p.attempt && shard < p.shards =>
                {
                    Some(shard)
                }
                _ => None,
            },
        )
        .collect())
}

/// Sends a task per missing shard (SendMessageBatch, 10 at a time).
async fn dispatch<S, E, Q: Queue>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    p: &PendingPoint,
    missing: &[u32],
) -> Result<(), ReplicaError> {
    for chunk in missing.chunks(MAX_BATCH) {
        let bodies: Vec<String> = chunk
            .iter()
            .map(|&n| ShardTask::new(disk.clone(), p.generation, p.attempt, n).to_json())
            .collect();
        let failed = r
            .cfg
            .retry
            .run(p.generation, None, || r.tasks.send_batch(&bodies))
            .await?;
        if let Some((i, why)) = failed.first() {
            return Err(ReplicaError::Internal(format!(
                "shard task {i} of generation {} not sent: {why}",
                p.generation
            )));
        }
    }
    Ok(())
}

fn client_token(stack: &str, disk: &DiskId, p: &PendingPoint) -> String {
    let h = Sha256::digest(format!(
        "{stack}\n{disk}\n{}\n{}\n{}",
        p.generation, p.attempt, p.token_salt
    ));
    format!("plr-{}", &hex::encode(h)[..48])
}

/// StartSnapshot (idempotent by its client token), recorded in the head.
async fn start<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    read: &Read,
    p: PendingPoint,
    m: &Manifest,
    now: &impl Fn() -> DateTime<Utc>,
) -> Result<Progress, ReplicaError> {
    let disk = &read.head.disk;
    let parent = p.parent.as_ref().map(|x| x.snapshot_id.clone());
    let info = PointInfo {
        disk: disk.clone(),
        generation: m.generation,
        snapshot_time: m.snapshot_time,
        consistency: m.consistency.as_str().into(),
        change_id: m.source_change_id.clone(),
        stack: r.cfg.stack.clone(),
        parent: parent.clone(),
    };
    let (encrypted, kms_key_arn) =
        StartSnapshot::encryption(parent.as_deref(), r.cfg.kms_key_arn.as_deref());
    let req = StartSnapshot {
        volume_size_gib: volume_gib(m.disk_size),
        parent: parent.clone(),
        description: at_most(
            &format!(
                "pilotlight recovery point: {disk} generation {} at {}",
                m.generation,
                time_tag(m.snapshot_time)
            ),
            MAX_DESCRIPTION,
        ),
        tags: info.tags(),
        client_token: client_token(&r.cfg.stack, disk, &p),
        encrypted,
        kms_key_arn,
        timeout_minutes: r.cfg.timeout_minutes,
    };
    let sid = match r
        .cfg
        .retry
        .run(m.generation, None, || r.ebs.start_snapshot(&req))
        .await
    {
        Ok(s) => s,
        Err(e) if e.is_not_found() && parent.is_some() => {
            let id = parent.unwrap_or_default();
            let mut next = read.head.clone();
            next.pending = None;
            next.point = None;
            next.last_error = Some(
                ReplicaError::ParentGone {
                    id: id.clone(),
                    generation: m.generation,
                }
                .to_string(),
            );
            next.updated_at = now();
            chain::replace(&r.store, &r.cfg.prefix, read, &next).await?;
            return Err(ReplicaError::ParentGone {
                id,
                generation: m.generation,
            });
        }
        Err(e) => return Err(e.into()),
    };
    replace_pending(r, read, now(), |np| np.snapshot_id = Some(sid)).await?;
    Ok(Progress::Again)
}

/// Every shard recorded: the head says sealed, then CompleteSnapshot with the count and
/// the LINEAR checksum of every written block in index order.
async fn seal<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    read: &Read,
    p: PendingPoint,
    m: &Manifest,
    sid: &str,
    now: &impl Fn() -> DateTime<Utc>,
) -> Result<Progress, ReplicaError> {
    let disk = &read.head.disk;
    let mut digests: Vec<(u64, [u8; 32])> = Vec::new();
    for n in 0..p.shards {
        let key = shard::shard_key(r, disk, p.generation, p.attempt, n);
        let doc = shard::recorded(r, disk, p.generation, p.attempt, n)
            .await?
            .ok_or_else(|| ReplicaError::BadShard {
                key: key.clone(),
                detail: "listed but gone".into(),
            })?;
        if doc.snapshot_id != sid {
            return Err(ReplicaError::BadShard {
                key,
                detail: format!("names snapshot {}, not {sid}", doc.snapshot_id),
            });
        }
        digests.extend(doc.blocks.iter().map(|b| (b.index, b.sha256.0)));
    }
    if !digests.windows(2).all(|w| w[0].0 < w[1].0)
        || digests
            .last()
            .is_some_and(|b| b.0 >= volume_gib(m.disk_size) * BLOCKS_PER_GIB)
    {
        return Err(ReplicaError::Internal(format!(
            "generation {}: shard records overlap or exceed the volume",
            m.generation
        )));
    }
    let sealed_at = now();
    if !replace_pending(r, read, sealed_at, |np| np.sealed_at = Some(sealed_at)).await? {
        return Ok(Progress::Again);
    }
    let aggregate = linear_checksum(digests.iter().map(|d| &d.1));
    let visible_by = tokio::time::Instant::now() + r.cfg.visibility_window;
    let status = r
        .cfg
        .retry
        .run(m.generation, Some(visible_by), || {
            r.ebs
                .complete_snapshot(sid, digests.len() as u64, &aggregate)
        })
        .await;
    match status {
        Ok(_) => {}
        // A refused CompleteSnapshot leaves the snapshot unsealed: it times out into
        // `error` and the attempt is written again.
        Err(e) if !e.is_transient() => {
            tracing::warn!(snapshot = sid, "CompleteSnapshot refused: {e}");
        }
        Err(e) => return Err(e.into()),
    }
    // Settled next round, from the head as written (with the ETag the next write needs).
    Ok(Progress::Again)
}

/// A sealed snapshot: recorded as the point once `completed`; written again (a new
/// attempt) once `error`, or when it is still not listed after the visibility window.
async fn settle<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    read: &Read,
    p: PendingPoint,
    m: &Manifest,
    sid: &str,
    sealed_at: DateTime<Utc>,
    now: &impl Fn() -> DateTime<Utc>,
) -> Result<Progress, ReplicaError> {
    let deadline = tokio::time::Instant::now() + r.cfg.settle_wait;
    let mut wait = r.cfg.retry.base;
    let status = loop {
        let filter = SnapshotFilter::id(sid);
        let found = match r
            .cfg
            .retry
            .run(0, None, || r.ebs.describe_snapshots(&filter))
            .await
        {
            Ok(v) => v.into_iter().find(|s| s.id == sid).map(|s| s.status),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        match found {
            Some(SnapshotStatus::Pending) | None if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
            other => break other,
        }
    };
    let visible_for = (now() - sealed_at).to_std().unwrap_or_default();
    match status {
        Some(SnapshotStatus::Completed) => finish(r, read, p, m, sid, now).await,
        Some(SnapshotStatus::Pending) => Ok(Progress::Wait(format!(
            "snapshot {sid} sealed, EBS still completing it"
        ))),
        None if visible_for < r.cfg.visibility_window => Ok(Progress::Wait(format!(
            "snapshot {sid} sealed, not listed yet"
        ))),
        Some(SnapshotStatus::Error) | None => retry_attempt(r, read, p, sid, now).await,
    }
}

/// The point is complete: the head moves to it.
async fn finish<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    read: &Read,
    p: PendingPoint,
    m: &Manifest,
    sid: &str,
    now: &impl Fn() -> DateTime<Utc>,
) -> Result<Progress, ReplicaError> {
    let mut next: ChainHead = read.head.clone();
    next.point = Some(HeadPoint {
        generation: p.generation,
        snapshot_id: sid.to_string(),
        snapshot_time: m.snapshot_time,
        disk_size: m.disk_size,
    });
    next.pending = None;
    next.points_written += 1;
    next.last_error = None;
    next.updated_at = now();
    if chain::replace(&r.store, &r.cfg.prefix, read, &next).await? {
        let blocks = count_blocks(r, &read.head.disk, &p).await;
        if r.cfg.emf {
            let line = crate::emf::point_line(
                &r.cfg.stack,
                &read.head.disk,
                m.snapshot_time,
                now(),
                blocks.unwrap_or(0),
            );
            println!("{line}");
        }
        if let Some(n) = blocks {
            let tags = [(tag::BLOCKS.to_string(), n.to_string())];
            if let Err(e) = r
                .cfg
                .retry
                .run(0, None, || r.ebs.create_tags(sid, &tags))
                .await
            {
                tracing::warn!(
                    snapshot = sid,
                    "cannot tag the point with its block count: {e}"
                );
            }
        }
        tracing::info!(disk = %read.head.disk, generation = p.generation, snapshot = sid, "point completed");
    }
    Ok(Progress::Again)
}

async fn count_blocks<S: ObjectStore, E, Q>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    p: &PendingPoint,
) -> Option<u64> {
    let mut n = 0;
    for s in 0..p.shards {
        n += shard::recorded(r, disk, p.generation, p.attempt, s)
            .await
            .ok()??
            .blocks
            .len() as u64;
    }
    Some(n)
}

/// The attempt's snapshot failed: deleted, and the point written again from the start.
async fn retry_attempt<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    read: &Read,
    p: PendingPoint,
    sid: &str,
    now: &impl Fn() -> DateTime<Utc>,
) -> Result<Progress, ReplicaError> {
    if let Err(e) = r
        .cfg
        .retry
        .run(0, None, || r.ebs.delete_snapshot(sid))
        .await
    {
        if !e.is_not_found() {
            tracing::warn!(
                snapshot = sid,
                "cannot delete a failed attempt's snapshot: {e}"
            );
        }
    }
    let why = format!(
        "generation {} attempt {}: snapshot {sid} failed (error state, or never listed after sealing)",
        p.generation, p.attempt
    );
    if p.attempt >= MAX_ATTEMPTS {
        return Err(ReplicaError::Internal(format!(
            "{why}; gave up after {MAX_ATTEMPTS} attempts"
        )));
    }
    let mut next = read.head.clone();
    next.attempts_failed += 1;
    next.last_error = Some(why);
    next.pending = Some(PendingPoint {
        attempt: p.attempt + 1,
        token_salt: format!("{:016x}", rand::random::<u64>()),
        snapshot_id: None,
        sealed_at: None,
        claimed_at: now(),
        dispatched_at: None,
        ..p
    });
    next.updated_at = now();
    chain::replace(&r.store, &r.cfg.prefix, read, &next).await?;
    Ok(Progress::Again)
}

/// The schedule's sweep: every disk with a chain is moved to its newest committed
/// generation (one LIST of its manifests each), so a point whose events were all lost or
/// dead-lettered is still written. Returns (disk, step) for each disk that had work.
pub async fn sweep<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    now: impl Fn() -> DateTime<Utc> + Copy,
) -> Result<Vec<(DiskId, Result<Step, String>)>, ReplicaError> {
    let mut out = Vec::new();
    for h in chain::all(&r.store, &r.cfg.prefix, now()).await? {
        let newest = h.point.as_ref().map_or(0, |p| p.generation);
        let Some(&last) = manifests::list(&r.store, &r.cfg.prefix, &h.disk)
            .await?
            .last()
        else {
            continue;
        };
        if last > newest || h.pending.is_some() {
            let step = generation(r, &h.disk, last.max(newest), now)
                .await
                .map_err(|e| e.to_string());
            out.push((h.disk.clone(), step));
        }
    }
    Ok(out)
}
