//! EBS snapshots as recovery points use them: the EBS direct APIs (StartSnapshot,
//! PutSnapshotBlock, CompleteSnapshot, ListSnapshotBlocks, GetSnapshotBlock) and the EC2
//! snapshot calls that go with them (DescribeSnapshots, DeleteSnapshot, tags). One trait
//! ([`EbsApi`]), implemented for the AWS SDK ([`SdkEbs`], feature `ebs`) and in memory
//! ([`MemoryEbs`]).
//!
//! The emulator answers the direct APIs only thinly (no parents, a 512-byte block size, no
//! checksum checks), so [`MemoryEbs`] follows AWS's documented behaviour instead: 512 KiB
//! blocks, a child inherits its parent's blocks as they were when it started, deleting a
//! parent leaves its children whole, every block's SHA-256 and the LINEAR aggregate are
//! checked, a snapshot is `pending` until completed (or `error` when the aggregate is
//! wrong), client tokens make StartSnapshot idempotent, and throttling comes on demand
//! through [`Faults`].

use crate::error::{CloudError, ErrorKind};
use crate::fault::{lock, Faults};
use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The EBS direct APIs' block size.
pub const BLOCK_SIZE: u64 = 512 * 1024;
/// Blocks per GiB (snapshot sizes are whole GiB).
pub const BLOCKS_PER_GIB: u64 = (1 << 30) / BLOCK_SIZE;
/// The largest snapshot StartSnapshot accepts (64 TiB).
pub const MAX_VOLUME_GIB: u64 = 65_536;

/// A snapshot's state as DescribeSnapshots and CompleteSnapshot report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStatus {
    Pending,
    Completed,
    Error,
}

impl SnapshotStatus {
    pub fn parse(s: &str) -> SnapshotStatus {
        match s {
            "completed" => SnapshotStatus::Completed,
            "pending" => SnapshotStatus::Pending,
            _ => SnapshotStatus::Error,
        }
    }
}

/// EBS Snapshot Lock modes (EC2 `LockSnapshot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Deletable once unlocked by a principal allowed `ec2:UnlockSnapshot`, or expired.
    Governance,
    /// Nobody can unlock or delete it before it expires (no cooling-off period is set).
    Compliance,
}

impl LockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Governance => "governance",
            LockMode::Compliance => "compliance",
        }
    }
}

/// A `StartSnapshot` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartSnapshot {
    /// Whole GiB, 1 to 65 536, at least the parent's.
    pub volume_size_gib: u64,
    /// The snapshot this one starts from: its blocks are inherited.
    pub parent: Option<String>,
    pub description: String,
    pub tags: Vec<(String, String)>,
    /// Idempotency token (at most 64 characters): a retried request with the same token
    /// returns the snapshot the first one started.
    pub client_token: String,
    /// `Encrypted`, sent only when `Some`. Never with a parent: "You can't specify
    /// ParentSnapshotId and Encrypted in the same request" (StartSnapshot API reference);
    /// a child inherits its parent's encryption. See [`StartSnapshot::encryption`].
    pub encrypted: Option<bool>,
    /// A customer KMS key; requires `encrypted: Some(true)` and no parent.
    pub kms_key_arn: Option<String>,
    /// Minutes after which a snapshot not completed goes to `error` (10 to 4 320).
    pub timeout_minutes: u32,
}

impl StartSnapshot {
    /// The `Encrypted` and `KmsKeyArn` a request sends, per the "Encryption outcomes for
    /// EBS direct APIs" table (EBS User Guide): with a parent, neither (the snapshot is
    /// encrypted exactly as its parent, with the parent's key); without one, `Encrypted`
    /// true and the key when encrypting with a customer key, else neither (the account's
    /// encryption-by-default setting decides).
    pub fn encryption(
        parent: Option<&str>,
        kms_key_arn: Option<&str>,
    ) -> (Option<bool>, Option<String>) {
        match (parent, kms_key_arn) {
            (Some(_), _) | (None, None) => (None, None),
            (None, Some(k)) => (Some(true), Some(k.to_string())),
        }
    }
}

/// One snapshot as DescribeSnapshots reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub status: SnapshotStatus,
    pub volume_size_gib: u64,
    pub description: String,
    pub tags: BTreeMap<String, String>,
}

