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

/// A multipart upload in progress: its key and the parts uploaded so far.
type Upload = (String, BTreeMap<i32, Bytes>);

/// A bucket in memory, behaving as S3 does where pilotlight depends on it: capped reads,
/// `If-None-Match: *`, multipart uploads (parts assembled in the order given, unknown
/// upload ids refused), and faults on demand. `discard` keeps keys only (`--dry-run`).
#[derive(Debug)]
pub struct MemoryStore {
    bucket: String,
    objects: Mutex<BTreeMap<String, Bytes>>,
    uploads: Mutex<BTreeMap<String, Upload>>,
    next_upload: AtomicU64,
    discard: bool,
    /// Answer a missing key as S3 does to a caller without `s3:ListBucket`.
    missing_is_denied: std::sync::atomic::AtomicBool,
    pub faults: Faults,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new("memory")
    }
}

impl MemoryStore {
    pub fn new(bucket: &str) -> Self {
        MemoryStore {
            bucket: bucket.into(),
            objects: Mutex::new(BTreeMap::new()),
            uploads: Mutex::new(BTreeMap::new()),
            next_upload: AtomicU64::new(1),
            discard: false,
            missing_is_denied: std::sync::atomic::AtomicBool::new(false),
            faults: Faults::default(),
        }
    }

    /// A store that accepts every write and keeps nothing (`--dry-run`).
    pub fn discarding() -> Self {
        MemoryStore {
            discard: true,
            ..MemoryStore::new("dry-run")
        }
    }

    /// From now on, a GET or HEAD of a missing key is 403 AccessDenied, as S3 answers a
    /// caller without `s3:ListBucket` (listing still works: the prefix-conditioned grant
    /// pilotlight's roles have).
    pub fn deny_missing_keys(&self, on: bool) {
        self.missing_is_denied.store(on, Ordering::Relaxed);
    }

    /// The ETag this store gives an object's bytes (S3's is their MD5 for a single PUT;
    /// here a SHA-256 prefix: equally a function of the bytes).
    pub fn etag_of(body: &[u8]) -> String {
        use sha2::Digest;
        format!("\"{}\"", hex(&sha2::Sha256::digest(body)[..16]))
    }

    /// Writes an object directly (test setup; no faults, no conditions).
    pub fn insert(&self, key: &str, body: impl Into<Bytes>) {
        lock(&self.objects).insert(key.into(), body.into());
    }

    pub fn remove(&self, key: &str) -> Option<Bytes> {
        lock(&self.objects).remove(key)
    }

    pub fn object(&self, key: &str) -> Option<Bytes> {
        lock(&self.objects).get(key).cloned()
    }

    /// Every object (test assertions).
    pub fn objects(&self) -> BTreeMap<String, Bytes> {
        lock(&self.objects).clone()
    }

    pub fn keys(&self) -> Vec<String> {
        lock(&self.objects).keys().cloned().collect()
    }

    /// Multipart uploads started and neither completed nor aborted.
    pub fn open_uploads(&self) -> usize {
        lock(&self.uploads).len()
    }

    fn check(&self, op: &'static str, key: &str) -> Result<(), CloudError> {
        self.faults.check("S3", op, &s3_resource(&self.bucket, key))
    }

    fn err(
        &self,
        op: &'static str,
        key: &str,
        kind: ErrorKind,
        code: &str,
        detail: &str,
    ) -> CloudError {
        CloudError::new("S3", op, s3_resource(&self.bucket, key), kind, detail).with_code(code)
    }

    /// What a read of a missing key gets: 404, or 403 in `deny_missing_keys` mode. S3 API
    /// reference, GetObject, Permissions: "If you have the s3:ListBucket permission on
    /// the bucket, Amazon S3 returns an HTTP status code 404 Not Found error. If you
    /// don't have the s3:ListBucket permission, Amazon S3 returns an HTTP status code 403
    /// Access Denied error."
    fn not_found(&self, op: &'static str, key: &str) -> CloudError {
        if self.missing_is_denied.load(Ordering::Relaxed) {
            return self.err(
                op,
                key,
                ErrorKind::AccessDenied,
                "AccessDenied",
                "Access Denied",
            );
        }
        self.no_such_key(op, key)
    }

