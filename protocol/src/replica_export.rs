//! Snapshots mode's exports fanned out over invocations: a point larger than one range is
//! uploaded as one S3 multipart upload whose parts are written by many invocations at
//! once, each a range of consecutive parts.
//!
//! ```text
//! {prefix}/{site}/{vm}/{disk}/x/{id}/plan.json          the upload: point, size, parts, ranges
//! {prefix}/{site}/{vm}/{disk}/x/{id}/p/{range:05}.json  one range: claimed (a lease), then done
//! ```
//!
//! The plan is created once (`If-None-Match: *`). A range's record is a lease first (who
//! writes it, until when) and, once every part of it is uploaded, the parts' numbers,
//! ETags and SHA-256s; it is replaced only over the version read (`If-Match`), so one
//! invocation at a time uploads a range, and a range whose writer died is taken over only
//! after its lease ran out (longer than any invocation lives). Both documents are read as
//! untrusted (size cap, version, the id and range their key names).

use crate::manifest::Sha256Hex;
use crate::names::{DiskId, Name};
use crate::replica::{parse, snapshot_id_ok, ReplicaDocError};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A plan is a few hundred bytes.
pub const MAX_PLAN_BYTES: usize = 64 * 1024;
/// A range record lists its parts (about 130 bytes each, at most S3's 10 000 in all).
pub const MAX_RANGE_DOC_BYTES: usize = 4 * 1024 * 1024;
/// S3's most parts in one upload (part numbers 1 to 10 000).
pub const MAX_PARTS: u32 = 10_000;
/// The `kind` of an export range task.
pub const EXPORT_TASK_KIND: &str = "pilotlight.replica.export-range";

/// The upload of one export, fanned out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportPlan {
    pub version: u32,
    pub id: Name,
    pub generation: u64,
    pub snapshot_id: String,
    /// The disk's bytes (the image's size).
    pub size: u64,
    /// Every part but the last is this long (a whole number of 512 KiB blocks).
    pub part_size: u64,
    pub parts: u32,
    pub parts_per_range: u32,
    pub upload_id: String,
    pub created_at: DateTime<Utc>,
}

impl ExportPlan {
    pub fn ranges(&self) -> u32 {
        self.parts.div_ceil(self.parts_per_range.max(1))
    }

    /// The part numbers (1-based, inclusive) of range `r`.
    pub fn part_numbers(&self, r: u32) -> std::ops::RangeInclusive<u32> {
        let first = r * self.parts_per_range + 1;
        first..=((r + 1) * self.parts_per_range).min(self.parts)
    }

    /// Where part `number` starts on the disk, and its length.
    pub fn part_span(&self, number: u32) -> (u64, u64) {
        let at = (number as u64 - 1) * self.part_size;
        (at, self.part_size.min(self.size.saturating_sub(at)))
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8], id: &Name) -> Result<Self, ReplicaDocError> {
        let p: ExportPlan = parse(bytes, MAX_PLAN_BYTES, |p: &ExportPlan| p.version)?;
        if &p.id != id {
            return Err(ReplicaDocError::Mismatch {
                expected: id.to_string(),
                found: p.id.to_string(),
            });
        }
        snapshot_id_ok(&p.snapshot_id)?;
        let fits = p.part_size > 0
            && p.part_size.is_multiple_of(512 * 1024)
            && p.parts >= 1
            && p.parts <= MAX_PARTS
            && p.parts_per_range >= 1
            && p.size.div_ceil(p.part_size) == p.parts as u64
            && !p.upload_id.is_empty()
            && p.upload_id.len() <= 1024;
        if !fits {
            return Err(ReplicaDocError::Invalid(format!(
                "export plan {id}: {} parts of {} bytes do not make {} bytes, or the upload id is missing",
                p.parts, p.part_size, p.size
            )));
        }
        Ok(p)
    }
}

/// One part uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartDone {
    pub number: u32,
    pub etag: String,
    /// The SHA-256 of the part's bytes.
    pub sha256: Sha256Hex,
}

