//! An export from a point larger than one range (`export_range_bytes`, 4 GiB), fanned out
//! over invocations: one S3 multipart upload whose parts many invocations write at once.
//!
//! ```text
//! export request ──► plan.json (create-only: CreateMultipartUpload once) ──► one task per range
//!                                                                             (task queue)
//! range task ──► lease p/{range}.json (If-Match) ──► ListSnapshotBlocks of its window,
//!                GetSnapshotBlock, UploadPart, each part's SHA-256 ──► p/{range}.json: done
//!            ──► every range done? CompleteMultipartUpload ──► result.json (composite SHA-256)
//! schedule   ──► ranges with no record (16 minutes on) or a lapsed lease: sent again; all
//!                done but no result: completed
//! ```
//!
//! - **One writer per range.** A range's record is claimed with a conditional write and
//!   leased for `export_lease` (8 minutes), longer than the function lives (300 s); its
//!   holder starts no part in the last `export_margin` of it. A range is taken over only
//!   once its lease ran out, so two invocations never upload the same part at once, and
//!   the ETags a done record lists are the parts' last uploads (what
//!   CompleteMultipartUpload wants: "the specified ETag might not have matched the
//!   uploaded part's ETag" is an `InvalidPart`).
//! - **Completion.** Whichever invocation finds every range done completes the upload;
//!   two that do complete the same parts, and one that finds the upload already gone
//!   (NoSuchUpload) checks the object is there at its size.
//! - **Checksum.** No invocation sees every byte, so the result carries the composite
//!   SHA-256 of the parts' SHA-256s (`parts_sha256`) instead of the image's.

use crate::drive::Step;
use crate::error::ReplicaError;
use crate::Replica;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::sqs::{Queue, MAX_BATCH};
use pilotlight_cloud::{ErrorKind, ObjectStore, PutOptions};
use pilotlight_protocol::replica::REPLICA_VERSION;
use pilotlight_protocol::replica_export::{
    composite_sha256, ExportPlan, ExportRange, ExportTask, PartDone, MAX_PLAN_BYTES,
    MAX_RANGE_DOC_BYTES,
};
use pilotlight_protocol::{DiskId, ExportResult, Name, ObjectKey, Sha256Hex};
use pilotlight_store::exports;
use pilotlight_store::upload::{part_size_for, ExportError, PointReader};
use sha2::{Digest, Sha256};

/// The plan for exporting `snapshot` (`size` bytes) as the image of export `id`: parts of
/// about `export_part_bytes`, ranges of about `export_range_bytes` (at least one part);
/// `upload_id` is the multipart upload's.
pub fn plan(
    id: &Name,
    generation: u64,
    snapshot: &str,
    size: u64,
    cfg: &crate::ReplicaConfig,
    upload_id: String,
    now: DateTime<Utc>,
) -> ExportPlan {
    let (part_bytes, range_bytes) = (cfg.export_part_bytes, cfg.export_range_bytes);
    let part_size = part_size_for(size, part_bytes);
    let parts = size.div_ceil(part_size).max(1) as u32;
    ExportPlan {
        version: REPLICA_VERSION,
        id: id.clone(),
        generation,
        snapshot_id: snapshot.to_string(),
        size,
        part_size,
        parts,
        parts_per_range: (range_bytes / part_size).clamp(1, parts as u64) as u32,
        upload_id,
        created_at: now,
    }
}

fn plan_key(r_prefix: &pilotlight_protocol::Prefix, disk: &DiskId, id: &Name) -> String {
    ObjectKey::ExportPlan {
        disk: disk.clone(),
        id: id.clone(),
    }
    .to_key(r_prefix)
}

fn range_key(
    r_prefix: &pilotlight_protocol::Prefix,
    disk: &DiskId,
    id: &Name,
    range: u32,
) -> String {
    ObjectKey::ExportRange {
        disk: disk.clone(),
        id: id.clone(),
        range,
    }
    .to_key(r_prefix)
}

