//! The applier's durable state, one file per disk: which snapshot the target equals, and
//! the round under way (its snapshot, its base, how far it got). Written with
//! `pilotlight-durable` (temp file, fsync, rename, fsync the directory) after the target
//! was flushed, so it never claims more than the target holds.
//!
//! Format version 1. Fields only ever grow, optional (`#[serde(default)]`); a golden file
//! in the tests holds the first format.

use chrono::{DateTime, Utc};
use pilotlight_protocol::DiskId;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const STATE_VERSION: u32 = 1;

/// How a round finds the blocks to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// ListChangedBlocks between the base and the snapshot (one lineage): only what differs.
    Changed,
    /// The two are not of one lineage (UNRELATED_SNAPSHOTS, e.g. an instance launched by
    /// the import method): every block of the snapshot, zeroes everywhere else.
    Full,
    /// The site ran after the point without change tracking (first round, `--compare`):
    /// every block of the snapshot read and its SHA-256 compared with the target's block,
    /// written only where they differ; blocks the snapshot does not hold zeroed only where
    /// the target's are not zero.
    Compared,
}

/// Which pass of a round is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The blocks the site changed after the point (first round only): rewritten from
    /// the snapshot whatever the delta says.
    Site,
    /// The blocks that differ between the base and the snapshot.
    Delta,
}

/// What a round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Blocks read from the snapshot and written.
    pub blocks_written: u64,
    /// Bytes of those blocks (the last one may be clipped to the disk's size).
    pub bytes_written: u64,
    /// Bytes made zero (blocks the snapshot does not hold).
    pub bytes_zeroed: u64,
    /// Blocks read back and compared after each flush.
    #[serde(default)]
    pub blocks_verified: u64,
    /// Blocks found equal on the target and left alone (`Compared` rounds).
    #[serde(default)]
    pub blocks_same: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.blocks_written += o.blocks_written;
        self.bytes_written += o.bytes_written;
        self.bytes_zeroed += o.bytes_zeroed;
        self.blocks_verified += o.blocks_verified;
        self.blocks_same += o.blocks_same;
    }
}

/// The round under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundState {
    /// What the target equals at the end of the round.
    pub snapshot: String,
    /// What the target equals (outside the site's changes) at its start.
    pub base: String,
    /// Unknown until the first listing answered.
    pub mode: Option<Mode>,
    pub phase: Phase,
    /// Every block below this index of the current phase is written and durable.
    pub next_index: u64,
    /// The site's changes since the point, as block index ranges `[start, end)`.
    #[serde(default)]
    pub site: Vec<(u64, u64)>,
    pub done: Counters,
    pub started: DateTime<Utc>,
}

/// One finished round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundSummary {
    pub snapshot: String,
    pub base: String,
    pub mode: Mode,
    #[serde(flatten)]
    pub counters: Counters,
    /// Blocks of the site's changes rewritten (already counted in `counters`).
    #[serde(default)]
    pub site_blocks: u64,
    /// Those blocks, as index ranges `[start, end)` (protection resumes with them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub site: Vec<(u64, u64)>,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
}

impl RoundSummary {
    pub fn seconds(&self) -> f64 {
        (self.finished - self.started).num_milliseconds().max(0) as f64 / 1000.0
    }
}

/// The state of one disk's failback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailbackState {
    pub disk: DiskId,
    /// The target (a path or NBD URI) the rounds write into.
    pub target: String,
    /// The recovery point the instance was launched from: the first round's base.
    pub point: String,
    /// The snapshot the target equals, once a round finished.
    pub applied: Option<String>,
    pub round: Option<RoundState>,
    #[serde(default)]
    pub rounds: Vec<RoundSummary>,
}

impl FailbackState {
    pub fn new(disk: DiskId, target: String, point: String) -> Self {
        FailbackState {
            disk,
            target,
            point,
            applied: None,
            round: None,
            rounds: Vec::new(),
        }
    }

    /// The counters of every finished round.
    pub fn total(&self) -> Counters {
        let mut t = Counters::default();
        for r in &self.rounds {
            t.add(&r.counters);
        }
        t
    }
}

/// `{state_dir}/failback/{site}/{vm}/{disk}.json`.
pub fn path(state_dir: &Path, disk: &DiskId) -> PathBuf {
    state_dir
        .join("failback")
        .join(disk.site.as_str())
        .join(disk.vm.as_str())
        .join(format!("{}.json", disk.disk.as_str()))
}

/// Takes the disk's round lock (`{state}.lock`, released when the file is dropped or
/// the process dies) without waiting.
pub fn lock(path: &Path) -> Result<std::fs::File, crate::FailbackError> {
    let lock_path = path.with_extension("lock");
    let err = |source| crate::FailbackError::Lock {
        path: lock_path.display().to_string(),
        source,
    };
    if let Some(dir) = lock_path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(err)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(crate::FailbackError::Busy {
            path: lock_path.display().to_string(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(err(e)),
    }
}

pub fn load(path: &Path) -> Result<Option<FailbackState>, pilotlight_durable::DurableError> {
    pilotlight_durable::load(path, STATE_VERSION)
}

pub fn save(path: &Path, st: &FailbackState) -> Result<(), pilotlight_durable::DurableError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| pilotlight_durable::DurableError::Io {
            path: dir.display().to_string(),
            source: e,
        })?;
    }
    pilotlight_durable::save(path, STATE_VERSION, st)
}
