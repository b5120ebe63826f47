//! Settling sealed snapshots: after CompleteSnapshot, EBS reports a snapshot `pending`
//! until it has processed it, and only a `completed` one can be a point (and the parent
//! of the next). Every point settling at the same time is asked about in one
//! DescribeSnapshots call (the `snapshot-id` filter, which matches what exists and fails
//! on nothing), not one call per point per poll: DescribeSnapshots is an EC2 API action,
//! paged and throttled per account ("Request throttling for the Amazon EC2 API", EC2 API
//! reference), shared with every other tool in the account; with 100 disks the per-point
//! polls were the receiver's largest use of it.
//!
//! Also here: the counts of the calls points make, per phase, logged with each point and
//! summed for the receiver's lifetime (`describe_calls` per point is what #35 measures).

use super::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::oneshot;

/// Ids asked about in one DescribeSnapshots call at most (the filter's values).
const BATCH_IDS: usize = 200;

type Answer = Result<Option<SnapshotStatus>, CloudError>;

/// Who waits for each snapshot's status.
type Waiters = BTreeMap<String, Vec<oneshot::Sender<Answer>>>;

/// Snapshots waiting for their next status poll, and whether a poll is gathering them.
#[derive(Debug, Default)]
pub struct Settling {
    waiting: Mutex<(Waiters, bool)>,
}

impl Settling {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Waiters, bool)> {
        // Nothing panics while it is held; a poisoned lock's data is still whole.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One phase of a point: calls made (retries included) and time spent.
#[derive(Debug, Default)]
pub struct Phase {
    calls: AtomicU64,
    micros: AtomicU64,
}

impl Phase {
    pub fn call(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
    pub fn ms(&self) -> u64 {
        self.micros.load(Ordering::Relaxed) / 1000
    }
    /// Runs `f`, adding its time to the phase.
    pub async fn time<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let t = std::time::Instant::now();
        let out = f.await;
        self.micros
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        out
    }
}

/// Where one point's time went: StartSnapshot, PutSnapshotBlock (with the image reads),
/// CompleteSnapshot, settling (DescribeSnapshots polls it shared), the block-count tag.
#[derive(Debug, Default)]
pub struct PointPhases {
    pub start: Phase,
    pub puts: Phase,
    pub complete: Phase,
    pub settle: Phase,
    pub tags: Phase,
}

/// What the receiver's points have cost since it started.
#[derive(Debug, Default)]
pub struct PointCalls {
    pub points: AtomicU64,
    pub describe_snapshots: AtomicU64,
    pub start_snapshot: AtomicU64,
    pub put_snapshot_block: AtomicU64,
    pub delete_snapshot: AtomicU64,
    pub prune_rounds: AtomicU64,
}

impl PointCalls {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }
    pub fn add(v: &AtomicU64, n: u64) {
        v.fetch_add(n, Ordering::Relaxed);
    }
}

impl<E: EbsApi + 'static> PointWriter<E> {
    /// The status of a sealed snapshot, asked together with every other snapshot whose
    /// status is asked within the next `retry_base` (none: not listed, maybe not visible
    /// yet). The call is made by a task of its own, so a point abandoned meanwhile never
    /// leaves the others waiting.
    pub(super) async fn settling_status(
        &self,
        sid: &str,
    ) -> Result<Option<SnapshotStatus>, PointError> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut w = self.settling.lock();
            w.0.entry(sid.to_string()).or_default().push(tx);
            !std::mem::replace(&mut w.1, true)
        };
        if lead {
            let me = self.clone();
            tokio::spawn(async move { me.poll_settling().await });
        }
        match rx.await {
            Ok(a) => Ok(a?),
            Err(_) => Err(PointError::State("the status poll was dropped".into())),
        }
    }

    async fn poll_settling(&self) {
        // Let the points settling now join this call.
        tokio::time::sleep(self.cfg.retry_base).await;
        let batch = {
            let mut w = self.settling.lock();
            w.1 = false;
            std::mem::take(&mut w.0)
        };
        let ids: Vec<&String> = batch.keys().collect();
        let mut found = BTreeMap::new();
        let mut failed = None;
        for chunk in ids.chunks(BATCH_IDS) {
            let filter = SnapshotFilter::any_of(chunk.iter().map(|s| s.as_str()));
            match self.describe(&filter).await {
                Ok(v) => found.extend(v.into_iter().map(|s| (s.id, s.status))),
                // The filter matches nothing rather than failing, but "not found" from an
                // endpoint that answers so means the same: not listed (yet).
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        for (id, waiters) in batch {
            let answer: Answer = match &failed {
                Some(e) => Err(e.clone()),
                None => Ok(found.get(&id).copied()),
            };
            for w in waiters {
                let _ = w.send(answer.clone());
            }
        }
    }

    /// DescribeSnapshots, retried, counted.
    pub(super) async fn describe(
        &self,
        filter: &SnapshotFilter,
    ) -> Result<Vec<SnapshotInfo>, CloudError> {
        self.retrying(|| {
            PointCalls::add(&self.calls.describe_snapshots, 1);
            self.ebs.describe_snapshots(filter)
        })
        .await
    }

    /// Waits until a sealed snapshot is `completed` or `error`. Not listed by
    /// DescribeSnapshots (EC2 reads are eventually consistent) is waited for until
    /// `visible_by`, and never deleted.
    pub(super) async fn settle(
        &self,
        sid: &str,
        visible_by: tokio::time::Instant,
        phase: &Phase,
    ) -> Result<Sealed, PointError> {
        let deadline = tokio::time::Instant::now() + self.cfg.settle_timeout;
        let mut wait = self.cfg.retry_base;
        loop {
            phase.call();
            match self.settling_status(sid).await? {
                Some(SnapshotStatus::Completed) => return Ok(Sealed::Completed),
                Some(SnapshotStatus::Error) => return Ok(Sealed::Failed),
                None if tokio::time::Instant::now() >= visible_by => return Ok(Sealed::Vanished),
                Some(SnapshotStatus::Pending) | None => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PointError::Unsettled {
                    id: sid.into(),
                    secs: self.cfg.settle_timeout.as_secs(),
                });
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(15));
        }
    }
}
