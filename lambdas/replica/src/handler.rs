//! One queue message, decided: an S3 event (a manifest: move the disk's chain to that
//! generation; an export request), a shard task (write one shard, then move the chain),
//! an export range task (upload one range of a fanned-out export), or neither.
//!
//! Every message is untrusted: a malformed one is refused with the reason (the queue's
//! redrive takes it to the dead-letter queue after a few deliveries), never a panic.

use crate::drive::{self, Step};
use crate::error::ReplicaError;
use crate::shard::{self, PointPlan};
use crate::Replica;
use chrono::{DateTime, Utc};
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::sqs::Queue;
use pilotlight_cloud::ObjectStore;
use pilotlight_protocol::replica::ShardTask;
use pilotlight_protocol::replica_export::ExportTask;
use pilotlight_protocol::{parse_notification, ObjectKey, S3Notification};
use pilotlight_store::manifests;

/// What to do with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: delete it.
    Delete(String),
    /// Not yet, or a transient failure: leave it for the next delivery.
    Retry(String),
    /// Malformed or failed for good: leave it (the dead-letter queue takes it); the reason
    /// is logged.
    Reject(String),
}

impl Outcome {
    pub fn is_delete(&self) -> bool {
        matches!(self, Outcome::Delete(_))
    }
}

fn failed(e: ReplicaError) -> Outcome {
    if e.is_transient() {
        Outcome::Retry(e.to_string())
    } else {
        Outcome::Reject(e.to_string())
    }
}

/// Decides one message body.
pub async fn handle_body<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    body: &str,
    now: impl Fn() -> DateTime<Utc> + Copy,
) -> Outcome {
    if let Some(task) = ShardTask::from_body(body) {
        return match task {
            Ok(t) => shard_task(r, &t, now).await,
            Err(e) => Outcome::Reject(format!("malformed shard task: {e}")),
        };
    }
    if let Some(task) = ExportTask::from_body(body) {
        return match task {
            Ok(t) => match crate::export_fanout::range_task(r, &t, now).await {
                Ok(Step::Done(why)) => Outcome::Delete(why),
                Ok(Step::Wait(why)) => Outcome::Retry(why),
                Err(e) => failed(e),
            },
            Err(e) => Outcome::Reject(format!("malformed export task: {e}")),
        };
    }
    let records = match parse_notification(body.as_bytes()) {
        Ok(S3Notification::Test { .. }) => return Outcome::Delete("s3:TestEvent".into()),
        Ok(S3Notification::Records(r)) => r,
        Err(e) => return Outcome::Reject(format!("malformed event: {e}")),
    };
    let mut waits = Vec::new();
    let mut done = Vec::new();
    for rec in records {
        if rec.bucket != r.cfg.bucket {
            return Outcome::Reject(format!(
                "event for bucket {:?}, not {:?}: check the bucket notification",
                rec.bucket, r.cfg.bucket
            ));
        }
        if !rec.is_object_created() {
            continue;
        }
        match ObjectKey::parse(&r.cfg.prefix, &rec.key) {
            Ok(ObjectKey::Manifest { disk, generation }) => {
                match drive::generation(r, &disk, generation, now).await {
                    Ok(Step::Done(why)) => done.push(format!("{disk} {generation}: {why}")),
                    Ok(Step::Wait(why)) => waits.push(format!("{disk} {generation}: {why}")),
                    Err(e) => return failed(e),
                }
            }
            Ok(ObjectKey::ExportRequest { disk, id }) => {
                match crate::export::request(r, &disk, &id, now).await {
                    Ok(Step::Done(why)) => done.push(format!("{disk}: {why}")),
                    Ok(Step::Wait(why)) => waits.push(format!("{disk}: {why}")),
                    Err(e) => return failed(e),
                }
            }
            // Everything else under the prefix (data objects, export outputs, failback and
            // our own documents) needs nothing from this function.
            Ok(_) => {}
            Err(e) => return Outcome::Reject(format!("rejected key: {e}")),
        }
    }
    if waits.is_empty() {
        Outcome::Delete(if done.is_empty() {
            "no manifest in the event".into()
        } else {
            done.join("; ")
        })
    } else {
        Outcome::Retry(waits.join("; "))
    }
}

/// Writes one shard of the disk's pending point (when the task is still current), then
/// moves the chain (the last shard's invocation seals the point).
async fn shard_task<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    t: &ShardTask,
    now: impl Fn() -> DateTime<Utc> + Copy,
) -> Outcome {
    let read = match crate::chain::read(&r.store, &r.cfg.prefix, &t.disk, now()).await {
        Ok(h) => h,
        Err(e) => return failed(e),
    };
    let current = read.head.pending.as_ref().filter(|p| {
        p.generation == t.generation
            && p.attempt == t.attempt
            && p.snapshot_id.is_some()
            && p.sealed_at.is_none()
            && t.shard < p.shards
    });
    let Some(p) = current else {
        return Outcome::Delete(format!(
            "shard {} of {} generation {} attempt {}: no longer current",
            t.shard, t.disk, t.generation, t.attempt
        ));
    };
    let m = match manifests::read(&r.store, &r.cfg.prefix, &t.disk, t.generation).await {
        Ok(m) => m,
        Err(e) => return failed(e.into()),
    };
    let plan = PointPlan::new(&m, p.parent.is_none(), p.shard_blocks, p.shard_bytes);
    match shard::write(r, &m, p, &plan, t.shard).await {
        Ok(_) => {}
        Err(ReplicaError::Stale(why)) => return Outcome::Delete(why),
        Err(e) => return failed(e),
    }
    match drive::generation(r, &t.disk, t.generation, now).await {
        // The shard is written; what is left is another invocation's (or the manifest
        // message's next delivery).
        Ok(step) => Outcome::Delete(format!("shard {} written; {step:?}", t.shard)),
        Err(e) => Outcome::Delete(format!(
            "shard {} written; moving the chain failed ({e}): the manifest's message retries",
            t.shard
        )),
    }
}
