//! The manifest: the commit record of one generation of one disk.
//!
//! Written last, after every data object it lists. A generation exists for the
//! receiver only once its manifest does. Manifests are untrusted input for the receiver:
//! [`Manifest::from_json`] parses and validates in one step.

use crate::extent::{Extent, SECTOR_SIZE};
use crate::keys::ObjectKey;
use crate::names::DiskId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// The newest manifest format this crate reads and writes. v2 adds packed objects
/// ([`DataObject::pieces`]); a manifest without them is written as v1, which older
/// receivers still read. This crate reads both.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest manifest format this crate reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Default largest data object: 8 MiB.
pub const DEFAULT_MAX_OBJECT: u64 = 8 * 1024 * 1024;
/// Hard ceiling on any object a manifest may declare, so the receiver's memory stays
/// bounded by concurrency x this, whatever a manifest says.
pub const MAX_OBJECT_LIMIT: u64 = 64 * 1024 * 1024;
/// Largest manifest document accepted (about 300 000 objects).
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024 * 1024;
/// Longest source change id accepted (vSphere change ids are ~50 bytes).
pub const MAX_CHANGE_ID_LEN: usize = 1024;

/// How a data object's bytes are stored on S3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Raw,
    Zstd,
}

/// Whether the source snapshot was quiesced (application) or not (crash).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    Crash,
    Application,
}

impl Consistency {
    /// Its name in manifests (and in recovery points' tags).
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Crash => "crash",
            Consistency::Application => "application",
        }
    }
}

/// A SHA-256 digest, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Hex(pub [u8; 32]);

impl Sha256Hex {
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Hex({self})")
    }
}

impl Serialize for Sha256Hex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Sha256Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Sha256Hex::parse(&s).ok_or_else(|| {
            serde::de::Error::custom("sha256 must be 64 lowercase hexadecimal digits")
        })
    }
}

/// One data object: `length` decoded bytes, named by `offset`, the disk offset of its
/// first byte. Contiguous (v1, `pieces` empty): the bytes of `[offset, offset + length)`.
/// Packed (v2): the concatenation of the disk ranges in `pieces`, in order; the first
/// starts at `offset`, their lengths add up to `length`. Packing lets scattered small
/// changes travel in few large objects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataObject {
    pub offset: u64,
    pub length: u64,
    pub encoding: Encoding,
    /// Bytes of the object as stored on S3 (equals `length` when raw).
    pub stored_length: u64,
    /// SHA-256 of the decoded bytes.
    pub sha256: Sha256Hex,
    /// Format v2: the disk ranges the decoded bytes fill, in order (empty: contiguous).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pieces: Vec<Extent>,
}

impl DataObject {
    /// The object's span when contiguous (`[offset, offset + length)`); for a packed
    /// object use [`DataObject::parts`].
    pub fn extent(&self) -> Extent {
        Extent::new(self.offset, self.length)
    }

    /// The disk ranges the decoded bytes go to, in order: the object's extent, or its
    /// pieces.
    pub fn parts(&self) -> impl Iterator<Item = Extent> + '_ {
        let whole = self.pieces.is_empty().then(|| self.extent());
        whole.into_iter().chain(self.pieces.iter().copied())
    }

    pub fn is_packed(&self) -> bool {
        !self.pieces.is_empty()
    }
}

/// A manifest (formats v1 and v2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub disk: DiskId,
    pub generation: u64,
    /// The generation this one applies on top of; `None` for a full base.
    pub parent: Option<u64>,
    pub disk_size: u64,
    pub max_object: u64,
    /// Which sender source produced it (`extent-list`, `full`, `spool`, ...).
    pub source_kind: String,
    /// The source's change id after this generation (e.g. a vSphere changeId).
    pub source_change_id: Option<String>,
    pub snapshot_time: DateTime<Utc>,
    pub consistency: Consistency,
    /// Data objects, sorted by offset, non-overlapping.
    pub objects: Vec<DataObject>,
    /// Changed ranges that are all zeroes: punched as holes, never uploaded.
    pub zero_ranges: Vec<Extent>,
    /// The program that wrote it, e.g. `pilotlight-sender 0.1.0`.
    pub created_by: String,
}

