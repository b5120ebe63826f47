//! [`MemoryEbs`]: the in-memory twin of EBS, following AWS's documented behaviour (see the
//! module's documentation), with faults on demand.

use super::*;

/// One snapshot in [`MemoryEbs`].
#[derive(Debug, Clone)]
pub struct MemorySnapshot {
    pub status: SnapshotStatus,
    pub volume_size_gib: u64,
    pub parent: Option<String>,
    /// The first snapshot of its parent chain: ListChangedBlocks compares only two
    /// snapshots of one lineage.
    pub lineage: String,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub encrypted: bool,
    pub kms_key_arn: Option<String>,
    /// Every block it holds: inherited from its parent when it started, then its own.
    pub blocks: BTreeMap<u64, Arc<Vec<u8>>>,
    /// The blocks written to it, with their digests.
    pub written: BTreeMap<u64, [u8; 32]>,
    /// DescribeSnapshots calls still answering `pending` after completion.
    pub settling: u32,
    /// A lock and its days: DeleteSnapshot is refused while it is set (the twin has no
    /// clock: a test lifts it with [`MemoryEbs::expire_lock`]).
    pub lock: Option<(LockMode, u32)>,
    /// StartSnapshot's Timeout, and when the snapshot was started or last written (the
    /// tokio clock): a `pending` snapshot idle longer than that goes to `error`.
    pub timeout: Duration,
    pub last_activity: tokio::time::Instant,
}

/// What [`MemoryEbs`] holds.
#[derive(Debug, Default)]
pub struct MemoryEbsState {
    pub snapshots: BTreeMap<String, MemorySnapshot>,
    /// StartSnapshot client tokens and the snapshot each started.
    pub tokens: BTreeMap<String, String>,
    next: u64,
    /// Rate windows: the first call's time, the current second, and the calls in it
    /// (per operation, and PutSnapshotBlock per snapshot).
    epoch: Option<tokio::time::Instant>,
    second: u64,
    in_second: BTreeMap<String, u32>,
    /// Calls refused by [`Limits`], per operation.
    pub throttled: BTreeMap<&'static str, u64>,
    /// Every call made, per operation (refused ones too).
    pub calls: BTreeMap<&'static str, u64>,
}

/// The documented EBS direct API quotas (AWS General Reference, "Amazon EBS endpoints and
/// quotas"), enforced per second on the tokio clock when [`MemoryEbs::limits`] is set.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// PutSnapshotBlock requests per second per account, and per snapshot.
    pub put_per_account: u32,
    pub put_per_snapshot: u32,
    /// StartSnapshot and CompleteSnapshot requests per second per account (each).
    pub start_per_second: u32,
    pub complete_per_second: u32,
    /// Snapshots pending (started, not completed) at once per account.
    pub pending: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            put_per_account: 1000,
            put_per_snapshot: 1000,
            start_per_second: 10,
            complete_per_second: 10,
            pending: 100,
        }
    }
}

/// EBS in memory, faithful to AWS's documented behaviour (see the module doc).
#[derive(Debug, Default)]
pub struct MemoryEbs {
    pub state: Mutex<MemoryEbsState>,
    pub faults: Faults,
    /// DescribeSnapshots answers `pending` this many times after CompleteSnapshot before
    /// `completed` (EBS takes a while to seal a snapshot).
    pub settle_describes: u32,
    /// ListSnapshotBlocks and ListChangedBlocks page size (AWS: at most 10 000).
    pub page_size: usize,
    /// Every listing answers an empty page with a next token before each page of blocks
    /// (the service may: EBS direct APIs FAQ), so a caller that stops at an empty page
    /// is caught.
    pub empty_pages: bool,
    /// Added to every call (for benchmarks: a realistic round trip).
    pub latency: Option<Duration>,
    /// The account has EBS encryption by default on (with its default key): "you can't
    /// create unencrypted snapshots" (Encryption outcomes for EBS direct APIs).
    pub encryption_by_default: bool,
    /// The next this-many sealed snapshots go to `error` instead of `completed` (as EBS
    /// does when it fails to process one).
    pub fail_completions: std::sync::atomic::AtomicU32,
    /// StartSnapshot calls whose description contains the text wait for a permit of
    /// the semaphore first (a test holds one disk's points back while others go on).
    pub held_starts: Mutex<Option<(String, Arc<tokio::sync::Semaphore>)>>,
    /// The documented request-rate and pending-snapshot quotas, when set: a call over
    /// them is refused as EBS refuses it (RequestThrottledException,
    /// ServiceQuotaExceededException), and counted in `state.throttled`.
    pub limits: Option<Limits>,
}

