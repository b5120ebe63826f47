//! The documents pilotlight keeps, read and written in one place each: one key function,
//! one size cap, one parse-and-validate, as rustic's `repofile` does for its repository.
//!
//! - [`manifests`]: a disk's generation listing and its manifests (the sender numbering a
//!   generation, the receiver applying one, the DR function resolving a point);
//! - [`exports`]: export requests (DR → receiver) and their results (receiver → DR);
//! - [`failback`]: return snapshots (DR → sender) and failback rounds (sender → DR);
//! - [`objects`]: a data object's stored bytes checked against its manifest entry;
//! - [`upload`]: an image or a recovery point uploaded to the bucket, import-ready;
//! - [`points`]: recovery points, read from their EBS snapshots' tags (one query for the
//!   receiver, the DR function and both CLIs).
//!
//! Everything read here is untrusted: a document that is too large, does not parse, or
//! names another key is an `Invalid` error that says which key and why, never a panic.
//! The DR run records and the documents kept beside them (ready marks, VM settings) are
//! the DR function's own and live in its `runs` module.

pub mod exports;
pub mod failback;
pub mod manifests;
pub mod objects;
pub mod points;
pub mod upload;

use bytes::Bytes;
use exports::WriteError;
use pilotlight_cloud::{CloudError, ErrorKind, ObjectStore, PutOptions};

/// Why a document could not be had.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    /// The bucket did not answer as it should (throttling, 5xx, denied): the error's kind
    /// says whether trying again can help.
    #[error(transparent)]
    Read(CloudError),
    /// No object at the key (or a 403 that listing the key shows is one: see
    /// `ObjectStore::get_if_exists`).
    #[error("{key}: no such object")]
    Missing { key: String },
    /// An object is there but is not the document its key promises: too large, not JSON,
    /// invalid, or naming another disk, generation or id. It never becomes valid.
    #[error("{key}: {detail}")]
    Invalid { key: String, detail: String },
}

impl DocError {
    /// True when trying again later may succeed with nobody changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(self, DocError::Read(e) if e.is_transient())
    }
}

/// The document at `key`: at most `cap` bytes (`what` names it in the error), then
/// `parse` (parse and validate; its error is the `Invalid` detail).
async fn read<S: ObjectStore + ?Sized, T, E: std::fmt::Display>(
    store: &S,
    key: String,
    cap: usize,
    what: &str,
    parse: impl FnOnce(&[u8]) -> Result<T, E>,
) -> Result<T, DocError> {
    let bytes: Bytes = match store.get_if_exists(&key, cap as u64).await {
        Ok(Some(b)) => b,
        Ok(None) => return Err(DocError::Missing { key }),
        Err(e) if e.kind == ErrorKind::TooLarge => {
            return Err(DocError::Invalid {
                key,
                detail: format!("larger than {what} may be ({cap} bytes)"),
            })
        }
        Err(e) => return Err(DocError::Read(e)),
    };
    parse(&bytes).map_err(|e| DocError::Invalid {
        key,
        detail: e.to_string(),
    })
}

/// Writes a document as pretty JSON.
pub(crate) async fn put_json<S: ObjectStore + ?Sized, T: serde::Serialize>(
    store: &S,
    key: &str,
    what: &'static str,
    doc: &T,
) -> Result<(), WriteError> {
    let body = serde_json::to_vec_pretty(doc).map_err(|e| WriteError::Encode {
        what,
        detail: e.to_string(),
    })?;
    store.put(key, body.into(), PutOptions::json()).await?;
    Ok(())
}
