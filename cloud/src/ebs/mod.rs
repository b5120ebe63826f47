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

mod memory;
pub use memory::{Limits, MemoryEbs, MemoryEbsState, MemorySnapshot};
#[cfg(test)]
mod tests;

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

    /// The stack's `PointLock` setting: `off` (none), `governance` or `compliance`.
    pub fn from_setting(s: &str) -> Result<Option<LockMode>, String> {
        match s {
            "off" => Ok(None),
            "governance" => Ok(Some(LockMode::Governance)),
            "compliance" => Ok(Some(LockMode::Compliance)),
            other => Err(format!("{other:?}: governance, compliance or off")),
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
/// given, one of `ids`, and one of `any_id`). Always only the caller's own snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotFilter {
    /// `SnapshotIds`: "If you specify an invalid snapshot ID, an error is returned"
    /// (DescribeSnapshots API reference), so one id not visible yet fails the call.
    pub ids: Vec<String>,
    pub tags: Vec<(String, String)>,
    /// The `snapshot-id` filter: an id that does not exist (or is not visible yet) just
    /// matches nothing, so many snapshots are asked about in one call.
    pub any_id: Vec<String>,
}

impl SnapshotFilter {
    pub fn tag(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.tags.push((k.into(), v.into()));
        self
    }
    pub fn id(id: impl Into<String>) -> Self {
        SnapshotFilter {
            ids: vec![id.into()],
            ..Default::default()
        }
    }
    /// Those of `ids` that exist (the `snapshot-id` filter; never "not found").
    pub fn any_of(ids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        SnapshotFilter {
            any_id: ids.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
    fn matches(&self, id: &str, tags: &BTreeMap<String, String>) -> bool {
        (self.ids.is_empty() || self.ids.iter().any(|i| i == id))
            && (self.any_id.is_empty() || self.any_id.iter().any(|i| i == id))
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

/// A block that differs between two snapshots of one lineage, as ListChangedBlocks
/// returns it: the block's token in each snapshot that has it ("FirstBlockToken ... is
/// absent if the first snapshot does not have the changed block that is on the second
/// snapshot", ChangedBlock API reference). A block without a second token is not in the
/// second snapshot: it reads as zeroes there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedBlock {
    pub index: u64,
    pub first: Option<String>,
    pub second: Option<String>,
}

/// One page of a block listing, and the token of the next (none: the last page). A page
/// can be empty and still have a next one ("the response may be empty, but the API
/// returns a next page token", EBS direct APIs FAQ).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockPage<T> {
    pub blocks: Vec<T>,
    pub next_token: Option<String>,
}

/// Where a listing page starts: a block index (`StartingBlockIndex`, how a resumed
/// listing starts), or the previous page's `NextToken` (valid 60 minutes; when given,
/// "StartingBlockIndex is ignored").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageStart<'a> {
    Index(u64),
    Token(&'a str),
}

/// The `Reason` of the ValidationException ListChangedBlocks answers for two snapshots
/// that are not of one lineage (ValidationException API reference): a [`CloudError`]
/// with this code means "compare them another way", not "failed".
pub const UNRELATED_SNAPSHOTS: &str = "UNRELATED_SNAPSHOTS";

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
    ) -> impl Future<Output = Result<Vec<BlockRef>, CloudError>> + Send {
        async move {
            let mut out = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let start = token
                    .as_deref()
                    .map_or(PageStart::Index(0), PageStart::Token);
                let page = self.list_snapshot_blocks_page(id, start).await?;
                out.extend(page.blocks);
                match page.next_token {
                    Some(t) => token = Some(t),
                    None => return Ok(out),
                }
            }
        }
    }
    /// One page of the blocks a completed snapshot holds.
    fn list_snapshot_blocks_page(
        &self,
        id: &str,
        start: PageStart<'_>,
    ) -> impl Future<Output = Result<BlockPage<BlockRef>, CloudError>> + Send;
    /// One page of the blocks that differ between two completed snapshots of one lineage
    /// (ListChangedBlocks); a [`CloudError`] with code [`UNRELATED_SNAPSHOTS`] when they
    /// are not of one lineage.
    fn list_changed_blocks_page(
        &self,
        first: &str,
        second: &str,
        start: PageStart<'_>,
    ) -> impl Future<Output = Result<BlockPage<ChangedBlock>, CloudError>> + Send;
    /// Every block that differs between two completed snapshots of one lineage, every
    /// page (empty pages with a next token included).
    fn list_changed_blocks(
        &self,
        first: &str,
        second: &str,
    ) -> impl Future<Output = Result<Vec<ChangedBlock>, CloudError>> + Send {
        async move {
            let mut out = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let start = token
                    .as_deref()
                    .map_or(PageStart::Index(0), PageStart::Token);
                let page = self.list_changed_blocks_page(first, second, start).await?;
                out.extend(page.blocks);
                match page.next_token {
                    Some(t) => token = Some(t),
                    None => return Ok(out),
                }
            }
        }
    }
    /// One block's bytes and their SHA-256, checked against the checksum the service
    /// sends with them (a caller that needs the digest does not hash the block again).
    fn get_snapshot_block_checked(
        &self,
        id: &str,
        block: &BlockRef,
    ) -> impl Future<Output = Result<(Bytes, [u8; 32]), CloudError>> + Send;
    /// One block's bytes, checked against the checksum the service sends with them.
    fn get_snapshot_block(
        &self,
        id: &str,
        block: &BlockRef,
    ) -> impl Future<Output = Result<Bytes, CloudError>> + Send {
        async move { Ok(self.get_snapshot_block_checked(id, block).await?.0) }
    }
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
    async fn list_snapshot_blocks_page(
        &self,
        id: &str,
        start: PageStart<'_>,
    ) -> Result<BlockPage<BlockRef>, CloudError> {
        (**self).list_snapshot_blocks_page(id, start).await
    }
    async fn list_changed_blocks_page(
        &self,
        first: &str,
        second: &str,
        start: PageStart<'_>,
    ) -> Result<BlockPage<ChangedBlock>, CloudError> {
        (**self)
            .list_changed_blocks_page(first, second, start)
            .await
    }
    async fn get_snapshot_block_checked(
        &self,
        id: &str,
        b: &BlockRef,
    ) -> Result<(Bytes, [u8; 32]), CloudError> {
        (**self).get_snapshot_block_checked(id, b).await
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
    async fn list_snapshot_blocks_page(
        &self,
        _: &str,
        _: PageStart<'_>,
    ) -> Result<BlockPage<BlockRef>, CloudError> {
        Err(off("ListSnapshotBlocks"))
    }
    async fn list_changed_blocks_page(
        &self,
        _: &str,
        _: &str,
        _: PageStart<'_>,
    ) -> Result<BlockPage<ChangedBlock>, CloudError> {
        Err(off("ListChangedBlocks"))
    }
    async fn get_snapshot_block_checked(
        &self,
        _: &str,
        _: &BlockRef,
    ) -> Result<(Bytes, [u8; 32]), CloudError> {
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
mod sdk;
