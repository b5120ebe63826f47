//! Export requests (`x/{id}/request.json`, written by the DR function for the receiver)
//! and their results (`x/{id}/result.json`, written by the receiver), each at most
//! [`MAX_EXPORT_DOC_BYTES`] and naming its own id.

use crate::{put_json, DocError};
use pilotlight_cloud::{CloudError, ObjectStore};
use pilotlight_protocol::{
    DiskId, ExportRequest, ExportResult, Name, ObjectKey, Prefix, MAX_EXPORT_DOC_BYTES,
};

/// Why a document could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// It cannot be written as JSON: a bug; nothing was written.
    #[error("{what} cannot be written as JSON: {detail}")]
    Encode { what: &'static str, detail: String },
    /// The bucket refused or failed the PUT.
    #[error(transparent)]
    Put(#[from] CloudError),
}

pub fn request_key(prefix: &Prefix, disk: &DiskId, id: &Name) -> String {
    ObjectKey::ExportRequest {
        disk: disk.clone(),
        id: id.clone(),
    }
    .to_key(prefix)
}

pub fn result_key(prefix: &Prefix, disk: &DiskId, id: &Name) -> String {
    ObjectKey::ExportResult {
        disk: disk.clone(),
        id: id.clone(),
    }
    .to_key(prefix)
}

/// Where the receiver writes the exported image.
pub fn image_key(prefix: &Prefix, disk: &DiskId, id: &Name) -> String {
    ObjectKey::ExportImage {
        disk: disk.clone(),
        id: id.clone(),
    }
    .to_key(prefix)
}

pub async fn read_request<S: ObjectStore + ?Sized>(
    store: &S,
    prefix: &Prefix,
    disk: &DiskId,
    id: &Name,
) -> Result<ExportRequest, DocError> {
    let key = request_key(prefix, disk, id);
    crate::read(store, key, MAX_EXPORT_DOC_BYTES, "an export request", |b| {
        ExportRequest::from_json(b, id)
    })
    .await
}

pub async fn read_result<S: ObjectStore + ?Sized>(
    store: &S,
    prefix: &Prefix,
    disk: &DiskId,
    id: &Name,
) -> Result<ExportResult, DocError> {
    let key = result_key(prefix, disk, id);
    crate::read(store, key, MAX_EXPORT_DOC_BYTES, "an export result", |b| {
        ExportResult::from_json(b, id)
    })
    .await
}

/// Writes an export request; returns its key.
pub async fn write_request<S: ObjectStore + ?Sized>(
    store: &S,
    prefix: &Prefix,
    disk: &DiskId,
    req: &ExportRequest,
) -> Result<String, WriteError> {
    let key = request_key(prefix, disk, &req.id);
    put_json(store, &key, "the export request", req).await?;
    Ok(key)
}

/// Writes an export's outcome; returns its key.
pub async fn write_result<S: ObjectStore + ?Sized>(
    store: &S,
    prefix: &Prefix,
    disk: &DiskId,
    r: &ExportResult,
) -> Result<String, WriteError> {
    let key = result_key(prefix, disk, &r.id);
    put_json(store, &key, "the export result", r).await?;
    Ok(key)
}

#[cfg(test)]
mod tests;