/// Which snapshots DescribeSnapshots returns: those with every one of `tags` (and, when
/// given, one of `ids`). Always only the caller's own snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotFilter {
    pub ids: Vec<String>,
    pub tags: Vec<(String, String)>,
}

impl SnapshotFilter {
    pub fn tag(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.tags.push((k.into(), v.into()));
        self
    }
    pub fn id(id: impl Into<String>) -> Self {
        SnapshotFilter {
            ids: vec![id.into()],
            tags: vec![],
        }
    }
    fn matches(&self, id: &str, tags: &BTreeMap<String, String>) -> bool {
        (self.ids.is_empty() || self.ids.iter().any(|i| i == id))
            && self
                .tags
                .iter()
                .all(|(k, v)| tags.get(k).is_some_and(|t| t == v))
    }
}

/// A block of a completed snapshot, as ListSnapshotBlocks returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRef {
    pub index: u64,
    pub token: String,
}

/// The SHA-256 of a block, base64 (what PutSnapshotBlock and GetSnapshotBlock carry).
pub fn block_checksum(digest: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// The LINEAR aggregate checksum CompleteSnapshot wants: the SHA-256 of the written
/// blocks' SHA-256 digests concatenated in ascending block index order, base64.
pub fn linear_checksum<'a>(
    digests_in_index_order: impl IntoIterator<Item = &'a [u8; 32]>,
) -> String {
    let mut h = Sha256::new();
    for d in digests_in_index_order {
        h.update(d);
    }
    block_checksum(&h.finalize().into())
}

