//! S3 as pilotlight uses it: one trait ([`ObjectStore`]), implemented for the AWS SDK's
//! client ([`SdkS3`], feature `s3`) and in memory ([`MemoryStore`], with faults).
//!
//! Every read is capped (`max_len`): objects, manifests and documents in the bucket are
//! untrusted, and an object larger than its reader allows is refused without reading it.

use crate::error::{CloudError, ErrorKind};
use crate::fault::{lock, Faults};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

mod memory;
pub use memory::MemoryStore;
#[cfg(test)]
mod tests;

/// How a PUT is made.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    /// SHA-256 of the body: sent as `x-amz-checksum-sha256`, so S3 verifies the bytes.
    pub sha256: Option<[u8; 32]>,
    /// `If-None-Match: *`: refuse (412, [`ErrorKind::PreconditionFailed`]) when the key
    /// exists, so nothing committed is overwritten.
    pub if_none_match: bool,
    /// `If-Match: <etag>`: write only over this version of the object (412 when it
    /// changed since it was read, [`ErrorKind::NotFound`] when it is gone), so two writers
    /// that read the same version cannot both write.
    pub if_match: Option<String>,
    pub content_type: Option<&'static str>,
}

/// Why [`ObjectStore::get_chunks`] stopped: the read failed, or the caller's sink did.
#[derive(Debug, thiserror::Error)]
pub enum ChunksError<E> {
    #[error(transparent)]
    Read(CloudError),
    #[error(transparent)]
    Sink(E),
}

/// An object and the ETag of the version read ([`ObjectStore::get_versioned`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub body: Bytes,
    pub etag: String,
}

impl PutOptions {
    pub fn checksum(sha256: [u8; 32]) -> Self {
        PutOptions {
            sha256: Some(sha256),
            ..Default::default()
        }
    }
    pub fn json() -> Self {
        PutOptions {
            content_type: Some("application/json"),
            ..Default::default()
        }
    }
    pub fn create_only(mut self) -> Self {
        self.if_none_match = true;
        self
    }
    pub fn replacing(mut self, etag: impl Into<String>) -> Self {
        self.if_match = Some(etag.into());
        self
    }
}

/// The bucket. Keys are full keys; the store is bound to one bucket.
pub trait ObjectStore: Send + Sync {
    fn bucket(&self) -> &str;

    /// The whole object; an object longer than `max_len` is refused
    /// ([`ErrorKind::TooLarge`]) without reading it all. A missing key is
    /// [`ErrorKind::NotFound`] (or `AccessDenied` from S3 to a caller without ListBucket).
    fn get(
        &self,
        key: &str,
        max_len: u64,
    ) -> impl Future<Output = Result<Bytes, CloudError>> + Send;

    /// The whole object handed to `sink` chunk by chunk as it arrives (memory: a chunk,
    /// not the object); more than `max_len` bytes is refused ([`ErrorKind::TooLarge`]).
    /// A sink error stops the read and is returned. Returns the bytes read.
    fn get_chunks<E: Send, F: FnMut(&[u8]) -> Result<(), E> + Send>(
        &self,
        key: &str,
        max_len: u64,
        sink: F,
    ) -> impl Future<Output = Result<u64, ChunksError<E>>> + Send {
        async move {
            let mut sink = sink;
            let b = self.get(key, max_len).await.map_err(ChunksError::Read)?;
            sink(&b).map_err(ChunksError::Sink)?;
            Ok(b.len() as u64)
        }
    }

    /// `len` bytes from `start` (fewer at the end of the object).
    fn get_range(
        &self,
        key: &str,
        start: u64,
        len: u64,
    ) -> impl Future<Output = Result<Bytes, CloudError>> + Send;

    /// The object's size, or `None` when there is none.
    fn head(&self, key: &str) -> impl Future<Output = Result<Option<u64>, CloudError>> + Send;

    /// The keys under `prefix` that `keep` accepts, in key order. Filtering page by page
    /// keeps memory to what is kept, not to every key in the bucket.
    fn list(
        &self,
        prefix: &str,
        keep: fn(&str) -> bool,
    ) -> impl Future<Output = Result<Vec<String>, CloudError>> + Send;

    /// Writes the object; returns the new version's ETag when the store gives one.
    fn put(
        &self,
        key: &str,
        body: Bytes,
        opts: PutOptions,
    ) -> impl Future<Output = Result<Option<String>, CloudError>> + Send;

    /// The object and its ETag, or `None` when it does not exist (see
    /// [`ObjectStore::get_if_exists`] for how "does not exist" is known).
    fn get_versioned(
        &self,
        key: &str,
        max_len: u64,
    ) -> impl Future<Output = Result<Option<Versioned>, CloudError>> + Send;

    fn delete(&self, key: &str) -> impl Future<Output = Result<(), CloudError>> + Send;

    /// Starts a multipart upload; returns its id.
    fn create_multipart(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;

    /// Uploads part `number` (from 1); returns its ETag.
    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;

    fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, String)>,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;

