//! Reading the bucket: a narrow trait, implemented for the AWS SDK's S3 client.

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use bytes::Bytes;
use std::future::Future;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("object s3://{bucket}/{key} does not exist (deleted, expired, or not uploaded yet)")]
    NotFound { bucket: String, key: String },
    #[error("object s3://{bucket}/{key} is {got} bytes, more than the {max} its manifest allows")]
    TooLarge {
        bucket: String,
        key: String,
        max: u64,
        got: u64,
    },
    #[error("reading s3://{bucket}/{key} failed: {detail}")]
    Other {
        bucket: String,
        key: String,
        detail: String,
    },
}

/// Reads whole objects and lists keys.
pub trait ObjectSource: Send + Sync {
    /// Fetches `key`, refusing (without reading it all) an object longer than `max_len`.
    fn get(
        &self,
        key: &str,
        max_len: u64,
    ) -> impl Future<Output = Result<Bytes, FetchError>> + Send;
    /// The keys under `prefix` that `keep` accepts, in order. Filtering page by page keeps
    /// memory to what is kept (manifests, say), not every data object in the bucket.
    fn list(
        &self,
        prefix: &str,
        keep: fn(&str) -> bool,
    ) -> impl Future<Output = Result<Vec<String>, FetchError>> + Send;
    fn bucket(&self) -> &str;
}

#[derive(Debug, Clone)]
pub struct S3Source {
    pub client: aws_sdk_s3::Client,
    pub bucket: String,
}

fn detail<E: std::error::Error + 'static, R: std::fmt::Debug>(e: &SdkError<E, R>) -> String {
    DisplayErrorContext(e)
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl ObjectSource for S3Source {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn get(&self, key: &str, max_len: u64) -> Result<Bytes, FetchError> {
        let other = |d: String| FetchError::Other {
            bucket: self.bucket.clone(),
            key: key.to_string(),
            detail: d,
        };
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) => {
                if e.as_service_error().and_then(|s| s.code()) == Some("NoSuchKey") {
                    return Err(FetchError::NotFound {
                        bucket: self.bucket.clone(),
                        key: key.to_string(),
                    });
                }
                return Err(other(detail(&e)));
            }
        };
        let too_large = |got: u64| FetchError::TooLarge {
            bucket: self.bucket.clone(),
            key: key.to_string(),
            max: max_len,
            got,
        };
        if let Some(len) = out.content_length {
            if len as u64 > max_len {
                return Err(too_large(len as u64));
            }
        }
        // Read at most max_len + 1 bytes, whatever the headers said.
        let mut body = out.body;
        // One allocation of the announced size, capped: no regrowth copies.
        let hint = out.content_length.unwrap_or(0).clamp(0, max_len as i64) as usize;
        let mut buf = bytes::BytesMut::with_capacity(hint);
        while let Some(chunk) = body.try_next().await.map_err(|e| other(e.to_string()))? {
            if (buf.len() + chunk.len()) as u64 > max_len {
                return Err(too_large((buf.len() + chunk.len()) as u64));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    async fn list(&self, prefix: &str, keep: fn(&str) -> bool) -> Result<Vec<String>, FetchError> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| FetchError::Other {
                bucket: self.bucket.clone(),
                key: prefix.to_string(),
                detail: detail(&e),
            })?;
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
}

/// Objects in memory: for unit and property tests of the apply logic.
#[derive(Debug, Default)]
pub struct MemorySource {
    pub objects: std::sync::Mutex<std::collections::BTreeMap<String, Bytes>>,
}

impl MemorySource {
    pub fn put(&self, key: &str, body: impl Into<Bytes>) {
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), body.into());
    }
}

impl ObjectSource for MemorySource {
    fn bucket(&self) -> &str {
        "memory"
    }

    async fn get(&self, key: &str, max_len: u64) -> Result<Bytes, FetchError> {
        let objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        let b = objects
            .get(key)
            .cloned()
            .ok_or_else(|| FetchError::NotFound {
                bucket: "memory".into(),
                key: key.into(),
            })?;
        if b.len() as u64 > max_len {
            return Err(FetchError::TooLarge {
                bucket: "memory".into(),
                key: key.into(),
                max: max_len,
                got: b.len() as u64,
            });
        }
        Ok(b)
    }

