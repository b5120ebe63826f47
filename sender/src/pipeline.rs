//! Changed ranges in, data objects and zero ranges out.
//!
//! Each range is split into chunks of at most `max_object` bytes at 512 KiB boundaries.
//! A chunk is read, cut into 512 KiB-aligned blocks; all-zero blocks become zero ranges
//! (never uploaded), each run of non-zero blocks one object: compressed with zstd when
//! that makes it smaller, hashed, and PUT with its checksum. At most `concurrency` chunks
//! are in flight, so memory stays bounded by concurrency x max_object x 2.

use crate::source::{OpenSource, SourceError};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use pilotlight_cloud::{CloudError, ObjectStore, PutOptions};
use pilotlight_protocol::extent::{coalesce, split};
use pilotlight_protocol::{
    DataObject, DiskId, Encoding, Extent, ObjectKey, Prefix, Sha256Hex, SPLIT_ALIGN,
};
use sha2::{Digest, Sha256};
use std::num::NonZeroU32;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] CloudError),
    #[error("compression of {extent} failed: {source}")]
    Compress {
        extent: Extent,
        source: std::io::Error,
    },
    #[error("internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How to turn ranges into objects.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub prefix: Prefix,
    pub disk: DiskId,
    pub generation: u64,
    pub max_object: u64,
    /// zstd level, or `None` to store raw.
    pub zstd_level: Option<i32>,
    pub concurrency: usize,
}

/// What a pipeline run produced.
#[derive(Debug, Default)]
pub struct PipelineOutput {
    pub objects: Vec<DataObject>,
    /// Zero ranges found by reading (coalesced).
    pub zero_ranges: Vec<Extent>,
    pub bytes_read: u64,
    pub bytes_stored: u64,
}

/// Counts progress; the caller decides how to show it.
pub trait Progress: Send + Sync {
    fn advance(&self, bytes: u64);
}

impl Progress for () {
    fn advance(&self, _bytes: u64) {}
}

impl Progress for indicatif::ProgressBar {
    fn advance(&self, bytes: u64) {
        self.inc(bytes);
    }
}

/// A bandwidth limit in bytes per second, counted in KiB cells.
#[derive(Debug)]
pub struct Bandwidth(DefaultDirectRateLimiter);

impl Bandwidth {
    pub fn new(bytes_per_sec: u64, max_object: u64) -> Self {
        let per_sec = clamp_cells(bytes_per_sec / 1024);
        // The burst must hold the largest object, or it could never pass.
        let burst = clamp_cells((max_object / 1024 + 1).max(u64::from(per_sec.get())));
        Self(RateLimiter::direct(
            Quota::per_second(per_sec).allow_burst(burst),
        ))
    }

    async fn wait(&self, bytes: usize) {
        let cells = clamp_cells(bytes.div_ceil(1024) as u64);
        // Cannot fail: the burst holds any object (see new).
        let _ = self.0.until_n_ready(cells).await;
    }
}

fn clamp_cells(v: u64) -> NonZeroU32 {
    NonZeroU32::new(v.clamp(1, u64::from(u32::MAX)) as u32).unwrap_or(NonZeroU32::MIN)
}

/// One object ready to upload.
struct Encoded {
    object: DataObject,
    body: Bytes,
    body_sha256: [u8; 32],
}