    fn abort_multipart(
        &self,
        key: &str,
        upload_id: &str,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;

    /// The object, or `None` when it does not exist. S3 answers a missing key with 403
    /// AccessDenied, not 404, to a caller without `s3:ListBucket` on the bucket (and a
    /// ListBucket grant conditioned on `s3:prefix` does not count: a GET carries no
    /// prefix). So a denial is checked by listing the key as a prefix, which such a grant
    /// allows: absent from the listing, the key does not exist; listed, the denial is
    /// real and returned.
    fn get_if_exists(
        &self,
        key: &str,
        max_len: u64,
    ) -> impl Future<Output = Result<Option<Bytes>, CloudError>> + Send {
        async move {
            match self.get(key, max_len).await {
                Ok(b) => Ok(Some(b)),
                Err(e) => absent(self, key, e).await.map(|()| None),
            }
        }
    }
}

/// `Ok(())` when the error a read of `key` met means the key does not exist: a 404, or a
/// 403 for a key that listing it as a prefix does not find (see
/// [`ObjectStore::get_if_exists`]); else the error. A listing that is denied too says
/// nothing: the first denial is returned, with what the caller needs to grant.
async fn absent<S: ObjectStore + ?Sized>(
    store: &S,
    key: &str,
    e: CloudError,
) -> Result<(), CloudError> {
    if e.is_not_found() {
        return Ok(());
    }
    if e.kind != ErrorKind::AccessDenied {
        return Err(e);
    }
    match store.list(key, |_| true).await {
        Ok(keys) if keys.iter().any(|k| k == key) => Err(e),
        Ok(_) => Ok(()),
        Err(l) if l.kind == ErrorKind::AccessDenied => {
            let detail = format!(
                "{}; and listing it was denied too: grant s3:ListBucket on the bucket for this prefix, so a missing key can be told from a denied one",
                e.detail
            );
            Err(e.with_detail(detail))
        }
        Err(l) => Err(l),
    }
}

macro_rules! forward_store {
    ($($t:tt)*) => {
        impl<T: ObjectStore + ?Sized> ObjectStore for $($t)* {
            fn bucket(&self) -> &str { (**self).bucket() }
            fn get(&self, key: &str, max_len: u64) -> impl Future<Output = Result<Bytes, CloudError>> + Send { (**self).get(key, max_len) }
            fn get_range(&self, key: &str, start: u64, len: u64) -> impl Future<Output = Result<Bytes, CloudError>> + Send { (**self).get_range(key, start, len) }
            fn get_chunks<E: Send, F: FnMut(&[u8]) -> Result<(), E> + Send>(&self, key: &str, max_len: u64, sink: F) -> impl Future<Output = Result<u64, ChunksError<E>>> + Send { (**self).get_chunks(key, max_len, sink) }
            fn head(&self, key: &str) -> impl Future<Output = Result<Option<u64>, CloudError>> + Send { (**self).head(key) }
            fn list(&self, prefix: &str, keep: fn(&str) -> bool) -> impl Future<Output = Result<Vec<String>, CloudError>> + Send { (**self).list(prefix, keep) }
            fn put(&self, key: &str, body: Bytes, opts: PutOptions) -> impl Future<Output = Result<Option<String>, CloudError>> + Send { (**self).put(key, body, opts) }
            fn get_versioned(&self, key: &str, max_len: u64) -> impl Future<Output = Result<Option<Versioned>, CloudError>> + Send { (**self).get_versioned(key, max_len) }
            fn delete(&self, key: &str) -> impl Future<Output = Result<(), CloudError>> + Send { (**self).delete(key) }
            fn create_multipart(&self, key: &str) -> impl Future<Output = Result<String, CloudError>> + Send { (**self).create_multipart(key) }
            fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Bytes) -> impl Future<Output = Result<String, CloudError>> + Send { (**self).upload_part(key, upload_id, number, body) }
            fn complete_multipart(&self, key: &str, upload_id: &str, parts: Vec<(i32, String)>) -> impl Future<Output = Result<(), CloudError>> + Send { (**self).complete_multipart(key, upload_id, parts) }
            fn abort_multipart(&self, key: &str, upload_id: &str) -> impl Future<Output = Result<(), CloudError>> + Send { (**self).abort_multipart(key, upload_id) }
        }
    };
}
forward_store!(&T);
forward_store!(Arc<T>);

fn s3_resource(bucket: &str, key: &str) -> String {
    format!("s3://{bucket}/{key}")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn too_large(bucket: &str, key: &str, max: u64, got: u64) -> CloudError {
    CloudError::new(
        "S3",
        "GetObject",
        s3_resource(bucket, key),
        ErrorKind::TooLarge,
        format!("{got} bytes, more than the {max} its reader allows"),
    )
}

#[cfg(feature = "s3")]
pub use sdk::SdkS3;
#[cfg(feature = "s3")]
mod sdk;
