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
    /// Every key under `prefix`, in order.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, FetchError>> + Send;
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

    async fn list(&self, prefix: &str) -> Result<Vec<String>, FetchError> {
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
                    .filter_map(|o| o.key().map(String::from)),
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

    async fn list(&self, prefix: &str) -> Result<Vec<String>, FetchError> {
        let objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        Ok(objects
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }
}
