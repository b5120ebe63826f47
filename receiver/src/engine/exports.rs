//! Export requests (`x/{id}/request.json`, written by the DR Lambda): each waits until
//! the image holds exactly the requested generation and runs on the disk's own turn,
//! before anything newer is applied, so it is never half-applied. Its outcome goes to
//! `x/{id}/result.json`; the request's messages are deleted after that.

use super::context::{read_manifest, Disk, EngineConfig, PendingExport, Turn};
use super::lifetime::{delete_messages, hold, Held, KeepAlive};
use super::Engine;
use crate::export::{export_image, export_point, ExportOptions, ExportReport};
use crate::points::PointWriter;
use chrono::Utc;
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::{Message, ObjectStore, Queue};
use pilotlight_protocol::{DiskId, ExportResult, ExportStatus, Name, Prefix};
use pilotlight_store::{exports, DocError};
use std::time::Instant;

impl<S: ObjectStore + Clone + 'static, Q: Queue + Clone + 'static, E: EbsApi + 'static>
    Engine<S, Q, E>
{
    /// Takes up an export request. Returns whether its message must be kept (it waits to
    /// be answered, or could not be read for now); a request already answered, or one
    /// answered at once with a failure, does not wait.
    pub(super) async fn learn_export(
        &mut self,
        disk: &DiskId,
        id: &Name,
        msg: Option<&Message>,
    ) -> bool {
        let prefix = self.cfg.prefix.clone();
        let d = match self.disk(disk) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(%disk, export = %id, "{e}");
                return true;
            }
        };
        if let Some(p) = d.exports.get_mut(id) {
            if let Some(m) = msg {
                hold(&mut p.messages, m);
            }
            return true;
        }
        match exports::read_result(&self.src, &prefix, disk, id).await {
            Ok(_) => {
                tracing::debug!(%disk, export = %id, "export already answered");
                return false;
            }
            Err(DocError::Missing { .. }) => {}
            Err(e) if e.is_transient() => {
                tracing::warn!(%disk, export = %id, "{e}; will retry");
                return true;
            }
            // Not readable or not a result (garbage at its key): answer it (again); the
            // answer is the same.
            Err(e) => tracing::debug!(%disk, export = %id, "result not readable: {e}"),
        }
        let req = match exports::read_request(&self.src, &prefix, disk, id).await {
            Ok(r) => Ok(r),
            // Transient: keep the message; it comes back and is tried again.
            Err(e) if e.is_transient() => {
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
        // An older generation: from its recovery point, when there are points.
        if applied.is_some_and(|a| a > req.generation) && self.points.is_none() {
            let why = superseded(req.generation, applied);
            self.answer_failed(disk, id, applied, why).await;
            return false;
        }
        if let Err(e) = self.learn(disk, req.generation).await {
            if e.is_transient() {
                tracing::warn!(%disk, export = %id, "{e}; will retry");
                return true;
            }
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
                    messages: msg.map(Held::new).into_iter().collect(),
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
}

fn superseded(wanted: u64, applied: Option<u64>) -> String {
    format!(
        "generation {wanted} is no longer available: the image already holds generation {} \
         (the receiver keeps only the newest applied generation); ask for that one or the latest",
        applied.map_or("none".into(), |a| a.to_string())
    )
}

fn done_result(id: &Name, generation: u64, key: String, r: &ExportReport) -> ExportResult {
    ExportResult::done(id, generation, key, r.size, r.sha256, r.seconds, Utc::now())
}

fn failed_result(id: &Name, generation: Option<u64>, why: String, seconds: f64) -> ExportResult {
    ExportResult::failed(id, generation, why, seconds, Utc::now())
}

/// Writes an export's outcome. A failure to write it is logged: the request stays
/// unanswered, so listing finds it again and the export is retried.
async fn write_result<S: ObjectStore>(
    src: &S,
    prefix: &Prefix,
    disk: &DiskId,
    r: &ExportResult,
) -> bool {
    match exports::write_result(src, prefix, disk, r).await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(disk = %disk, export = %r.id, "export result not written: {e}");
            false
        }
    }
}