/// One range of an export: leased by `owner` until `lease_until`; `parts` once done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRange {
    pub version: u32,
    pub id: Name,
    pub range: u32,
    pub upload_id: String,
    pub owner: String,
    pub lease_until: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<Vec<PartDone>>,
}

impl ExportRange {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks a record read from the key naming `id` and `range`, of `plan`:
    /// a done record lists exactly the range's part numbers, ascending.
    pub fn from_json(bytes: &[u8], plan: &ExportPlan, range: u32) -> Result<Self, ReplicaDocError> {
        let d: ExportRange = parse(bytes, MAX_RANGE_DOC_BYTES, |d: &ExportRange| d.version)?;
        if (&d.id, d.range) != (&plan.id, range) {
            return Err(ReplicaDocError::Mismatch {
                expected: format!("export {} range {range}", plan.id),
                found: format!("export {} range {}", d.id, d.range),
            });
        }
        if let Some(parts) = &d.parts {
            let want: Vec<u32> = plan.part_numbers(range).collect();
            let got: Vec<u32> = parts.iter().map(|p| p.number).collect();
            if got != want
                || parts
                    .iter()
                    .any(|p| p.etag.is_empty() || p.etag.len() > 1024)
            {
                return Err(ReplicaDocError::Invalid(format!(
                    "export {} range {range} lists parts {:?}..., not {:?}",
                    plan.id,
                    got.iter().take(4).collect::<Vec<_>>(),
                    plan.part_numbers(range)
                )));
            }
        }
        Ok(d)
    }

    pub fn is_done(&self) -> bool {
        self.parts.is_some()
    }
}

/// A queue message: upload range `range` of export `id` (of the upload `upload_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportTask {
    pub kind: String,
    pub disk: DiskId,
    pub id: Name,
    pub range: u32,
    pub upload_id: String,
}