/// The calls recovery points make.
pub trait EbsApi: Send + Sync {
    /// Starts a snapshot (`pending`); returns its id.
    fn start_snapshot(
        &self,
        req: &StartSnapshot,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
    /// Writes one whole block (`BLOCK_SIZE` bytes) with its SHA-256 (base64).
    fn put_snapshot_block(
        &self,
        id: &str,
        index: u64,
        data: Bytes,
        checksum: &str,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Seals a snapshot: the number of blocks written and their LINEAR checksum.
    /// Returns the state the service reports (it may still be `pending` a while).
    fn complete_snapshot(
        &self,
        id: &str,
        changed_blocks: u64,
        checksum: &str,
    ) -> impl Future<Output = Result<SnapshotStatus, CloudError>> + Send;
    /// Every block a completed snapshot holds (its own and inherited), every page.
    fn list_snapshot_blocks(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Vec<BlockRef>, CloudError>> + Send;
    /// One block's bytes, checked against the checksum the service sends with them.
    fn get_snapshot_block(
        &self,
        id: &str,
        block: &BlockRef,
    ) -> impl Future<Output = Result<Bytes, CloudError>> + Send;
    /// The caller's snapshots matching `filter`, every page.
    fn describe_snapshots(
        &self,
        filter: &SnapshotFilter,
    ) -> impl Future<Output = Result<Vec<SnapshotInfo>, CloudError>> + Send;
    fn delete_snapshot(&self, id: &str) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Adds or replaces tags on a snapshot.
    fn create_tags(
        &self,
        id: &str,
        tags: &[(String, String)],
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn delete_tags(
        &self,
        id: &str,
        keys: &[String],
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Locks a snapshot against deletion for `days` (EC2 `LockSnapshot`, 1 to 36 500).
    fn lock_snapshot(
        &self,
        id: &str,
        mode: LockMode,
        days: u32,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
}

impl<T: EbsApi> EbsApi for Arc<T> {
    async fn start_snapshot(&self, req: &StartSnapshot) -> Result<String, CloudError> {
        (**self).start_snapshot(req).await
    }
    async fn put_snapshot_block(
        &self,
        id: &str,
        index: u64,
        data: Bytes,
        checksum: &str,
    ) -> Result<(), CloudError> {
        (**self).put_snapshot_block(id, index, data, checksum).await
    }
    async fn complete_snapshot(
        &self,
        id: &str,
        n: u64,
        checksum: &str,
    ) -> Result<SnapshotStatus, CloudError> {
        (**self).complete_snapshot(id, n, checksum).await
    }
    async fn list_snapshot_blocks(&self, id: &str) -> Result<Vec<BlockRef>, CloudError> {
        (**self).list_snapshot_blocks(id).await
    }
    async fn get_snapshot_block(&self, id: &str, b: &BlockRef) -> Result<Bytes, CloudError> {
        (**self).get_snapshot_block(id, b).await
    }
    async fn describe_snapshots(
        &self,
        f: &SnapshotFilter,
    ) -> Result<Vec<SnapshotInfo>, CloudError> {
        (**self).describe_snapshots(f).await
    }
    async fn delete_snapshot(&self, id: &str) -> Result<(), CloudError> {
        (**self).delete_snapshot(id).await
    }
    async fn create_tags(&self, id: &str, tags: &[(String, String)]) -> Result<(), CloudError> {
        (**self).create_tags(id, tags).await
    }
    async fn delete_tags(&self, id: &str, keys: &[String]) -> Result<(), CloudError> {
        (**self).delete_tags(id, keys).await
    }
    async fn lock_snapshot(&self, id: &str, mode: LockMode, days: u32) -> Result<(), CloudError> {
        (**self).lock_snapshot(id, mode, days).await
    }
}

fn ebs_error(op: &'static str, id: &str, kind: ErrorKind, code: &str, detail: &str) -> CloudError {
    CloudError::new("EBS", op, id, kind, detail).with_code(code)
}

fn invalid(op: &'static str, id: &str, detail: &str) -> CloudError {
    ebs_error(op, id, ErrorKind::Invalid, "ValidationException", detail)
}

fn not_found(op: &'static str, id: &str) -> CloudError {
    ebs_error(
        op,
        id,
        ErrorKind::NotFound,
        "ResourceNotFoundException",
        "no such snapshot",
    )
}

/// One snapshot in [`MemoryEbs`].
#[derive(Debug, Clone)]
pub struct MemorySnapshot {
    pub status: SnapshotStatus,
    pub volume_size_gib: u64,
    pub parent: Option<String>,
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
}

/// What [`MemoryEbs`] holds.
#[derive(Debug, Default)]
pub struct MemoryEbsState {
    pub snapshots: BTreeMap<String, MemorySnapshot>,
    /// StartSnapshot client tokens and the snapshot each started.
    pub tokens: BTreeMap<String, String>,
    next: u64,
}

/// EBS in memory, faithful to AWS's documented behaviour (see the module doc).
#[derive(Debug, Default)]
pub struct MemoryEbs {
    pub state: Mutex<MemoryEbsState>,
    pub faults: Faults,
    /// DescribeSnapshots answers `pending` this many times after CompleteSnapshot before
    /// `completed` (EBS takes a while to seal a snapshot).
    pub settle_describes: u32,
    /// ListSnapshotBlocks page size (AWS: at most 10 000).
    pub page_size: usize,
    /// Added to every call (for benchmarks: a realistic round trip).
    pub latency: Option<Duration>,
    /// The account has EBS encryption by default on (with its default key): "you can't
    /// create unencrypted snapshots" (Encryption outcomes for EBS direct APIs).
    pub encryption_by_default: bool,
    /// The next this-many sealed snapshots go to `error` instead of `completed` (as EBS
    /// does when it fails to process one).
    pub fail_completions: std::sync::atomic::AtomicU32,
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
        self.faults.check("EBS", op, id)?;
        f(&mut lock(&self.state))
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

impl EbsApi for MemoryEbs {
    async fn start_snapshot(&self, req: &StartSnapshot) -> Result<String, CloudError> {
        const OP: &str = "StartSnapshot";
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
            let (encrypted, kms_key_arn, blocks) = match &req.parent {
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
                    (encrypted, key, BTreeMap::new())
                }
            };
            st.next += 1;
            let id = format!("snap-{:017x}", st.next);
            st.tokens.insert(req.client_token.clone(), id.clone());
            st.snapshots.insert(
                id.clone(),
                MemorySnapshot {
                    status: SnapshotStatus::Pending,
                    volume_size_gib: req.volume_size_gib,
                    parent: req.parent.clone(),
                    description: req.description.clone(),
                    tags: req.tags.iter().cloned().collect(),
                    encrypted,
                    kms_key_arn,
                    blocks,
                    written: BTreeMap::new(),
                    settling: 0,
                    lock: None,
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

    async fn list_snapshot_blocks(&self, id: &str) -> Result<Vec<BlockRef>, CloudError> {
        const OP: &str = "ListSnapshotBlocks";
        let page = self.page_size.max(1);
        let mut out = Vec::new();
        let mut from = 0u64;
        // One call per page, as the service pages (ListSnapshotBlocks API reference:
        // MaxResults 100 to 10000, NextToken), at most `page_size` blocks each; the
        // snapshot must be completed to be read.
        loop {
            let batch = self
                .call(OP, id, |st| {
                    let s = st.snapshots.get(id).ok_or_else(|| not_found(OP, id))?;
                    if s.status != SnapshotStatus::Completed {
                        return Err(invalid(OP, id, "the snapshot is not completed"));
                    }
                    Ok(s.blocks
                        .range(from..)
                        .take(page)
                        .map(|(i, _)| BlockRef {
                            index: *i,
                            token: format!("tok-{id}-{i}"),
                        })
                        .collect::<Vec<_>>())
                })
                .await?;
            let full = batch.len() == page;
            if let Some(last) = batch.last() {
                from = last.index + 1;
            }
            out.extend(batch);
            if !full {
                return Ok(out);
            }
        }
    }

    async fn get_snapshot_block(&self, id: &str, b: &BlockRef) -> Result<Bytes, CloudError> {
        const OP: &str = "GetSnapshotBlock";
        self.call(OP, id, |st| {
            let s = st.snapshots.get(id).ok_or_else(|| not_found(OP, id))?;
            if s.status != SnapshotStatus::Completed {
                return Err(invalid(OP, id, "the snapshot is not completed"));
            }
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

/// No EBS at all: what a receiver with recovery points off holds. Every call fails.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEbs;

fn off(op: &'static str) -> CloudError {
    CloudError::new("EBS", op, "", ErrorKind::Invalid, "recovery points are off")
}

impl EbsApi for NoEbs {
    async fn start_snapshot(&self, _: &StartSnapshot) -> Result<String, CloudError> {
        Err(off("StartSnapshot"))
    }
    async fn put_snapshot_block(
        &self,
        _: &str,
        _: u64,
        _: Bytes,
        _: &str,
    ) -> Result<(), CloudError> {
        Err(off("PutSnapshotBlock"))
    }
    async fn complete_snapshot(
        &self,
        _: &str,
        _: u64,
        _: &str,
    ) -> Result<SnapshotStatus, CloudError> {
        Err(off("CompleteSnapshot"))
    }
    async fn list_snapshot_blocks(&self, _: &str) -> Result<Vec<BlockRef>, CloudError> {
        Err(off("ListSnapshotBlocks"))
    }
    async fn get_snapshot_block(&self, _: &str, _: &BlockRef) -> Result<Bytes, CloudError> {
        Err(off("GetSnapshotBlock"))
    }
    async fn describe_snapshots(
        &self,
        _: &SnapshotFilter,
    ) -> Result<Vec<SnapshotInfo>, CloudError> {
        Err(off("DescribeSnapshots"))
    }
    async fn delete_snapshot(&self, _: &str) -> Result<(), CloudError> {
        Err(off("DeleteSnapshot"))
    }
    async fn create_tags(&self, _: &str, _: &[(String, String)]) -> Result<(), CloudError> {
        Err(off("CreateTags"))
    }
    async fn delete_tags(&self, _: &str, _: &[String]) -> Result<(), CloudError> {
        Err(off("DeleteTags"))
    }
    async fn lock_snapshot(&self, _: &str, _: LockMode, _: u32) -> Result<(), CloudError> {
        Err(off("LockSnapshot"))
    }
}

#[cfg(feature = "ebs")]
pub use sdk::SdkEbs;

#[cfg(feature = "ebs")]
mod sdk {
    use super::*;
    use crate::error::from_sdk;
    use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, Status};

    /// The EBS direct APIs and EC2's snapshot calls through the AWS SDK.
    #[derive(Debug, Clone)]
    pub struct SdkEbs {
        pub ebs: aws_sdk_ebs::Client,
        pub ec2: aws_sdk_ec2::Client,
    }

    fn status(s: Option<&Status>) -> SnapshotStatus {
        SnapshotStatus::parse(s.map_or("error", |s| s.as_str()))
    }

    fn ec2_tags(tags: &[(String, String)]) -> Vec<aws_sdk_ec2::types::Tag> {
        tags.iter()
            .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build())
            .collect()
    }

    fn broken(op: &'static str, id: &str, detail: &str) -> CloudError {
        CloudError::new("EBS", op, id, ErrorKind::Unreachable, detail)
    }

    impl EbsApi for SdkEbs {
        async fn start_snapshot(&self, req: &StartSnapshot) -> Result<String, CloudError> {
            let tags = req
                .tags
                .iter()
                .map(|(k, v)| aws_sdk_ebs::types::Tag::builder().key(k).value(v).build())
                .collect();
            let out = self
                .ebs
                .start_snapshot()
                .volume_size(req.volume_size_gib as i64)
                .set_parent_snapshot_id(req.parent.clone())
                .description(&req.description)
                .set_tags(Some(tags))
                .client_token(&req.client_token)
                .set_encrypted(req.encrypted)
                .set_kms_key_arn(req.kms_key_arn.clone())
                .timeout(req.timeout_minutes as i32)
                .send()
                .await
                .map_err(|e| from_sdk("EBS", "StartSnapshot", "", &e))?;
            out.snapshot_id()
                .map(String::from)
                .ok_or_else(|| broken("StartSnapshot", "", "no SnapshotId in the response"))
        }

        async fn put_snapshot_block(
            &self,
            id: &str,
            index: u64,
            data: Bytes,
            checksum: &str,
        ) -> Result<(), CloudError> {
            let index = i32::try_from(index)
                .map_err(|_| invalid("PutSnapshotBlock", id, "BlockIndex too large"))?;
            let len = data.len() as i32;
            self.ebs
                .put_snapshot_block()
                .snapshot_id(id)
                .block_index(index)
                .block_data(data.into())
                .data_length(len)
                .checksum(checksum)
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .send()
                .await
                .map_err(|e| {
                    from_sdk("EBS", "PutSnapshotBlock", format!("{id} block {index}"), &e)
                })?;
            Ok(())
        }

        async fn complete_snapshot(
            &self,
            id: &str,
            changed_blocks: u64,
            checksum: &str,
        ) -> Result<SnapshotStatus, CloudError> {
            let n = i32::try_from(changed_blocks)
                .map_err(|_| invalid("CompleteSnapshot", id, "ChangedBlocksCount too large"))?;
            let out = self
                .ebs
                .complete_snapshot()
                .snapshot_id(id)
                .changed_blocks_count(n)
                .checksum(checksum)
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
                .send()
                .await
                .map_err(|e| from_sdk("EBS", "CompleteSnapshot", id, &e))?;
            Ok(status(out.status()))
        }

        async fn list_snapshot_blocks(&self, id: &str) -> Result<Vec<BlockRef>, CloudError> {
            let mut out = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let page = self
                    .ebs
                    .list_snapshot_blocks()
                    .snapshot_id(id)
                    .max_results(10_000)
                    .set_next_token(token.take())
                    .send()
                    .await
                    .map_err(|e| from_sdk("EBS", "ListSnapshotBlocks", id, &e))?;
                for b in page.blocks() {
                    if let (Some(i), Some(t)) = (b.block_index(), b.block_token()) {
                        out.push(BlockRef {
                            index: i as u64,
                            token: t.to_string(),
                        });
                    }
                }
                match page.next_token() {
                    Some(t) if !t.is_empty() => token = Some(t.to_string()),
                    _ => return Ok(out),
                }
            }
        }

        async fn get_snapshot_block(&self, id: &str, b: &BlockRef) -> Result<Bytes, CloudError> {
            const OP: &str = "GetSnapshotBlock";
            let index =
                i32::try_from(b.index).map_err(|_| invalid(OP, id, "BlockIndex too large"))?;
            let out = self
                .ebs
                .get_snapshot_block()
                .snapshot_id(id)
                .block_index(index)
                .block_token(&b.token)
                .send()
                .await
                .map_err(|e| from_sdk("EBS", OP, id, &e))?;
            let sent = out.checksum.clone();
            let data = out
                .block_data
                .collect()
                .await
                .map_err(|e| broken(OP, id, &crate::error::causes(&e)))?
                .into_bytes();
            let digest: [u8; 32] = Sha256::digest(&data).into();
            if sent.is_some_and(|c| c != block_checksum(&digest)) {
                return Err(broken(
                    OP,
                    id,
                    "the block's bytes do not match its checksum",
                ));
            }
            Ok(data)
        }

        async fn describe_snapshots(
            &self,
            f: &SnapshotFilter,
        ) -> Result<Vec<SnapshotInfo>, CloudError> {
            // Only our own snapshots: without OwnerIds, DescribeSnapshots also pages
            // through every public snapshot in the region.
            let mut req = self.ec2.describe_snapshots().owner_ids("self");
            for id in &f.ids {
                req = req.snapshot_ids(id);
            }
            for (k, v) in &f.tags {
                req = req.filters(
                    aws_sdk_ec2::types::Filter::builder()
                        .name(format!("tag:{k}"))
                        .values(v)
                        .build(),
                );
            }
            let mut pages = req.into_paginator().send();
            let mut out = Vec::new();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| from_sdk("EC2", "DescribeSnapshots", "", &e))?;
                for s in page.snapshots() {
                    let Some(id) = s.snapshot_id() else { continue };
                    out.push(SnapshotInfo {
                        id: id.to_string(),
                        status: SnapshotStatus::parse(s.state().map_or("error", |s| s.as_str())),
                        volume_size_gib: s.volume_size().unwrap_or(0).max(0) as u64,
                        description: s.description().unwrap_or_default().to_string(),
                        tags: s
                            .tags()
                            .iter()
                            .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                            .collect(),
                    });
                }
            }
            Ok(out)
        }

        async fn delete_snapshot(&self, id: &str) -> Result<(), CloudError> {
            self.ec2
                .delete_snapshot()
                .snapshot_id(id)
                .send()
                .await
                .map_err(|e| from_sdk("EC2", "DeleteSnapshot", id, &e))?;
            Ok(())
        }

        async fn create_tags(&self, id: &str, tags: &[(String, String)]) -> Result<(), CloudError> {
            self.ec2
                .create_tags()
                .resources(id)
                .set_tags(Some(ec2_tags(tags)))
                .send()
                .await
                .map_err(|e| from_sdk("EC2", "CreateTags", id, &e))?;
            Ok(())
        }

        async fn delete_tags(&self, id: &str, keys: &[String]) -> Result<(), CloudError> {
            let tags = keys
                .iter()
                .map(|k| aws_sdk_ec2::types::Tag::builder().key(k).build())
                .collect();
            self.ec2
                .delete_tags()
                .resources(id)
                .set_tags(Some(tags))
                .send()
                .await
                .map_err(|e| from_sdk("EC2", "DeleteTags", id, &e))?;
            Ok(())
        }

        async fn lock_snapshot(
            &self,
            id: &str,
            mode: LockMode,
            days: u32,
        ) -> Result<(), CloudError> {
            let mode = match mode {
                LockMode::Governance => aws_sdk_ec2::types::LockMode::Governance,
                LockMode::Compliance => aws_sdk_ec2::types::LockMode::Compliance,
            };
            self.ec2
                .lock_snapshot()
                .snapshot_id(id)
                .lock_mode(mode)
                .lock_duration(days as i32)
                .send()
                .await
                .map_err(|e| from_sdk("EC2", "LockSnapshot", id, &e))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(byte: u8) -> (Bytes, String, [u8; 32]) {
        let data = Bytes::from(vec![byte; BLOCK_SIZE as usize]);
        let d: [u8; 32] = Sha256::digest(&data).into();
        (data, block_checksum(&d), d)
    }

    fn start(parent: Option<&str>, token: &str) -> StartSnapshot {
        StartSnapshot {
            volume_size_gib: 1,
            parent: parent.map(String::from),
            description: "t".into(),
            tags: vec![("k".into(), "v".into())],
            client_token: token.into(),
            encrypted: None,
            kms_key_arn: None,
            timeout_minutes: 60,
        }
    }

    /// Every row of the "Encryption outcomes for EBS direct APIs" tables (EBS User
    /// Guide): unencrypted parent, encrypted parent, no parent; encryption by default on
    /// and off.
    #[tokio::test]
    async fn start_snapshot_follows_the_encryption_outcomes_table() {
        const KEY: &str = "arn:aws:kms:eu-west-1:111122223333:key/k";
        let req = |parent: Option<&str>, enc: Option<bool>, key: bool, token: &str| StartSnapshot {
            encrypted: enc,
            kms_key_arn: key.then(|| KEY.to_string()),
            ..start(parent, token)
        };
        for by_default in [false, true] {
            let ebs = MemoryEbs {
                encryption_by_default: by_default,
                ..MemoryEbs::new()
            };
            let outcome = |r: StartSnapshot| {
                let ebs = &ebs;
                async move {
                    match ebs.start_snapshot(&r).await {
                        Ok(id) => {
                            let s = ebs.get(&id).unwrap();
                            Ok((s.encrypted, s.kms_key_arn))
                        }
                        Err(e) => {
                            assert_eq!(e.code.as_deref(), Some("ValidationException"), "{e}");
                            Err(())
                        }
                    }
                }
            };
            // No parent.
            let default_outcome = if by_default {
                Ok((true, None))
            } else {
                Ok((false, None))
            };
            assert_eq!(outcome(req(None, None, false, "n1")).await, default_outcome);
            assert_eq!(outcome(req(None, None, true, "n2")).await, Err(()));
            assert_eq!(
                outcome(req(None, Some(true), false, "n3")).await,
                Ok((true, None))
            );
            assert_eq!(
                outcome(req(None, Some(true), true, "n4")).await,
                Ok((true, Some(KEY.into())))
            );
            let unencrypted = if by_default {
                Err(())
            } else {
                Ok((false, None))
            };
            assert_eq!(
                outcome(req(None, Some(false), false, "n5")).await,
                unencrypted
            );
            assert_eq!(outcome(req(None, Some(false), true, "n6")).await, Err(()));

            // Parents, completed: one encrypted with the key, one not (made before
            // encryption by default was turned on).
            let enc_parent = {
                let id = ebs
                    .start_snapshot(&req(None, Some(true), true, "pe"))
                    .await
                    .unwrap();
                ebs.complete_snapshot(&id, 0, &linear_checksum([]))
                    .await
                    .unwrap();
                id
            };
            let plain_parent = {
                let id = ebs.start_snapshot(&start(None, "pp")).await.unwrap();
                ebs.complete_snapshot(&id, 0, &linear_checksum([]))
                    .await
                    .unwrap();
                lock(&ebs.state).snapshots.get_mut(&id).unwrap().encrypted = false;
                id
            };
            // Encrypted parent: inherited with its key; anything specified fails.
            assert_eq!(
                outcome(req(Some(&enc_parent), None, false, "e1")).await,
                Ok((true, Some(KEY.into())))
            );
            for (enc, key, t) in [
                (None, true, "e2"),
                (Some(true), false, "e3"),
                (Some(true), true, "e4"),
                (Some(false), false, "e5"),
                (Some(false), true, "e6"),
            ] {
                assert_eq!(
                    outcome(req(Some(&enc_parent), enc, key, t)).await,
                    Err(()),
                    "{t}"
                );
            }
            // Unencrypted parent: unencrypted only with encryption by default off and
            // nothing specified.
            let plain_child = if by_default {
                Err(())
            } else {
                Ok((false, None))
            };
            assert_eq!(
                outcome(req(Some(&plain_parent), None, false, "u1")).await,
                plain_child
            );
            for (enc, key, t) in [
                (None, true, "u2"),
                (Some(true), false, "u3"),
                (Some(false), false, "u4"),
            ] {
                assert_eq!(
                    outcome(req(Some(&plain_parent), enc, key, t)).await,
                    Err(()),
                    "{t}"
                );
            }
        }
        // What the receiver sends is valid in every case.
        assert_eq!(
            StartSnapshot::encryption(Some("snap-1"), Some(KEY)),
            (None, None)
        );
        assert_eq!(StartSnapshot::encryption(None, None), (None, None));
        assert_eq!(
            StartSnapshot::encryption(None, Some(KEY)),
            (Some(true), Some(KEY.to_string()))
        );
    }

    async fn write(
        ebs: &MemoryEbs,
        parent: Option<&str>,
        token: &str,
        blocks: &[(u64, u8)],
    ) -> String {
        let id = ebs.start_snapshot(&start(parent, token)).await.unwrap();
        let mut digests = BTreeMap::new();
        for (i, b) in blocks {
            let (data, sum, d) = block(*b);
            ebs.put_snapshot_block(&id, *i, data, &sum).await.unwrap();
            digests.insert(*i, d);
        }
        let st = ebs
            .complete_snapshot(
                &id,
                digests.len() as u64,
                &linear_checksum(digests.values()),
            )
            .await
            .unwrap();
        assert_eq!(st, SnapshotStatus::Completed);
        id
    }

    #[tokio::test]
    async fn a_child_inherits_and_outlives_its_parent() {
        let ebs = MemoryEbs::new();
        let a = write(&ebs, None, "a", &[(0, 1), (5, 2)]).await;
        let b = write(&ebs, Some(&a), "b", &[(5, 3), (7, 4)]).await;
        ebs.delete_snapshot(&a).await.unwrap();
        let blocks = ebs.list_snapshot_blocks(&b).await.unwrap();
        assert_eq!(
            blocks.iter().map(|b| b.index).collect::<Vec<_>>(),
            [0, 5, 7]
        );
        let got = ebs.get_snapshot_block(&b, &blocks[1]).await.unwrap();
        assert_eq!(got[0], 3);
        let got = ebs.get_snapshot_block(&b, &blocks[0]).await.unwrap();
        assert_eq!(got[0], 1);
        assert!(ebs
            .list_snapshot_blocks(&a)
            .await
            .unwrap_err()
            .is_not_found());
    }

    #[tokio::test]
    async fn checksums_sizes_and_states_are_enforced() {
        let ebs = MemoryEbs::new();
        let id = ebs.start_snapshot(&start(None, "t")).await.unwrap();
        // Same token: same snapshot.
        assert_eq!(ebs.start_snapshot(&start(None, "t")).await.unwrap(), id);
        let (data, sum, d) = block(9);
        let (_, wrong, _) = block(8);
        let e = ebs
            .put_snapshot_block(&id, 0, data.clone(), &wrong)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        let e = ebs
            .put_snapshot_block(&id, 0, data.slice(..512), &sum)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("524288"), "{e}");
        let e = ebs
            .put_snapshot_block(&id, 2048, data.clone(), &sum)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("beyond"), "{e}");
        ebs.put_snapshot_block(&id, 1, data, &sum).await.unwrap();
        // Not completed: not readable, and not a parent.
        assert!(ebs.list_snapshot_blocks(&id).await.is_err());
        assert!(ebs.start_snapshot(&start(Some(&id), "c")).await.is_err());
        // A wrong aggregate sends it to error.
        let st = ebs
            .complete_snapshot(&id, 1, &linear_checksum([&[0u8; 32]]))
            .await
            .unwrap();
        assert_eq!(st, SnapshotStatus::Error);
        let good = linear_checksum([&d]);
        assert!(ebs.complete_snapshot(&id, 1, &good).await.is_err());
        // A missing parent is "not found".
        assert!(ebs
            .start_snapshot(&start(Some("snap-nope"), "d"))
            .await
            .unwrap_err()
            .is_not_found());
    }

    #[tokio::test]
    async fn completion_settles_and_listing_pages() {
        let ebs = MemoryEbs {
            settle_describes: 2,
            page_size: 2,
            ..MemoryEbs::new()
        };
        let id = ebs.start_snapshot(&start(None, "s")).await.unwrap();
        let mut ds = vec![];
        for i in 0..5 {
            let (data, sum, d) = block(i as u8 + 1);
            ebs.put_snapshot_block(&id, i, data, &sum).await.unwrap();
            ds.push(d);
        }
        let st = ebs
            .complete_snapshot(&id, 5, &linear_checksum(&ds))
            .await
            .unwrap();
        assert_eq!(st, SnapshotStatus::Pending);
        let f = SnapshotFilter::default().tag("k", "v");
        let mut states = vec![];
        for _ in 0..3 {
            states.push(ebs.describe_snapshots(&f).await.unwrap()[0].status);
        }
        assert_eq!(
            states,
            [
                SnapshotStatus::Pending,
                SnapshotStatus::Pending,
                SnapshotStatus::Completed
            ]
        );
        assert_eq!(ebs.list_snapshot_blocks(&id).await.unwrap().len(), 5);
        assert_eq!(ebs.faults.calls("ListSnapshotBlocks"), 3);
    }
}
