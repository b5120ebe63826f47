//! Snapshots mode's documents: the chain head of a disk (its newest completed point and
//! the point being written), the record of one shard written into a pending point, and
//! the queue message that asks for a shard.
//!
//! ```text
//! {prefix}/{site}/{vm}/{disk}/r/head.json                                   chain head
//! {prefix}/{site}/{vm}/{disk}/r/{generation:020}/{attempt:05}-{shard:06}.json  one shard written
//! ```
//!
//! The head is replaced only with a conditional write (`If-Match` its ETag, or
//! `If-None-Match: *` for the first), so two invocations never both advance a disk. Both
//! documents are the replica function's own state, but they live in the bucket: each is
//! read as untrusted (size cap, version, the disk and generation its key names).

use crate::manifest::Sha256Hex;
use crate::names::DiskId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const REPLICA_VERSION: u32 = 1;
/// A chain head is a few hundred bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most blocks one shard writes (4 GiB): one invocation's work, well within Lambda's
/// 15 minutes even at a tenth of a snapshot's 1 000 PutSnapshotBlock/s.
pub const MAX_SHARD_BLOCKS: u64 = 8192;
/// A shard document lists at most [`MAX_SHARD_BLOCKS`] digests (about 100 bytes each).
pub const MAX_SHARD_DOC_BYTES: usize = 2 * 1024 * 1024;
/// A queue message asking for a shard (SQS allows 256 KiB; ours are far smaller).
pub const MAX_TASK_BYTES: usize = 16 * 1024;
/// The `kind` of a shard task: how the replica function tells it from an S3 event.
pub const SHARD_TASK_KIND: &str = "pilotlight.replica.shard";

/// A disk's newest completed point: the parent of its next generation's point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadPoint {
    pub generation: u64,
    pub snapshot_id: String,
    pub snapshot_time: DateTime<Utc>,
    pub disk_size: u64,
}

/// The point being written: one generation, one attempt, one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingPoint {
    pub generation: u64,
    /// The point it is written on (none: a full point).
    pub parent: Option<HeadPoint>,
    /// Counts attempts: each one has its own client token and its own shard documents.
    pub attempt: u32,
    /// Random, chosen when the point was claimed: a client token of a later claim of the
    /// same generation (after the head was reset) never returns an old snapshot.
    pub token_salt: String,
    /// Set once StartSnapshot answered.
    pub snapshot_id: Option<String>,
    /// How the point was cut into shards (at most this many blocks, about this many
    /// bytes of objects each) and into how many: every invocation plans the same shards.
    pub shard_blocks: u64,
    pub shard_bytes: u64,
    pub shards: u32,
    /// Set, by a conditional write, just before CompleteSnapshot: from then on the
    /// snapshot is waited for, never written again.
    pub sealed_at: Option<DateTime<Utc>>,
    pub claimed_at: DateTime<Utc>,
    /// When shard tasks were last sent (a shard not recorded long after is asked again).
    pub dispatched_at: Option<DateTime<Utc>>,
}

/// A disk's chain head (`r/head.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainHead {
    pub version: u32,
    pub disk: DiskId,
    pub point: Option<HeadPoint>,
    pub pending: Option<PendingPoint>,
    /// Points completed by this chain, and attempts that failed (for status and alarms).
    #[serde(default)]
    pub points_written: u64,
    #[serde(default)]
    pub attempts_failed: u64,
    /// Why the newest attempt failed or the disk waits (cleared when a point completes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

impl ChainHead {
    pub fn new(disk: DiskId, now: DateTime<Utc>) -> Self {
        ChainHead {
            version: REPLICA_VERSION,
            disk,
            point: None,
            pending: None,
            points_written: 0,
            attempts_failed: 0,
            last_error: None,
            updated_at: now,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8], disk: &DiskId) -> Result<Self, ReplicaDocError> {
        let h: ChainHead = parse(bytes, MAX_HEAD_BYTES, |h: &ChainHead| h.version)?;
        if &h.disk != disk {
            return Err(ReplicaDocError::Mismatch {
                expected: disk.to_string(),
                found: h.disk.to_string(),
            });
        }
        for id in h
            .point
            .iter()
            .chain(h.pending.iter().filter_map(|p| p.parent.as_ref()))
            .map(|p| p.snapshot_id.as_str())
            .chain(h.pending.iter().filter_map(|p| p.snapshot_id.as_deref()))
        {
            snapshot_id_ok(id)?;
        }
        if let Some(p) = &h.pending {
            if p.shard_blocks == 0 || p.shard_blocks > MAX_SHARD_BLOCKS {
                return Err(ReplicaDocError::Invalid(format!(
                    "shard_blocks {} is not between 1 and {MAX_SHARD_BLOCKS}",
                    p.shard_blocks
                )));
            }
        }
        Ok(h)
    }
}