/// The export's plan, if there is one; a plan that does not parse is an error that names
/// its key (the export is answered as failed by the caller).
pub async fn read_plan<S: ObjectStore, E, Q>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    id: &Name,
) -> Result<Option<ExportPlan>, ReplicaError> {
    let key = plan_key(&r.cfg.prefix, disk, id);
    match r.store.get_if_exists(&key, MAX_PLAN_BYTES as u64).await {
        Ok(Some(body)) => ExportPlan::from_json(&body, id)
            .map(Some)
            .map_err(|e| ReplicaError::Internal(format!("export plan {key}: {e}"))),
        Ok(None) => Ok(None),
        Err(e) if e.kind == ErrorKind::TooLarge => Err(ReplicaError::Internal(format!(
            "export plan {key} is larger than a plan may be"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Starts (or finds) the fanned-out export of `snapshot` and sends a task per range that
/// is neither done nor held; completes it when every range is done.
#[allow(clippy::too_many_arguments)]
pub async fn start<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    id: &Name,
    generation: u64,
    snapshot: &str,
    size: u64,
    now: DateTime<Utc>,
) -> Result<Step, ReplicaError> {
    let plan = match read_plan(r, disk, id).await? {
        Some(p) => p,
        None => {
            let image = exports::image_key(&r.cfg.prefix, disk, id);
            let upload_id = r.store.create_multipart(&image).await?;
            let p = plan(id, generation, snapshot, size, &r.cfg, upload_id, now);
            let key = plan_key(&r.cfg.prefix, disk, id);
            match r
                .store
                .put(&key, p.to_json().into(), PutOptions::json().create_only())
                .await
            {
                Ok(_) => p,
                // Another invocation planned it first: its upload is the one.
                Err(e) if e.kind == ErrorKind::PreconditionFailed => {
                    let _ = r.store.abort_multipart(&image, &p.upload_id).await;
                    read_plan(r, disk, id).await?.ok_or_else(|| {
                        ReplicaError::Stale(format!("export {id}: its plan vanished"))
                    })?
                }
                Err(e) => {
                    let _ = r.store.abort_multipart(&image, &p.upload_id).await;
                    return Err(e.into());
                }
            }
        }
    };
    if (plan.generation, plan.snapshot_id.as_str(), plan.size) != (generation, snapshot, size) {
        return Err(ReplicaError::Internal(format!(
            "export {id}: its plan is for generation {} ({}), not {generation} ({snapshot})",
            plan.generation, plan.snapshot_id
        )));
    }
    drive(r, disk, &plan, now, chrono::Duration::zero()).await
}

/// Sends a task for each range with no record (once the plan is `quiet` old) or a lapsed
/// lease; completes the export when every range is done.
async fn drive<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    plan: &ExportPlan,
    now: DateTime<Utc>,
    quiet: chrono::Duration,
) -> Result<Step, ReplicaError> {
    let mut missing = Vec::new();
    let mut done = 0;
    for range in 0..plan.ranges() {
        match read_range(r, disk, plan, range).await? {
            Some((d, _)) if d.is_done() => done += 1,
            Some((d, _)) if d.lease_until > now => {}
            Some(_) => missing.push(range),
            None if now - plan.created_at >= quiet => missing.push(range),
            None => {}
        }
    }
    if done == plan.ranges() {
        return finish(r, disk, plan, now).await;
    }
    for chunk in missing.chunks(MAX_BATCH) {
        let bodies: Vec<String> = chunk
            .iter()
            .map(|&n| {
                ExportTask::new(disk.clone(), plan.id.clone(), n, plan.upload_id.clone()).to_json()
            })
            .collect();
        let refused = r
            .cfg
            .retry
            .run(0, None, || r.tasks.send_batch(&bodies))
            .await?;
        if let Some((i, why)) = refused.first() {
            return Err(ReplicaError::Internal(format!(
                "export {} range task {} not sent: {why}",
                plan.id, chunk[*i]
            )));
        }
    }
    Ok(Step::Done(format!(
        "export {}: {done} of {} ranges uploaded, {} sent as tasks",
        plan.id,
        plan.ranges(),
        missing.len()
    )))
}

/// A range's record and its ETag, if there is one.
async fn read_range<S: ObjectStore, E, Q>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    plan: &ExportPlan,
    range: u32,
) -> Result<Option<(ExportRange, String)>, ReplicaError> {
    let key = range_key(&r.cfg.prefix, disk, &plan.id, range);
    // Another upload's record, garbage, or an oversized one: a lapsed claim, so the range
    // is uploaded again over it.
    let lapsed = || ExportRange {
        version: REPLICA_VERSION,
        id: plan.id.clone(),
        range,
        upload_id: plan.upload_id.clone(),
        owner: String::new(),
        lease_until: plan.created_at,
        parts: None,
    };
    match r
        .store
        .get_versioned(&key, MAX_RANGE_DOC_BYTES as u64)
        .await
    {
        Ok(Some(v)) => match ExportRange::from_json(&v.body, plan, range) {
            Ok(d) if d.upload_id == plan.upload_id => Ok(Some((d, v.etag))),
            Ok(_) | Err(_) => Ok(Some((lapsed(), v.etag))),
        },
        Ok(None) => Ok(None),
        // No ETag read: the claim overwrites it unconditionally.
        Err(e) if e.kind == ErrorKind::TooLarge => Ok(Some((lapsed(), String::new()))),
        Err(e) => Err(e.into()),
    }
}

/// Uploads one range of a fanned-out export (when the task is current and the range is
/// neither done nor held), then completes the export if every range is done.
pub async fn range_task<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    t: &ExportTask,
    now: impl Fn() -> DateTime<Utc> + Copy,
) -> Result<Step, ReplicaError> {
    let stale = |why: &str| {
        Ok(Step::Done(format!(
            "export {} range {}: {why}",
            t.id, t.range
        )))
    };
    let plan = match read_plan(r, &t.disk, &t.id).await? {
        Some(p) if p.upload_id == t.upload_id => p,
        _ => return stale("no longer current"),
    };
    if t.range >= plan.ranges() {
        return Err(ReplicaError::Internal(format!(
            "export {} has {} ranges, not range {}",
            t.id,
            plan.ranges(),
            t.range
        )));
    }
    if answered(r, &t.disk, &t.id).await? {
        return stale("already answered");
    }
    let key = range_key(&r.cfg.prefix, &t.disk, &t.id, t.range);
    let read = read_range(r, &t.disk, &plan, t.range).await?;
    if let Some((d, _)) = &read {
        if d.is_done() {
            return finish(r, &t.disk, &plan, now()).await;
        }
        if d.lease_until > now() {
            return Ok(Step::Wait(format!(
                "export {} range {}: uploaded by another invocation until {}",
                t.id, t.range, d.lease_until
            )));
        }
    }
    // Claim the range: a lease only this invocation's conditional writes can replace.
    let lease = ExportRange {
        version: REPLICA_VERSION,
        id: t.id.clone(),
        range: t.range,
        upload_id: plan.upload_id.clone(),
        owner: format!("{:016x}", rand::random::<u64>()),
        lease_until: now() + r.cfg.export_lease,
        parts: None,
    };
    let opts = match &read {
        Some((_, etag)) if !etag.is_empty() => PutOptions::json().replacing(etag.clone()),
        Some(_) => PutOptions::json(),
        None => PutOptions::json().create_only(),
    };
    let etag = match r.store.put(&key, lease.to_json().into(), opts).await {
        Ok(Some(etag)) => etag,
        Ok(None) => match r
            .store
            .get_versioned(&key, MAX_RANGE_DOC_BYTES as u64)
            .await?
        {
            Some(v) if v.body == lease.to_json() => v.etag,
            _ => return stale("claimed by another invocation"),
        },
        Err(e) if e.kind == ErrorKind::PreconditionFailed || e.kind == ErrorKind::NotFound => {
            return stale("claimed by another invocation")
        }
        Err(e) => return Err(e.into()),
    };
    let parts = match upload_range(
        r,
        &t.disk,
        &plan,
        t.range,
        lease.lease_until - r.cfg.export_margin,
        now,
    )
    .await
    {
        Ok(parts) => parts,
        Err(e) if export_transient(&e) => {
            return Err(ReplicaError::Stale(format!(
                "export {} range {}: {e} (tried again)",
                t.id, t.range
            )))
        }
        Err(e) => {
            let why = format!("export of point {}: {e}", plan.snapshot_id);
            return fail(r, &t.disk, &plan, why, now()).await;
        }
    };
    let done = ExportRange {
        parts: Some(parts),
        ..lease
    };
    match r
        .store
        .put(
            &key,
            done.to_json().into(),
            PutOptions::json().replacing(etag),
        )
        .await
    {
        Ok(_) => {}
        // The lease ran out and another invocation took the range over: it uploads it.
        Err(e) if e.kind == ErrorKind::PreconditionFailed || e.kind == ErrorKind::NotFound => {
            return stale("lease lost to another invocation")
        }
        Err(e) => return Err(e.into()),
    }
    finish(r, &t.disk, &plan, now()).await
}

/// Out of lease time: the range is left for the next delivery of its task.
#[derive(Debug, thiserror::Error)]
#[error("the range's lease ends before another part could be uploaded")]
struct OutOfLease;

fn export_transient(e: &RangeError) -> bool {
    match e {
        RangeError::OutOfLease(_) => true,
        RangeError::Export(ExportError::Put(c)) => c.is_transient(),
        RangeError::Export(ExportError::Point { source, .. }) => source.is_transient(),
        RangeError::Export(_) => false,
    }
}

#[derive(Debug, thiserror::Error)]
enum RangeError {
    #[error(transparent)]
    OutOfLease(#[from] OutOfLease),
    #[error(transparent)]
    Export(#[from] ExportError),
}

/// Reads and uploads the range's parts (several at once), each hashed; starts none after
/// `deadline`.
async fn upload_range<S: ObjectStore, E: EbsApi, Q>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    plan: &ExportPlan,
    range: u32,
    deadline: DateTime<Utc>,
    now: impl Fn() -> DateTime<Utc> + Copy,
) -> Result<Vec<PartDone>, RangeError> {
    let numbers = plan.part_numbers(range);
    let from = plan.part_span(*numbers.start()).0;
    let (last_at, last_len) = plan.part_span(*numbers.end());
    let reader = PointReader::open(
        &r.ebs,
        &plan.snapshot_id,
        plan.size,
        from..last_at + last_len,
    )
    .await?;
    let (reader, image) = (&reader, exports::image_key(&r.cfg.prefix, disk, &plan.id));
    let image = image.as_str();
    futures::stream::iter(numbers)
        .map(|number| async move {
            if now() >= deadline {
                return Err(RangeError::from(OutOfLease));
            }
            let (at, len) = plan.part_span(number);
            let body = reader.read(at, len as usize).await?;
            let sha256 = Sha256Hex(Sha256::digest(&body).into());
            let etag = r
                .store
                .upload_part(image, &plan.upload_id, number as i32, body)
                .await
                .map_err(ExportError::Put)?;
            Ok(PartDone {
                number,
                etag,
                sha256,
            })
        })
        .buffered(r.cfg.export_concurrency.max(1))
        .try_collect()
        .await
}

async fn answered<S: ObjectStore, E, Q>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    id: &Name,
) -> Result<bool, ReplicaError> {
    match exports::read_result(&r.store, &r.cfg.prefix, disk, id).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_transient() => Err(e.into()),
        Err(_) => Ok(false),
    }
}