/// Why a manifest was rejected. Each says what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {0} bytes, more than the {MAX_MANIFEST_BYTES} allowed")]
    TooLarge(usize),
    #[error("manifest is not valid JSON of format v{FORMAT_VERSION}: {0}")]
    Json(String),
    #[error("manifest format_version {0} is not supported (this build reads {MIN_FORMAT_VERSION} to {FORMAT_VERSION}); upgrade the receiver")]
    UnsupportedVersion(u64),
    #[error("manifest generation {0} is invalid: generations start at 1")]
    GenerationZero(u64),
    #[error("manifest generation {generation} names parent {parent}, which is not older")]
    ParentNotOlder { generation: u64, parent: u64 },
    #[error("manifest disk_size {0} is not a positive multiple of {SECTOR_SIZE}")]
    BadDiskSize(u64),
    #[error("manifest max_object {0} must be a multiple of {SECTOR_SIZE} between {SECTOR_SIZE} and {MAX_OBJECT_LIMIT}")]
    BadMaxObject(u64),
    #[error("manifest {what} {extent} is not aligned to {SECTOR_SIZE}-byte sectors")]
    Unaligned { what: &'static str, extent: Extent },
    #[error("manifest {what} {extent} is empty")]
    Empty { what: &'static str, extent: Extent },
    #[error("manifest {what} {extent} ends past the disk size {disk_size}")]
    PastEnd {
        what: &'static str,
        extent: Extent,
        disk_size: u64,
    },
    #[error("manifest {what} {extent} is longer than max_object {max_object}")]
    TooLong {
        what: &'static str,
        extent: Extent,
        max_object: u64,
    },
    #[error("manifest {what}s are not sorted or overlap: {previous} then {next}")]
    Overlap {
        what: &'static str,
        previous: Extent,
        next: Extent,
    },
    #[error("manifest object at {offset}: {why}")]
    BadPieces { offset: u64, why: String },
    #[error("manifest zero range {zero} overlaps data object {object}")]
    ZeroOverlapsData { zero: Extent, object: Extent },
    #[error("manifest object {extent}: stored_length {stored} is invalid for encoding {encoding:?} (raw must equal length; zstd must be 1..=length)")]
    BadStoredLength {
        extent: Extent,
        stored: u64,
        encoding: Encoding,
    },
    #[error("manifest field {field} is invalid: {why}")]
    BadField { field: &'static str, why: String },
    #[error("manifest is for {found}, but its key says {expected}")]
    KeyMismatch { expected: String, found: String },
}

#[derive(Deserialize)]
struct VersionProbe {
    format_version: u64,
}

impl Manifest {
    /// A generation from `source_kind` that changes nothing yet (objects and zero ranges
    /// are added to it): the current format, crash-consistent, default object size.
    pub fn new(
        disk: DiskId,
        generation: u64,
        parent: Option<u64>,
        disk_size: u64,
        snapshot_time: DateTime<Utc>,
        source_kind: &str,
    ) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            disk,
            generation,
            parent,
            disk_size,
            max_object: DEFAULT_MAX_OBJECT,
            source_kind: source_kind.into(),
            source_change_id: None,
            snapshot_time,
            consistency: Consistency::Crash,
            objects: Vec::new(),
            zero_ranges: Vec::new(),
            created_by: String::new(),
        }
    }

    /// Parses and validates a manifest from untrusted bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        // Read the version first, so a future format gets "unsupported version", not a
        // confusing complaint about its fields.
        let probe: VersionProbe =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        if !(u64::from(MIN_FORMAT_VERSION)..=u64::from(FORMAT_VERSION))
            .contains(&probe.format_version)
        {
            return Err(ManifestError::UnsupportedVersion(probe.format_version));
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// Serialises the manifest (pretty, for people reading the bucket).
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs of strings and integers cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// The oldest format that can express this manifest: v2 when an object is packed,
    /// else v1 (which receivers older than packing still read).
    pub fn required_version(&self) -> u32 {
        if self.objects.iter().any(DataObject::is_packed) {
            2
        } else {
            1
        }
    }

    /// Checks every rule of formats v1 and v2. See the crate docs and design.md.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&self.format_version) {
            return Err(ManifestError::UnsupportedVersion(
                self.format_version.into(),
            ));
        }
        if self.generation == 0 {
            return Err(ManifestError::GenerationZero(0));
        }
        if let Some(parent) = self.parent {
            if parent >= self.generation || parent == 0 {
                return Err(ManifestError::ParentNotOlder {
                    generation: self.generation,
                    parent,
                });
            }
        }
        if self.disk_size == 0 || !self.disk_size.is_multiple_of(SECTOR_SIZE) {
            return Err(ManifestError::BadDiskSize(self.disk_size));
        }
        if self.max_object < SECTOR_SIZE
            || self.max_object > MAX_OBJECT_LIMIT
            || !self.max_object.is_multiple_of(SECTOR_SIZE)
        {
            return Err(ManifestError::BadMaxObject(self.max_object));
        }
        if self.source_kind.is_empty() || self.source_kind.len() > 64 {
            return Err(ManifestError::BadField {
                field: "source_kind",
                why: "must be 1 to 64 bytes".into(),
            });
        }
        if let Some(id) = &self.source_change_id {
            if id.len() > MAX_CHANGE_ID_LEN || id.chars().any(char::is_control) {
                return Err(ManifestError::BadField {
                    field: "source_change_id",
                    why: format!(
                        "must be at most {MAX_CHANGE_ID_LEN} bytes without control characters"
                    ),
                });
            }
        }
        if self.created_by.len() > 256 {
            return Err(ManifestError::BadField {
                field: "created_by",
                why: "must be at most 256 bytes".into(),
            });
        }
        let mut prev: Option<Extent> = None;
        // Every disk range any object fills (a packed object's pieces may interleave with
        // another object's): sorted and checked for overlap below.
        let mut parts: Vec<Extent> = Vec::with_capacity(self.objects.len());
        for o in &self.objects {
            let e = o.extent();
            if o.is_packed() {
                self.check_packed(o)?;
                parts.extend(o.pieces.iter().copied());
            } else {
                self.check_extent("object", e, Some(self.max_object))?;
                parts.push(e);
            }
            let stored_ok = match o.encoding {
                Encoding::Raw => o.stored_length == o.length,
                Encoding::Zstd => o.stored_length >= 1 && o.stored_length <= o.length,
            };
            if !stored_ok {
                return Err(ManifestError::BadStoredLength {
                    extent: e,
                    stored: o.stored_length,
                    encoding: o.encoding,
                });
            }
            // Objects sorted by offset, each offset once (it names the object's key).
            if let Some(p) = prev {
                if o.offset <= p.offset {
                    return Err(ManifestError::Overlap {
                        what: "object",
                        previous: p,
                        next: Extent::new(o.offset, o.length),
                    });
                }
            }
            prev = Some(Extent::new(o.offset, o.length));
        }
        parts.sort_unstable();
        let mut prev = None;
        for &p in &parts {
            check_order("object", &mut prev, p)?;
        }
        let mut prev = None;
        for &z in &self.zero_ranges {
            self.check_extent("zero range", z, None)?;
            check_order("zero range", &mut prev, z)?;
        }
        // Both lists are sorted: one merge walk finds any overlap.
        let (mut i, mut j) = (0, 0);
        while i < parts.len() && j < self.zero_ranges.len() {
            let o = parts[i];
            let z = self.zero_ranges[j];
            if o.offset < z.end() && z.offset < o.end() {
                return Err(ManifestError::ZeroOverlapsData { zero: z, object: o });
            }
            if o.end() <= z.offset {
                i += 1;
            } else {
                j += 1;
            }
        }
        Ok(())
    }

    /// A packed object: allowed from v2; pieces sorted, disjoint, aligned, inside the
    /// disk, the first at the object's offset, adding up to its length, which is at most
    /// `max_object`.
    fn check_packed(&self, o: &DataObject) -> Result<(), ManifestError> {
        let bad = |why: String| ManifestError::BadPieces {
            offset: o.offset,
            why,
        };
        if self.format_version < 2 {
            return Err(bad("pieces need format_version 2".into()));
        }
        if o.pieces[0].offset != o.offset {
            return Err(bad(format!(
                "its first piece {} does not start at the object's offset",
                o.pieces[0]
            )));
        }
        if o.length == 0 || o.length > self.max_object || !o.length.is_multiple_of(SECTOR_SIZE) {
            return Err(bad(format!(
                "length {} must be a multiple of {SECTOR_SIZE} from {SECTOR_SIZE} to max_object {}",
                o.length, self.max_object
            )));
        }
        let mut sum = 0u64;
        let mut prev = None;
        for &p in &o.pieces {
            self.check_extent("object piece", p, Some(self.max_object))?;
            check_order("object piece", &mut prev, p)?;
            sum = sum.saturating_add(p.length);
        }
        if sum != o.length {
            return Err(bad(format!(
                "its pieces add up to {sum} bytes, not its length {}",
                o.length
            )));
        }
        Ok(())
    }

    fn check_extent(
        &self,
        what: &'static str,
        e: Extent,
        max_len: Option<u64>,
    ) -> Result<(), ManifestError> {
        if e.length == 0 {
            return Err(ManifestError::Empty { what, extent: e });
        }
        if !e.is_sector_aligned() {
            return Err(ManifestError::Unaligned { what, extent: e });
        }
        match e.checked_end() {
            Some(end) if end <= self.disk_size => {}
            _ => {
                return Err(ManifestError::PastEnd {
                    what,
                    extent: e,
                    disk_size: self.disk_size,
                })
            }
        }
        if let Some(max_object) = max_len {
            if e.length > max_object {
                return Err(ManifestError::TooLong {
                    what,
                    extent: e,
                    max_object,
                });
            }
        }
        Ok(())
    }

    /// Checks that this manifest is the one its key names.
    pub fn check_key(&self, key: &ObjectKey) -> Result<(), ManifestError> {
        if key.disk() != &self.disk || key.generation() != Some(self.generation) {
            return Err(ManifestError::KeyMismatch {
                expected: match key.generation() {
                    Some(g) => format!("{} generation {g}", key.disk()),
                    None => format!("{} (not a manifest key)", key.disk()),
                },
                found: format!("{} generation {}", self.disk, self.generation),
            });
        }
        Ok(())
    }

    /// Bytes of changed data the generation carries (decoded).
    pub fn data_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.length).sum()
    }

    /// Bytes the generation stores on S3.
    pub fn stored_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.stored_length).sum()
    }

    /// Bytes marked as zero (never uploaded).
    pub fn zero_bytes(&self) -> u64 {
        self.zero_ranges.iter().map(|z| z.length).sum()
    }
}

fn check_order(
    what: &'static str,
    prev: &mut Option<Extent>,
    next: Extent,
) -> Result<(), ManifestError> {
    if let Some(p) = *prev {
        if next.offset < p.end() {
            return Err(ManifestError::Overlap {
                what,
                previous: p,
                next,
            });
        }
    }
    *prev = Some(next);
    Ok(())
}

#[cfg(test)]
mod tests;