impl MemoryEbs {
    pub fn new() -> Self {
        MemoryEbs {
            page_size: 10_000,
            ..Default::default()
        }
    }

    pub fn with_latency(mut self, d: Duration) -> Self {
        self.latency = Some(d);
        self
    }

    /// Runs `f` on the state unless a fault fails the call.
    async fn call<T>(
        &self,
        op: &'static str,
        id: &str,
        f: impl FnOnce(&mut MemoryEbsState) -> Result<T, CloudError>,
    ) -> Result<T, CloudError> {
        if let Some(d) = self.latency {
            tokio::time::sleep(d).await;
        }
        *lock(&self.state).calls.entry(op).or_default() += 1;
        self.faults.check("EBS", op, id)?;
        let mut st = lock(&self.state);
        if let Some(l) = self.limits {
            if let Err(e) = Self::within_limits(&mut st, &l, op, id) {
                *st.throttled.entry(op).or_default() += 1;
                return Err(e);
            }
        }
        // StartSnapshot API reference, Timeout: "The amount of time (in minutes) after
        // which the snapshot is automatically cancelled if: No blocks are written to the
        // snapshot. The snapshot is not completed after writing the last block of data."
        let now = tokio::time::Instant::now();
        for s in st.snapshots.values_mut() {
            if s.status == SnapshotStatus::Pending
                && s.settling == 0
                && now.duration_since(s.last_activity) >= s.timeout
            {
                s.status = SnapshotStatus::Error;
            }
        }
        f(&mut st)
    }

