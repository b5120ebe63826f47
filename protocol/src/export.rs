//! Export requests and results: how the DR Lambda asks the receiver for an
//! import-ready copy of a disk's image, and how the receiver answers.
//!
//! The request is an object under the disk's `x/{id}/` prefix, so it reaches the
//! receiver through the bucket's notification like any other key (and through listing, if
//! the event is lost). The receiver exports the image at exactly the requested applied
//! generation, never while a generation is being applied, to `x/{id}/image.raw`, and
//! writes `x/{id}/result.json` last. Both documents are untrusted input to their reader.

use crate::manifest::Sha256Hex;
use crate::names::Name;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const EXPORT_VERSION: u32 = 1;
/// Export documents are small; anything larger is refused unread.
pub const MAX_EXPORT_DOC_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// The raw disk, byte for byte (EC2 ImportImage format `RAW`).
    Raw,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    pub version: u32,
    pub id: Name,
    /// The applied generation to export: the receiver waits until it holds exactly this
    /// one, and refuses if it already holds a newer one.
    pub generation: u64,
    pub format: ExportFormat,
    /// The DR run that asked, for logs.
    pub run_id: Option<String>,
    pub requested_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportStatus {
    Done,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportResult {
    pub version: u32,
    pub id: Name,
    pub status: ExportStatus,
    /// The generation the image holds (for `done`, the requested one).
    pub generation: Option<u64>,
    /// For `done`: the image's key, size and SHA-256 of all its bytes.
    pub image_key: Option<String>,
    pub size: Option<u64>,
    pub sha256: Option<Sha256Hex>,
    /// For `done` by an export fanned out over invocations (snapshots mode), instead of
    /// `sha256`, which no one invocation sees: the SHA-256 of the parts' SHA-256s in part
    /// order, hex, `-{parts}` (S3's composite checksum form), parts of `part_size` bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_size: Option<u64>,
    /// For `failed`: what went wrong and what to do.
    pub reason: Option<String>,
    pub seconds: f64,
    pub finished_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportDocError {
    #[error("export document is {0} bytes, more than the {MAX_EXPORT_DOC_BYTES} allowed")]
    TooLarge(usize),
    #[error("export document is not valid JSON of version {EXPORT_VERSION}: {0}")]
    Json(String),
    #[error("export document version {0} is not supported (this build reads {EXPORT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("export document names id {found:?} but its key names {expected:?}")]
    IdMismatch { expected: String, found: String },
    #[error("export generation 0 does not exist; generations start at 1")]
    GenerationZero,
}

/// Parses a document (size-capped) and checks its version and id against its key's.
fn parse<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    id: &Name,
    head: impl Fn(&T) -> (u32, &Name),
) -> Result<T, ExportDocError> {
    if bytes.len() > MAX_EXPORT_DOC_BYTES {
        return Err(ExportDocError::TooLarge(bytes.len()));
    }
    let doc: T = serde_json::from_slice(bytes).map_err(|e| ExportDocError::Json(e.to_string()))?;
    let (version, found) = head(&doc);
    if version != EXPORT_VERSION {
        return Err(ExportDocError::UnsupportedVersion(version));
    }
    if found != id {
        return Err(ExportDocError::IdMismatch {
            expected: id.to_string(),
            found: found.to_string(),
        });
    }
    Ok(doc)
}

impl ExportRequest {
    /// Parses and checks a request read from the key naming `id`.
    pub fn from_json(bytes: &[u8], id: &Name) -> Result<Self, ExportDocError> {
        let r: Self = parse(bytes, id, |r: &Self| (r.version, &r.id))?;
        if r.generation == 0 {
            return Err(ExportDocError::GenerationZero);
        }
        Ok(r)
    }
}

impl ExportResult {
    /// The image of `generation` is at `image_key`: `size` bytes whose SHA-256 is `sha256`.
    pub fn done(
        id: &Name,
        generation: u64,
        image_key: String,
        size: u64,
        sha256: Sha256Hex,
        seconds: f64,
        finished_at: DateTime<Utc>,
    ) -> Self {
        ExportResult {
            version: EXPORT_VERSION,
            id: id.clone(),
            status: ExportStatus::Done,
            generation: Some(generation),
            image_key: Some(image_key),
            size: Some(size),
            sha256: Some(sha256),
            parts_sha256: None,
            part_size: None,
            reason: None,
            seconds,
            finished_at,
        }
    }

    /// Like [`Self::done`], for an image uploaded in parts by many invocations: its
    /// composite checksum `parts_sha256` over parts of `part_size` bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn done_in_parts(
        id: &Name,
        generation: u64,
        image_key: String,
        size: u64,
        parts_sha256: String,
        part_size: u64,
        seconds: f64,
        finished_at: DateTime<Utc>,
    ) -> Self {
        ExportResult {
            sha256: None,
            parts_sha256: Some(parts_sha256),
            part_size: Some(part_size),
            ..Self::done(
                id,
                generation,
                image_key,
                size,
                Sha256Hex([0; 32]),
                seconds,
                finished_at,
            )
        }
    }

    /// What the image's bytes are checked against: the whole image's SHA-256, or the
    /// composite of its parts' (`parts:` and the part size).
    pub fn checksum(&self) -> Option<String> {
        match (&self.sha256, &self.parts_sha256, self.part_size) {
            (Some(s), _, _) => Some(s.to_string()),
            (None, Some(c), Some(p)) => Some(format!("parts of {p} bytes: {c}")),
            _ => None,
        }
    }

    /// The export failed: `reason` says why and what to do.
    pub fn failed(
        id: &Name,
        generation: Option<u64>,
        reason: String,
        seconds: f64,
        finished_at: DateTime<Utc>,
    ) -> Self {
        ExportResult {
            version: EXPORT_VERSION,
            id: id.clone(),
            status: ExportStatus::Failed,
            generation,
            image_key: None,
            size: None,
            sha256: None,
            parts_sha256: None,
            part_size: None,
            reason: Some(reason),
            seconds,
            finished_at,
        }
    }

    /// Parses and checks a result read from the key naming `id`.
    pub fn from_json(bytes: &[u8], id: &Name) -> Result<Self, ExportDocError> {
        parse(bytes, id, |r: &Self| (r.version, &r.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> ExportRequest {
        ExportRequest {
            version: EXPORT_VERSION,
            id: Name::new("r1-disk0").unwrap(),
            generation: 3,
            format: ExportFormat::Raw,
            run_id: Some("r1".into()),
            requested_at: Utc::now(),
        }
    }

    #[test]
    fn request_round_trips() {
        let r = req();
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(ExportRequest::from_json(&json, &r.id).unwrap(), r);
    }

    #[test]
    fn bad_requests_are_refused() {
        let id = Name::new("r1-disk0").unwrap();
        let other = Name::new("other").unwrap();
        let ok = serde_json::to_value(req()).unwrap();
        let with = |k: &str, v: serde_json::Value| {
            let mut j = ok.clone();
            j[k] = v;
            serde_json::to_vec(&j).unwrap()
        };
        assert!(matches!(
            ExportRequest::from_json(&with("version", 2.into()), &id),
            Err(ExportDocError::UnsupportedVersion(2))
        ));
        assert!(matches!(
            ExportRequest::from_json(&with("generation", 0.into()), &id),
            Err(ExportDocError::GenerationZero)
        ));
        assert!(matches!(
            ExportRequest::from_json(&with("format", "vhd".into()), &id),
            Err(ExportDocError::Json(_))
        ));
        assert!(matches!(
            ExportRequest::from_json(&with("id", "../x".into()), &id),
            Err(ExportDocError::Json(_))
        ));
        assert!(matches!(
            ExportRequest::from_json(&with("extra", 1.into()), &id),
            Err(ExportDocError::Json(_))
        ));
        assert!(matches!(
            ExportRequest::from_json(&serde_json::to_vec(&req()).unwrap(), &other),
            Err(ExportDocError::IdMismatch { .. })
        ));
        assert!(matches!(
            ExportRequest::from_json(b"{not json", &id),
            Err(ExportDocError::Json(_))
        ));
        assert!(matches!(
            ExportRequest::from_json(&vec![b' '; MAX_EXPORT_DOC_BYTES + 1], &id),
            Err(ExportDocError::TooLarge(_))
        ));
    }
}
