//! The sender's durable state for one disk: what was committed, what is under way.
//!
//! Versioned and checksummed; written to a temp file, fsynced, renamed, and the directory
//! fsynced, so a crash leaves either the old state or the new one. A lock file stops two
//! runs on one disk.

use chrono::{DateTime, Utc};
use pilotlight_durable::DurableError;
use pilotlight_protocol::DiskId;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

pub const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] DurableError),
    #[error(
        "another pilotlight-sender run holds the lock on {disk} ({path}); wait for it to finish"
    )]
    Locked { disk: String, path: String },
}

/// Where a run that did not finish stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Data objects may be partly uploaded; the manifest is not. Re-run the generation.
    Uploading,
    /// All data objects are up; the manifest (saved beside the state) may or may not be.
    /// Re-put the saved manifest before anything else.
    Committing,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub generation: u64,
    pub snapshot_time: DateTime<Utc>,
    pub phase: Phase,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    pub disk: DiskId,
    pub last_committed: Option<u64>,
    pub last_change_id: Option<String>,
    pub last_snapshot_time: Option<DateTime<Utc>>,
    pub pending: Option<Pending>,
}

/// The state directory of one disk, locked for the lifetime of this value.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Opens (creating) `{root}/{site}/{vm}/{disk}/` and takes its lock without waiting.
    pub fn open(root: &Path, disk: &DiskId) -> Result<Self, StateError> {
        let dir = root
            .join(disk.site.as_str())
            .join(disk.vm.as_str())
            .join(disk.disk.as_str());
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StateError::Locked {
                    disk: disk.to_string(),
                    path: lock_path.display().to_string(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path, e)),
        }
        Ok(Self { dir, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The manifest of a generation in the Committing phase.
    pub fn pending_manifest_path(&self) -> PathBuf {
        self.dir.join("pending-manifest.json")
    }

    pub fn load(&self, disk: &DiskId) -> Result<DiskState, StateError> {
        Ok(
            pilotlight_durable::load(&self.state_path(), STATE_VERSION)?.unwrap_or(DiskState {
                disk: disk.clone(),
                last_committed: None,
                last_change_id: None,
                last_snapshot_time: None,
                pending: None,
            }),
        )
    }

    pub fn save(&self, state: &DiskState) -> Result<(), StateError> {
        Ok(pilotlight_durable::save(
            &self.state_path(),
            STATE_VERSION,
            state,
        )?)
    }

    pub fn write_pending_manifest(&self, bytes: &[u8]) -> Result<(), StateError> {
        Ok(pilotlight_durable::write_atomic(
            &self.pending_manifest_path(),
            bytes,
        )?)
    }

    pub fn read_pending_manifest(&self) -> Result<Vec<u8>, StateError> {
        let p = self.pending_manifest_path();
        std::fs::read(&p).map_err(|e| io(&p, e))
    }

    pub fn remove_pending_manifest(&self) -> Result<(), StateError> {
        let p = self.pending_manifest_path();
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&p, e)),
        }
    }
}

/// Reads a state file without taking the lock (for `status`).
pub fn peek(root: &Path, disk: &DiskId) -> Result<Option<DiskState>, StateError> {
    let path = root
        .join(disk.site.as_str())
        .join(disk.vm.as_str())
        .join(disk.disk.as_str())
        .join("state.json");
    Ok(pilotlight_durable::load(&path, STATE_VERSION)?)
}

fn io(path: &Path, source: std::io::Error) -> StateError {
    StateError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> DiskId {
        DiskId::new("s", "v", "d").unwrap()
    }

    #[test]
    fn save_load_round_trip_and_lock() {
        let root = tempfile::tempdir().unwrap();
        let sd = StateDir::open(root.path(), &disk()).unwrap();
        let mut st = sd.load(&disk()).unwrap();
        assert_eq!(st.last_committed, None);
        st.last_committed = Some(4);
        st.pending = Some(Pending {
            generation: 5,
            snapshot_time: Utc::now(),
            phase: Phase::Uploading,
        });
        sd.save(&st).unwrap();
        assert_eq!(sd.load(&disk()).unwrap(), st);
        assert_eq!(peek(root.path(), &disk()).unwrap(), Some(st));
        let err = StateDir::open(root.path(), &disk()).unwrap_err();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        drop(sd);
        StateDir::open(root.path(), &disk()).unwrap();
    }

    #[test]
    fn corruption_is_detected() {
        let root = tempfile::tempdir().unwrap();
        let sd = StateDir::open(root.path(), &disk()).unwrap();
        let mut st = sd.load(&disk()).unwrap();
        st.last_committed = Some(7);
        sd.save(&st).unwrap();
        let path = sd.path().join("state.json");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replace("\"last_committed\": 7", "\"last_committed\": 8"),
        )
        .unwrap();
        let corrupt = |r| matches!(r, Err(StateError::File(DurableError::Corrupt { .. })));
        assert!(corrupt(sd.load(&disk())));
        std::fs::write(&path, b"{\"version\": 9}").unwrap();
        assert!(matches!(
            sd.load(&disk()),
            Err(StateError::File(DurableError::Version { found: 9, .. }))
        ));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(corrupt(sd.load(&disk())));
    }
}
