//! Exports an image to the bucket, import-ready: the raw disk, byte for byte, by a
//! parallel multipart upload, with the SHA-256 of the whole image.
//!
//! The caller (the engine) guarantees the image sits at a generation boundary: exports
//! run on the disk's own task, between applies, never during one.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use pilotlight_cloud::ebs::{BlockRef, EbsApi, PageStart, BLOCK_SIZE};
use pilotlight_cloud::{CloudError, ObjectStore, PutOptions};
use pilotlight_protocol::Sha256Hex;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// S3 allows at most this many parts per upload.
const MAX_PARTS: u64 = 10_000;
/// S3's smallest part (but the last).
const MIN_PART: u64 = 5 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("reading image {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Put(#[from] CloudError),
    #[error("reading recovery point {snapshot}: {source}")]
    Point {
        snapshot: String,
        source: Box<CloudError>,
    },
    #[error("recovery point {snapshot} has block {index}, past the disk's {size} bytes")]
    PointTooLarge {
        snapshot: String,
        index: u64,
        size: u64,
    },
    #[error("export task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub size: u64,
    pub sha256: Sha256Hex,
    pub parts: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Part size before the 10 000-part limit raises it.
    pub part_size: u64,
    /// Parts uploading at once (memory: about this many parts plus two).
    pub concurrency: usize,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            part_size: 16 << 20,
            concurrency: 4,
        }
    }
}

/// The part size for an image of `size` bytes: at least `wanted` (and S3's minimum), and
/// large enough that the image fits in S3's 10 000 parts; a whole MiB.
pub fn part_size_for(size: u64, wanted: u64) -> u64 {
    let least = size.div_ceil(MAX_PARTS);
    let p = wanted.max(MIN_PART).max(least);
    p.div_ceil(1 << 20) * (1 << 20)
}

/// Uploads the image at `path` to `key`.
pub async fn export_image<K: ObjectStore>(
    sink: &K,
    path: &Path,
    key: &str,
    opts: &ExportOptions,
) -> Result<ExportReport, ExportError> {
    let read_err = |source| ExportError::Read {
        path: path.display().to_string(),
        source,
    };
    let file = Arc::new(File::open(path).map_err(read_err)?);
    let size = file.metadata().map_err(read_err)?.len();
    let read_part = |at: u64, len: usize| {
        let (file, path) = (file.clone(), path.display().to_string());
        async move {
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, at)
                    .map_err(|source| ExportError::Read { path, source })?;
                Ok::<_, ExportError>(Bytes::from(buf))
            })
            .await?
        }
    };
    upload_parts(sink, size, key, opts, read_part).await
}

/// Blocks read at once from a recovery point.
const POINT_READS: usize = 16;

/// A completed recovery point read as a raw disk of `size` bytes: its blocks at their
/// offsets, holes as zeroes (never read).
#[derive(Debug)]
pub struct PointReader<'a, E> {
    ebs: &'a E,
    snapshot: &'a str,
    blocks: BTreeMap<u64, BlockRef>,
}

impl<'a, E: EbsApi> PointReader<'a, E> {
    /// Lists the point's blocks that overlap `bytes` (ListSnapshotBlocks from the
    /// window's first block, paged, stopping past the window). A window that reaches the
    /// disk's end lists to the end of the point: a block wholly past the disk is not this
    /// disk's (the snapshot is whole GiB, the disk need not be) and refused.
    pub async fn open(
        ebs: &'a E,
        snapshot: &'a str,
        size: u64,
        bytes: std::ops::Range<u64>,
    ) -> Result<PointReader<'a, E>, ExportError> {
        let first = bytes.start / BLOCK_SIZE;
        let end = bytes.end.min(size).div_ceil(BLOCK_SIZE);
        let to_the_end = bytes.end >= size;
        let mut blocks = BTreeMap::new();
        let mut token: Option<String> = None;
        loop {
            let start = token
                .as_deref()
                .map_or(PageStart::Index(first), PageStart::Token);
            let page = ebs
                .list_snapshot_blocks_page(snapshot, start)
                .await
                .map_err(|e| point_err(snapshot, e))?;
            let past = page.blocks.last().is_some_and(|b| b.index >= end);
            blocks.extend(
                page.blocks
                    .into_iter()
                    .filter(|b| b.index >= first && (to_the_end || b.index < end))
                    .map(|b| (b.index, b)),
            );
            match page.next_token {
                Some(t) if to_the_end || !past => token = Some(t),
                _ => break,
            }
        }
        if let Some((&index, _)) = blocks.range(size.div_ceil(BLOCK_SIZE)..).next() {
            return Err(ExportError::PointTooLarge {
                snapshot: snapshot.to_string(),
                index,
                size,
            });
        }
        Ok(PointReader {
            ebs,
            snapshot,
            blocks,
        })
    }

    /// The disk's bytes `[at, at + len)` (inside the window opened).
    pub async fn read(&self, at: u64, len: usize) -> Result<Bytes, ExportError> {
        let mut buf = vec![0u8; len];
        let first = at / BLOCK_SIZE;
        let last = (at + len as u64).div_ceil(BLOCK_SIZE);
        let (ebs, snapshot) = (self.ebs, self.snapshot);
        let fetched: Vec<(u64, Bytes)> = futures::stream::iter(self.blocks.range(first..last))
            .map(|(&i, b)| async move {
                let data = ebs
                    .get_snapshot_block(snapshot, b)
                    .await
                    .map_err(|e| point_err(snapshot, e))?;
                Ok::<_, ExportError>((i, data))
            })
            .buffer_unordered(POINT_READS)
            .try_collect()
            .await?;
        for (i, data) in fetched {
            // The window's part of this block (windows are whole blocks but the last).
            let start = i * BLOCK_SIZE;
            let from = start.max(at);
            let to = (start + data.len() as u64).min(at + len as u64);
            if from < to {
                buf[(from - at) as usize..(to - at) as usize]
                    .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
            }
        }
        Ok(Bytes::from(buf))
    }
}