    async fn list(&self, prefix: &str, keep: fn(&str) -> bool) -> Result<Vec<String>, FetchError> {
        let objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        Ok(objects
            .keys()
            .filter(|k| k.starts_with(prefix) && keep(k))
            .cloned()
            .collect())
    }
}

/// Why a write to the bucket failed.
#[derive(Debug, thiserror::Error)]
#[error("writing s3://{bucket}/{key} failed ({op}): {detail}")]
pub struct PutError {
    pub bucket: String,
    pub key: String,
    pub op: &'static str,
    pub detail: String,
}

/// Writes objects, whole or in parts: what an export needs.
pub trait ObjectSink: Send + Sync {
    fn put(&self, key: &str, body: Bytes) -> impl Future<Output = Result<(), PutError>> + Send;
    /// Starts a multipart upload; returns its id.
    fn create_multipart(&self, key: &str) -> impl Future<Output = Result<String, PutError>> + Send;
    /// Uploads part `number` (from 1); returns its ETag.
    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> impl Future<Output = Result<String, PutError>> + Send;
    fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, String)>,
    ) -> impl Future<Output = Result<(), PutError>> + Send;
    fn abort_multipart(
        &self,
        key: &str,
        upload_id: &str,
    ) -> impl Future<Output = Result<(), PutError>> + Send;
}

impl S3Source {
    fn put_err<E: std::error::Error + 'static, R: std::fmt::Debug>(
        &self,
        key: &str,
        op: &'static str,
        e: &SdkError<E, R>,
    ) -> PutError {
        PutError {
            bucket: self.bucket.clone(),
            key: key.to_string(),
            op,
            detail: detail(e),
        }
    }
}

impl ObjectSink for S3Source {
    async fn put(&self, key: &str, body: Bytes) -> Result<(), PutError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(body.into())
            .send()
            .await
            .map_err(|e| self.put_err(key, "put", &e))?;
        Ok(())
    }

    async fn create_multipart(&self, key: &str) -> Result<String, PutError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.put_err(key, "create multipart upload", &e))?;
        out.upload_id.ok_or_else(|| PutError {
            bucket: self.bucket.clone(),
            key: key.to_string(),
            op: "create multipart upload",
            detail: "no upload id in the answer".into(),
        })
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<String, PutError> {
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
            .map_err(|e| self.put_err(key, "upload part", &e))?;
        Ok(out.e_tag.unwrap_or_default())
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, String)>,
    ) -> Result<(), PutError> {
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
            .map_err(|e| self.put_err(key, "complete multipart upload", &e))?;
        Ok(())
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), PutError> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| self.put_err(key, "abort multipart upload", &e))?;
        Ok(())
    }
}

/// Multipart uploads in progress in a [`MemorySource`]: (key, id) -> parts.
type Uploads = std::collections::BTreeMap<(String, String), std::collections::BTreeMap<i32, Bytes>>;

static MEMORY_UPLOADS: std::sync::Mutex<Uploads> = std::sync::Mutex::new(Uploads::new());

impl ObjectSink for MemorySource {
    async fn put(&self, key: &str, body: Bytes) -> Result<(), PutError> {
        MemorySource::put(self, key, body);
        Ok(())
    }

    async fn create_multipart(&self, key: &str) -> Result<String, PutError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string();
        MEMORY_UPLOADS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((key.to_string(), id.clone()), Default::default());
        Ok(id)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<String, PutError> {
        let mut up = MEMORY_UPLOADS.lock().unwrap_or_else(|p| p.into_inner());
        let parts = up
            .get_mut(&(key.to_string(), upload_id.to_string()))
            .ok_or_else(|| PutError {
                bucket: "memory".into(),
                key: key.into(),
                op: "upload part",
                detail: "no such upload".into(),
            })?;
        parts.insert(number, body);
        Ok(format!("etag-{number}"))
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, String)>,
    ) -> Result<(), PutError> {
        let stored = MEMORY_UPLOADS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(key.to_string(), upload_id.to_string()))
            .unwrap_or_default();
        let mut body = bytes::BytesMut::new();
        for (n, _) in &parts {
            if let Some(b) = stored.get(n) {
                body.extend_from_slice(b);
            }
        }
        MemorySource::put(self, key, body.freeze());
        Ok(())
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), PutError> {
        MEMORY_UPLOADS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(key.to_string(), upload_id.to_string()));
        Ok(())
    }
}
