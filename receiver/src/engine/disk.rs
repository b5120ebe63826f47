//! One disk's turn: which generation comes next (its parent applied, else the newest
//! base), applying it, saving the state, and only then deleting its messages; the
//! applied generation's recovery point is started before the next ([`super::point_task`]).

use super::context::{Disk, Turn};
use super::exports::run_exports;
use super::lifetime::{delete_messages, KeepAlive};
use super::point_task::{point_turn, PointTurn};
use super::prefetch::{prefetch_dir, remove_prefetched_up_to};
use crate::apply::{apply, ApplyOptions};
use crate::image::FileImage;
use crate::points::PointDue;
use crate::state::{self};
use chrono::Utc;
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::{ObjectStore, Queue};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Applies every generation of one disk that can be applied now, in order; runs the
/// exports that wait at each boundary first. Returns how many generations it applied.
pub async fn drive_disk<S: ObjectStore, Q: Queue + Clone + 'static, E: EbsApi + 'static>(
    t: &Turn<'_, S, Q, E>,
    d: &mut Disk,
) -> usize {
    let (id, src, queue, cfg, points) = (t.id, t.src, t.queue, t.cfg, t.points);
    let mut applied = 0;
    if d.retry_after.is_some_and(|t| Instant::now() < t) {
        return 0;
    }
    d.take_over(id);
    if !d.owned {
        d.backoff(cfg.retry_base);
        return 0;
    }
    loop {
        // The applied generation's recovery point is written by a task of its own while
        // the engine goes on; one read from the image (not staged) holds this disk's
        // next generation until it is written.
        if let Some(pw) = points {
            match point_turn(id, d, pw, t.point_done) {
                PointTurn::Free => {}
                PointTurn::Busy => break,
                PointTurn::Failed => {
                    d.backoff(cfg.retry_base);
                    break;
                }
            }
        }
        // Exports at this boundary run before anything newer is applied.
        run_exports(t, d).await;
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
                d.backoff(cfg.retry_base);
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
        let keepalive = KeepAlive::start(queue, receipts, cfg.visibility_secs);
        let opts = ApplyOptions {
            concurrency: cfg.concurrency,
            staging_dir: d.paths.staging_dir.clone(),
            image_name: d.paths.image.display().to_string(),
            prefetch_dir: Some(prefetch_dir(&d.paths, g)),
            budget: cfg.budget.clone(),
        };
        tracing::info!(disk = %id, generation = g, parent = ?m.parent, objects = m.objects.len(), "applying");
        d.prefetch_floor.fetch_max(g, Ordering::Relaxed);
        let res = apply(src, &cfg.prefix, &m, image, &opts).await;
        drop(keepalive);
        match res {
            Ok(report) => {
                let mut st = d.state.clone();
                st.applied = Some(g);
                st.snapshot_time = Some(m.snapshot_time);
                st.applied_at = Some(Utc::now());
                st.disk_size = m.disk_size;
                // Saved with "applied": a crash before the point is written still writes it.
                if let Some(pw) = points {
                    let mut due = PointDue::for_manifest(&m);
                    let first = d.state.applied.is_none();
                    if super::stage::should_stage(&st, &due, first, pw.cfg.stage_max_bytes) {
                        let (image, staged, d2) =
                            (d.paths.image.clone(), d.paths.staged_point(g), due.clone());
                        let staged_ok = tokio::task::spawn_blocking(move || {
                            super::stage::stage(&image, &staged, &d2)
                        })
                        .await
                        .map_err(std::io::Error::other)
                        .and_then(|r| r);
                        match staged_ok {
                            Ok(()) => due.staged = true,
                            Err(e) => {
                                tracing::warn!(disk = %id, generation = g, "point not staged, the disk's next generation waits for it: {e}")
                            }
                        }
                    }
                    if st.point_due.is_none() && d.point_task.is_none() {
                        st.point_due = Some(due);
                    } else {
                        st.points_queued.push(due);
                    }
                } else {
                    st.point_due = None;
                    st.points_queued.clear();
                }
                if let Err(e) = state::save(&d.paths, &st) {
                    tracing::error!(disk = %id, generation = g, "image written but state not saved: {e}; will re-apply");
                    d.backoff(cfg.retry_base);
                    break;
                }
                d.state = st;
                remove_prefetched_up_to(&d.paths, g);
                d.prefetched = d.prefetched.split_off(&(g + 1, 0));
                d.failures = 0;
                d.retry_after = None;
                d.applied_since.bytes += report.bytes_written + report.bytes_zeroed;
                d.applied_since.seconds += report.seconds;
                applied += 1;
                let lag = (Utc::now() - m.snapshot_time).num_seconds();
                tracing::info!(
                    disk = %id, generation = g, objects = report.objects, bytes = report.bytes_written,
                    zeroed = report.bytes_zeroed, prefetched = report.objects_prefetched, fetch_seconds = report.fetch_seconds, write_seconds = report.write_seconds, seconds = report.seconds, lag_seconds = lag, "applied"
                );
                // Everything at or below g is done: drop it, delete its messages.
                d.pending = d.pending.split_off(&(g + 1));
                d.unread = d.unread.split_off(&(g + 1));
                let keep_msgs = d.messages.split_off(&(g + 1));
                let done = std::mem::replace(&mut d.messages, keep_msgs);
                let receipts: Vec<String> =
                    done.into_values().flatten().map(|w| w.receipt).collect();
                delete_messages(queue, &receipts).await;
            }
            Err(e) => {
                let transient = e.is_transient();
                if transient {
                    tracing::warn!(disk = %id, generation = g, "apply failed, state unchanged, will retry: {e}");
                } else {
                    // The generation itself is bad: forget it so its messages are not
                    // kept alive; they go to the dead-letter queue.
                    tracing::error!(disk = %id, generation = g, "generation rejected, state unchanged: {e}; its messages are left for the dead-letter queue");
                    d.pending.remove(&g);
                    d.messages.remove(&g);
                }
                d.backoff(cfg.retry_base);
                break;
            }
        }
    }
    applied
}