    /// Counts the call in the current second; refuses it over a quota.
    fn within_limits(
        st: &mut MemoryEbsState,
        l: &Limits,
        op: &'static str,
        id: &str,
    ) -> Result<(), CloudError> {
        let now = tokio::time::Instant::now();
        let epoch = *st.epoch.get_or_insert(now);
        let second = now.duration_since(epoch).as_secs();
        if second != st.second {
            st.second = second;
            st.in_second.clear();
        }
        let throttled = |what: &str| {
            CloudError::new("EBS", op, id, ErrorKind::Throttled, what)
                .with_code("RequestThrottledException")
        };
        let mut count = |key: String, max: u32| {
            let n = st.in_second.entry(key).or_default();
            *n += 1;
            *n <= max
        };
        match op {
            "StartSnapshot" => {
                if !count(op.into(), l.start_per_second) {
                    return Err(throttled("StartSnapshot rate exceeded"));
                }
                let pending = st
                    .snapshots
                    .values()
                    .filter(|s| s.status == SnapshotStatus::Pending && s.settling == 0)
                    .count();
                if pending >= l.pending {
                    return Err(CloudError::new(
                        "EBS",
                        op,
                        id,
                        ErrorKind::Throttled,
                        "Your current service quotas do not allow you to perform this action (pending snapshots)",
                    )
                    .with_code("ServiceQuotaExceededException"));
                }
            }
            "CompleteSnapshot" if !count(op.into(), l.complete_per_second) => {
                return Err(throttled("CompleteSnapshot rate exceeded"));
            }
            "PutSnapshotBlock" => {
                if !count(op.into(), l.put_per_account) {
                    return Err(throttled("PutSnapshotBlock account rate exceeded"));
                }
                if !count(format!("{op} {id}"), l.put_per_snapshot) {
                    return Err(throttled("PutSnapshotBlock rate for the snapshot exceeded"));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Calls refused by the limits so far, per operation.
    /// Calls made so far, per operation.
    pub fn calls(&self, op: &str) -> u64 {
        lock(&self.state).calls.get(op).copied().unwrap_or(0)
    }

    pub fn throttled(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.state).throttled.clone()
    }

    /// A copy of one snapshot (tests).
    pub fn get(&self, id: &str) -> Option<MemorySnapshot> {
        lock(&self.state).snapshots.get(id).cloned()
    }

    /// Sets a snapshot's state (tests: a snapshot that went to `error`).
    pub fn set_status(&self, id: &str, status: SnapshotStatus) {
        if let Some(s) = lock(&self.state).snapshots.get_mut(id) {
            s.status = status;
        }
    }

    /// The lock of a snapshot runs out.
    pub fn expire_lock(&self, id: &str) {
        if let Some(s) = lock(&self.state).snapshots.get_mut(id) {
            s.lock = None;
        }
    }

    /// The disk a completed snapshot describes, `volume_size_gib` GiB, holes as zeroes
    /// (tests: compare a point with the image).
    pub fn read_all(&self, id: &str) -> Option<Vec<u8>> {
        let st = lock(&self.state);
        let s = st.snapshots.get(id)?;
        let mut out = vec![0u8; (s.volume_size_gib * BLOCKS_PER_GIB * BLOCK_SIZE) as usize];
        for (i, b) in &s.blocks {
            let at = (*i * BLOCK_SIZE) as usize;
            out[at..at + b.len()].copy_from_slice(b);
        }
        Some(out)
    }
}

/// A completed snapshot, or why it cannot be read ("The snapshot can be accessed only if it
/// has a completed status", EBS direct APIs FAQ).
fn readable<'a>(
    st: &'a MemoryEbsState,
    op: &'static str,
    id: &str,
) -> Result<&'a MemorySnapshot, CloudError> {
    let s = st.snapshots.get(id).ok_or_else(|| not_found(op, id))?;
    if s.status != SnapshotStatus::Completed {
        return Err(invalid(op, id, "the snapshot is not completed"));
    }
    Ok(s)
}

/// Where a twin page starts, and whether the previous one was an empty page.
#[derive(Debug, Clone, Copy)]
struct From {
    index: u64,
    after_empty: bool,
}

/// The twin's page tokens: `i<index>` (the next page starts there), `e<index>` (an empty
/// page was answered; the next starts there). Anything else is refused as the service
/// refuses a bad token (ValidationException, Reason INVALID_PAGE_TOKEN).
fn page_from(op: &'static str, id: &str, start: PageStart<'_>) -> Result<From, CloudError> {
    match start {
        PageStart::Index(index) => Ok(From {
            index,
            after_empty: false,
        }),
        PageStart::Token(t) => {
            let bad = || {
                ebs_error(
                    op,
                    id,
                    ErrorKind::Invalid,
                    "INVALID_PAGE_TOKEN",
                    "NextToken is not valid",
                )
            };
            let (kind, n) = t.split_at_checked(1).ok_or_else(bad)?;
            let index = n.parse().map_err(|_| bad())?;
            match kind {
                "i" => Ok(From {
                    index,
                    after_empty: false,
                }),
                "e" => Ok(From {
                    index,
                    after_empty: true,
                }),
                _ => Err(bad()),
            }
        }
    }
}

/// One page of `items` (already from `from.index` on, in index order): at most `size`,
/// or, with `empty` on, an empty page with a token first (as the service may answer).
fn one_page<T>(
    mut items: impl Iterator<Item = T>,
    index_of: impl Fn(&T) -> u64,
    from: From,
    size: usize,
    empty: bool,
) -> BlockPage<T> {
    if empty && !from.after_empty {
        return BlockPage {
            blocks: Vec::new(),
            next_token: Some(format!("e{}", from.index)),
        };
    }
    let blocks: Vec<T> = items.by_ref().take(size).collect();
    let next_token = items.next().map(|n| format!("i{}", index_of(&n)));
    BlockPage { blocks, next_token }
}

impl EbsApi for MemoryEbs {
    async fn start_snapshot(&self, req: &StartSnapshot) -> Result<String, CloudError> {
        const OP: &str = "StartSnapshot";
        let gate = lock(&self.held_starts)
            .as_ref()
            .filter(|(text, _)| req.description.contains(text.as_str()))
            .map(|(_, g)| g.clone());
        if let Some(g) = gate {
            // Closed: let it through.
            let _permit = g.acquire().await;
        }
        self.call(OP, "", |st| {
            if req.client_token.is_empty() || req.client_token.len() > 64 {
                return Err(invalid(OP, "", "ClientToken must be 1 to 64 characters"));
            }
            if let Some(id) = st.tokens.get(&req.client_token) {
                return Ok(id.clone());
            }
            if !(1..=MAX_VOLUME_GIB).contains(&req.volume_size_gib) {
                return Err(invalid(OP, "", "VolumeSize must be 1 to 65536 GiB"));
            }
            if !(10..=4320).contains(&req.timeout_minutes) {
                return Err(invalid(OP, "", "Timeout must be 10 to 4320 minutes"));
            }
            // StartSnapshot API reference: Description "Maximum length of 255"; Tags
            // "Maximum number of 50 items"; Tag: Key "Maximum length of 127", Value
            // "Maximum length of 255".
            if req.description.chars().count() > 255 {
                return Err(invalid(OP, "", "Description is longer than 255 characters"));
            }
            if req.tags.len() > 50 {
                return Err(invalid(OP, "", "more than 50 tags"));
            }
            if let Some((k, _)) = req
                .tags
                .iter()
                .find(|(k, v)| k.chars().count() > 127 || v.chars().count() > 255)
            {
                return Err(invalid(
                    OP,
                    "",
                    &format!("tag {k}: keys are at most 127 characters, values 255"),
                ));
            }
            st.next += 1;
            let id = format!("snap-{:017x}", st.next);
            let (encrypted, kms_key_arn, blocks, lineage) = match &req.parent {
                Some(p) => {
                    // StartSnapshot API reference: "You can't specify ParentSnapshotId
                    // and Encrypted in the same request. If you specify both parameters,
                    // the request fails with ValidationException."
                    if req.encrypted.is_some() || req.kms_key_arn.is_some() {
                        return Err(invalid(
                            OP,
                            p,
                            "You can't specify ParentSnapshotId and Encrypted (or KmsKeyArn) in the same request",
                        ));
                    }
                    let parent = st.snapshots.get(p).ok_or_else(|| not_found(OP, p))?;
                    if parent.status != SnapshotStatus::Completed {
                        return Err(invalid(OP, p, "the parent snapshot is not completed"));
                    }
                    if req.volume_size_gib < parent.volume_size_gib {
                        return Err(invalid(
                            OP,
                            p,
                            "VolumeSize is smaller than the parent snapshot's",
                        ));
                    }
                    // Encryption outcomes, unencrypted parent: "If Amazon EBS encryption
                    // by default is enabled on your AWS account, you cannot start a new
                    // snapshot using an unencrypted parent snapshot."
                    if !parent.encrypted && self.encryption_by_default {
                        return Err(invalid(
                            OP,
                            p,
                            "encryption by default is on: an unencrypted parent cannot be used",
                        ));
                    }
                    // Encrypted parent, both omitted: "The snapshot is encrypted using the
                    // same KMS key as the parent snapshot." Blocks are shared, not
                    // copied: the child keeps them whatever happens to the parent.
                    (
                        parent.encrypted,
                        parent.kms_key_arn.clone(),
                        parent.blocks.clone(),
                        parent.lineage.clone(),
                    )
                }
                None => {
                    let (encrypted, key) = match (req.encrypted, &req.kms_key_arn) {
                        // KmsKeyArn (API reference): "If you specify a KmsKeyArn, you must
                        // set Encrypted to true."
                        (None | Some(false), Some(_)) => {
                            return Err(invalid(OP, "", "KmsKeyArn requires Encrypted true"))
                        }
                        (Some(true), key) => (true, key.clone()),
                        // "If Amazon EBS encryption by default is enabled on your AWS
                        // account, you can't create unencrypted snapshots."
                        (Some(false), None) if self.encryption_by_default => {
                            return Err(invalid(
                                OP,
                                "",
                                "encryption by default is on: Encrypted false is refused",
                            ))
                        }
                        (Some(false), None) => (false, None),
                        (None, None) => (self.encryption_by_default, None),
                    };
                    (encrypted, key, BTreeMap::new(), id.clone())
                }
            };
            st.tokens.insert(req.client_token.clone(), id.clone());
            st.snapshots.insert(
                id.clone(),
                MemorySnapshot {
                    status: SnapshotStatus::Pending,
                    volume_size_gib: req.volume_size_gib,
                    parent: req.parent.clone(),
                    lineage,
                    description: req.description.clone(),
                    tags: req.tags.iter().cloned().collect(),
                    encrypted,
                    kms_key_arn,
                    blocks,
                    written: BTreeMap::new(),
                    settling: 0,
                    lock: None,
                    timeout: Duration::from_secs(u64::from(req.timeout_minutes) * 60),
                    last_activity: tokio::time::Instant::now(),
                },
            );
            Ok(id)
        })
        .await
    }

