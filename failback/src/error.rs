//! What can stop a failback round, each with what to do about it.

use pilotlight_cloud::error::CloudError;

#[derive(Debug, thiserror::Error)]
pub enum FailbackError {
    /// An EBS call failed (after the SDK's retries); the round resumes where it stopped.
    #[error("{0}; run failback again: the round resumes where it stopped")]
    Cloud(#[from] CloudError),
    #[error("target {target}: {source}")]
    Target {
        target: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Nbd(#[from] pilotlight_nbd::NbdError),
    #[error("target {target} is {size} bytes, but snapshot {snapshot} holds data at offset {offset}: give a target as large as the disk that was recovered")]
    TooSmall {
        target: String,
        size: u64,
        snapshot: String,
        offset: u64,
    },
    #[error("target {target} is {size} bytes: a disk is a whole number of 512-byte sectors")]
    NotSectors { target: String, size: u64 },
    #[error("{0}")]
    State(#[from] pilotlight_durable::DurableError),
    #[error("the failback state {path} belongs to {what}; finish or remove it (or give a state directory of its own) before starting another")]
    OtherFailback { path: String, what: String },
    #[error("snapshot {snapshot} answered block {index} with {len} bytes, not 524288")]
    BadBlock {
        snapshot: String,
        index: u64,
        len: usize,
    },
    #[error("block {index} of {snapshot} read back from {target} differs from what was written to it: the target lost a write; check the disk, then run again (the round resumes)")]
    ReadBack {
        target: String,
        snapshot: String,
        index: u64,
    },
    #[error("another failback round of this disk is running (it holds {path}); let it finish, or stop it, then run again")]
    Busy { path: String },
    #[error("{path}: {source}")]
    Lock {
        path: String,
        source: std::io::Error,
    },
    #[error("{disk}: cannot resume protection yet: {why}")]
    NotFinished { disk: String, why: String },
    #[error("the site-change extent {offset}+{length} is not inside the {size}-byte disk")]
    SiteExtent { offset: u64, length: u64, size: u64 },
}
