//! A disk's recovery point as a task of its own. The point reads the blocks its
//! generation touched back from the image, so that disk's next generation waits for it;
//! nothing else does: the engine goes on receiving, prefetching, and applying every
//! other disk while points are written. Before, the loop ran each disk's point (and a
//! DescribeSnapshots listing to prune) inside the step that applied it, so every disk
//! waited for the slowest point of the batch (#35).
//!
//! The task owns a copy of the disk's state while it runs (it saves the point's
//! progress as before: crash safety is the point writer's) and hands it back when it
//! ends; the engine changes nothing of that disk's state meanwhile. Pruning is a
//! separate round on a timer: one listing of the stack's points for every disk.

use super::context::Disk;
use crate::points::{PointError, PointPhases, PointRecord, PointWriter, MAX_POINT_ATTEMPTS};
use crate::state::{self, DiskPaths, DiskState};
use chrono::Utc;
use futures::FutureExt;
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_protocol::DiskId;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// A point being written.
#[derive(Debug)]
pub struct PointTask {
    handle: JoinHandle<Outcome>,
}

impl PointTask {
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// An engine dropped (shut down, or a test's "crash") stops its points where they are:
/// as after a crash, the state says what to resume, and no task outlives its engine to
/// write a state file the next engine owns.
impl Drop for PointTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// How a point task ended, with the disk's state as it left it.
#[derive(Debug)]
struct Outcome {
    state: DiskState,
    verdict: Verdict,
}

#[derive(Debug)]
enum Verdict {
    /// Written (or nothing was due): the next generation may be applied.
    Done(Option<PointRecord>, PointPhases, f64),
    /// Failed for now: tried again after a back-off, before the next generation.
    Retry(PointError),
    /// Given up for good (recorded in the state): replication goes on.
    GaveUp,
}

/// What the disk may do now.
#[derive(Debug, PartialEq, Eq)]
pub enum PointTurn {
    /// No point due or under way: apply the next generation.
    Free,
    /// A point is under way (or was just started): the image must not change.
    Busy,
    /// The point failed for now: back off.
    Failed,
}

/// Reaps the disk's finished point task, and starts one when a point is due. `done` is
/// notified when a task ends, so the engine wakes for the disk's next generation.
pub fn point_turn<E: EbsApi + 'static>(
    id: &DiskId,
    d: &mut Disk,
    pw: &PointWriter<E>,
    done: &Arc<Notify>,
) -> PointTurn {
    if let Some(task) = d.point_task.as_mut() {
        if !task.handle.is_finished() {
            return PointTurn::Busy;
        }
        // Unconstrained: a finished task's result is taken even when this task has used
        // its cooperative budget (the handle would answer "pending" then).
        let Some(joined) = tokio::task::unconstrained(&mut task.handle).now_or_never() else {
            return PointTurn::Busy;
        };
        d.point_task = None;
        match joined {
            Ok(outcome) => {
                d.state = outcome.state;
                match outcome.verdict {
                    Verdict::Done(p, ph, seconds) => log_written(id, p.as_ref(), &ph, seconds, pw),
                    Verdict::GaveUp => {}
                    Verdict::Retry(e) => {
                        let attempts = d.state.point_due.as_ref().map_or(0, |p| p.attempt);
                        tracing::warn!(disk = %id, attempts, "recovery point not written yet, tried again before the next generation: {e}");
                        return PointTurn::Failed;
                    }
                }
            }
            Err(e) => {
                // A panic or an abort: what the task saved is on disk; read it back.
                tracing::error!(disk = %id, "the recovery point task failed: {e}; tried again");
                match state::load(&d.paths, id) {
                    Ok(st) => d.state = st,
                    Err(e) => tracing::error!(disk = %id, "cannot read the state back: {e}"),
                }
                return PointTurn::Failed;
            }
        }
    }
    if d.state.point_due.is_none() {
        return PointTurn::Free;
    }
    let (id2, st, paths, pw2, done2) = (
        id.clone(),
        d.state.clone(),
        d.paths.clone(),
        pw.clone(),
        done.clone(),
    );
    let handle = tokio::spawn(async move {
        let out = write_point(&id2, st, &paths, &pw2).await;
        done2.notify_one();
        out
    });
    d.point_task = Some(PointTask { handle });
    PointTurn::Busy
}