    async fn put_snapshot_block(
        &self,
        id: &str,
        index: u64,
        data: Bytes,
        checksum: &str,
    ) -> Result<(), CloudError> {
        const OP: &str = "PutSnapshotBlock";
        self.call(OP, id, |st| {
            let s = st.snapshots.get_mut(id).ok_or_else(|| not_found(OP, id))?;
            // PutSnapshotBlock API reference: blocks are written to a snapshot "in the
            // pending state"; BlockIndex within the volume; DataLength 524288 ("Data
            // written to a snapshot must be aligned with 512-KiB sectors"); Checksum the
            // Base64 SHA-256 of the block, checked by the service.
            if s.status != SnapshotStatus::Pending {
                return Err(invalid(OP, id, "the snapshot is not pending"));
            }
            if index >= s.volume_size_gib * BLOCKS_PER_GIB {
                return Err(invalid(OP, id, "BlockIndex is beyond the volume size"));
            }
            if data.len() as u64 != BLOCK_SIZE {
                return Err(invalid(OP, id, "DataLength must be 524288"));
            }
            let digest: [u8; 32] = Sha256::digest(&data).into();
            if block_checksum(&digest) != checksum {
                return Err(invalid(
                    OP,
                    id,
                    "the block's checksum does not match its data",
                ));
            }
            s.written.insert(index, digest);
            s.blocks.insert(index, Arc::new(data.to_vec()));
            s.last_activity = tokio::time::Instant::now();
            Ok(())
        })
        .await
    }

