//! Local files shared by the sender and the receiver: durable state files (below) and
//! sparse files' allocation maps ([`sparse`]).
//!
//! A state file is JSON `{"version": V, "checksum": SHA-256, "state": {...}}`, written to
//! a temp file, fsynced, renamed over the old one, and the directory fsynced: a crash
//! leaves the old file or the new one, never a mix, and a damaged file is detected rather
//! than believed.
//!
//! The checksum covers the state *as stored*: the SHA-256 of the `state` value's text with
//! the whitespace between JSON tokens removed (what `serde_json::to_vec` writes). It never
//! depends on the reading build's types, so a newer build that adds optional fields
//! (`#[serde(default)]`) verifies and loads files older builds wrote. The rule for every
//! persisted format: new fields are optional with defaults; a breaking change bumps the
//! version and ships a migration with its test.

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
    #[error(
        "state for {path} cannot be written as JSON ({why}), which is a bug; the old file is kept"
    )]
    Encode { path: String, why: String },
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
struct EnvelopeIn<'a> {
    version: u32,
    checksum: String,
    #[serde(borrow)]
    state: &'a serde_json::value::RawValue,
}

#[derive(Deserialize)]
struct Probe {
    version: u64,
}

/// `json` without the whitespace between its tokens (JSON strings hold none unescaped
/// but spaces, which are kept): the compact form `serde_json::to_vec` writes.
fn compact(json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in json.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = b == b'"';
            out.push(b);
        }
    }
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The bytes of a state file holding `state` at format `version`. `path` is for messages.
pub fn encode<T: Serialize>(path: &Path, version: u32, state: &T) -> Result<Vec<u8>, DurableError> {
    let failed = |e: serde_json::Error| DurableError::Encode {
        path: path.display().to_string(),
        why: e.to_string(),
    };
    let env = EnvelopeOut {
        version,
        checksum: sha256_hex(&serde_json::to_vec(state).map_err(failed)?),
        state,
    };
    serde_json::to_vec_pretty(&env).map_err(failed)
}

/// Parses a state file, checking version and checksum. `path` is for messages.
pub fn decode<T: DeserializeOwned>(
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
    let env: EnvelopeIn = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if env.version != version || sha256_hex(&compact(env.state.get())) != env.checksum {
        return Err(corrupt("checksum mismatch".into()));
    }
    serde_json::from_str(env.state.get()).map_err(|e| corrupt(e.to_string()))
}

/// Reads a state file; `Ok(None)` when it does not exist.
pub fn load<T: DeserializeOwned>(path: &Path, version: u32) -> Result<Option<T>, DurableError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(path, version, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, e)),
    }
}

/// Writes `state` durably at `path`.
pub fn save<T: Serialize>(path: &Path, version: u32, state: &T) -> Result<(), DurableError> {
    write_atomic(path, &encode(path, version, state)?)
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
                &p,
                2,
                &S {
                    applied: None,
                    name: "y".into(),
                },
            )
            .unwrap(),
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

    /// A newer build with one more optional field reads a file an older build wrote, and
    /// writing it again keeps the new field.
    #[test]
    fn a_file_of_an_older_build_loads_in_a_newer_one() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Newer {
            applied: Option<u64>,
            name: String,
            #[serde(default)]
            points: Vec<u64>,
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        save(
            &p,
            1,
            &S {
                applied: Some(3),
                name: "a \"quoted\" name\\ with  spaces".into(),
            },
        )
        .unwrap();
        let newer: Newer = load(&p, 1).unwrap().unwrap();
        assert_eq!(newer.points, Vec::<u64>::new());
        assert_eq!(newer.name, "a \"quoted\" name\\ with  spaces");
        // Reformatted whitespace between tokens is still the same state.
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, text.replace('\n', "\n\t ")).unwrap();
        assert!(load::<Newer>(&p, 1).unwrap().is_some());
        // A space inside a string is part of the state.
        std::fs::write(&p, text.replace("with  spaces", "with spaces")).unwrap();
        assert!(matches!(
            load::<Newer>(&p, 1),
            Err(DurableError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_state_that_cannot_be_written_is_an_error_not_an_empty_file() {
        struct Unwritable;
        impl Serialize for Unwritable {
            fn serialize<Z: serde::Serializer>(&self, _: Z) -> Result<Z::Ok, Z::Error> {
                Err(serde::ser::Error::custom("no"))
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        std::fs::write(&p, b"old").unwrap();
        assert!(matches!(
            save(&p, 1, &Unwritable),
            Err(DurableError::Encode { .. })
        ));
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
    }
}
