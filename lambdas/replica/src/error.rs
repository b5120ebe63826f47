//! Why a generation's point could not be written (yet).

use pilotlight_cloud::CloudError;
use pilotlight_store::DocError;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Cloud(#[from] CloudError),
    /// The chain head is not a chain head: nothing is written until someone looks.
    #[error("chain head {key}: {detail}; nothing written (inspect it; deleting it makes the next full generation a new base)")]
    BadHead { key: String, detail: String },
    #[error("shard record {key}: {detail}; the point is written again")]
    BadShard { key: String, detail: String },
    #[error("manifest: {0}")]
    Manifest(#[from] DocError),
    /// An object of the generation is not what its manifest says: nothing of it is
    /// written into a point.
    #[error("object {key}: {detail}; the generation's point is not written (corrupt or tampered object: the sender must send it again)")]
    Object { key: String, detail: String },
    /// The parent point's snapshot was deleted outside pilotlight: a child cannot be
    /// written without it, and without an image there is no full copy to write instead.
    #[error("the parent point {id} of generation {generation} no longer exists; send a full generation (pilotlight-sender send --rebase --source full) to start a new chain")]
    ParentGone { id: String, generation: u64 },
    /// The disk's first point (or the first after a lost chain) must be a full one.
    #[error("generation {generation} is incremental (parent {parent}) but the disk has no point of generation {parent}; send a full generation (pilotlight-sender send --rebase --source full)")]
    NoBase { generation: u64, parent: u64 },
    /// EBS snapshots only grow (StartSnapshot: the size must be at least the parent's).
    #[error("generation {generation} shrinks the disk to {disk_size} bytes, smaller than its parent point's volume ({parent_gib} GiB); send a full generation to start a new chain")]
    Shrunk {
        generation: u64,
        disk_size: u64,
        parent_gib: u64,
    },
    /// The point moved on (sealed, or a new attempt) while this invocation worked: read
    /// the head again.
    #[error("{0}")]
    Stale(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl ReplicaError {
    /// True when trying again later may succeed with nobody changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicaError::Cloud(e) => e.is_transient(),
            ReplicaError::Manifest(e) => e.is_transient(),
            ReplicaError::BadShard { .. } | ReplicaError::Stale(_) => true,
            _ => false,
        }
    }
}