    async fn complete_snapshot(
        &self,
        id: &str,
        changed_blocks: u64,
        checksum: &str,
    ) -> Result<SnapshotStatus, CloudError> {
        const OP: &str = "CompleteSnapshot";
        let settle = self.settle_describes;
        self.call(OP, id, |st| {
            let s = st.snapshots.get_mut(id).ok_or_else(|| not_found(OP, id))?;
            if s.status == SnapshotStatus::Completed {
                return Ok(SnapshotStatus::Completed);
            }
            if s.status == SnapshotStatus::Error {
                return Err(invalid(OP, id, "the snapshot is in the error state"));
            }
            // CompleteSnapshot API reference: ChangedBlocksCount "The number of blocks that
            // were written to the snapshot"; Checksum with ChecksumAggregationMethod
            // LINEAR over the blocks' checksums in ascending index order. A count or
            // aggregate that does not match what was written: the snapshot goes to
            // `error` (it never becomes a point anyone can launch from).
            if changed_blocks != s.written.len() as u64
                || linear_checksum(s.written.values()) != checksum
            {
                s.status = SnapshotStatus::Error;
                return Ok(SnapshotStatus::Error);
            }
            let fail = &self.fail_completions;
            use std::sync::atomic::Ordering::SeqCst;
            if fail
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                s.status = SnapshotStatus::Error;
                return Ok(SnapshotStatus::Error);
            }
            s.status = SnapshotStatus::Completed;
            s.settling = settle;
            Ok(if settle > 0 {
                SnapshotStatus::Pending
            } else {
                SnapshotStatus::Completed
            })
        })
        .await
    }