impl ExportTask {
    pub fn new(disk: DiskId, id: Name, range: u32, upload_id: String) -> Self {
        ExportTask {
            kind: EXPORT_TASK_KIND.into(),
            disk,
            id,
            range,
            upload_id,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `None` when the body is not an export task; an error when it says it is one but
    /// is malformed.
    pub fn from_body(body: &str) -> Option<Result<Self, ReplicaDocError>> {
        if !body.contains(EXPORT_TASK_KIND) {
            return None;
        }
        if body.len() > crate::replica::MAX_TASK_BYTES {
            return Some(Err(ReplicaDocError::TooLarge(body.len())));
        }
        match serde_json::from_str::<ExportTask>(body) {
            Ok(t) if t.kind != EXPORT_TASK_KIND => None,
            Ok(t) => Some(Ok(t)),
            Err(e) => Some(Err(ReplicaDocError::Json(e.to_string()))),
        }
    }
}

/// The SHA-256 of the parts' SHA-256 digests in part order, hex, with `-{parts}`: S3's
/// composite checksum of a multipart object ("a checksum of the concatenated checksums
/// for each individual part", S3 User Guide, "Checking object integrity") in hex. What a
/// fanned-out export reports instead of the whole image's SHA-256, which no one
/// invocation sees.
pub fn composite_sha256<'a>(parts_in_order: impl IntoIterator<Item = &'a Sha256Hex>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut n = 0u32;
    for p in parts_in_order {
        h.update(p.0);
        n += 1;
    }
    format!("{}-{n}", hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::REPLICA_VERSION;

    fn plan() -> ExportPlan {
        ExportPlan {
            version: REPLICA_VERSION,
            id: Name::new("run1-d0").unwrap(),
            generation: 2,
            snapshot_id: "snap-0123".into(),
            size: 100 << 20,
            part_size: 16 << 20,
            parts: 7,
            parts_per_range: 3,
            upload_id: "u1".into(),
            created_at: DateTime::parse_from_rfc3339("2026-12-05T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
        }
    }

    #[test]
    fn a_plan_cuts_parts_into_ranges() {
        let p = plan();
        assert_eq!(p.ranges(), 3);
        assert_eq!(p.part_numbers(0), 1..=3);
        assert_eq!(p.part_numbers(2), 7..=7);
        assert_eq!(p.part_span(1), (0, 16 << 20));
        // The last part is what is left: 100 - 6 x 16 = 4 MiB.
        assert_eq!(p.part_span(7), (96 << 20, 4 << 20));
        assert_eq!(ExportPlan::from_json(&p.to_json(), &p.id).unwrap(), p);
    }

    #[test]
    fn bad_plans_and_ranges_are_refused() {
        let p = plan();
        let other = Name::new("other").unwrap();
        assert!(matches!(
            ExportPlan::from_json(&p.to_json(), &other),
            Err(ReplicaDocError::Mismatch { .. })
        ));
        for bad in [
            ExportPlan {
                parts: 6,
                ..p.clone()
            },
            ExportPlan {
                part_size: 1000,
                ..p.clone()
            },
            ExportPlan {
                parts_per_range: 0,
                ..p.clone()
            },
            ExportPlan {
                upload_id: String::new(),
                ..p.clone()
            },
            ExportPlan {
                snapshot_id: "vol-1".into(),
                ..p.clone()
            },
        ] {
            assert!(
                ExportPlan::from_json(&bad.to_json(), &p.id).is_err(),
                "{bad:?}"
            );
        }
        assert!(matches!(
            ExportPlan::from_json(&vec![b' '; MAX_PLAN_BYTES + 1], &p.id),
            Err(ReplicaDocError::TooLarge(_))
        ));
        let part = |n| PartDone {
            number: n,
            etag: "e".into(),
            sha256: Sha256Hex([n as u8; 32]),
        };
        let done = ExportRange {
            version: REPLICA_VERSION,
            id: p.id.clone(),
            range: 1,
            upload_id: "u1".into(),
            owner: "o".into(),
            lease_until: p.created_at,
            parts: Some(vec![part(4), part(5), part(6)]),
        };
        assert_eq!(
            ExportRange::from_json(&done.to_json(), &p, 1).unwrap(),
            done
        );
        // Another range's key, a missing part, an empty ETag: refused.
        assert!(ExportRange::from_json(&done.to_json(), &p, 0).is_err());
        let short = ExportRange {
            parts: Some(vec![part(4), part(6)]),
            ..done.clone()
        };
        assert!(ExportRange::from_json(&short.to_json(), &p, 1).is_err());
        let mut blank = done.clone();
        blank.parts.as_mut().unwrap()[0].etag.clear();
        assert!(ExportRange::from_json(&blank.to_json(), &p, 1).is_err());
    }

    #[test]
    fn export_tasks_round_trip_and_others_are_not_tasks() {
        let t = ExportTask::new(
            DiskId::parse("s/v/d").unwrap(),
            Name::new("run1-d0").unwrap(),
            4,
            "u1".into(),
        );
        assert_eq!(ExportTask::from_body(&t.to_json()), Some(Ok(t)));
        assert_eq!(ExportTask::from_body(r#"{"Records":[]}"#), None);
        let bad = format!(r#"{{"kind":"{EXPORT_TASK_KIND}","range":"x"}}"#);
        assert!(matches!(ExportTask::from_body(&bad), Some(Err(_))));
    }

    #[test]
    fn the_composite_checksum_is_over_the_part_digests_in_order() {
        use sha2::{Digest, Sha256};
        let a = Sha256Hex(Sha256::digest(b"a").into());
        let b = Sha256Hex(Sha256::digest(b"b").into());
        let mut h = Sha256::new();
        h.update(a.0);
        h.update(b.0);
        assert_eq!(
            composite_sha256([&a, &b]),
            format!("{}-2", hex::encode(h.finalize()))
        );
        assert_ne!(composite_sha256([&a, &b]), composite_sha256([&b, &a]));
    }
}