/// Exports generation `g` from its recovery point (the image has moved on): the disk's
/// size from the generation's manifest, the bytes from the point's snapshot.
async fn export_from_point<S: ObjectStore, E: EbsApi>(
    id: &DiskId,
    name: &Name,
    g: u64,
    src: &S,
    cfg: &EngineConfig,
    pw: &PointWriter<E>,
) -> ExportResult {
    let started = Instant::now();
    let fail = |why: String| failed_result(name, Some(g), why, started.elapsed().as_secs_f64());
    let found =
        pilotlight_store::points::of_generation(pw.ebs.as_ref(), id, g, Some(&pw.cfg.stack)).await;
    let point = match found {
        Ok(p) => p,
        Err(e) => {
            return fail(format!(
                "cannot look up the recovery point of generation {g}: {e}"
            ))
        }
    };
    let Some(point) = point else {
        return fail(format!(
            "generation {g} is no longer in the image and has no recovery point (recovery points off then, or pruned): ask for a newer point (`pilotlight-dr points`)"
        ));
    };
    let m = match read_manifest(src, &cfg.prefix, id, g).await {
        Ok(m) => m,
        Err(e) => return fail(format!("cannot read the manifest of generation {g}: {e}")),
    };
    let key = exports::image_key(&cfg.prefix, id, name);
    tracing::info!(disk = %id, export = %name, generation = g, snapshot = %point.snapshot_id, %key, "exporting from the recovery point");
    let opts = ExportOptions {
        concurrency: cfg.concurrency.clamp(1, 8),
        ..ExportOptions::default()
    };
    match export_point(
        src,
        pw.ebs.as_ref(),
        &point.snapshot_id,
        m.disk_size,
        &key,
        &opts,
    )
    .await
    {
        Ok(r) => {
            tracing::info!(disk = %id, export = %name, generation = g, bytes = r.size, parts = r.parts, seconds = r.seconds, "exported from the recovery point");
            done_result(name, g, key, &r)
        }
        Err(e) => fail(format!(
            "export of generation {g} from recovery point {} failed: {e}",
            point.snapshot_id
        )),
    }
}

/// Runs the exports that want the generation the image holds now, and those that want
/// an older one from its recovery point (without points they fail).
pub async fn run_exports<S: ObjectStore, Q: Queue + Clone + 'static, E: EbsApi + 'static>(
    t: &Turn<'_, S, Q, E>,
    d: &mut Disk,
) {
    let (id, src, queue, cfg, points) = (t.id, t.src, t.queue, t.cfg, t.points);
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
            match points {
                Some(pw) => {
                    let receipts: Vec<String> =
                        p.messages.iter().map(|w| w.receipt.clone()).collect();
                    let keepalive = KeepAlive::start(queue, receipts, cfg.visibility_secs);
                    let r = export_from_point(id, &name, g, src, cfg, pw).await;
                    drop(keepalive);
                    r
                }
                None => failed_result(&name, applied, superseded(g, applied), 0.0),
            }
        } else {
            let key = exports::image_key(&cfg.prefix, id, &name);
            let receipts: Vec<String> = p.messages.iter().map(|w| w.receipt.clone()).collect();
            let keepalive = KeepAlive::start(queue, receipts, cfg.visibility_secs);
            tracing::info!(disk = %id, export = %name, generation = g, %key, "exporting");
            let opts = ExportOptions {
                concurrency: cfg.concurrency.clamp(1, 8),
                ..ExportOptions::default()
            };
            let started = Instant::now();
            let res = export_image(src, &d.paths.image, &key, &opts).await;
            drop(keepalive);
            match res {
                Ok(r) => {
                    tracing::info!(disk = %id, export = %name, generation = g, bytes = r.size, parts = r.parts, seconds = r.seconds, "exported");
                    done_result(&name, g, key, &r)
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