    async fn list_snapshot_blocks_page(
        &self,
        id: &str,
        start: PageStart<'_>,
    ) -> Result<BlockPage<BlockRef>, CloudError> {
        const OP: &str = "ListSnapshotBlocks";
        let (size, empty) = (self.page_size.max(1), self.empty_pages);
        self.call(OP, id, |st| {
            let s = readable(st, OP, id)?;
            let from = page_from(OP, id, start)?;
            Ok(one_page(
                s.blocks.range(from.index..).map(|(i, _)| BlockRef {
                    index: *i,
                    token: format!("tok-{id}-{i}"),
                }),
                |b| b.index,
                from,
                size,
                empty,
            ))
        })
        .await
    }

    async fn list_changed_blocks_page(
        &self,
        first: &str,
        second: &str,
        start: PageStart<'_>,
    ) -> Result<BlockPage<ChangedBlock>, CloudError> {
        const OP: &str = "ListChangedBlocks";
        let (size, empty) = (self.page_size.max(1), self.empty_pages);
        self.call(OP, second, |st| {
            let a = readable(st, OP, first)?;
            let b = readable(st, OP, second)?;
            // ListChangedBlocks API reference: "blocks that are different between two
            // Amazon Elastic Block Store snapshots of the same volume/snapshot lineage";
            // other pairs: ValidationException, Reason UNRELATED_SNAPSHOTS.
            if a.lineage != b.lineage {
                return Err(ebs_error(
                    OP,
                    second,
                    ErrorKind::Invalid,
                    UNRELATED_SNAPSHOTS,
                    &format!("{first} and {second} are not of the same lineage"),
                ));
            }
            let from = page_from(OP, second, start)?;
            // A block differs when it was written after the two parted: a block both
            // share (inherited) is the same allocation in both.
            let indices: std::collections::BTreeSet<u64> = a
                .blocks
                .range(from.index..)
                .chain(b.blocks.range(from.index..))
                .map(|(i, _)| *i)
                .collect();
            let changed = indices.into_iter().filter_map(|i| {
                let (x, y) = (a.blocks.get(&i), b.blocks.get(&i));
                let same = matches!((x, y), (Some(x), Some(y)) if Arc::ptr_eq(x, y));
                (!same).then(|| ChangedBlock {
                    index: i,
                    first: x.map(|_| format!("tok-{first}-{i}")),
                    second: y.map(|_| format!("tok-{second}-{i}")),
                })
            });
            Ok(one_page(changed, |c| c.index, from, size, empty))
        })
        .await
    }

    async fn get_snapshot_block_checked(
        &self,
        id: &str,
        b: &BlockRef,
    ) -> Result<(Bytes, [u8; 32]), CloudError> {
        const OP: &str = "GetSnapshotBlock";
        self.call(OP, id, |st| {
            let s = readable(st, OP, id)?;
            if b.token != format!("tok-{id}-{}", b.index) {
                return Err(invalid(OP, id, "BlockToken is not this block's"));
            }
            let data = s
                .blocks
                .get(&b.index)
                .ok_or_else(|| invalid(OP, id, "no such block"))?;
            Ok(Bytes::from(data.as_ref().clone()))
        })
        .await
        .map(|data| {
            let digest = Sha256::digest(&data).into();
            (data, digest)
        })
    }

