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
    /// Staged, but it must be a full point: written from the image if the image still
    /// holds its generation, else given up.
    NeedsImage,
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
///
/// A staged point (its blocks copied out of the image when it was applied) holds nothing
/// back: the disk applies newer generations while it is written, and their points queue
/// behind it (each written on the one before). A point read from the image (a full one,
/// or one too large to stage) holds the disk's next generation until it is written.
pub fn point_turn<E: EbsApi + 'static>(
    id: &DiskId,
    d: &mut Disk,
    pw: &PointWriter<E>,
    done: &Arc<Notify>,
) -> PointTurn {
    if let Some(task) = d.point_task.as_mut() {
        if !task.handle.is_finished() {
            return held(&d.state);
        }
        // Unconstrained: a finished task's result is taken even when this task has used
        // its cooperative budget (the handle would answer "pending" then).
        let Some(joined) = tokio::task::unconstrained(&mut task.handle).now_or_never() else {
            return held(&d.state);
        };
        d.point_task = None;
        let started = d.state.point_due.as_ref().map(|p| (p.generation, p.staged));
        let mut failed = false;
        match joined {
            Ok(outcome) => {
                d.state.take_point_fields(outcome.state);
                match outcome.verdict {
                    Verdict::Done(p, ph, seconds) => log_written(id, p.as_ref(), &ph, seconds, pw),
                    Verdict::GaveUp => {}
                    Verdict::NeedsImage => from_the_image_or_given_up(id, &mut d.state),
                    Verdict::Retry(e) => {
                        let attempts = d.state.point_due.as_ref().map_or(0, |p| p.attempt);
                        tracing::warn!(disk = %id, attempts, "recovery point not written yet, tried again: {e}");
                        failed = true;
                    }
                }
            }
            Err(e) => {
                // A panic or an abort: what the task saved is on disk; read it back.
                tracing::error!(disk = %id, "the recovery point task failed: {e}; tried again");
                match state::load(&d.paths, id) {
                    Ok(st) => d.state.take_point_fields(st),
                    Err(e) => tracing::error!(disk = %id, "cannot read the state back: {e}"),
                }
                failed = true;
            }
        }
        // A staged point no longer due (or now read from the image): its staged blocks go.
        if let Some((g, true)) = started {
            if !d
                .state
                .point_due
                .as_ref()
                .is_some_and(|p| p.generation == g && p.staged)
            {
                remove_staged(&d.paths, g);
            }
        }
        replan_after_a_lost_point(id, &mut d.state, &d.paths);
        d.state.advance_point_queue();
        // The task's point fields into the state file, then its progress file goes.
        match state::save(&d.paths, &d.state) {
            Ok(()) => state::remove_progress(&d.paths),
            Err(e) => tracing::error!(disk = %id, "cannot save the state: {e}"),
        }
        if failed {
            if d.state.point_due.as_ref().is_some_and(|p| p.staged) {
                // The disk goes on; only its points wait.
                let attempts = d.state.point_due.as_ref().map_or(0, |p| p.attempt);
                d.point_retry_after =
                    Some(Instant::now() + point_backoff(pw.cfg.retry_base, attempts));
                return held(&d.state);
            }
            return PointTurn::Failed;
        }
    }
    if d.state.advance_point_queue() {
        if let Err(e) = state::save(&d.paths, &d.state) {
            tracing::error!(disk = %id, "cannot save the state: {e}");
        }
    }
    let Some(due) = d.state.point_due.as_ref() else {
        return PointTurn::Free;
    };
    if d.point_retry_after.is_some_and(|t| Instant::now() < t) {
        return held(&d.state);
    }
    d.point_retry_after = None;
    // The task saves into a progress file of its own (the engine saves the state file
    // meanwhile); a staged point reads its staged blocks, which hold its generation.
    let mut st = d.state.clone();
    let mut paths = d.paths.clone();
    paths.state = d.paths.point_progress();
    if due.staged {
        paths.image = d.paths.staged_point(due.generation);
        st.applied = Some(due.generation);
    }
    let (id2, pw2, done2) = (id.clone(), pw.clone(), done.clone());
    let handle = tokio::spawn(async move {
        let out = write_point(&id2, st, &paths, &pw2).await;
        done2.notify_one();
        out
    });
    d.point_task = Some(PointTask { handle });
    held(&d.state)
}

