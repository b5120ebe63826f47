//! [`MemoryStore`]: a bucket in memory, with faults on demand.

use super::*;

/// A multipart upload in progress: its key and the parts uploaded so far.
/// The key and each part's bytes and ETag.
type Upload = (String, BTreeMap<i32, (Bytes, String)>);

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

    /// In 64 KiB chunks, as a body arrives from the network in pieces.
    async fn get_chunks<E: Send, F: FnMut(&[u8]) -> Result<(), E> + Send>(
        &self,
        key: &str,
        max_len: u64,
        mut sink: F,
    ) -> Result<u64, super::ChunksError<E>> {
        let b = self
            .get(key, max_len)
            .await
            .map_err(super::ChunksError::Read)?;
        for c in b.chunks(64 * 1024) {
            sink(c).map_err(super::ChunksError::Sink)?;
        }
        Ok(b.len() as u64)
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
        // refuses an object whose bytes do not match it (BadDigest). A discarding store
        // (`--dry-run`) keeps no bytes, so it neither checks nor fingerprints them: each
        // was another SHA-256 pass over every byte, a dry run hashed everything 3 times.
        if let Some(sum) = opts.sha256.filter(|_| !self.discard) {
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
        let body = if self.discard { Bytes::new() } else { body };
        let etag = Self::etag_of(&body);
        objects.insert(key.into(), body);
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
                // Each upload of a part gets its own ETag, as with SSE-KMS ("Objects
                // created ... encrypted by SSE-C or SSE-KMS, have ETags that are not an
                // MD5 digest of their object data", S3 API Reference, Object): the same
                // bytes uploaded twice are two ETags, and only the last one completes.
                let n = self.next_upload.fetch_add(1, Ordering::Relaxed);
                let mut salted = body.to_vec();
                salted.extend_from_slice(&n.to_le_bytes());
                let etag = Self::etag_of(&salted);
                parts.insert(number, (body, etag.clone()));
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
        // CompleteMultipartUpload API reference, errors: "InvalidPart: One or more of the
        // specified parts could not be found. The part might not have been uploaded, or
        // the specified ETag might not have matched the uploaded part's ETag";
        // "EntityTooSmall: ... Each part must be at least 5 MB in size, except the last
        // part."
        let mut body = bytes::BytesMut::new();
        for (i, (n, etag)) in parts.iter().enumerate() {
            let b = stored
                .get(n)
                .filter(|(_, e)| e == etag)
                .map(|(b, _)| b)
                .ok_or_else(|| {
                    self.err(
                        "CompleteMultipartUpload",
                        key,
                        ErrorKind::Invalid,
                        "InvalidPart",
                        "One or more of the specified parts could not be found, or its ETag did not match",
                    )
                })?;
            if i + 1 < parts.len() && b.len() < 5 << 20 {
                return Err(self.err(
                    "CompleteMultipartUpload",
                    key,
                    ErrorKind::Invalid,
                    "EntityTooSmall",
                    "Each part must be at least 5 MB in size, except the last part",
                ));
            }
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