fn point_err(snapshot: &str, source: CloudError) -> ExportError {
    ExportError::Point {
        snapshot: snapshot.to_string(),
        source: Box::new(source),
    }
}

/// Uploads recovery point `snapshot` as a raw disk of `size` bytes to `key`.
pub async fn export_point<K: ObjectStore, E: EbsApi>(
    sink: &K,
    ebs: &E,
    snapshot: &str,
    size: u64,
    key: &str,
    opts: &ExportOptions,
) -> Result<ExportReport, ExportError> {
    let reader = PointReader::open(ebs, snapshot, size, 0..size).await?;
    let reader = &reader;
    upload_parts(sink, size, key, opts, |at, len| reader.read(at, len)).await
}

/// The upload both exports share: parts of the whole disk read in order (two ahead),
/// hashed in order, uploaded several at once; a single PUT for a one-part disk.
async fn upload_parts<K, R, F>(
    sink: &K,
    size: u64,
    key: &str,
    opts: &ExportOptions,
    read: R,
) -> Result<ExportReport, ExportError>
where
    K: ObjectStore,
    R: Fn(u64, usize) -> F,
    F: std::future::Future<Output = Result<Bytes, ExportError>>,
{
    let started = Instant::now();
    let part = part_size_for(size, opts.part_size);
    let count = size.div_ceil(part).max(1);
    let read_part = |n: u64| {
        let at = n * part;
        read(at, part.min(size - at.min(size)) as usize)
    };
    let mut hasher = Sha256::new();
    if count == 1 {
        let body = read_part(0).await?;
        hasher.update(&body);
        sink.put(key, body, PutOptions::default()).await?;
    } else {
        let upload_id = sink.create_multipart(key).await?;
        let uploaded: Result<Vec<(i32, String)>, ExportError> = {
            let hasher = &mut hasher;
            let upload_id = upload_id.as_str();
            // Read ahead two parts in order, hash in order, upload several at once.
            futures::stream::iter(0..count)
                .map(read_part)
                .buffered(2)
                .map_ok(|body| {
                    hasher.update(&body);
                    body
                })
                .enumerate()
                .map(|(i, body)| async move {
                    let number = i as i32 + 1;
                    let etag = sink.upload_part(key, upload_id, number, body?).await?;
                    Ok::<_, ExportError>((number, etag))
                })
                .buffer_unordered(opts.concurrency.max(1))
                .try_collect()
                .await
        };
        match uploaded {
            Ok(mut parts) => {
                parts.sort();
                if let Err(e) = sink.complete_multipart(key, &upload_id, parts).await {
                    let _ = sink.abort_multipart(key, &upload_id).await;
                    return Err(e.into());
                }
            }
            Err(e) => {
                // Leave nothing billable behind (the bucket's lifecycle rule is the
                // backstop if this fails too).
                let _ = sink.abort_multipart(key, &upload_id).await;
                return Err(e);
            }
        }
    }
    Ok(ExportReport {
        size,
        sha256: Sha256Hex(hasher.finalize().into()),
        parts: count,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pilotlight_cloud::{MemoryStore, ObjectStore};

    #[test]
    fn part_sizes_respect_s3_limits() {
        assert_eq!(part_size_for(1 << 30, 16 << 20), 16 << 20);
        assert_eq!(part_size_for(1 << 20, 1), MIN_PART);
        let tib = 1u64 << 40;
        let p = part_size_for(tib, 16 << 20);
        assert!(
            tib.div_ceil(p) <= MAX_PARTS && p.is_multiple_of(1 << 20),
            "{p}"
        );
    }

    #[tokio::test]
    async fn exports_small_and_multipart_images_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let store = MemoryStore::default();
        for (name, size) in [("small", 3u64 << 20), ("big", (23 << 20) + 4096)] {
            let path = dir.path().join(name);
            let data: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
            std::fs::write(&path, &data).unwrap();
            let opts = ExportOptions {
                part_size: 5 << 20,
                concurrency: 3,
            };
            let r = export_image(&store, &path, name, &opts).await.unwrap();
            let got = store.get(name, u64::MAX).await.unwrap();
            assert_eq!(got.as_ref(), &data[..], "{name}");
            assert_eq!(r.size, size);
            assert_eq!(r.sha256.0, <[u8; 32]>::from(Sha256::digest(&data)));
            assert_eq!(r.parts, if name == "small" { 1 } else { 5 });
        }
    }

    #[tokio::test]
    async fn a_missing_image_is_a_clear_error() {
        let store = MemoryStore::default();
        let e = export_image(
            &store,
            Path::new("/nonexistent/x.raw"),
            "k",
            &ExportOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.raw"), "{e}");
    }
}