/// One block a shard wrote, with its SHA-256 (for CompleteSnapshot's LINEAR checksum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrittenBlock {
    pub index: u64,
    pub sha256: Sha256Hex,
}

/// What one shard wrote into the pending point (`r/{generation}/{attempt}-{shard}.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardDoc {
    pub version: u32,
    pub disk: DiskId,
    pub generation: u64,
    pub attempt: u32,
    pub shard: u32,
    pub snapshot_id: String,
    /// Blocks written, ascending (a full point skips zero blocks: fewer than planned).
    pub blocks: Vec<WrittenBlock>,
    /// Bytes of the generation's objects this shard fetched.
    #[serde(default)]
    pub bytes_fetched: u64,
    /// Parent blocks read to merge partly written blocks.
    #[serde(default)]
    pub parent_blocks_read: u64,
}

impl ShardDoc {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(
        bytes: &[u8],
        disk: &DiskId,
        generation: u64,
        attempt: u32,
        shard: u32,
    ) -> Result<Self, ReplicaDocError> {
        let d: ShardDoc = parse(bytes, MAX_SHARD_DOC_BYTES, |d: &ShardDoc| d.version)?;
        if (&d.disk, d.generation, d.attempt, d.shard) != (disk, generation, attempt, shard) {
            return Err(ReplicaDocError::Mismatch {
                expected: format!("{disk} generation {generation} attempt {attempt} shard {shard}"),
                found: format!(
                    "{} generation {} attempt {} shard {}",
                    d.disk, d.generation, d.attempt, d.shard
                ),
            });
        }
        snapshot_id_ok(&d.snapshot_id)?;
        if d.blocks.len() as u64 > MAX_SHARD_BLOCKS
            || !d.blocks.windows(2).all(|w| w[0].index < w[1].index)
        {
            return Err(ReplicaDocError::Invalid(
                "blocks are not ascending, or more than a shard holds".into(),
            ));
        }
        Ok(d)
    }
}

/// A queue message: write shard `shard` of `generation`'s point (attempt `attempt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardTask {
    pub kind: String,
    pub disk: DiskId,
    pub generation: u64,
    pub attempt: u32,
    pub shard: u32,
}

