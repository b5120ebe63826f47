//! Local files shared by the sender and the receiver: durable state files (below) and
//! sparse files' allocation maps ([`sparse`]).
//!
//! A state file is JSON `{"version": V, "checksum": SHA-256 of the state's JSON,
//! "state": {...}}`, written to a temp file, fsynced, renamed over the old one, and the
//! directory fsynced: a crash leaves the old file or the new one, never a mix, and a
//! damaged file is detected rather than believed.

pub mod sparse;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt ({why}); move it away to start over")]
    Corrupt { path: String, why: String },
    #[error("state file {path} has version {found}; this build reads {expected}")]
    Version {
        path: String,
        found: u64,
        expected: u32,
    },
}

fn io(path: &Path, source: std::io::Error) -> DurableError {
    DurableError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    version: u32,
    checksum: String,
    state: &'a T,
}

#[derive(Deserialize)]
struct EnvelopeIn<T> {
    version: u32,
    checksum: String,
    state: T,
}

#[derive(Deserialize)]
struct Probe {
    version: u64,
}

fn checksum<T: Serialize>(state: &T) -> String {
    hex::encode(Sha256::digest(
        serde_json::to_vec(state).unwrap_or_default(),
    ))
}

/// The bytes of a state file holding `state` at format `version`.
pub fn encode<T: Serialize>(version: u32, state: &T) -> Vec<u8> {
    let env = EnvelopeOut {
        version,
        checksum: checksum(state),
        state,
    };
    serde_json::to_vec_pretty(&env).unwrap_or_default()
}

/// Parses a state file, checking version and checksum. `path` is for messages.
pub fn decode<T: Serialize + DeserializeOwned>(
    path: &Path,
    version: u32,
    bytes: &[u8],
) -> Result<T, DurableError> {
    let p = path.display().to_string();
    let corrupt = |why: String| DurableError::Corrupt {
        path: p.clone(),
        why,
    };
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if probe.version != u64::from(version) {
        return Err(DurableError::Version {
            path: p,
            found: probe.version,
            expected: version,
        });
    }
    let env: EnvelopeIn<T> = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if env.version != version || checksum(&env.state) != env.checksum {
        return Err(corrupt("checksum mismatch".into()));
    }
    Ok(env.state)
}

/// Reads a state file; `Ok(None)` when it does not exist.
pub fn load<T: Serialize + DeserializeOwned>(
    path: &Path,
    version: u32,
) -> Result<Option<T>, DurableError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(path, version, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, e)),
    }
}

/// Writes `state` durably at `path`.
pub fn save<T: Serialize>(path: &Path, version: u32, state: &T) -> Result<(), DurableError> {
    write_atomic(path, &encode(version, state))
}

/// Temp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DurableError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct S {
        applied: Option<u64>,
        name: String,
    }

    #[test]
    fn round_trip_and_detection() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        assert!(load::<S>(&p, 1).unwrap().is_none());
        let s = S {
            applied: Some(3),
            name: "x".into(),
        };
        save(&p, 1, &s).unwrap();
        assert_eq!(load::<S>(&p, 1).unwrap(), Some(s));
        assert!(!dir.path().join("s.json.tmp").exists());
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, text.replace("\"applied\": 3", "\"applied\": 4")).unwrap();
        assert!(matches!(
            load::<S>(&p, 1),
            Err(DurableError::Corrupt { .. })
        ));
        std::fs::write(
            &p,
            encode(
                2,
                &S {
                    applied: None,
                    name: "y".into(),
                },
            ),
        )
        .unwrap();
        assert!(matches!(
            load::<S>(&p, 1),
            Err(DurableError::Version { found: 2, .. })
        ));
        std::fs::write(&p, b"\x00garbage").unwrap();
        assert!(matches!(
            load::<S>(&p, 1),
            Err(DurableError::Corrupt { .. })
        ));
    }
}
