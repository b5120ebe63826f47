//! The receiver's durable state per disk: which generation the image holds, and its
//! recovery points (written, due). Fields added later default when absent, so state files
//! of earlier versions load.
//!
//! Saved only after the image is fsynced, so the state never claims a generation whose
//! bytes are not on disk.

use chrono::{DateTime, Utc};
use pilotlight_durable::DurableError;
use pilotlight_protocol::{Consistency, DiskId};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    pub disk: DiskId,
    /// The generation the image holds completely, if any.
    pub applied: Option<u64>,
    pub snapshot_time: Option<DateTime<Utc>>,
    pub applied_at: Option<DateTime<Utc>>,
    pub disk_size: u64,
    /// The newest recovery points written and not pruned (at most `RECENT_POINTS`),
    /// oldest first; the last is the next point's parent.
    #[serde(default)]
    pub points: Vec<PointRecord>,
    /// The applied generation's point, while it is not written yet.
    #[serde(default)]
    pub point_due: Option<PointDue>,
    /// A point was given up: the next one cannot build on the previous point.
    #[serde(default)]
    pub points_need_full: bool,
    /// Points given up so far, and why the last one was.
    #[serde(default)]
    pub points_failed: u64,
    #[serde(default)]
    pub point_error: Option<String>,
    /// Points of generations applied after `point_due`'s, oldest first, each staged
    /// (its blocks copied out of the image before a newer generation wrote them), so
    /// the image took those generations without waiting for the points (#35).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub points_queued: Vec<PointDue>,
}

impl DiskState {
    pub fn new(disk: &DiskId) -> Self {
        Self {
            disk: disk.clone(),
            applied: None,
            snapshot_time: None,
            applied_at: None,
            disk_size: 0,
            points: Vec::new(),
            point_due: None,
            points_need_full: false,
            points_failed: 0,
            point_error: None,
            points_queued: Vec::new(),
        }
    }

    /// The newest point due (queued last, else `point_due`): the applied generation's.
    pub fn newest_due(&self) -> Option<&PointDue> {
        self.points_queued.last().or(self.point_due.as_ref())
    }

    /// Takes the fields a point task owns from the state it saved (`from`): the points
    /// written, the point under way, and the failures.
    pub fn take_point_fields(&mut self, from: DiskState) {
        self.points = from.points;
        self.point_due = from.point_due;
        self.points_need_full = from.points_need_full;
        self.points_failed = from.points_failed;
        self.point_error = from.point_error;
    }

    /// When no point is under way, the oldest queued one becomes due.
    pub fn advance_point_queue(&mut self) -> bool {
        if self.point_due.is_some() || self.points_queued.is_empty() {
            return false;
        }
        self.point_due = Some(self.points_queued.remove(0));
        true
    }
}

/// Where one disk's files live.
#[derive(Debug, Clone)]
pub struct DiskPaths {
    pub image: PathBuf,
    pub state: PathBuf,
    pub staging_dir: PathBuf,
}

impl DiskPaths {
    pub fn new(image_dir: &Path, state_dir: &Path, disk: &DiskId) -> Self {
        let rel = Path::new(disk.site.as_str()).join(disk.vm.as_str());
        Self {
            image: image_dir.join(&rel).join(format!("{}.raw", disk.disk)),
            state: state_dir.join(&rel).join(format!("{}.json", disk.disk)),
            staging_dir: state_dir.join(&rel).join(format!("{}.staging", disk.disk)),
        }
    }

    /// Where a point task saves the disk's state while it writes a point: the engine
    /// saves the state file meanwhile (it applies newer generations), so each has a
    /// file of its own; the task's point fields are taken back when it ends, or when
    /// the disk is opened after a crash ([`load`]).
    pub fn point_progress(&self) -> PathBuf {
        self.state.with_extension("point")
    }

    /// Where the blocks of generation `g`'s point are staged: a sparse file of the
    /// disk's size holding them at their offsets.
    pub fn staged_point(&self, g: u64) -> PathBuf {
        self.staging_dir.join("points").join(format!("{g:020}.raw"))
    }

    pub fn create_dirs(&self) -> std::io::Result<()> {
        for p in [&self.image, &self.state] {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d)?;
            }
        }
        std::fs::create_dir_all(&self.staging_dir)
    }
}

/// The disk's state, with the point fields of a point task's progress file when one is
/// there (a task was writing a point; its file is newer for those fields).
pub fn load(paths: &DiskPaths, disk: &DiskId) -> Result<DiskState, DurableError> {
    let mut st: DiskState = pilotlight_durable::load(&paths.state, STATE_VERSION)?
        .unwrap_or_else(|| DiskState::new(disk));
    if let Some(progress) =
        pilotlight_durable::load::<DiskState>(&paths.point_progress(), STATE_VERSION)?
    {
        st.take_point_fields(progress);
    }
    Ok(st)
}

/// Removes a point task's progress file once its fields are in the state file.
pub fn remove_progress(paths: &DiskPaths) {
    match std::fs::remove_file(paths.point_progress()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove {}: {e}", paths.point_progress().display()),
    }
}

pub fn save(paths: &DiskPaths, st: &DiskState) -> Result<(), DurableError> {
    pilotlight_durable::save(&paths.state, STATE_VERSION, st)
}

/// A point that was written and completed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointRecord {
    pub generation: u64,
    pub snapshot_id: String,
    pub snapshot_time: DateTime<Utc>,
    pub disk_size: u64,
    /// Blocks written into it (unknown when a restart found it completed).
    pub blocks_written: Option<u64>,
    pub parent: Option<String>,
}

/// The point the applied generation still needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointDue {
    pub generation: u64,
    /// The generation's parent: the previous point is this point's parent only when it
    /// holds exactly that generation.
    pub parent_generation: Option<u64>,
    pub snapshot_time: DateTime<Utc>,
    pub consistency: Consistency,
    pub change_id: Option<String>,
    pub disk_size: u64,
    /// Block index ranges `[start, end)` the generation touched.
    pub blocks: Vec<(u64, u64)>,
    /// Attempts so far (the client token of each is different).
    pub attempt: u32,
    /// The snapshot of the current attempt, once started.
    pub snapshot_id: Option<String>,
    /// CompleteSnapshot was accepted for it.
    pub sealed: bool,
    /// The parent point of the current attempt (none: a full point).
    #[serde(default)]
    pub parent_snapshot: Option<String>,
    /// Random, made with the due point: part of every attempt's StartSnapshot client
    /// token, so a receiver whose state was lost and that applies the same generation
    /// again never gets an older receiver's snapshot back from the token ("subsequent
    /// retries with the same client token return the result from the original
    /// successful request", StartSnapshot API reference). Absent in older state files:
    /// made before the next attempt.
    #[serde(default)]
    pub token_salt: Option<String>,
    /// Its blocks were copied to [`DiskPaths::staged_point`] when it was applied: the
    /// point reads them there, and the image may take newer generations meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub staged: bool,
}