impl ShardTask {
    pub fn new(disk: DiskId, generation: u64, attempt: u32, shard: u32) -> Self {
        ShardTask {
            kind: SHARD_TASK_KIND.into(),
            disk,
            generation,
            attempt,
            shard,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `None` when the body is not a shard task at all (an S3 event); an error when it
    /// says it is one but is malformed.
    pub fn from_body(body: &str) -> Option<Result<Self, ReplicaDocError>> {
        if !body.contains(SHARD_TASK_KIND) {
            return None;
        }
        if body.len() > MAX_TASK_BYTES {
            return Some(Err(ReplicaDocError::TooLarge(body.len())));
        }
        let t = serde_json::from_str::<ShardTask>(body)
            .map_err(|e| ReplicaDocError::Json(e.to_string()));
        match t {
            Ok(t) if t.kind != SHARD_TASK_KIND => None,
            Ok(t) if t.generation == 0 => Some(Err(ReplicaDocError::Invalid(
                "generation 0 does not exist".into(),
            ))),
            other => Some(other),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaDocError {
    #[error("replica document is {0} bytes, more than allowed")]
    TooLarge(usize),
    #[error("replica document is not valid JSON of version {REPLICA_VERSION}: {0}")]
    Json(String),
    #[error("replica document version {0} is not supported (this build reads {REPLICA_VERSION})")]
    UnsupportedVersion(u32),
    #[error("replica document names {found} but its key names {expected}")]
    Mismatch { expected: String, found: String },
    #[error("replica document: {0:?} is not an EBS snapshot id (snap-...)")]
    BadSnapshotId(String),
    #[error("replica document: {0}")]
    Invalid(String),
}

pub(crate) fn snapshot_id_ok(id: &str) -> Result<(), ReplicaDocError> {
    let ok = id.strip_prefix("snap-").is_some_and(|h| {
        !h.is_empty() && h.len() <= 32 && h.bytes().all(|b| b.is_ascii_alphanumeric())
    });
    if ok {
        Ok(())
    } else {
        Err(ReplicaDocError::BadSnapshotId(
            id.chars().take(80).collect(),
        ))
    }
}

pub(crate) fn parse<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    cap: usize,
    version: impl Fn(&T) -> u32,
) -> Result<T, ReplicaDocError> {
    if bytes.len() > cap {
        return Err(ReplicaDocError::TooLarge(bytes.len()));
    }
    // The version first, so a newer document says so rather than "unknown field".
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    match serde_json::from_slice::<Version>(bytes) {
        Ok(v) if v.version != REPLICA_VERSION => {
            return Err(ReplicaDocError::UnsupportedVersion(v.version))
        }
        _ => {}
    }
    let doc: T = serde_json::from_slice(bytes).map_err(|e| ReplicaDocError::Json(e.to_string()))?;
    match version(&doc) {
        REPLICA_VERSION => Ok(doc),
        v => Err(ReplicaDocError::UnsupportedVersion(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> DiskId {
        DiskId::new("s", "vm", "d0").unwrap()
    }

    #[test]
    fn a_head_round_trips_and_refuses_another_disk_a_bad_id_and_a_newer_version() {
        let mut h = ChainHead::new(disk(), Utc::now());
        h.point = Some(HeadPoint {
            generation: 3,
            snapshot_id: "snap-0abc".into(),
            snapshot_time: Utc::now(),
            disk_size: 1 << 30,
        });
        let j = h.to_json();
        assert_eq!(ChainHead::from_json(&j, &disk()).unwrap(), h);
        let other = DiskId::new("s", "vm", "d1").unwrap();
        assert!(matches!(
            ChainHead::from_json(&j, &other),
            Err(ReplicaDocError::Mismatch { .. })
        ));
        let bad = String::from_utf8(j.clone())
            .unwrap()
            .replace("snap-0abc", "vol-1");
        assert!(matches!(
            ChainHead::from_json(bad.as_bytes(), &disk()),
            Err(ReplicaDocError::BadSnapshotId(_))
        ));
        let newer = String::from_utf8(j)
            .unwrap()
            .replace("\"version\": 1", "\"version\": 2");
        assert_eq!(
            ChainHead::from_json(newer.as_bytes(), &disk()),
            Err(ReplicaDocError::UnsupportedVersion(2))
        );
        assert!(matches!(
            ChainHead::from_json(&vec![b' '; MAX_HEAD_BYTES + 1], &disk()),
            Err(ReplicaDocError::TooLarge(_))
        ));
        assert!(ChainHead::from_json(b"{", &disk()).is_err());
    }

    #[test]
    fn a_shard_doc_must_name_its_key_and_list_blocks_ascending() {
        let d = ShardDoc {
            version: REPLICA_VERSION,
            disk: disk(),
            generation: 4,
            attempt: 1,
            shard: 2,
            snapshot_id: "snap-1".into(),
            blocks: vec![
                WrittenBlock {
                    index: 1,
                    sha256: Sha256Hex([1; 32]),
                },
                WrittenBlock {
                    index: 5,
                    sha256: Sha256Hex([2; 32]),
                },
            ],
            bytes_fetched: 0,
            parent_blocks_read: 0,
        };
        let j = d.to_json();
        assert_eq!(ShardDoc::from_json(&j, &disk(), 4, 1, 2).unwrap(), d);
        assert!(ShardDoc::from_json(&j, &disk(), 4, 2, 2).is_err());
        let mut unsorted = d.clone();
        unsorted.blocks.reverse();
        assert!(matches!(
            ShardDoc::from_json(&unsorted.to_json(), &disk(), 4, 1, 2),
            Err(ReplicaDocError::Invalid(_))
        ));
    }

    #[test]
    fn a_task_is_told_from_an_s3_event_and_checked() {
        let t = ShardTask::new(disk(), 9, 1, 0);
        assert_eq!(ShardTask::from_body(&t.to_json()), Some(Ok(t)));
        assert_eq!(ShardTask::from_body(r#"{"Records":[]}"#), None);
        let bad = format!(r#"{{"kind":"{SHARD_TASK_KIND}","disk":1}}"#);
        assert!(matches!(ShardTask::from_body(&bad), Some(Err(_))));
        let zero = ShardTask::new(disk(), 0, 1, 0).to_json();
        assert!(matches!(ShardTask::from_body(&zero), Some(Err(_))));
    }
}