/// Runs the pipeline over `source.to_read`.
pub async fn run<S: ObjectStore>(
    source: Arc<OpenSource>,
    store: &S,
    opts: &PipelineOptions,
    bandwidth: Option<&Bandwidth>,
    progress: &dyn Progress,
) -> Result<PipelineOutput, PipelineError> {
    let chunks: Vec<Extent> = source
        .to_read
        .iter()
        .flat_map(|e| split(*e, opts.max_object, SPLIT_ALIGN))
        .collect();
    let results: Vec<(Vec<DataObject>, Vec<Extent>, u64)> = futures::stream::iter(chunks)
        .map(|chunk| {
            let source = source.clone();
            async move {
                let level = opts.zstd_level;
                let buf = source.read_chunk(chunk).await?;
                let (encoded, zeros) =
                    tokio::task::spawn_blocking(move || encode_chunk(chunk, buf, level)).await??;
                let mut objects = Vec::with_capacity(encoded.len());
                let mut stored = 0;
                for e in encoded {
                    if let Some(bw) = bandwidth {
                        bw.wait(e.body.len()).await;
                    }
                    let key = ObjectKey::Data {
                        disk: opts.disk.clone(),
                        generation: opts.generation,
                        offset: e.object.offset,
                    }
                    .to_key(&opts.prefix);
                    stored += e.body.len() as u64;
                    store
                        .put(&key, e.body, PutOptions::checksum(e.body_sha256))
                        .await?;
                    tracing::debug!(
                        key,
                        length = e.object.length,
                        stored = e.object.stored_length,
                        "uploaded"
                    );
                    objects.push(e.object);
                }
                progress.advance(chunk.length);
                Ok::<_, PipelineError>((objects, zeros, stored))
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .try_collect()
        .await?;

    let mut out = PipelineOutput::default();
    let mut zeros = Vec::new();
    for (objects, z, stored) in results {
        out.objects.extend(objects);
        zeros.extend(z);
        out.bytes_stored += stored;
    }
    out.bytes_read = source.to_read.iter().map(|e| e.length).sum();
    out.objects.sort_by_key(|o| o.offset);
    zeros.sort();
    out.zero_ranges = coalesce(zeros);
    Ok(out)
}

/// Cuts one chunk's bytes into objects and zero ranges. Blocking (CPU-bound).
fn encode_chunk(
    chunk: Extent,
    buf: Vec<u8>,
    zstd_level: Option<i32>,
) -> Result<(Vec<Encoded>, Vec<Extent>), PipelineError> {
    let buf = Bytes::from(buf);
    let mut objects = Vec::new();
    let mut zeros = Vec::new();
    for (run, zero) in runs(chunk, &buf) {
        if zero {
            zeros.push(run);
            continue;
        }
        let start = (run.offset - chunk.offset) as usize;
        let data = buf.slice(start..start + run.length as usize);
        objects.push(encode(run, data, zstd_level)?);
    }
    Ok((objects, zeros))
}

/// Splits a chunk into maximal runs of zero and non-zero 512 KiB-aligned blocks.
fn runs(chunk: Extent, buf: &[u8]) -> Vec<(Extent, bool)> {
    let mut out: Vec<(Extent, bool)> = Vec::new();
    let mut pos = chunk.offset;
    while pos < chunk.end() {
        let block_end = ((pos / SPLIT_ALIGN + 1) * SPLIT_ALIGN).min(chunk.end());
        let a = (pos - chunk.offset) as usize;
        let b = (block_end - chunk.offset) as usize;
        let zero = is_zero(&buf[a..b]);
        match out.last_mut() {
            Some((run, z)) if *z == zero => run.length += block_end - pos,
            _ => out.push((Extent::new(pos, block_end - pos), zero)),
        }
        pos = block_end;
    }
    out
}

/// True when every byte is zero. Works on 64-byte blocks so the compiler vectorises it.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    let body = blocks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0);
    body && blocks.remainder().iter().all(|&b| b == 0)
}

fn encode(extent: Extent, data: Bytes, zstd_level: Option<i32>) -> Result<Encoded, PipelineError> {
    let sha: [u8; 32] = Sha256::digest(&data).into();
    let compressed = match zstd_level {
        Some(level) => Some(
            zstd::bulk::compress(&data, level)
                .map_err(|source| PipelineError::Compress { extent, source })?,
        ),
        None => None,
    };
    // Keep the compressed form only when it is smaller.
    let (body, encoding, body_sha256) = match compressed {
        Some(c) if c.len() < data.len() => {
            let c = Bytes::from(c);
            let s: [u8; 32] = Sha256::digest(&c).into();
            (c, Encoding::Zstd, s)
        }
        _ => (data, Encoding::Raw, sha),
    };
    Ok(Encoded {
        object: DataObject {
            offset: extent.offset,
            length: extent.length,
            encoding,
            stored_length: body.len() as u64,
            sha256: Sha256Hex(sha),
        },
        body,
        body_sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1000]));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert!(!is_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn runs_follow_block_boundaries() {
        let k = SPLIT_ALIGN as usize;
        let chunk = Extent::new(SPLIT_ALIGN - 4096, 3 * SPLIT_ALIGN);
        let mut buf = vec![0u8; 3 * k];
        buf[4096 + k] = 1; // in the second full block
        let r = runs(chunk, &buf);
        assert_eq!(
            r,
            vec![
                (Extent::new(SPLIT_ALIGN - 4096, 4096 + SPLIT_ALIGN), true),
                (Extent::new(2 * SPLIT_ALIGN, SPLIT_ALIGN), false),
                (Extent::new(3 * SPLIT_ALIGN, SPLIT_ALIGN - 4096), true),
            ]
        );
    }

    #[test]
    fn encode_keeps_zstd_only_when_smaller() {
        let compressible = Bytes::from(vec![7u8; 65536]);
        let e = encode(Extent::new(0, 65536), compressible.clone(), Some(3)).unwrap();
        assert_eq!(e.object.encoding, Encoding::Zstd);
        assert!(e.object.stored_length < 65536);
        assert_eq!(
            zstd::bulk::decompress(&e.body, 65536).unwrap(),
            compressible
        );
        let random: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let e = encode(Extent::new(0, 65536), Bytes::from(random.clone()), Some(3)).unwrap();
        if e.object.encoding == Encoding::Raw {
            assert_eq!(e.body, random);
        }
        let expect: [u8; 32] = Sha256::digest(&random).into();
        assert_eq!(e.object.sha256.0, expect, "hash is of the decoded bytes");
    }

    proptest! {
        #[test]
        fn runs_partition_the_chunk(start in 0u64..64, len in 1u64..64, marks in proptest::collection::vec(0usize..1 << 16, 0..8)) {
            let chunk = Extent::new(start * 65536, len * 65536);
            let mut buf = vec![0u8; chunk.length as usize];
            for m in marks { let i = m % buf.len(); buf[i] = 1; }
            let r = runs(chunk, &buf);
            let mut pos = chunk.offset;
            for (i, (e, zero)) in r.iter().enumerate() {
                prop_assert_eq!(e.offset, pos);
                let a = (e.offset - chunk.offset) as usize;
                prop_assert_eq!(is_zero(&buf[a..a + e.length as usize]), *zero);
                if i > 0 { prop_assert_ne!(r[i - 1].1, *zero); }
                pos = e.end();
            }
            prop_assert_eq!(pos, chunk.end());
        }
    }
}