    fn no_such_key(&self, op: &'static str, key: &str) -> CloudError {
        self.err(
            op,
            key,
            ErrorKind::NotFound,
            "NoSuchKey",
            "The specified key does not exist.",
        )
    }
}

impl ObjectStore for MemoryStore {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn get(&self, key: &str, max_len: u64) -> Result<Bytes, CloudError> {
        self.check("GetObject", key)?;
        let b = self
            .object(key)
            .ok_or_else(|| self.not_found("GetObject", key))?;
        if b.len() as u64 > max_len {
            return Err(too_large(&self.bucket, key, max_len, b.len() as u64));
        }
        Ok(b)
    }

    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes, CloudError> {
        self.check("GetObject", key)?;
        let b = self
            .object(key)
            .ok_or_else(|| self.not_found("GetObject", key))?;
        if start >= b.len() as u64 && !(start == 0 && b.is_empty()) {
            return Err(self.err(
                "GetObject",
                key,
                ErrorKind::Invalid,
                "InvalidRange",
                "The requested range is not satisfiable",
            ));
        }
        let end = start.saturating_add(len).min(b.len() as u64);
        Ok(b.slice(start as usize..end as usize))
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, CloudError> {
        self.check("HeadObject", key)?;
        match self.object(key) {
            Some(b) => Ok(Some(b.len() as u64)),
            None if self.missing_is_denied.load(Ordering::Relaxed) => {
                Err(self.not_found("HeadObject", key))
            }
            None => Ok(None),
        }
    }

    async fn get_versioned(
        &self,
        key: &str,
        max_len: u64,
    ) -> Result<Option<Versioned>, CloudError> {
        Ok(self
            .get_if_exists(key, max_len)
            .await?
            .map(|body| Versioned {
                etag: Self::etag_of(&body),
                body,
            }))
    }

    async fn list(&self, prefix: &str, keep: fn(&str) -> bool) -> Result<Vec<String>, CloudError> {
        self.check("ListObjectsV2", prefix)?;
        Ok(lock(&self.objects)
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| keep(k))
            .map(|(k, _)| k.clone())
            .collect())
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        opts: PutOptions,
    ) -> Result<Option<String>, CloudError> {
        self.check("PutObject", key)?;
        // PutObject API reference, x-amz-checksum-sha256: the object's checksum; S3
        // refuses an object whose bytes do not match it (BadDigest).
        if let Some(sum) = opts.sha256 {
            use sha2::Digest;
            if <[u8; 32]>::from(sha2::Sha256::digest(&body)) != sum {
                return Err(self.err(
                    "PutObject",
                    key,
                    ErrorKind::Invalid,
                    "BadDigest",
                    "The SHA256 you specified did not match the calculated checksum.",
                ));
            }
        }
        let mut objects = lock(&self.objects);
        let precondition_failed = || {
            self.err(
                "PutObject",
                key,
                ErrorKind::PreconditionFailed,
                "PreconditionFailed",
                "At least one of the pre-conditions you specified did not hold",
            )
        };
        // PutObject API reference, If-None-Match: "Uploads the object only if the object
        // key name does not already exist in the bucket specified. Otherwise, Amazon S3
        // returns a 412 Precondition Failed error."
        if opts.if_none_match && objects.contains_key(key) {
            return Err(precondition_failed());
        }
        if let Some(want) = &opts.if_match {
            // PutObject API reference, If-Match: "Uploads the object only if the ETag
            // (entity tag) value provided during the WRITE operation matches the ETag of
            // the object in S3. If the ETag values do not match, the operation returns a
            // 412 Precondition Failed error. If a conflicting operation occurs during the
            // upload S3 returns a 409 ConditionalRequestConflict response." A missing
            // key: 404 NoSuchKey (S3 User Guide, "Conditional writes").
            match objects.get(key) {
                None => return Err(self.no_such_key("PutObject", key)),
                Some(b) if Self::etag_of(b) != *want => return Err(precondition_failed()),
                Some(_) => {}
            }
        }
        let etag = Self::etag_of(&body);
        objects.insert(key.into(), if self.discard { Bytes::new() } else { body });
        Ok(Some(etag))
    }

