//! Retention in snapshots mode, on the function's schedule: the same tiers as the
//! receiver's (every point for a day, hourly for a week, daily for a month), one paged
//! DescribeSnapshots of the stack's points per run (not one per point), then deletes.
//! Never deleted: a disk's chain head (the next point's parent), the point being written
//! and its parent, a point a DR run holds, a locked point. A snapshot EBS put in `error`
//! (an attempt that failed) goes too, unless it is the attempt under way.

use crate::error::ReplicaError;
use crate::Replica;
use chrono::{DateTime, Utc};
use pilotlight_cloud::ebs::{EbsApi, SnapshotFilter, SnapshotStatus};
use pilotlight_cloud::ObjectStore;
use pilotlight_protocol::points::{daily_locks, retained, tag, time_tag, Point, Tiers};
use pilotlight_protocol::replica::ChainHead;
use pilotlight_protocol::DiskId;
use std::collections::{BTreeMap, BTreeSet};

/// What a pruning run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Pruned {
    pub points: usize,
    pub deleted: Vec<String>,
    /// Deletes that failed (tried again next run).
    pub failed: usize,
    /// Daily points locked by this run (EBS Snapshot Lock).
    pub locked: Vec<String>,
}

/// With a lock mode set: locks each UTC day's first point of the disk that is not locked
/// yet until it would leave the daily tier (`daily_locks`, as the receiver does in image
/// mode) and tags it `pilotlight:locked-until`. A lock that fails is logged and tried
/// again at the next run. Returns the ids it locked (never offered for deletion).
async fn lock_daily<S, E: EbsApi, Q>(
    r: &Replica<S, E, Q>,
    points: &[Point],
    now: DateTime<Utc>,
) -> BTreeSet<String> {
    let mut locked = BTreeSet::new();
    let Some(mode) = r.cfg.lock else {
        return locked;
    };
    for lock in daily_locks(points, now, r.cfg.tiers.keep_daily) {
        let sid = lock.snapshot_id.as_str();
        let tags = [(tag::LOCKED_UNTIL.to_string(), time_tag(lock.until))];
        let res = async {
            r.cfg
                .retry
                .run(0, None, || r.ebs.lock_snapshot(sid, mode, lock.days))
                .await?;
            r.cfg
                .retry
                .run(0, None, || r.ebs.create_tags(sid, &tags))
                .await
        }
        .await;
        match res {
            Ok(()) => {
                tracing::info!(
                    snapshot = sid,
                    mode = mode.as_str(),
                    days = lock.days,
                    "recovery point locked"
                );
                locked.insert(lock.snapshot_id.clone());
            }
            Err(e) => tracing::warn!(
                snapshot = sid,
                "cannot lock a daily recovery point, tried again at the next run: {e}"
            ),
        }
    }
    locked
}

pub async fn prune<S: ObjectStore, E: EbsApi, Q>(
    r: &Replica<S, E, Q>,
    tiers: &Tiers,
    now: DateTime<Utc>,
) -> Result<Pruned, ReplicaError> {
    // The heads first: a point that becomes a head after this read is newer than every
    // point listed below, and the newest point of a disk is always kept.
    let heads = crate::chain::all(&r.store, &r.cfg.prefix, now).await?;
    prune_with_heads(r, &heads, tiers, now).await
}

/// [`prune`] with every disk's chain head as read just before (the schedule reads them
/// once for retention and the lag).
pub async fn prune_with_heads<S: ObjectStore, E: EbsApi, Q>(
    r: &Replica<S, E, Q>,
    heads: &[ChainHead],
    tiers: &Tiers,
    now: DateTime<Utc>,
) -> Result<Pruned, ReplicaError> {
    let mut protected: BTreeSet<String> = BTreeSet::new();
    for h in heads {
        protected.extend(h.point.iter().map(|p| p.snapshot_id.clone()));
        if let Some(p) = &h.pending {
            protected.extend(p.parent.iter().map(|x| x.snapshot_id.clone()));
            protected.extend(p.snapshot_id.iter().cloned());
        }
    }
    let filter = SnapshotFilter::default()
        .tag(tag::POINT, "1")
        .tag(tag::STACK, &r.cfg.stack);
    let found = r
        .cfg
        .retry
        .run(0, None, || r.ebs.describe_snapshots(&filter))
        .await?;
    let mut by_disk: BTreeMap<DiskId, Vec<Point>> = BTreeMap::new();
    let mut doomed: Vec<String> = Vec::new();
    let mut out = Pruned::default();
    for s in found {
        match s.status {
            SnapshotStatus::Completed => {
                if let Some(p) = Point::from_tags(&s.id, &s.tags) {
                    out.points += 1;
                    by_disk.entry(p.disk.clone()).or_default().push(p);
                }
            }
            SnapshotStatus::Error if !protected.contains(&s.id) => doomed.push(s.id),
            _ => {}
        }
    }
    for points in by_disk.values() {
        let locked = lock_daily(r, points, now).await;
        out.locked.extend(locked.iter().cloned());
        let keep = retained(
            points
                .iter()
                .map(|p| (p.snapshot_id.as_str(), p.snapshot_time, p.hold)),
            now,
            tiers,
        );
        doomed.extend(
            points
                .iter()
                .filter(|p| !keep.contains(p.snapshot_id.as_str()))
                .filter(|p| !protected.contains(&p.snapshot_id))
                .filter(|p| p.locked_until.is_none_or(|t| t <= now))
                .filter(|p| !locked.contains(&p.snapshot_id))
                .map(|p| p.snapshot_id.clone()),
        );
    }
    for id in doomed {
        match r
            .cfg
            .retry
            .run(0, None, || r.ebs.delete_snapshot(&id))
            .await
        {
            Ok(()) => out.deleted.push(id),
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::warn!(snapshot = %id, "cannot delete (tried again next run): {e}");
                out.failed += 1;
            }
        }
    }
    Ok(out)
}
