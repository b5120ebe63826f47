//! Failback: after a real recovery, bring a disk home by writing into the site's disk
//! only the blocks the recovered instance changed, read from EBS snapshots with the EBS
//! direct APIs, in rounds that repeat while the instance runs, each smaller.
//!
//! - A round makes the target equal one snapshot. Its base is what the target equals
//!   already: the recovery point the instance launched from (first round), then the
//!   previous round's snapshot. With one lineage (a snapshot of a volume restored from the
//!   point), ListChangedBlocks names exactly the blocks that differ; between snapshots of
//!   different lineages (UNRELATED_SNAPSHOTS, e.g. after the import method) the round
//!   writes every block of the snapshot and zeroes the rest.
//! - The site's own changes after the point (its change tracking since the point's
//!   change id) are rewritten from the snapshot in the first round.
//! - Every block is SHA-256-checked as it arrives (the service sends its checksum), and
//!   by default read back from the target after each flush.
//! - Crash-safe: see [`round`] for the rule; the state (see [`state`]) never claims more
//!   than the target holds.

pub mod error;
pub mod resume;
pub mod round;
pub mod state;
pub mod target;
pub mod whole;

pub use error::FailbackError;
pub use round::{apply, block_ranges, Options, Progress, RoundRequest};
pub use state::{FailbackState, Mode, RoundSummary};
pub use target::Target;
pub use whole::{whole_disk_sha256, WholeDisk};

#[cfg(test)]
mod tests;