    async fn delete(&self, key: &str) -> Result<(), CloudError> {
        self.check("DeleteObject", key)?;
        lock(&self.objects).remove(key);
        Ok(())
    }

    async fn create_multipart(&self, key: &str) -> Result<String, CloudError> {
        self.check("CreateMultipartUpload", key)?;
        let id = format!(
            "upload-{}",
            self.next_upload.fetch_add(1, Ordering::Relaxed)
        );
        lock(&self.uploads).insert(id.clone(), (key.into(), BTreeMap::new()));
        Ok(id)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<String, CloudError> {
        self.check("UploadPart", key)?;
        if !(1..=10_000).contains(&number) {
            return Err(self.err(
                "UploadPart",
                key,
                ErrorKind::Invalid,
                "InvalidArgument",
                "Part number must be an integer between 1 and 10000",
            ));
        }
        let mut up = lock(&self.uploads);
        match up.get_mut(upload_id) {
            Some((k, parts)) if k == key => {
                let etag = Self::etag_of(&body);
                parts.insert(number, body);
                Ok(etag)
            }
            _ => Err(self.err(
                "UploadPart",
                key,
                ErrorKind::NotFound,
                "NoSuchUpload",
                "The specified upload does not exist",
            )),
        }
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, String)>,
    ) -> Result<(), CloudError> {
        self.check("CompleteMultipartUpload", key)?;
        let mut up = lock(&self.uploads);
        let Some((k, stored)) = up.get(upload_id) else {
            return Err(self.err(
                "CompleteMultipartUpload",
                key,
                ErrorKind::NotFound,
                "NoSuchUpload",
                "The specified upload does not exist",
            ));
        };
        if k != key {
            return Err(self.err(
                "CompleteMultipartUpload",
                key,
                ErrorKind::NotFound,
                "NoSuchUpload",
                "The specified upload does not exist",
            ));
        }
        if parts.is_empty() || parts.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(self.err(
                "CompleteMultipartUpload",
                key,
                ErrorKind::Invalid,
                "InvalidPartOrder",
                "The list of parts was not in ascending order",
            ));
        }
        let mut body = bytes::BytesMut::new();
        for (n, _) in &parts {
            let b = stored.get(n).ok_or_else(|| {
                self.err(
                    "CompleteMultipartUpload",
                    key,
                    ErrorKind::Invalid,
                    "InvalidPart",
                    "One or more of the specified parts could not be found",
                )
            })?;
            body.extend_from_slice(b);
        }
        up.remove(upload_id);
        drop(up);
        lock(&self.objects).insert(
            key.into(),
            if self.discard {
                Bytes::new()
            } else {
                body.freeze()
            },
        );
        Ok(())
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), CloudError> {
        self.check("AbortMultipartUpload", key)?;
        lock(&self.uploads).remove(upload_id);
        Ok(())
    }
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
mod sdk {
    use super::*;
    use crate::error::from_sdk;
    use aws_sdk_s3::primitives::ByteStream;
    use base64::Engine;

    /// S3 through the AWS SDK for Rust, bound to one bucket.
    #[derive(Debug, Clone)]
    pub struct SdkS3 {
        pub client: aws_sdk_s3::Client,
        pub bucket: String,
        /// Where requests go, named in "cannot reach" errors.
        pub endpoint: String,
    }

