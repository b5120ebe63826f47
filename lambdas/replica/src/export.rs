//! Export requests in snapshots mode (`x/{id}/request.json`, written by the DR function
//! for the import method): the requested generation's recovery point uploaded to the
//! bucket as a raw disk (ListSnapshotBlocks, GetSnapshotBlock, a parallel multipart
//! upload: the receiver's own export from points), then `x/{id}/result.json`. There is
//! no image to export from: a generation without a completed point waits until its point
//! is written, and is refused once it can never have one. A point larger than one range
//! (`export_range_bytes`) is fanned out over invocations ([`crate::export_fanout`]).

use crate::drive::Step;
use crate::error::ReplicaError;
use crate::Replica;
use chrono::Utc;
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::ObjectStore;
use pilotlight_protocol::{DiskId, ExportResult, Name};
use pilotlight_store::upload::{export_point, ExportOptions};
use pilotlight_store::{exports, manifests, DocError};
use std::time::Instant;

pub async fn request<S: ObjectStore, E: EbsApi, Q: pilotlight_cloud::sqs::Queue>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    id: &Name,
    now: impl Fn() -> chrono::DateTime<Utc> + Copy,
) -> Result<Step, ReplicaError> {
    let p = &r.cfg.prefix;
    match exports::read_result(&r.store, p, disk, id).await {
        Ok(_) => return Ok(Step::Done(format!("export {id} already answered"))),
        Err(DocError::Missing { .. }) => {}
        Err(e) if e.is_transient() => return Err(e.into()),
        // Garbage at the result's key: answered again.
        Err(_) => {}
    }
    let started = Instant::now();
    let req = match exports::read_request(&r.store, p, disk, id).await {
        Ok(req) => req,
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(e) => {
            return answer(
                r,
                disk,
                failed(id, None, format!("export request refused: {e}"), 0.0),
            )
            .await
        }
    };
    let g = req.generation;
    let point =
        pilotlight_store::points::of_generation(&r.ebs, disk, g, Some(&r.cfg.stack)).await?;
    let Some(point) = point else {
        let head = crate::chain::read(&r.store, p, disk, now()).await?.head;
        let newest = head.point.as_ref().map_or(0, |x| x.generation);
        let writing = head.pending.as_ref().is_some_and(|x| x.generation <= g);
        if newest < g || writing {
            return Ok(Step::Wait(format!(
                "export {id}: generation {g} has no completed point yet"
            )));
        }
        let why = format!(
            "generation {g} has no recovery point (pruned, or superseded by a full generation): ask for another point (`pilotlight-dr points`)"
        );
        return answer(r, disk, failed(id, Some(g), why, 0.0)).await;
    };
    let m = match manifests::read(&r.store, p, disk, g).await {
        Ok(m) => m,
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(e) => {
            let why = format!("cannot read the manifest of generation {g}: {e}");
            return answer(r, disk, failed(id, Some(g), why, 0.0)).await;
        }
    };
    if m.disk_size > r.cfg.export_range_bytes {
        return match crate::export_fanout::start(
            r,
            disk,
            id,
            g,
            &point.snapshot_id,
            m.disk_size,
            now(),
        )
        .await
        {
            Err(e) if !e.is_transient() => {
                let why = format!("export of point {}: {e}", point.snapshot_id);
                answer(r, disk, failed(id, Some(g), why, 0.0)).await
            }
            other => other,
        };
    }
    let key = exports::image_key(p, disk, id);
    let opts = ExportOptions::default();
    let result = match export_point(
        &r.store,
        &r.ebs,
        &point.snapshot_id,
        m.disk_size,
        &key,
        &opts,
    )
    .await
    {
        Ok(rep) => ExportResult::done(
            id,
            g,
            key,
            rep.size,
            rep.sha256,
            started.elapsed().as_secs_f64(),
            Utc::now(),
        ),
        Err(e) => failed(
            id,
            Some(g),
            format!("export of point {}: {e}", point.snapshot_id),
            started.elapsed().as_secs_f64(),
        ),
    };
    answer(r, disk, result).await
}

fn failed(id: &Name, generation: Option<u64>, why: String, seconds: f64) -> ExportResult {
    ExportResult::failed(id, generation, why, seconds, Utc::now())
}

/// Writes the export's result (what the DR function waits for).
pub(crate) async fn answer<S: ObjectStore, E, Q>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    result: ExportResult,
) -> Result<Step, ReplicaError> {
    exports::write_result(&r.store, &r.cfg.prefix, disk, &result)
        .await
        .map_err(|e| ReplicaError::Internal(format!("export result not written: {e}")))?;
    Ok(Step::Done(format!(
        "export {} {:?}{}",
        result.id,
        result.status,
        result.reason.map(|r| format!(": {r}")).unwrap_or_default()
    )))
}