fn log_written<E>(
    id: &DiskId,
    p: Option<&PointRecord>,
    ph: &PointPhases,
    seconds: f64,
    pw: &PointWriter<E>,
) {
    let Some(p) = p else { return };
    use crate::points::PointCalls as C;
    let c = &pw.calls;
    tracing::info!(
        disk = %id, generation = p.generation, snapshot = %p.snapshot_id, parent = ?p.parent,
        blocks = ?p.blocks_written, seconds,
        start_ms = ph.start.ms(), puts = ph.puts.calls(), puts_ms = ph.puts.ms(),
        complete_ms = ph.complete.ms(), settle_polls = ph.settle.calls(), settle_ms = ph.settle.ms(),
        tags_ms = ph.tags.ms(),
        points_total = C::get(&c.points), describe_snapshots_total = C::get(&c.describe_snapshots),
        "recovery point written"
    );
}

/// Writes the due point; a permanent failure (no permission, the image unreadable, too
/// many attempts) gives the point up, so replication goes on, and says so in the log
/// and the disk's status.
async fn write_point<E: EbsApi + 'static>(
    id: &DiskId,
    mut st: DiskState,
    paths: &DiskPaths,
    pw: &PointWriter<E>,
) -> Outcome {
    let generation = st.point_due.as_ref().map(|p| p.generation);
    let ph = PointPhases::default();
    let t = Instant::now();
    let verdict = match pw.write_due_timed(id, &mut st, paths, &ph).await {
        Ok(p) => {
            if p.is_some() {
                crate::points::PointCalls::add(&pw.calls.points, 1);
            }
            Verdict::Done(p, ph, t.elapsed().as_secs_f64())
        }
        Err(e) => {
            let attempts = st.point_due.as_ref().map_or(0, |p| p.attempt);
            if e.is_transient() && attempts < MAX_POINT_ATTEMPTS {
                Verdict::Retry(e)
            } else {
                tracing::error!(disk = %id, generation, attempts, "recovery point failed: {e}; given up: replication goes on, the next point is written in full");
                match pw.give_up(&mut st, paths, &e).await {
                    Ok(()) => Verdict::GaveUp,
                    Err(e2) => {
                        tracing::error!(disk = %id, "cannot record the failed point: {e2}");
                        Verdict::Retry(e)
                    }
                }
            }
        }
    };
    Outcome { state: st, verdict }
}

/// Waits until a point task ends (returns at once when one ended since the last wait),
/// or a second has passed (a safety net: the caller looks again either way).
pub async fn any_point_done(done: &Notify) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), done.notified()).await;
}

/// One pruning round: one listing of the stack's points, then each disk with no point
/// under way has its retention applied and what a crash left unfinished deleted. A disk
/// whose point is being written is left for the next round (its snapshot under way is
/// not in its state yet). Returns the snapshots deleted.
pub async fn prune_round<E: EbsApi + 'static>(
    disks: &mut BTreeMap<DiskId, Disk>,
    pw: &PointWriter<E>,
) -> Result<usize, PointError> {
    let t = Instant::now();
    let mut listed = pw.list_stack_points().await?;
    let now = Utc::now();
    let mut deleted = 0;
    for (id, d) in disks.iter_mut() {
        if d.point_task.is_some() {
            continue;
        }
        let found = listed.remove(id).unwrap_or_default();
        if found.is_empty() {
            continue;
        }
        match pw.prune_listed(&mut d.state, &d.paths, now, found).await {
            Ok(n) => deleted += n,
            Err(e) => {
                tracing::warn!(disk = %id, "pruning recovery points failed, tried again at the next round: {e}")
            }
        }
    }
    use crate::points::PointCalls as C;
    tracing::info!(
        deleted,
        seconds = t.elapsed().as_secs_f64(),
        rounds_total = C::get(&pw.calls.prune_rounds),
        points_total = C::get(&pw.calls.points),
        describe_snapshots_total = C::get(&pw.calls.describe_snapshots),
        "recovery points pruned"
    );
    Ok(deleted)
}