/// Completes the upload when every range is done and writes the result.
async fn finish<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    plan: &ExportPlan,
    now: DateTime<Utc>,
) -> Result<Step, ReplicaError> {
    if answered(r, disk, &plan.id).await? {
        return Ok(Step::Done(format!("export {} already answered", plan.id)));
    }
    // One listing first: while some range has no record at all, nothing more to read
    // (each range's completion does this; reading every record each time would be
    // ranges squared GETs).
    let under = format!(
        "{}{}/{}/",
        pilotlight_protocol::keys::export_prefix(&r.cfg.prefix, disk),
        plan.id,
        pilotlight_protocol::keys::EXPORT_RANGE_DIR
    );
    let recorded = r.store.list(&under, |_| true).await?.len();
    if recorded < plan.ranges() as usize {
        return Ok(Step::Done(format!(
            "export {}: {recorded} of {} ranges under way or uploaded",
            plan.id,
            plan.ranges()
        )));
    }
    let mut parts = Vec::with_capacity(plan.parts as usize);
    for range in 0..plan.ranges() {
        match read_range(r, disk, plan, range).await? {
            Some((d, _)) if d.is_done() => parts.extend(d.parts.unwrap_or_default()),
            _ => {
                return Ok(Step::Done(format!(
                    "export {}: range {range} is not uploaded yet",
                    plan.id
                )))
            }
        }
    }
    let image = exports::image_key(&r.cfg.prefix, disk, &plan.id);
    let list: Vec<(i32, String)> = parts
        .iter()
        .map(|p| (p.number as i32, p.etag.clone()))
        .collect();
    match r
        .store
        .complete_multipart(&image, &plan.upload_id, list)
        .await
    {
        Ok(()) => {}
        // Completed by another invocation that found every range done too, or aborted.
        Err(e) if e.is_not_found() => {
            if r.store.head(&image).await? != Some(plan.size) {
                let why = format!(
                    "the multipart upload of {image} is gone (aborted, or expired by the bucket's lifecycle rule): ask for the export again"
                );
                return fail(r, disk, plan, why, now).await;
            }
        }
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(e) => {
            let why = format!("completing the upload of {image}: {e}");
            return fail(r, disk, plan, why, now).await;
        }
    }
    let result = ExportResult::done_in_parts(
        &plan.id,
        plan.generation,
        image,
        plan.size,
        composite_sha256(parts.iter().map(|p| &p.sha256)),
        plan.part_size,
        (now - plan.created_at).num_milliseconds().max(0) as f64 / 1000.0,
        now,
    );
    crate::export::answer(r, disk, result).await
}

