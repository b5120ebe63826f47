//! Failback documents: how the DR function tells a site's sender which return snapshots
//! of a recovered instance it may fail back from, and how the sender tells the DR
//! function what its rounds did.
//!
//! ```text
//! {prefix}/{site}/{vm}/{disk}/b/{run-id}/return.json   the DR function's: point, return snapshots
//! {prefix}/{site}/{vm}/{disk}/b/{run-id}/round.json    the sender's: its newest round
//! ```
//!
//! Both live under the disk, so a sender reads and writes only under its own site (its
//! policy); each is untrusted input to its reader: size-capped, versioned, and checked to
//! name the run and disk its key names.

use crate::names::{DiskId, Name};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const FAILBACK_VERSION: u32 = 1;
/// Failback documents are small (a few return snapshots); anything larger is refused.
pub const MAX_FAILBACK_DOC_BYTES: usize = 64 * 1024;
/// At most this many return snapshots are listed per disk (the DR function keeps fewer).
pub const MAX_RETURNS: usize = 64;

/// One completed snapshot of the recovered instance's volume for this disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReturnPoint {
    /// The set it belongs to (one `CreateSnapshots` call: crash-consistent across the
    /// instance's volumes).
    pub set_id: String,
    pub snapshot_id: String,
    pub taken_at: DateTime<Utc>,
    /// Taken with the instance stopped, at cutover: nothing changes after it.
    #[serde(default)]
    pub r#final: bool,
}

/// What the DR function tells the sender about one disk of a failback (`return.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReturnDoc {
    pub version: u32,
    pub run_id: Name,
    pub disk: DiskId,
    /// The recovery point the instance was launched from: the first round's base.
    pub point_snapshot: String,
    pub point_generation: u64,
    pub instance_id: String,
    pub volume_id: String,
    /// Completed return snapshots, oldest first (the newest is the one to fail back to).
    pub returns: Vec<ReturnPoint>,
    pub updated_at: DateTime<Utc>,
}

impl ReturnDoc {
    /// The return snapshot a round should bring the site to.
    pub fn newest(&self) -> Option<&ReturnPoint> {
        self.returns.last()
    }
}

/// What the sender tells the DR function about its newest round of one disk (`round.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundDoc {
    pub version: u32,
    pub run_id: Name,
    pub disk: DiskId,
    /// The return snapshot the target now equals.
    pub snapshot_id: String,
    /// It was the final (cutover) snapshot.
    #[serde(default)]
    pub r#final: bool,
    /// Every written block was read back and its SHA-256 equalled the snapshot's.
    pub verified: bool,
    pub blocks_written: u64,
    pub bytes_written: u64,
    /// The target (a path or an NBD URI; never credentials).
    pub target: String,
    /// A drill: the target was a scratch copy, the site's disk untouched.
    #[serde(default)]
    pub drill: bool,
    pub seconds: f64,
    pub finished_at: DateTime<Utc>,
    /// The target's size in bytes.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// Rounds finished into this target so far, this one included.
    #[serde(default)]
    pub rounds: Option<u64>,
    /// Bytes written (and zeroed) by all of them: what failing back moved.
    #[serde(default)]
    pub total_bytes_written: Option<u64>,
    /// With `--whole-disk-sha256`: the SHA-256 of the whole target, found equal to the
    /// snapshot's over the same bytes.
    #[serde(default)]
    pub whole_disk_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailbackDocError {
    #[error("failback document is {0} bytes, more than the {MAX_FAILBACK_DOC_BYTES} allowed")]
    TooLarge(usize),
    #[error("failback document is not valid JSON of version {FAILBACK_VERSION}: {0}")]
    Json(String),
    #[error(
        "failback document version {0} is not supported (this build reads {FAILBACK_VERSION})"
    )]
    UnsupportedVersion(u32),
    #[error("failback document names {found} but its key names {expected}")]
    Mismatch { expected: String, found: String },
    #[error("failback document lists {0} return snapshots, more than {MAX_RETURNS}")]
    TooManyReturns(usize),
    #[error("failback document: {0:?} is not an EBS snapshot id (snap-...)")]
    BadSnapshotId(String),
}

fn snapshot_id_ok(id: &str) -> Result<(), FailbackDocError> {
    let ok = id.strip_prefix("snap-").is_some_and(|h| {
        !h.is_empty() && h.len() <= 32 && h.bytes().all(|b| b.is_ascii_alphanumeric())
    });
    if ok {
        Ok(())
    } else {
        Err(FailbackDocError::BadSnapshotId(
            id.chars().take(80).collect(),
        ))
    }
}

fn parse<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    run: &Name,
    disk: &DiskId,
    head: impl Fn(&T) -> (u32, &Name, &DiskId),
) -> Result<T, FailbackDocError> {
    if bytes.len() > MAX_FAILBACK_DOC_BYTES {
        return Err(FailbackDocError::TooLarge(bytes.len()));
    }
    let doc: T =
        serde_json::from_slice(bytes).map_err(|e| FailbackDocError::Json(e.to_string()))?;
    let (version, r, d) = head(&doc);
    if version != FAILBACK_VERSION {
        return Err(FailbackDocError::UnsupportedVersion(version));
    }
    if r != run || d != disk {
        return Err(FailbackDocError::Mismatch {
            expected: format!("run {run}, disk {disk}"),
            found: format!("run {r}, disk {d}"),
        });
    }
    Ok(doc)
}

