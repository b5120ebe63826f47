//! pilotlight's snapshots mode: no receiver instance, no image volume. Each committed
//! generation is written straight into a new EBS snapshot (a recovery point) parented on
//! the disk's previous point, from the generation's S3 objects:
//!
//! - whole 512 KiB blocks come from the objects, zero ranges become zero blocks, a block
//!   the generation touches only partly is merged with the parent's block
//!   (GetSnapshotBlock); a disk's first generation is a full point ([`plan`]);
//! - per disk, generations go in order: a chain head per disk (`r/head.json`) replaced
//!   only with conditional writes ([`chain`]); a generation whose parent's point is not
//!   complete waits ([`drive`]);
//! - a large generation is cut into shards, each written by its own invocation of the same
//!   function from a queue message, into the same pending snapshot; each shard records
//!   what it wrote (`r/{generation}/{attempt}-{shard}.json`), and whichever invocation
//!   finds every shard recorded seals the snapshot ([`shard`], [`drive`]);
//! - duplicates and retries write nothing twice: a shard already recorded is not written
//!   again, StartSnapshot's client token returns the same snapshot, PutSnapshotBlock
//!   overwrites ("If the specified block contains data, the existing data is
//!   overwritten", PutSnapshotBlock API reference).
//!
//! The Lambda function (`src/main.rs`) is fed by the stack's queue (manifest events) and
//! its own task queue (shard tasks); [`handler`] decides per message.

pub mod capacity;
pub mod chain;
pub mod drive;
pub mod emf;
pub mod error;
pub mod export;
pub mod export_fanout;
pub mod handler;
pub mod plan;
pub mod prune;
pub mod schedule;
pub mod shard;

pub use error::ReplicaError;
pub use handler::{handle_body, Outcome};

use pilotlight_protocol::Prefix;
use std::time::Duration;

/// How points are written in snapshots mode.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub bucket: String,
    pub prefix: Prefix,
    /// The stack's name: tagged on every point (as the receiver does), so `points`,
    /// retention and DR find them.
    pub stack: String,
    /// Encrypt a disk's first point with this KMS key (children inherit their parent's).
    pub kms_key_arn: Option<String>,
    /// A shard writes at most this many blocks ...
    pub shard_blocks: u64,
    /// ... and holds at most about this many bytes of objects.
    pub shard_bytes: u64,
    /// PutSnapshotBlock requests in flight per invocation.
    pub put_concurrency: usize,
    /// Objects fetched at once per invocation.
    pub fetch_concurrency: usize,
    /// StartSnapshot's Timeout: a snapshot not completed within it goes to `error`
    /// (10 to 4 320 minutes); also what ends an attempt sealed by an invocation that died
    /// before CompleteSnapshot.
    pub timeout_minutes: u32,
    pub retry: pilotlight_cloud::retry::Retry,
    /// How long after StartSnapshot or CompleteSnapshot "no such snapshot" is taken for
    /// eventual consistency.
    pub visibility_window: Duration,
    /// Shards not recorded this long after the claim are asked for again (a task that
    /// went to the dead-letter queue, an invocation that died).
    pub redispatch_after: chrono::Duration,
    /// How long an invocation waits for a sealed snapshot to become `completed` before it
    /// leaves the rest to the next delivery of the manifest's message.
    pub settle_wait: Duration,
    /// Retention (the function's schedule prunes).
    pub tiers: pilotlight_protocol::points::Tiers,
    /// An export from a point larger than this is fanned out over invocations, a range
    /// of this many bytes each (a whole number of parts); smaller ones are uploaded by
    /// the invocation that reads the request.
    pub export_range_bytes: u64,
    /// The part size exports aim for (at least S3's 5 MiB; raised for disks past 10 000
    /// parts).
    pub export_part_bytes: u64,
    /// Parts uploading at once per invocation (each part about 16 MiB in memory).
    pub export_concurrency: usize,
    /// How long a range's upload is leased to one invocation: longer than any invocation
    /// lives (the function's timeout, 300 s), so a range is taken over only from one that
    /// died. The holder starts no part in the last `export_margin` of its lease.
    pub export_lease: chrono::Duration,
    pub export_margin: chrono::Duration,
    /// EBS Snapshot Lock on each day's kept point, until it leaves the daily tier (the
    /// stack's `PointLock`); none: no lock.
    pub lock: Option<pilotlight_cloud::ebs::LockMode>,
    /// Print each completed point's lag as an embedded-metric log line (Lambda: its
    /// stdout is the function's log, from which CloudWatch takes the metrics).
    pub emf: bool,
}

impl ReplicaConfig {
    pub fn new(bucket: impl Into<String>, prefix: Prefix, stack: impl Into<String>) -> Self {
        ReplicaConfig {
            bucket: bucket.into(),
            prefix,
            stack: stack.into(),
            kms_key_arn: None,
            shard_blocks: 2048,
            shard_bytes: 512 << 20,
            put_concurrency: 16,
            fetch_concurrency: 8,
            timeout_minutes: 60,
            retry: pilotlight_cloud::retry::Retry::default(),
            visibility_window: Duration::from_secs(120),
            redispatch_after: chrono::Duration::minutes(16),
            settle_wait: Duration::from_secs(20),
            tiers: Default::default(),
            lock: None,
            export_range_bytes: 4 << 30,
            export_part_bytes: 16 << 20,
            export_concurrency: 4,
            export_lease: chrono::Duration::minutes(8),
            export_margin: chrono::Duration::minutes(2),
            emf: false,
        }
    }
}

/// What the function works with: the bucket, EBS, the task queue, and the settings.
#[derive(Debug)]
pub struct Replica<S, E, Q> {
    pub store: S,
    pub ebs: E,
    pub tasks: Q,
    pub cfg: ReplicaConfig,
}