/// A staged point that failed for now is tried again after `base` doubled per attempt,
/// up to a minute.
fn point_backoff(base: std::time::Duration, attempts: u32) -> std::time::Duration {
    base.saturating_mul(1 << attempts.min(8))
        .min(std::time::Duration::from_secs(60))
}

/// Busy while a due point reads the image (not staged), else free.
fn held(st: &DiskState) -> PointTurn {
    let reads_image = |p: &crate::state::PointDue| !p.staged;
    if st
        .point_due
        .iter()
        .chain(&st.points_queued)
        .any(reads_image)
    {
        PointTurn::Busy
    } else {
        PointTurn::Free
    }
}

fn remove_staged(paths: &DiskPaths, g: u64) {
    let f = paths.staged_point(g);
    match std::fs::remove_file(&f) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove {}: {e}", f.display()),
    }
}

/// A staged point that has to be a full point (its parent point is missing): written
/// from the image when the image still holds its generation (nothing newer applied),
/// else given up; the points queued behind it then follow [`replan_after_a_lost_point`].
fn from_the_image_or_given_up(id: &DiskId, st: &mut DiskState) {
    let Some(due) = st.point_due.as_mut() else {
        return;
    };
    if st.applied == Some(due.generation) && st.points_queued.is_empty() {
        due.staged = false;
        return;
    }
    let why = PointError::Unbuildable {
        generation: due.generation,
    };
    tracing::error!(disk = %id, generation = due.generation, "recovery point given up: {why}");
    // A snapshot an earlier attempt left unsealed is deleted by the next pruning round.
    st.point_due = None;
    st.points_need_full = true;
    st.points_failed += 1;
    st.point_error = Some(why.to_string());
}

/// A point was given up, so the points queued behind it have no parent to be written
/// on: they are given up too, except the newest (the applied generation's), which is
/// written in full from the image (a full point reads the whole image).
fn replan_after_a_lost_point(id: &DiskId, st: &mut DiskState, paths: &DiskPaths) {
    if !st.points_need_full || st.point_due.is_some() || st.points_queued.is_empty() {
        return;
    }
    let Some(mut newest) = st.points_queued.pop() else {
        return;
    };
    let lost = std::mem::take(&mut st.points_queued);
    for p in &lost {
        remove_staged(paths, p.generation);
    }
    remove_staged(paths, newest.generation);
    if !lost.is_empty() {
        st.points_failed += lost.len() as u64;
        let generations: Vec<u64> = lost.iter().map(|p| p.generation).collect();
        let why = format!("the points of generations {generations:?} were given up: the point before them failed, and the image has moved on");
        tracing::error!(disk = %id, "{why}; the point of generation {} is written in full", newest.generation);
        st.point_error = Some(why);
    }
    newest.staged = false;
    st.point_due = Some(newest);
}

/// Removes staged blocks no due point refers to (a crash between staging and saving
/// the state, or between a point's end and its cleanup).
pub fn remove_unreferenced_staged(paths: &DiskPaths, st: &DiskState) {
    let dir = paths.staged_point(0);
    let Some(dir) = dir.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let wanted: std::collections::BTreeSet<u64> = st
        .point_due
        .iter()
        .chain(&st.points_queued)
        .filter(|p| p.staged)
        .map(|p| p.generation)
        .collect();
    for e in entries.flatten() {
        let name = e.file_name();
        let g = name
            .to_str()
            .and_then(|n| n.strip_suffix(".raw"))
            .and_then(|n| n.parse::<u64>().ok());
        if g.is_none_or(|g| !wanted.contains(&g)) {
            let _ = std::fs::remove_file(e.path());
        }
    }
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
    // Staged as a child of the point before it, which is now missing (given up, or
    // deleted outside pilotlight): a full point needs the whole image; the engine
    // decides (it knows whether the image still holds this generation).
    // (A staged first generation is a full point by design: its staged blocks are all
    // the image held.)
    let child_without_parent = |due: &crate::state::PointDue| {
        due.staged && due.parent_generation.is_some() && pw.needs_full(&st, due)
    };
    if st.point_due.as_ref().is_some_and(child_without_parent) {
        return Outcome {
            state: st,
            verdict: Verdict::NeedsImage,
        };
    }
    // Staged: nothing waits for it, so replication's work at hand goes first.
    if st.point_due.as_ref().is_some_and(|p| p.staged) {
        pw.yield_to_replication().await;
    }
    let _slot = pw.point_slot().await;
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
        d.take_over(id);
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