    impl SdkS3 {
        pub fn new(client: aws_sdk_s3::Client, bucket: impl Into<String>) -> Self {
            SdkS3 {
                client,
                bucket: bucket.into(),
                endpoint: "AWS S3".into(),
            }
        }

        pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
            self.endpoint = endpoint.into();
            self
        }

        fn err<E>(
            &self,
            op: &'static str,
            key: &str,
            e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
        ) -> CloudError
        where
            E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
        {
            let mut e = from_sdk("S3", op, s3_resource(&self.bucket, key), e);
            if e.kind == ErrorKind::Unreachable {
                e.detail = format!("{}: {}", self.endpoint, e.detail);
            }
            e
        }

        /// Reads a body, refusing more than `max_len` bytes whatever the headers said.
        async fn read_capped(
            &self,
            key: &str,
            out: aws_sdk_s3::operation::get_object::GetObjectOutput,
            max_len: u64,
        ) -> Result<Bytes, CloudError> {
            if let Some(len) = out.content_length {
                if len as u64 > max_len {
                    return Err(too_large(&self.bucket, key, max_len, len as u64));
                }
            }
            let hint = out.content_length.unwrap_or(0).clamp(0, max_len as i64) as usize;
            let mut buf = bytes::BytesMut::with_capacity(hint);
            let mut body = out.body;
            while let Some(chunk) = body.try_next().await.map_err(|e| {
                CloudError::new(
                    "S3",
                    "GetObject",
                    s3_resource(&self.bucket, key),
                    ErrorKind::Unreachable,
                    format!("reading the body: {e}"),
                )
            })? {
                if (buf.len() + chunk.len()) as u64 > max_len {
                    return Err(too_large(
                        &self.bucket,
                        key,
                        max_len,
                        (buf.len() + chunk.len()) as u64,
                    ));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(buf.freeze())
        }
    }

    impl ObjectStore for SdkS3 {
        fn bucket(&self) -> &str {
            &self.bucket
        }

        async fn get(&self, key: &str, max_len: u64) -> Result<Bytes, CloudError> {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| self.err("GetObject", key, &e))?;
            self.read_capped(key, out, max_len).await
        }

        async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes, CloudError> {
            if len == 0 {
                return Ok(Bytes::new());
            }
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .range(format!("bytes={start}-{}", start.saturating_add(len - 1)))
                .send()
                .await
                .map_err(|e| self.err("GetObject", key, &e))?;
            self.read_capped(key, out, len).await
        }

        async fn head(&self, key: &str) -> Result<Option<u64>, CloudError> {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(o) => Ok(Some(o.content_length.unwrap_or(0).max(0) as u64)),
                Err(e) => super::absent(self, key, self.err("HeadObject", key, &e))
                    .await
                    .map(|()| None),
            }
        }