async fn fail<S: ObjectStore, E, Q>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    plan: &ExportPlan,
    why: String,
    now: DateTime<Utc>,
) -> Result<Step, ReplicaError> {
    let image = exports::image_key(&r.cfg.prefix, disk, &plan.id);
    // Nothing billable left behind (the lifecycle rule is the backstop).
    let _ = r.store.abort_multipart(&image, &plan.upload_id).await;
    let seconds = (now - plan.created_at).num_milliseconds().max(0) as f64 / 1000.0;
    let result = ExportResult::failed(&plan.id, Some(plan.generation), why, seconds, now);
    crate::export::answer(r, disk, result).await
}

/// The schedule's part: every fanned-out export of these disks not answered yet is driven
/// again (ranges whose task was lost, or whose invocation died, are sent again; a
/// finished one is completed). One listing of each disk's `x/` (an export needs a point,
/// so its disk has a chain head), never of the whole bucket.
pub async fn sweep<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    disks: impl IntoIterator<Item = &DiskId>,
    now: DateTime<Utc>,
) -> Result<Vec<String>, ReplicaError> {
    let mut keys = Vec::new();
    for disk in disks {
        let under = pilotlight_protocol::keys::export_prefix(&r.cfg.prefix, disk);
        keys.extend(r.store.list(&under, |k| k.ends_with("/plan.json")).await?);
    }
    let mut out = Vec::new();
    for k in keys {
        let Ok(ObjectKey::ExportPlan { disk, id }) = ObjectKey::parse(&r.cfg.prefix, &k) else {
            continue;
        };
        if answered(r, &disk, &id).await? {
            continue;
        }
        let step = match read_plan(r, &disk, &id).await {
            Ok(Some(plan)) => drive(r, &disk, &plan, now, r.cfg.redispatch_after).await,
            Ok(None) => continue,
            Err(e) => Err(e),
        };
        out.push(match step {
            Ok(s) => format!("{disk} export {id}: {s:?}"),
            Err(e) => format!("{disk} export {id}: {e}"),
        });
    }
    Ok(out)
}
