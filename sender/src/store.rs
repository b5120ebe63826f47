//! Where objects go: a narrow trait, implemented for the AWS SDK's S3 client.

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use base64::Engine;
use bytes::Bytes;
use std::future::Future;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bucket {bucket:?} does not exist (NoSuchBucket): create it, or check --bucket and --region")]
    NoSuchBucket { bucket: String },
    #[error("access denied writing s3://{bucket}/{key}: check the sender's IAM policy allows s3:PutObject under its prefix ({detail})")]
    AccessDenied {
        bucket: String,
        key: String,
        detail: String,
    },
    #[error("cannot reach the S3 endpoint {endpoint} writing {key}: {detail}; check --endpoint-url and the network")]
    Unreachable {
        endpoint: String,
        key: String,
        detail: String,
    },
    #[error("upload of s3://{bucket}/{key} failed: {detail}")]
    Other {
        bucket: String,
        key: String,
        detail: String,
    },
}

/// Writes whole objects. `sha256` is of `body`; the store sends it so the server verifies
/// the bytes in transit.
pub trait ObjectStore: Send + Sync {
    fn put(
        &self,
        key: &str,
        body: Bytes,
        sha256: [u8; 32],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// S3 through the AWS SDK for Rust.
#[derive(Debug, Clone)]
pub struct S3Store {
    pub client: aws_sdk_s3::Client,
    pub bucket: String,
    /// For error messages only.
    pub endpoint: String,
}

impl ObjectStore for S3Store {
    async fn put(&self, key: &str, body: Bytes, sha256: [u8; 32]) -> Result<(), StoreError> {
        let len = body.len() as i64;
        let result = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(len)
            .checksum_sha256(base64::engine::general_purpose::STANDARD.encode(sha256))
            .body(ByteStream::from(body))
            .send()
            .await;
        result.map(|_| ()).map_err(|e| self.classify(key, e))
    }
}

impl S3Store {
    fn classify<E, R>(&self, key: &str, err: SdkError<E, R>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let bucket = self.bucket.clone();
        let key = key.to_string();
        match &err {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => StoreError::Unreachable {
                endpoint: self.endpoint.clone(),
                key,
                detail: one_line(&DisplayErrorContext(&err).to_string()),
            },
            SdkError::ServiceError(se) => match se.err().code() {
                Some("NoSuchBucket") => StoreError::NoSuchBucket { bucket },
                Some("AccessDenied")
                | Some("InvalidAccessKeyId")
                | Some("SignatureDoesNotMatch") => StoreError::AccessDenied {
                    bucket,
                    key,
                    detail: one_line(&DisplayErrorContext(&err).to_string()),
                },
                _ => StoreError::Other {
                    bucket,
                    key,
                    detail: one_line(&DisplayErrorContext(&err).to_string()),
                },
            },
            _ => StoreError::Other {
                bucket,
                key,
                detail: one_line(&DisplayErrorContext(&err).to_string()),
            },
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Discards everything: for `--dry-run`.
#[derive(Debug, Default)]
pub struct NullStore;

impl ObjectStore for NullStore {
    async fn put(&self, _key: &str, _body: Bytes, _sha256: [u8; 32]) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Keeps objects in memory: for unit tests of the pipeline logic.
#[derive(Debug, Default)]
pub struct MemoryStore {
    pub objects: std::sync::Mutex<std::collections::BTreeMap<String, Bytes>>,
    /// Fail every put after this many succeeded (fault injection for tests).
    pub fail_after: Option<usize>,
}

impl ObjectStore for MemoryStore {
    async fn put(&self, key: &str, body: Bytes, _sha256: [u8; 32]) -> Result<(), StoreError> {
        let mut objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        if self.fail_after.is_some_and(|n| objects.len() >= n) {
            return Err(StoreError::Other {
                bucket: "memory".into(),
                key: key.into(),
                detail: "injected failure".into(),
            });
        }
        objects.insert(key.to_string(), body);
        Ok(())
    }
}