        async fn list(
            &self,
            prefix: &str,
            keep: fn(&str) -> bool,
        ) -> Result<Vec<String>, CloudError> {
            let mut out = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| self.err("ListObjectsV2", prefix, &e))?;
                out.extend(
                    page.contents()
                        .iter()
                        .filter_map(|o| o.key())
                        .filter(|k| keep(k))
                        .map(String::from),
                );
            }
            Ok(out)
        }

        async fn put(
            &self,
            key: &str,
            body: Bytes,
            opts: PutOptions,
        ) -> Result<Option<String>, CloudError> {
            let mut req = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_length(body.len() as i64);
            if let Some(sum) = opts.sha256 {
                req = req.checksum_sha256(base64::engine::general_purpose::STANDARD.encode(sum));
            }
            if opts.if_none_match {
                req = req.if_none_match("*");
            }
            if let Some(etag) = opts.if_match {
                req = req.if_match(etag);
            }
            if let Some(ct) = opts.content_type {
                req = req.content_type(ct);
            }
            let out = req
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| self.err("PutObject", key, &e))?;
            Ok(out.e_tag)
        }

        async fn get_versioned(
            &self,
            key: &str,
            max_len: u64,
        ) -> Result<Option<Versioned>, CloudError> {
            let out = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) => {
                    return super::absent(self, key, self.err("GetObject", key, &e))
                        .await
                        .map(|()| None)
                }
            };
            let etag = out.e_tag.clone().unwrap_or_default();
            let body = self.read_capped(key, out, max_len).await?;
            Ok(Some(Versioned { body, etag }))
        }

        async fn delete(&self, key: &str) -> Result<(), CloudError> {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| self.err("DeleteObject", key, &e))?;
            Ok(())
        }

        async fn create_multipart(&self, key: &str) -> Result<String, CloudError> {
            let out = self
                .client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| self.err("CreateMultipartUpload", key, &e))?;
            out.upload_id.ok_or_else(|| {
                CloudError::new(
                    "S3",
                    "CreateMultipartUpload",
                    s3_resource(&self.bucket, key),
                    ErrorKind::Invalid,
                    "no upload id in the answer",
                )
            })
        }

        async fn upload_part(
            &self,
            key: &str,
            upload_id: &str,
            number: i32,
            body: Bytes,
        ) -> Result<String, CloudError> {
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(body.into())
                .send()
                .await
                .map_err(|e| self.err("UploadPart", key, &e))?;
            Ok(out.e_tag.unwrap_or_default())
        }

        async fn complete_multipart(
            &self,
            key: &str,
            upload_id: &str,
            parts: Vec<(i32, String)>,
        ) -> Result<(), CloudError> {
            use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
            let parts = parts
                .into_iter()
                .map(|(n, etag)| CompletedPart::builder().part_number(n).e_tag(etag).build())
                .collect();
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| self.err("CompleteMultipartUpload", key, &e))?;
            Ok(())
        }

        async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), CloudError> {
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .send()
                .await
                .map_err(|e| self.err("AbortMultipartUpload", key, &e))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::Fault;
    use futures::executor::block_on;

    #[test]
    fn memory_store_behaves_like_s3() {
        let s = MemoryStore::new("b");
        block_on(async {
            s.put("a/1", Bytes::from_static(b"hello"), PutOptions::default())
                .await
                .unwrap();
            assert_eq!(s.get("a/1", 5).await.unwrap(), Bytes::from_static(b"hello"));
            assert_eq!(s.get("a/1", 4).await.unwrap_err().kind, ErrorKind::TooLarge);
            assert_eq!(s.get("a/2", 9).await.unwrap_err().kind, ErrorKind::NotFound);
            assert_eq!(s.get_if_exists("a/2", 9).await.unwrap(), None);
            assert_eq!(
                s.get_range("a/1", 1, 3).await.unwrap(),
                Bytes::from_static(b"ell")
            );
            assert_eq!(
                s.get_range("a/1", 3, 10).await.unwrap(),
                Bytes::from_static(b"lo")
            );
            assert_eq!(s.head("a/1").await.unwrap(), Some(5));
            assert_eq!(s.head("a/2").await.unwrap(), None);
            // If-None-Match: *
            let e = s
                .put(
                    "a/1",
                    Bytes::from_static(b"x"),
                    PutOptions::default().create_only(),
                )
                .await
                .unwrap_err();
            assert_eq!(e.kind, ErrorKind::PreconditionFailed);
            assert_eq!(s.object("a/1").unwrap(), Bytes::from_static(b"hello"));
            // A wrong checksum is refused, as S3 does (BadDigest).
            let e = s
                .put(
                    "a/3",
                    Bytes::from_static(b"x"),
                    PutOptions::checksum([0; 32]),
                )
                .await
                .unwrap_err();
            assert_eq!(e.code.as_deref(), Some("BadDigest"));
            s.insert("a/d/2", b"d".to_vec());
            s.insert("b/1", b"d".to_vec());
            assert_eq!(s.list("a/", |_| true).await.unwrap(), vec!["a/1", "a/d/2"]);
            assert_eq!(
                s.list("a/", |k| !k.contains("/d/")).await.unwrap(),
                vec!["a/1"]
            );
            // Multipart: parts in order, an unknown upload refused.
            let id = s.create_multipart("big").await.unwrap();
            let e2 = s
                .upload_part("big", &id, 2, Bytes::from_static(b"world"))
                .await
                .unwrap();
            let e1 = s
                .upload_part("big", &id, 1, Bytes::from_static(b"hello "))
                .await
                .unwrap();
            assert_eq!(s.open_uploads(), 1);
            s.complete_multipart("big", &id, vec![(1, e1), (2, e2)])
                .await
                .unwrap();
            assert_eq!(s.object("big").unwrap(), Bytes::from_static(b"hello world"));
            assert_eq!(s.open_uploads(), 0);
            let e = s
                .upload_part("big", &id, 3, Bytes::new())
                .await
                .unwrap_err();
            assert_eq!(e.kind, ErrorKind::NotFound);
            s.delete("big").await.unwrap();
            assert_eq!(s.head("big").await.unwrap(), None);
        });
    }

    #[test]
    fn faults_fail_the_chosen_calls() {
        let s = MemoryStore::new("b");
        s.insert("g/manifest.json", b"{}".to_vec());
        s.faults.add(
            Fault::on("GetObject")
                .resource_contains("manifest.json")
                .times(2)
                .throttle(),
        );
        block_on(async {
            let e = s.get("g/manifest.json", 10).await.unwrap_err();
            assert!(e.is_transient(), "{e}");
            assert!(s.get("g/manifest.json", 10).await.is_err());
            assert!(s.get("g/manifest.json", 10).await.is_ok());
        });
        assert_eq!(s.faults.calls("GetObject"), 3);
    }

    #[test]
    fn conditional_writes_let_one_of_two_writers_of_a_version_win() {
        let s = MemoryStore::new("b");
        block_on(async {
            let v1 = s
                .put(
                    "r",
                    Bytes::from_static(b"v1"),
                    PutOptions::default().create_only(),
                )
                .await
                .unwrap()
                .unwrap();
            let read = s.get_versioned("r", 9).await.unwrap().unwrap();
            assert_eq!(read.etag, v1);
            // Two writers read v1; the first wins, the second is refused (412).
            s.put(
                "r",
                Bytes::from_static(b"a"),
                PutOptions::default().replacing(&v1),
            )
            .await
            .unwrap();
            let e = s
                .put(
                    "r",
                    Bytes::from_static(b"b"),
                    PutOptions::default().replacing(&v1),
                )
                .await
                .unwrap_err();
            assert_eq!(e.kind, ErrorKind::PreconditionFailed);
            assert_eq!(s.object("r").unwrap(), Bytes::from_static(b"a"));
            // If-Match on a missing key: 404, as S3.
            let e = s
                .put(
                    "gone",
                    Bytes::from_static(b"x"),
                    PutOptions::default().replacing(&v1),
                )
                .await
                .unwrap_err();
            assert!(e.is_not_found(), "{e}");
            assert_eq!(s.get_versioned("gone", 9).await.unwrap(), None);
        });
    }

    #[test]
    fn a_403_for_a_missing_key_is_told_from_a_real_denial_by_listing() {
        let s = MemoryStore::new("b");
        s.insert("p/here", Bytes::from_static(b"x"));
        s.deny_missing_keys(true);
        block_on(async {
            // Missing: S3 says 403 to a caller without ListBucket; the listing says absent.
            assert_eq!(
                s.get("p/missing", 9).await.unwrap_err().kind,
                ErrorKind::AccessDenied
            );
            assert_eq!(s.get_if_exists("p/missing", 9).await.unwrap(), None);
            assert_eq!(s.get_versioned("p/missing", 9).await.unwrap(), None);
            // A key that is listed but denied is a real denial (a planted one here).
            s.faults.add(
                Fault::on("GetObject")
                    .resource_contains("p/here")
                    .kind(ErrorKind::AccessDenied, Some("AccessDenied")),
            );
            let e = s.get_if_exists("p/here", 9).await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::AccessDenied);
            // Listing denied too: an error that says what to grant, never "absent".
            s.faults.add(
                Fault::on("ListObjectsV2")
                    .always()
                    .kind(ErrorKind::AccessDenied, Some("AccessDenied")),
            );
            let e = s.get_if_exists("p/missing", 9).await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::AccessDenied);
            assert!(e.to_string().contains("s3:ListBucket"), "{e}");
        });
    }

    #[test]
    fn discarding_store_keeps_no_bytes() {
        let s = MemoryStore::discarding();
        block_on(s.put("k", Bytes::from(vec![1u8; 1 << 20]), PutOptions::default())).unwrap();
        assert_eq!(s.object("k").unwrap().len(), 0);
    }
}