impl ReturnDoc {
    /// Parses and checks a document read from the key naming `run` and `disk`.
    pub fn from_json(bytes: &[u8], run: &Name, disk: &DiskId) -> Result<Self, FailbackDocError> {
        let d: Self = parse(bytes, run, disk, |d: &Self| (d.version, &d.run_id, &d.disk))?;
        if d.returns.len() > MAX_RETURNS {
            return Err(FailbackDocError::TooManyReturns(d.returns.len()));
        }
        snapshot_id_ok(&d.point_snapshot)?;
        for r in &d.returns {
            snapshot_id_ok(&r.snapshot_id)?;
        }
        Ok(d)
    }
}

impl RoundDoc {
    /// Parses and checks a document read from the key naming `run` and `disk`.
    pub fn from_json(bytes: &[u8], run: &Name, disk: &DiskId) -> Result<Self, FailbackDocError> {
        let d: Self = parse(bytes, run, disk, |d: &Self| (d.version, &d.run_id, &d.disk))?;
        snapshot_id_ok(&d.snapshot_id)?;
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> DiskId {
        DiskId::parse("s/v/d0").unwrap()
    }

    fn doc() -> ReturnDoc {
        ReturnDoc {
            version: FAILBACK_VERSION,
            run_id: Name::new("dr-1").unwrap(),
            disk: disk(),
            point_snapshot: "snap-0a".into(),
            point_generation: 3,
            instance_id: "i-1".into(),
            volume_id: "vol-1".into(),
            returns: vec![ReturnPoint {
                set_id: "fb-1".into(),
                snapshot_id: "snap-0b".into(),
                taken_at: Utc::now(),
                r#final: false,
            }],
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn a_return_doc_round_trips_and_names_its_newest() {
        let d = doc();
        let json = serde_json::to_vec(&d).unwrap();
        let back = ReturnDoc::from_json(&json, &d.run_id, &d.disk).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.newest().unwrap().snapshot_id, "snap-0b");
    }

    #[test]
    fn documents_that_are_not_what_their_key_says_are_refused() {
        let d = doc();
        let run = d.run_id.clone();
        let ok = serde_json::to_vec(&d).unwrap();
        let other = DiskId::parse("s/v/d1").unwrap();
        assert!(matches!(
            ReturnDoc::from_json(&ok, &run, &other),
            Err(FailbackDocError::Mismatch { .. })
        ));
        assert!(matches!(
            ReturnDoc::from_json(&ok, &Name::new("dr-2").unwrap(), &d.disk),
            Err(FailbackDocError::Mismatch { .. })
        ));
        let mut v = d.clone();
        v.version = 2;
        assert!(matches!(
            ReturnDoc::from_json(&serde_json::to_vec(&v).unwrap(), &run, &d.disk),
            Err(FailbackDocError::UnsupportedVersion(2))
        ));
        let mut bad = d.clone();
        bad.returns[0].snapshot_id = "../../etc".into();
        assert!(matches!(
            ReturnDoc::from_json(&serde_json::to_vec(&bad).unwrap(), &run, &d.disk),
            Err(FailbackDocError::BadSnapshotId(_))
        ));
        let mut many = d.clone();
        many.returns = vec![d.returns[0].clone(); MAX_RETURNS + 1];
        assert!(matches!(
            ReturnDoc::from_json(&serde_json::to_vec(&many).unwrap(), &run, &d.disk),
            Err(FailbackDocError::TooManyReturns(_))
        ));
        assert!(matches!(
            ReturnDoc::from_json(b"{", &run, &d.disk),
            Err(FailbackDocError::Json(_))
        ));
        assert!(matches!(
            ReturnDoc::from_json(&vec![b' '; MAX_FAILBACK_DOC_BYTES + 1], &run, &d.disk),
            Err(FailbackDocError::TooLarge(_))
        ));
        let round = RoundDoc {
            version: FAILBACK_VERSION,
            run_id: run.clone(),
            disk: d.disk.clone(),
            snapshot_id: "snap-0b".into(),
            r#final: true,
            verified: true,
            blocks_written: 3,
            bytes_written: 3 << 19,
            target: "/dev/sdb".into(),
            drill: false,
            seconds: 1.5,
            finished_at: Utc::now(),
            disk_bytes: Some(1 << 30),
            rounds: Some(2),
            total_bytes_written: Some(5 << 19),
            whole_disk_sha256: None,
        };
        let json = serde_json::to_vec(&round).unwrap();
        assert_eq!(RoundDoc::from_json(&json, &run, &d.disk).unwrap(), round);
        assert!(RoundDoc::from_json(&json, &run, &other).is_err());
    }
}
