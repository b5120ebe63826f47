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

    /// A GET's body handed to `sink` chunk by chunk, refusing more than `max_len` bytes
    /// (by its Content-Length before reading, or as it arrives) whatever the headers said.
    async fn read_body<E>(
        &self,
        key: &str,
        out: aws_sdk_s3::operation::get_object::GetObjectOutput,
        max_len: u64,
        mut sink: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<u64, ChunksError<E>> {
        if let Some(len) = out.content_length {
            if len as u64 > max_len {
                let e = too_large(&self.bucket, key, max_len, len as u64);
                return Err(ChunksError::Read(e));
            }
        }
        let mut read = 0u64;
        let mut body = out.body;
        while let Some(chunk) = body.try_next().await.map_err(|e| {
            ChunksError::Read(CloudError::new(
                "S3",
                "GetObject",
                s3_resource(&self.bucket, key),
                ErrorKind::Unreachable,
                format!("reading the body: {e}"),
            ))
        })? {
            read += chunk.len() as u64;
            if read > max_len {
                return Err(ChunksError::Read(too_large(
                    &self.bucket,
                    key,
                    max_len,
                    read,
                )));
            }
            sink(&chunk).map_err(ChunksError::Sink)?;
        }
        Ok(read)
    }

    /// Reads a whole body, capped as [`Self::read_body`].
    async fn read_capped(
        &self,
        key: &str,
        out: aws_sdk_s3::operation::get_object::GetObjectOutput,
        max_len: u64,
    ) -> Result<Bytes, CloudError> {
        let hint = out.content_length.unwrap_or(0).clamp(0, max_len as i64) as usize;
        let mut buf = bytes::BytesMut::with_capacity(hint);
        let read = self.read_body(key, out, max_len, |chunk| {
            buf.extend_from_slice(chunk);
            Ok::<(), std::convert::Infallible>(())
        });
        match read.await {
            Ok(_) => Ok(buf.freeze()),
            Err(ChunksError::Read(e)) => Err(e),
            Err(ChunksError::Sink(never)) => match never {},
        }
    }
}

impl ObjectStore for SdkS3 {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn get_chunks<E: Send, F: FnMut(&[u8]) -> Result<(), E> + Send>(
        &self,
        key: &str,
        max_len: u64,
        sink: F,
    ) -> Result<u64, ChunksError<E>> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| ChunksError::Read(self.err("GetObject", key, &e)))?;
        self.read_body(key, out, max_len, sink).await
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

    async fn list(&self, prefix: &str, keep: fn(&str) -> bool) -> Result<Vec<String>, CloudError> {
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
        let req = req.body(ByteStream::from(body));
        // With the body's SHA-256 in `x-amz-checksum-sha256`, S3 verifies every byte
        // (BadDigest otherwise), so the body is not hashed a second time for the
        // signature: "UNSIGNED-PAYLOAD" (S3 API reference, "Signature Calculations for
        // the Authorization Header: Transferring Payload in a Single Chunk": the unsigned
        // payload option). Over TLS. The sender's CPU per GiB: docs/benchmarks.md.
        let sent = if opts.sha256.is_some() {
            req.customize().disable_payload_signing().send().await
        } else {
            req.send().await
        };
        let out = sent.map_err(|e| self.err("PutObject", key, &e))?;
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