    async fn describe_snapshots(
        &self,
        f: &SnapshotFilter,
    ) -> Result<Vec<SnapshotInfo>, CloudError> {
        self.call("DescribeSnapshots", "", |st| {
            // DescribeSnapshots API reference: a SnapshotId that does not exist is the
            // error InvalidSnapshot.NotFound (a filter that matches nothing is an empty
            // list).
            if let [id] = f.ids.as_slice() {
                if !st.snapshots.contains_key(id) {
                    return Err(CloudError::new(
                        "EC2",
                        "DescribeSnapshots",
                        id,
                        ErrorKind::NotFound,
                        "no such snapshot",
                    )
                    .with_code("InvalidSnapshot.NotFound"));
                }
            }
            Ok(st
                .snapshots
                .iter_mut()
                .filter(|(id, s)| f.matches(id, &s.tags))
                .map(|(id, s)| {
                    let mut status = s.status;
                    if status == SnapshotStatus::Completed && s.settling > 0 {
                        s.settling -= 1;
                        status = SnapshotStatus::Pending;
                    }
                    SnapshotInfo {
                        id: id.clone(),
                        status,
                        volume_size_gib: s.volume_size_gib,
                        description: s.description.clone(),
                        tags: s.tags.clone(),
                    }
                })
                .collect())
        })
        .await
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), CloudError> {
        self.call("DeleteSnapshot", id, |st| {
            let s = st.snapshots.get(id).ok_or_else(|| {
                CloudError::new(
                    "EC2",
                    "DeleteSnapshot",
                    id,
                    ErrorKind::NotFound,
                    "no such snapshot",
                )
                .with_code("InvalidSnapshot.NotFound")
            })?;
            // EBS User Guide, "Lock Amazon EBS snapshots": a locked snapshot "can't be
            // deleted" until the lock expires (governance: or an authorised user unlocks it).
            if let Some((mode, _)) = s.lock {
                return Err(CloudError::new(
                    "EC2",
                    "DeleteSnapshot",
                    id,
                    ErrorKind::Invalid,
                    format!("the snapshot is locked ({})", mode.as_str()),
                ));
            }
            st.snapshots.remove(id);
            Ok(())
        })
        .await
    }

    async fn lock_snapshot(&self, id: &str, mode: LockMode, days: u32) -> Result<(), CloudError> {
        self.call("LockSnapshot", id, |st| {
            // LockSnapshot API reference, LockDuration: "1 to 36500" days; only a
            // snapshot in the completed state can be locked here.
            if !(1..=36_500).contains(&days) {
                return Err(invalid(
                    "LockSnapshot",
                    id,
                    "LockDuration must be 1 to 36500 days",
                ));
            }
            let s = st
                .snapshots
                .get_mut(id)
                .ok_or_else(|| not_found("LockSnapshot", id))?;
            if s.status != SnapshotStatus::Completed {
                return Err(invalid(
                    "LockSnapshot",
                    id,
                    "only a completed snapshot can be locked",
                ));
            }
            s.lock = Some((mode, days));
            Ok(())
        })
        .await
    }

    async fn create_tags(&self, id: &str, tags: &[(String, String)]) -> Result<(), CloudError> {
        self.call("CreateTags", id, |st| {
            let s = st
                .snapshots
                .get_mut(id)
                .ok_or_else(|| not_found("CreateTags", id))?;
            s.tags.extend(tags.iter().cloned());
            Ok(())
        })
        .await
    }

    async fn delete_tags(&self, id: &str, keys: &[String]) -> Result<(), CloudError> {
        self.call("DeleteTags", id, |st| {
            let s = st
                .snapshots
                .get_mut(id)
                .ok_or_else(|| not_found("DeleteTags", id))?;
            for k in keys {
                s.tags.remove(k);
            }
            Ok(())
        })
        .await
    }
}
