//! Changed ranges in, data objects and zero ranges out.
//!
//! Each range is split into chunks of at most `max_object` bytes at 512 KiB boundaries.
//! Consecutive chunks are grouped, as many as fit in `max_object` together, whatever the
//! gaps between them (packing: scattered small changes travel in few large objects, so
//! requests grow with bytes changed, not with extent count). A group is read, cut into
//! 512 KiB-aligned blocks; all-zero blocks become zero ranges (never uploaded), the
//! non-zero runs become one object (format v2 `pieces` when more than one run):
//! compressed with zstd when that makes it smaller, hashed, and PUT with its checksum.
//! Without packing, each chunk is a group and each run its own object (format v1). At
//! most `concurrency` groups are in flight, so memory stays bounded by concurrency x
//! max_object x 2.

use crate::read_buf::{BufferPool, ReadBuf};
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
    /// Pack scattered ranges into shared objects (manifest v2; receivers from packing
    /// on read it). Off: one object per run (v1, read by every receiver).
    pub pack: bool,
}

/// What a pipeline run produced.
#[derive(Debug, Default)]
pub struct PipelineOutput {
    pub objects: Vec<DataObject>,
    /// Zero ranges found by reading (coalesced).
    pub zero_ranges: Vec<Extent>,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    /// PUT requests made (one per object).
    pub puts: u64,
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
    let groups = group_chunks(chunks, opts.max_object, opts.pack);
    let pack = opts.pack;
    let buffers = BufferPool::new(opts.concurrency.max(1) + 1, opts.max_object as usize);
    let buffers = &buffers;
    let results: Vec<(Vec<DataObject>, Vec<Extent>, u64)> = futures::stream::iter(groups)
        .map(|group| {
            let source = source.clone();
            async move {
                let level = opts.zstd_level;
                let buf = source.read_chunks(&group, buffers).await?;
                let read: u64 = group.iter().map(|c| c.length).sum();
                let (encoded, zeros) =
                    tokio::task::spawn_blocking(move || encode_group(&group, buf, level, pack))
                        .await??;
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
                progress.advance(read);
                Ok::<_, PipelineError>((objects, zeros, stored))
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .try_collect()
        .await?;

    let mut out = PipelineOutput::default();
    let mut zeros = Vec::new();
    for (objects, z, stored) in results {
        out.puts += objects.len() as u64;
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

/// Groups consecutive chunks (sorted, disjoint, each at most `max_object`) into reads of
/// at most `max_object` together; without packing, one chunk per group.
fn group_chunks(chunks: Vec<Extent>, max_object: u64, pack: bool) -> Vec<Vec<Extent>> {
    let mut groups: Vec<(Vec<Extent>, u64)> = Vec::new();
    for c in chunks {
        match groups.last_mut() {
            Some((g, total)) if pack && *total + c.length <= max_object => {
                g.push(c);
                *total += c.length;
            }
            _ => groups.push((vec![c], c.length)),
        }
    }
    groups.into_iter().map(|(g, _)| g).collect()
}

/// Cuts one group's bytes (its chunks concatenated) into objects and zero ranges.
/// Blocking (CPU-bound). Packed: the non-zero runs, moved together in place, are one
/// object; else each run is an object.
fn encode_group(
    group: &[Extent],
    mut buf: ReadBuf,
    zstd_level: Option<i32>,
    pack: bool,
) -> Result<(Vec<Encoded>, Vec<Extent>), PipelineError> {
    let mut zeros = Vec::new();
    // Non-zero runs with their place in `buf`.
    let mut data_runs: Vec<(Extent, usize)> = Vec::new();
    let mut at = 0usize;
    for &chunk in group {
        let len = chunk.length as usize;
        for (run, zero) in runs(chunk, &buf[at..at + len]) {
            if zero {
                zeros.push(run);
            } else {
                data_runs.push((run, at + (run.offset - chunk.offset) as usize));
            }
        }
        at += len;
    }
    if !pack {
        let buf = buf.into_bytes();
        let objects = data_runs
            .into_iter()
            .map(|(run, start)| {
                encode(
                    vec![run],
                    buf.slice(start..start + run.length as usize),
                    zstd_level,
                )
            })
            .collect::<Result<_, _>>()?;
        return Ok((objects, zeros));
    }
    if data_runs.is_empty() {
        return Ok((Vec::new(), zeros));
    }
    // Move the runs together (each moves to or before where it is) and merge runs that
    // touch into one piece.
    let mut pieces: Vec<Extent> = Vec::with_capacity(data_runs.len());
    let mut end = 0usize;
    for (run, start) in data_runs {
        let len = run.length as usize;
        if start != end {
            buf.copy_within(start..start + len, end);
        }
        end += len;
        match pieces.last_mut() {
            Some(p) if p.end() == run.offset => p.length += run.length,
            _ => pieces.push(run),
        }
    }
    buf.truncate(end);
    Ok((vec![encode(pieces, buf.into_bytes(), zstd_level)?], zeros))
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

/// Bytes sampled by [`worth_compressing`]: slices spread over the object, so a packed
/// object whose pieces differ is judged on all of them.
const PROBE_SLICES: usize = 8;
const PROBE_SLICE: usize = 8 * 1024;

/// Whether zstd is worth running over `data`: a sample of it (8 slices of 8 KiB spread
/// evenly) must shrink by at least 1/32. Random and already-compressed data (most of
/// a disk's changes that do not compress: media, archives, encrypted volumes) then
/// costs a 64 KiB attempt instead of a whole one; measured in scripts/bench-sender. A
/// small object is simply tried whole.
pub fn worth_compressing(data: &[u8], level: i32) -> bool {
    if data.len() < 4 * PROBE_SLICES * PROBE_SLICE {
        return true;
    }
    let step = data.len() / PROBE_SLICES;
    let mut sample = Vec::with_capacity(PROBE_SLICES * PROBE_SLICE);
    for i in 0..PROBE_SLICES {
        sample.extend_from_slice(&data[i * step..i * step + PROBE_SLICE]);
    }
    match zstd::bulk::compress(&sample, level) {
        Ok(c) => c.len() < sample.len() - sample.len() / 32,
        // Let the real attempt report the error.
        Err(_) => true,
    }
}

/// One object holding `data`, the bytes of `pieces` concatenated (one piece: a
/// contiguous v1 object).
fn encode(
    pieces: Vec<Extent>,
    data: Bytes,
    zstd_level: Option<i32>,
) -> Result<Encoded, PipelineError> {
    let extent = Extent::new(pieces[0].offset, data.len() as u64);
    let sha: [u8; 32] = Sha256::digest(&data).into();
    let compressed = match zstd_level {
        Some(level) if worth_compressing(&data, level) => Some(
            zstd::bulk::compress(&data, level)
                .map_err(|source| PipelineError::Compress { extent, source })?,
        ),
        _ => None,
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
            pieces: if pieces.len() > 1 { pieces } else { Vec::new() },
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
        let e = encode(vec![Extent::new(0, 65536)], compressible.clone(), Some(3)).unwrap();
        assert_eq!(e.object.encoding, Encoding::Zstd);
        assert!(e.object.stored_length < 65536);
        assert_eq!(
            zstd::bulk::decompress(&e.body, 65536).unwrap(),
            compressible
        );
        let random: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let e = encode(
            vec![Extent::new(0, 65536)],
            Bytes::from(random.clone()),
            Some(3),
        )
        .unwrap();
        if e.object.encoding == Encoding::Raw {
            assert_eq!(e.body, random);
        }
        let expect: [u8; 32] = Sha256::digest(&random).into();
        assert_eq!(e.object.sha256.0, expect, "hash is of the decoded bytes");
    }

    #[test]
    fn the_probe_skips_zstd_on_random_bytes_only() {
        // xorshift64*: incompressible enough for zstd.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let random: Vec<u8> = (0..(4 << 20) / 8)
            .flat_map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
            })
            .collect();
        assert!(!worth_compressing(&random, 3));
        let e = encode(
            vec![Extent::new(0, random.len() as u64)],
            Bytes::from(random.clone()),
            Some(3),
        )
        .unwrap();
        assert_eq!(e.object.encoding, Encoding::Raw);
        assert_eq!(
            e.body_sha256, e.object.sha256.0,
            "one hash: stored = decoded"
        );
        // Text, and a packed object that is random except for one text piece in the
        // middle: both compressed.
        let text: Vec<u8> = (0..(4 << 20) / 16)
            .flat_map(|i: u32| format!("line {i:010}\n").into_bytes())
            .collect();
        assert!(worth_compressing(&text, 3));
        let mut mixed = random.clone();
        let third = mixed.len() / 3;
        mixed[third..2 * third].copy_from_slice(&text[..third]);
        assert!(worth_compressing(&mixed, 3));
        let e = encode(
            vec![Extent::new(0, mixed.len() as u64)],
            Bytes::from(mixed),
            Some(3),
        )
        .unwrap();
        assert_eq!(e.object.encoding, Encoding::Zstd);
        // Small objects are tried whole.
        assert!(worth_compressing(&random[..64 * 1024], 3));
    }

    #[test]
    fn scattered_chunks_are_grouped_up_to_max_object() {
        let k64 = 64 * 1024;
        // 300 extents of 64 KiB, 1 MiB apart: 128 fit in 8 MiB.
        let chunks: Vec<Extent> = (0..300).map(|i| Extent::new(i * (1 << 20), k64)).collect();
        let groups = group_chunks(chunks.clone(), 8 << 20, true);
        assert_eq!(
            groups.iter().map(Vec::len).collect::<Vec<_>>(),
            [128, 128, 44]
        );
        assert_eq!(groups.concat(), chunks, "every chunk once, in order");
        assert_eq!(group_chunks(chunks, 8 << 20, false).len(), 300);
        // A chunk of max_object is a group of its own.
        let big = vec![
            Extent::new(0, k64),
            Extent::new(1 << 20, 8 << 20),
            Extent::new(10 << 20, k64),
        ];
        assert_eq!(group_chunks(big, 8 << 20, true).len(), 3);
    }

    proptest! {
        /// A packed group decodes to exactly the non-zero bytes of its chunks, placed by
        /// its pieces; zero blocks are zero ranges; nothing is lost or placed twice.
        #[test]
        fn a_packed_group_places_every_nonzero_byte_once(
            spans in proptest::collection::vec((0u64..4, 1u64..4, any::<u8>(), any::<bool>()), 1..8),
        ) {
            let k = SPLIT_ALIGN;
            let mut group = Vec::new();
            let mut disk = vec![0u8; (64 * k) as usize];
            let mut pos = 0;
            for (gap, len, seed, zero) in spans {
                let e = Extent::new((pos + gap) * k, len * k);
                pos += gap + len;
                if !zero {
                    for (i, b) in disk[e.offset as usize..e.end() as usize].iter_mut().enumerate() {
                        *b = seed | 1 ^ (i as u8);
                    }
                }
                group.push(e);
            }
            let mut buf = Vec::new();
            for e in &group {
                buf.extend_from_slice(&disk[e.offset as usize..e.end() as usize]);
            }
            let (objects, zeros) = encode_group(&group, ReadBuf::from_vec(buf), None, true).unwrap();
            prop_assert!(objects.len() <= 1);
            let mut model = vec![0u8; disk.len()];
            let mut covered = 0;
            for o in &objects {
                let mut at = 0usize;
                for p in o.object.parts() {
                    let len = p.length as usize;
                    model[p.offset as usize..p.offset as usize + len]
                        .copy_from_slice(&o.body[at..at + len]);
                    at += len;
                    covered += p.length;
                }
                prop_assert_eq!(at as u64, o.object.length);
                prop_assert_eq!(o.object.offset, o.object.parts().next().unwrap().offset);
            }
            prop_assert_eq!(&model, &disk);
            let total: u64 = group.iter().map(|e| e.length).sum();
            prop_assert_eq!(covered + zeros.iter().map(|z| z.length).sum::<u64>(), total);
        }

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
