//! Retention: which points to keep (tiers, runs' holds), Snapshot Lock on the daily
//! points, and deleting the rest.

use super::*;

impl<E: EbsApi + 'static> PointWriter<E> {
    /// Applies the retention tiers to this disk's points (this stack's only) and deletes
    /// what a crash left unfinished. Idempotent. Returns how many snapshots it deleted.
    pub async fn prune(
        &self,
        id: &DiskId,
        st: &mut DiskState,
        paths: &DiskPaths,
        now: DateTime<Utc>,
    ) -> Result<usize, PointError> {
        let filter = self
            .stack_filter()
            .tag(tag::SITE, id.site.as_str())
            .tag(tag::VM, id.vm.as_str())
            .tag(tag::DISK, id.disk.as_str());
        let found = self.describe(&filter).await?;
        self.prune_listed(st, paths, now, found).await
    }

    /// This stack's points.
    fn stack_filter(&self) -> SnapshotFilter {
        SnapshotFilter::default()
            .tag(tag::POINT, "1")
            .tag(tag::STACK, &self.cfg.stack)
    }

    /// Every point of this stack, by disk, in one listing (DescribeSnapshots, paged):
    /// pruning all disks costs one listing, not one per disk or per point. Snapshots
    /// whose disk tags do not name a disk are left out (never deleted).
    pub async fn list_stack_points(
        &self,
    ) -> Result<BTreeMap<DiskId, Vec<SnapshotInfo>>, PointError> {
        PointCalls::add(&self.calls.prune_rounds, 1);
        let found = self.describe(&self.stack_filter()).await?;
        let mut by_disk: BTreeMap<DiskId, Vec<SnapshotInfo>> = BTreeMap::new();
        for s in found {
            let name = |k: &str| s.tags.get(k).cloned().unwrap_or_default();
            let id = format!("{}/{}/{}", name(tag::SITE), name(tag::VM), name(tag::DISK));
            if let Ok(id) = DiskId::parse(&id) {
                by_disk.entry(id).or_default().push(s);
            }
        }
        Ok(by_disk)
    }

    /// [`Self::prune`] over this disk's points as listed (`found`: the disk's snapshots of
    /// this stack, whatever their state). The caller makes sure no point of the disk is
    /// being written: a snapshot not completed and not the due one is deleted.
    pub async fn prune_listed(
        &self,
        st: &mut DiskState,
        paths: &DiskPaths,
        now: DateTime<Utc>,
        found: Vec<SnapshotInfo>,
    ) -> Result<usize, PointError> {
        let under_way = st.point_due.as_ref().and_then(|d| d.snapshot_id.clone());
        let mut doomed = Vec::new();
        let mut completed = Vec::new();
        for s in found {
            if s.status == SnapshotStatus::Completed {
                if let Some(p) = Point::from_tags(&s.id, &s.tags) {
                    completed.push(p);
                }
            } else if under_way.as_deref() != Some(s.id.as_str()) {
                doomed.push(s.id);
            }
        }
        let keep = retained(
            completed
                .iter()
                .map(|p| (p.snapshot_id.as_str(), p.snapshot_time, p.hold)),
            now,
            &self.cfg.tiers,
        );
        let mut locked = self.lock_daily(&completed, now).await;
        locked.extend(
            completed
                .iter()
                .filter(|p| p.locked_until.is_some_and(|t| t > now))
                .map(|p| p.snapshot_id.clone()),
        );
        doomed.extend(
            completed
                .iter()
                .filter(|p| !keep.contains(p.snapshot_id.as_str()))
                .filter(|p| !locked.contains(&p.snapshot_id))
                .map(|p| p.snapshot_id.clone()),
        );
        // One snapshot that cannot go (e.g. InvalidSnapshot.InUse: an AMI registered from
        // it) never keeps the others: each is tried, a failure logged and tried again at
        // the next pruning.
        let mut deleted = 0;
        for sid in &doomed {
            match self.delete(sid).await {
                Ok(()) => deleted += 1,
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::warn!(
                        snapshot = %sid,
                        "a pruned recovery point cannot be deleted yet, tried again at the next pruning: {e}"
                    );
                    continue;
                }
            }
            st.points.retain(|p| &p.snapshot_id != sid);
        }
        if deleted > 0 {
            save(paths, st)?;
        }
        Ok(deleted)
    }
}

impl<E: EbsApi + 'static> PointWriter<E> {
    /// With a lock mode set: locks each UTC day's first point (the one the daily tier
    /// keeps) that is not locked yet, until it would leave the daily tier, and tags it
    /// `pilotlight:locked-until`; such a point is never offered for deletion before then.
    /// A lock that fails is logged and tried again at the next pruning. Returns the ids
    /// it locked.
    async fn lock_daily(&self, completed: &[Point], now: DateTime<Utc>) -> Vec<String> {
        let Some(mode) = self.cfg.lock else {
            return Vec::new();
        };
        let mut locked = Vec::new();
        for lock in
            pilotlight_protocol::points::daily_locks(completed, now, self.cfg.tiers.keep_daily)
        {
            let days = lock.days;
            let tags = [(
                tag::LOCKED_UNTIL.to_string(),
                pilotlight_protocol::points::time_tag(lock.until),
            )];
            let sid = lock.snapshot_id.as_str();
            let res = async {
                self.retrying(|| self.ebs.lock_snapshot(sid, mode, days))
                    .await?;
                self.retrying(|| self.ebs.create_tags(sid, &tags)).await
            }
            .await;
            match res {
                Ok(()) => {
                    tracing::info!(
                        snapshot = sid,
                        mode = mode.as_str(),
                        days,
                        "recovery point locked"
                    );
                    locked.push(lock.snapshot_id.clone());
                }
                Err(e) => tracing::warn!(
                    snapshot = sid,
                    "cannot lock a daily recovery point, tried again at the next pruning: {e}"
                ),
            }
        }
        locked
    }
}