#[cfg(feature = "s3")]
pub use lazy::LazyS3;

#[cfg(feature = "s3")]
mod lazy {
    use super::*;
    use crate::config::AwsSettings;

    /// [`SdkS3`], configured on first use: a command that fails on its own input (a
    /// missing file, a bad flag) never resolves a region or credentials first.
    #[derive(Debug)]
    pub struct LazyS3 {
        settings: AwsSettings,
        bucket: String,
        cell: tokio::sync::OnceCell<SdkS3>,
    }

    impl LazyS3 {
        pub fn new(settings: AwsSettings, bucket: impl Into<String>) -> Self {
            LazyS3 {
                settings,
                bucket: bucket.into(),
                cell: tokio::sync::OnceCell::new(),
            }
        }

        pub async fn get(&self) -> &SdkS3 {
            self.cell
                .get_or_init(|| async { self.settings.load().await.s3(self.bucket.clone()) })
                .await
        }
    }

    impl ObjectStore for LazyS3 {
        fn bucket(&self) -> &str {
            &self.bucket
        }
        async fn get(&self, key: &str, max_len: u64) -> Result<Bytes, CloudError> {
            ObjectStore::get(self.get().await, key, max_len).await
        }
        async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes, CloudError> {
            self.get().await.get_range(key, start, len).await
        }
        async fn head(&self, key: &str) -> Result<Option<u64>, CloudError> {
            self.get().await.head(key).await
        }
        async fn list(
            &self,
            prefix: &str,
            keep: fn(&str) -> bool,
        ) -> Result<Vec<String>, CloudError> {
            self.get().await.list(prefix, keep).await
        }
        async fn put(
            &self,
            key: &str,
            body: Bytes,
            opts: PutOptions,
        ) -> Result<Option<String>, CloudError> {
            self.get().await.put(key, body, opts).await
        }
        async fn get_versioned(
            &self,
            key: &str,
            max_len: u64,
        ) -> Result<Option<Versioned>, CloudError> {
            self.get().await.get_versioned(key, max_len).await
        }
        async fn delete(&self, key: &str) -> Result<(), CloudError> {
            self.get().await.delete(key).await
        }
        async fn create_multipart(&self, key: &str) -> Result<String, CloudError> {
            self.get().await.create_multipart(key).await
        }
        async fn upload_part(
            &self,
            key: &str,
            upload_id: &str,
            number: i32,
            body: Bytes,
        ) -> Result<String, CloudError> {
            self.get()
                .await
                .upload_part(key, upload_id, number, body)
                .await
        }
        async fn complete_multipart(
            &self,
            key: &str,
            upload_id: &str,
            parts: Vec<(i32, String)>,
        ) -> Result<(), CloudError> {
            self.get()
                .await
                .complete_multipart(key, upload_id, parts)
                .await
        }
        async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), CloudError> {
            self.get().await.abort_multipart(key, upload_id).await
        }
    }
}
