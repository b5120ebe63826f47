//! Applying one generation to an image.
//!
//! 1. Verify: every data object without a verified prefetched copy (see
//!    [`store_prefetched`]) is fetched (bounded concurrency): check stored length, decode,
//!    check decoded length and SHA-256; stage the decoded bytes in a local file. Nothing
//!    touches the image until every object has passed.
//! 2. Reserve: size the image and allocate the object ranges, so a full disk fails here,
//!    before any byte of the image changes.
//! 3. Write: copy each object from its prefetched copy or the staging file to its offset
//!    (copy_file_range), punch zero ranges (for a base, everything
//!    the generation does not write), fsync.
//!
//! The caller persists "applied N" only after this returns. A crash anywhere leaves the
//! state at N-1 and re-applying N gives the same image (idempotent). Memory stays bounded
//! by concurrency x 2 x max_object, whatever the disk or generation size.

use crate::image::Image;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use pilotlight_cloud::{CloudError, ObjectStore};
use pilotlight_protocol::{DataObject, Encoding, Extent, Manifest, ObjectKey, Prefix};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Fetch(#[from] CloudError),
    #[error("object {key}: stored length is {got} bytes, the manifest says {expected}")]
    StoredLength {
        key: String,
        expected: u64,
        got: u64,
    },
    #[error("object {key}: cannot decode zstd: {detail}")]
    Decode { key: String, detail: String },
    #[error("object {key}: decodes to {got} bytes, the manifest says {expected}")]
    DecodedLength {
        key: String,
        expected: u64,
        got: u64,
    },
    #[error("object {key}: SHA-256 is {got}, the manifest says {expected}: corrupt or tampered object; the generation is not applied")]
    Checksum {
        key: String,
        expected: String,
        got: String,
    },
    #[error("staging file {path}: {source}")]
    Staging {
        path: String,
        source: std::io::Error,
    },
    #[error("image {image}: {op} failed{hint}: {source}", hint = if is_enospc(.source) { " (disk full: free space or grow the volume; nothing was applied)" } else { "" })]
    Image {
        image: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32)
}

impl ApplyError {
    /// True when re-trying later may succeed without anyone fixing the input (network,
    /// disk space). A missing object is not: the sender writes the manifest only after
    /// all its objects, so one gone missing will not come back by itself.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Fetch(e) => e.is_transient(),
            ApplyError::Image { .. } | ApplyError::Staging { .. } | ApplyError::Task(_) => true,
            _ => false,
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ApplyReport {
    pub generation: u64,
    pub objects: usize,
    pub bytes_fetched: u64,
    /// Objects taken from verified prefetched copies (not fetched, not staged).
    pub objects_prefetched: usize,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    /// Fetching, verifying and staging every object.
    pub fetch_seconds: f64,
    /// Reserving, writing, punching and fsyncing the image.
    pub write_seconds: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    pub concurrency: usize,
    /// Directory for the staging file (on the receiver's local disk).
    pub staging_dir: PathBuf,
    /// For messages.
    pub image_name: String,
    /// Objects already fetched for this generation, as files named by offset (see the
    /// engine's prefetch). Each is verified like a fetched one; one that fails is
    /// fetched again.
    pub prefetch_dir: Option<PathBuf>,
}

/// Applies `m` to `image`. The manifest must already be validated (it is, when it comes
/// from `Manifest::from_json`) and its parent must be what the image holds.
pub async fn apply<S: ObjectStore, I: Image + 'static>(
    src: &S,
    prefix: &Prefix,
    m: &Manifest,
    image: Arc<I>,
    opts: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    let started = Instant::now();
    let staging_path = opts
        .staging_dir
        .join(format!("g{:020}.staging", m.generation));
    let staging_err = |source| ApplyError::Staging {
        path: staging_path.display().to_string(),
        source,
    };
    let staging = Arc::new(
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&staging_path)
            .map_err(staging_err)?,
    );
    let result = apply_inner(src, prefix, m, image, opts, staging.clone(), &staging_path).await;
    drop(staging);
    let _ = std::fs::remove_file(&staging_path);
    let mut report = result?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn apply_inner<S: ObjectStore, I: Image + 'static>(
    src: &S,
    prefix: &Prefix,
    m: &Manifest,
    image: Arc<I>,
    opts: &ApplyOptions,
    staging: Arc<File>,
    staging_path: &Path,
) -> Result<ApplyReport, ApplyError> {
    let started = Instant::now();
    let conc = opts.concurrency.max(1);
    // Where each object's bytes come from in the write step: a verified prefetched copy
    // (neither fetched nor staged), else its place in the staging file (staged decoded,
    // so the write step is a kernel copy with nothing left to decode).
    let mut pos = 0u64;
    let sources: Vec<Source> = m
        .objects
        .iter()
        .map(|o| {
            match opts
                .prefetch_dir
                .as_deref()
                .and_then(|d| verified_prefetched(d, o))
            {
                Some(path) => Source::Prefetched(path),
                None => {
                    pos += o.length;
                    Source::Staged(pos - o.length)
                }
            }
        })
        .collect();
    let prefetched = sources
        .iter()
        .filter(|s| matches!(s, Source::Prefetched(_)))
        .count();
    // Allocate the staging file whole: writes into allocated blocks are much faster than
    // into holes, and a full disk fails here, before the image is touched.
    if pos > 0 {
        use std::os::fd::AsRawFd;
        let flags = nix::fcntl::FallocateFlags::empty();
        match nix::fcntl::fallocate(staging.as_raw_fd(), flags, 0, pos as i64) {
            Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP) => {}
            Err(e) => {
                return Err(ApplyError::Staging {
                    path: staging_path.display().to_string(),
                    source: e.into(),
                })
            }
        }
    }
    // One writer at a time per file: concurrent pwrites to one inode contend on its lock
    // in the kernel (measured: most of an apply's time went to system CPU); a user-space
    // mutex makes the others sleep instead. Fetching and decoding stay parallel.
    let write_lock = Arc::new(std::sync::Mutex::new(()));
    let key_of = |o: &DataObject| {
        ObjectKey::Data {
            disk: m.disk.clone(),
            generation: m.generation,
            offset: o.offset,
        }
        .to_key(prefix)
    };

    // 1. Verify and stage what has no verified prefetched copy.
    let to_fetch = m.objects.iter().zip(&sources).filter_map(|(o, s)| match s {
        Source::Staged(at) => Some((o, *at)),
        Source::Prefetched(_) => None,
    });
    let fetched: u64 = futures::stream::iter(to_fetch)
        .map(|(o, at)| {
            let key = key_of(o);
            let staging = staging.clone();
            let o = o.clone();
            let staging_path = staging_path.to_path_buf();
            let write_lock = write_lock.clone();
            async move {
                let stored = src.get(&key, o.stored_length).await?;
                let n = o.stored_length;
                tokio::task::spawn_blocking(move || {
                    let data = verify(&key, &o, &stored)?;
                    let _one_writer = write_lock.lock().unwrap_or_else(|p| p.into_inner());
                    staging
                        .write_all_at(&data, at)
                        .map_err(|source| ApplyError::Staging {
                            path: staging_path.display().to_string(),
                            source,
                        })
                })
                .await??;
                Ok::<u64, ApplyError>(n)
            }
        })
        .buffer_unordered(conc)
        .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
        .await?;

    let fetch_seconds = started.elapsed().as_secs_f64();
    let write_started = Instant::now();

    // 2. Reserve: size the image, allocate what will be written.
    let img_err = |op: &'static str| {
        let name = opts.image_name.clone();
        move |source| ApplyError::Image {
            image: name,
            op,
            source,
        }
    };
    let old_size = image.size().map_err(img_err("stat"))?;
    if m.disk_size > old_size {
        image.set_size(m.disk_size).map_err(img_err("grow"))?;
    }
    for part in m.objects.iter().flat_map(DataObject::parts) {
        image
            .reserve(part.offset, part.length)
            .map_err(img_err("reserve space"))?;
    }

    // 3. Write: verified and decoded in step 1, so only a copy, in offset order, by
    // one task (one writer per file, see above).
    let written: u64 = {
        let (image, staging, objects) = (image.clone(), staging.clone(), m.objects.clone());
        let name = opts.image_name.clone();
        tokio::task::spawn_blocking(move || {
            let mut written = 0;
            for (o, source) in objects.iter().zip(sources) {
                // Verified when prefetched; a copy gone since fails the apply (it is
                // retried, and then fetches the object).
                let copied = (|| {
                    let opened;
                    let (file, mut pos) = match source {
                        Source::Prefetched(path) => {
                            opened = File::open(&path)?;
                            (&opened, 0)
                        }
                        Source::Staged(at) => (&*staging, at),
                    };
                    // The decoded bytes fill the object's parts in order (one part
                    // unless the object is packed).
                    for part in o.parts() {
                        image.copy_from(file, pos, part.offset, part.length)?;
                        pos += part.length;
                    }
                    Ok(())
                })();
                copied.map_err(|source| ApplyError::Image {
                    image: name.clone(),
                    op: "write",
                    source,
                })?;
                written += o.length;
            }
            Ok::<u64, ApplyError>(written)
        })
        .await??
    };

    // A base describes the whole disk: whatever it does not write reads as zero.
    // An increment zeroes exactly its zero ranges.
    let zeroes: Vec<Extent> = match m.parent {
        None => gaps(m.disk_size, &m.objects),
        Some(_) => m.zero_ranges.clone(),
    };
    let mut zeroed = 0;
    for z in &zeroes {
        image
            .punch(z.offset, z.length)
            .map_err(img_err("punch hole"))?;
        zeroed += z.length;
    }
    if m.disk_size < old_size {
        image.set_size(m.disk_size).map_err(img_err("shrink"))?;
    }
    image.sync().map_err(img_err("fsync"))?;
    Ok(ApplyReport {
        generation: m.generation,
        objects: m.objects.len(),
        bytes_fetched: fetched,
        objects_prefetched: prefetched,
        bytes_written: written,
        bytes_zeroed: zeroed,
        fetch_seconds,
        write_seconds: write_started.elapsed().as_secs_f64(),
        seconds: 0.0,
    })
}

/// Where the write step takes an object's decoded bytes from.
enum Source {
    /// A verified prefetched copy, whole.
    Prefetched(PathBuf),
    /// The staging file, at this position.
    Staged(u64),
}

/// A prefetched copy of an object, named by the offset and the SHA-256 of what it holds
/// (see [`store_prefetched`]), if one holds exactly the manifest's bytes.
fn verified_prefetched(dir: &Path, o: &DataObject) -> Option<PathBuf> {
    let path = dir.join(prefetched_name(o.offset, &o.sha256.to_string()));
    let meta = std::fs::metadata(&path).ok()?;
    (meta.is_file() && meta.len() == o.length).then_some(path)
}

fn prefetched_name(offset: u64, sha256_hex: &str) -> String {
    format!("{offset:020}.{sha256_hex}")
}

/// Stores a data object fetched before its manifest: its decoded bytes, in a file named
/// by offset and their SHA-256 (temp file, then rename: only complete files appear).
///
/// The encoding is in the manifest, not known yet: a zstd frame that states its size
/// (the sender's do) is decoded, anything else kept as is. The name carries the hash of
/// what the file holds, so the apply uses it only when that equals the manifest's
/// SHA-256 of the object's bytes: a wrong guess, another upload of the same offset, or
/// a bomb is simply not used. Returns the file's path.
pub fn store_prefetched(dir: &Path, offset: u64, stored: &[u8]) -> std::io::Result<PathBuf> {
    let decoded = match zstd::zstd_safe::get_frame_content_size(stored) {
        Ok(Some(n)) if n <= pilotlight_protocol::MAX_OBJECT_LIMIT => {
            zstd::bulk::decompress(stored, n as usize).ok()
        }
        _ => None,
    };
    let data = decoded.as_deref().unwrap_or(stored);
    let sha = pilotlight_protocol::Sha256Hex(Sha256::digest(data).into()).to_string();
    std::fs::create_dir_all(dir)?;
    let path = dir.join(prefetched_name(offset, &sha));
    // Unique: two fetches of one object (a duplicated event) must not share a temp file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!("{offset:020}.{}-{n}.tmp", std::process::id()));
    let written = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, &path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| path)
}

/// Checks one object's stored bytes against the manifest; returns the decoded bytes.
fn verify(key: &str, o: &DataObject, stored: &Bytes) -> Result<Bytes, ApplyError> {
    if stored.len() as u64 != o.stored_length {
        return Err(ApplyError::StoredLength {
            key: key.into(),
            expected: o.stored_length,
            got: stored.len() as u64,
        });
    }
    let data = decode(key, o, stored.clone())?;
    if data.len() as u64 != o.length {
        return Err(ApplyError::DecodedLength {
            key: key.into(),
            expected: o.length,
            got: data.len() as u64,
        });
    }
    let sha: [u8; 32] = Sha256::digest(&data).into();
    if sha != o.sha256.0 {
        return Err(ApplyError::Checksum {
            key: key.into(),
            expected: o.sha256.to_string(),
            got: pilotlight_protocol::Sha256Hex(sha).to_string(),
        });
    }
    Ok(data)
}

/// Decodes stored bytes per the manifest's encoding.
fn decode(key: &str, o: &DataObject, stored: Bytes) -> Result<Bytes, ApplyError> {
    match o.encoding {
        Encoding::Raw => Ok(stored),
        // Capacity is the manifest's length: a bomb that inflates further fails here.
        Encoding::Zstd => zstd::bulk::decompress(&stored, o.length as usize)
            .map(Bytes::from)
            .map_err(|e| ApplyError::Decode {
                key: key.into(),
                detail: e.to_string(),
            }),
    }
}

/// The parts of `[0, size)` no object covers. Objects' parts are disjoint (validated);
/// packed objects' pieces may interleave, so they are sorted first.
fn gaps(size: u64, objects: &[DataObject]) -> Vec<Extent> {
    let mut parts: Vec<Extent> = objects.iter().flat_map(DataObject::parts).collect();
    parts.sort_unstable();
    let mut out = Vec::new();
    let mut pos = 0;
    for p in parts {
        if p.offset > pos {
            out.push(Extent::new(pos, p.offset - pos));
        }
        pos = p.end();
    }
    if pos < size {
        out.push(Extent::new(pos, size - pos));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::FileImage;
    use chrono::DateTime;
    use pilotlight_cloud::MemoryStore;
    use pilotlight_protocol::{DiskId, Sha256Hex};
    use proptest::prelude::*;

    const SECTOR: u64 = 512;

    /// One change in a generation: sectors at `gap` after the previous one.
    #[derive(Debug, Clone)]
    struct Op {
        gap: u64,
        len: u64,
        zero: bool,
        seed: u8,
        compress: bool,
    }

    #[derive(Debug, Clone)]
    struct Gen {
        base: bool,
        size_sectors: u64,
        ops: Vec<Op>,
        /// Pack consecutive written ranges into objects of up to max_object (format v2).
        pack: bool,
    }

    fn prefix() -> Prefix {
        Prefix::new("p").unwrap()
    }

    fn disk() -> DiskId {
        DiskId::new("s", "v", "d").unwrap()
    }

    fn bytes_for(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| {
                if seed.is_multiple_of(3) {
                    seed
                } else {
                    (i as u8).wrapping_mul(seed) ^ (i >> 9) as u8
                }
            })
            .collect()
    }

    /// Builds generation `g`, uploads its objects into `src`, and applies it to `model`.
    fn build(
        src: &MemoryStore,
        g: u64,
        spec: &Gen,
        parent: Option<u64>,
        model: &mut Vec<u8>,
    ) -> Manifest {
        let size = spec.size_sectors * SECTOR;
        if spec.base {
            model.clear();
        }
        model.resize(size as usize, 0);
        let mut m = Manifest::new(
            disk(),
            g,
            if spec.base { None } else { parent },
            size,
            DateTime::from_timestamp(1_700_000_000 + g as i64, 0).unwrap(),
            "test",
        );
        m.max_object = 16 * SECTOR;
        let mut pos = 0;
        // Written ranges, in order, with their bytes and whether to compress.
        let mut written: Vec<(Extent, Vec<u8>, bool)> = Vec::new();
        for op in &spec.ops {
            let off = (pos + op.gap) * SECTOR;
            let len = op.len * SECTOR;
            if off + len > size {
                break;
            }
            pos += op.gap + op.len;
            let range = off as usize..(off + len) as usize;
            if op.zero {
                m.zero_ranges.push(Extent::new(off, len));
                model[range].fill(0);
            } else {
                let data = bytes_for(op.seed, len as usize);
                model[range].copy_from_slice(&data);
                written.push((Extent::new(off, len), data, op.compress));
            }
        }
        // One object per range, or (packed) as many consecutive ranges as fit.
        let mut groups: Vec<Vec<(Extent, Vec<u8>, bool)>> = Vec::new();
        for w in written {
            match groups.last_mut() {
                Some(gr)
                    if spec.pack
                        && gr.iter().map(|x| x.0.length).sum::<u64>() + w.0.length
                            <= m.max_object =>
                {
                    gr.push(w)
                }
                _ => groups.push(vec![w]),
            }
        }
        for gr in groups {
            let data: Vec<u8> = gr.iter().flat_map(|x| x.1.iter().copied()).collect();
            let off = gr[0].0.offset;
            let sha = Sha256Hex(Sha256::digest(&data).into());
            let len = data.len() as u64;
            let (stored, encoding) = match zstd::bulk::compress(&data, 1) {
                Ok(c) if gr[0].2 && c.len() < data.len() => (c, Encoding::Zstd),
                _ => (data, Encoding::Raw),
            };
            m.objects.push(DataObject {
                offset: off,
                length: len,
                encoding,
                stored_length: stored.len() as u64,
                sha256: sha,
                pieces: if gr.len() > 1 {
                    gr.iter().map(|x| x.0).collect()
                } else {
                    Vec::new()
                },
            });
            src.insert(
                &ObjectKey::Data {
                    disk: disk(),
                    generation: g,
                    offset: off,
                }
                .to_key(&prefix()),
                stored,
            );
        }
        m.format_version = m.required_version();
        if spec.base {
            // Whatever a base does not write is zero.
            let written: Vec<(u64, u64)> = m
                .objects
                .iter()
                .flat_map(DataObject::parts)
                .map(|p| (p.offset, p.length))
                .collect();
            let mut fresh = vec![0u8; size as usize];
            for (o, l) in written {
                fresh[o as usize..(o + l) as usize]
                    .copy_from_slice(&model[o as usize..(o + l) as usize]);
            }
            *model = fresh;
        }
        m.validate().unwrap();
        m
    }

    fn opts(dir: &Path) -> ApplyOptions {
        ApplyOptions {
            concurrency: 4,
            staging_dir: dir.to_path_buf(),
            image_name: "test".into(),
            prefetch_dir: None,
        }
    }

    fn arb_gen() -> impl Strategy<Value = Gen> {
        (
            prop::bool::weighted(0.15),
            64u64..160,
            any::<bool>(),
            prop::collection::vec(
                (
                    0u64..12,
                    1u64..16,
                    prop::bool::weighted(0.3),
                    any::<u8>(),
                    any::<bool>(),
                ),
                0..12,
            ),
        )
            .prop_map(|(base, size_sectors, pack, ops)| Gen {
                base,
                size_sectors,
                pack,
                ops: ops
                    .into_iter()
                    .map(|(gap, len, zero, seed, compress)| Op {
                        gap,
                        len,
                        zero,
                        seed,
                        compress,
                    })
                    .collect(),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_generations_match_a_byte_model(gens in prop::collection::vec(arb_gen(), 1..7)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let image = Arc::new(FileImage::open(&dir.path().join("img.raw")).unwrap());
            let src = MemoryStore::default();
            let mut model = Vec::new();
            let mut applied = None;
            for (i, spec) in gens.iter().enumerate() {
                let mut spec = spec.clone();
                if i == 0 { spec.base = true; }
                let g = i as u64 + 1;
                let m = build(&src, g, &spec, applied, &mut model);
                // Some objects arrive prefetched (the engine's path), some as stale copies
                // of the same offset that must not be used, the rest from the bucket.
                let mut o = opts(dir.path());
                let pf = dir.path().join(format!("prefetch-{g}"));
                o.prefetch_dir = Some(pf.clone());
                for (j, obj) in m.objects.iter().enumerate() {
                    let key = ObjectKey::Data { disk: m.disk.clone(), generation: g, offset: obj.offset }.to_key(&prefix());
                    let mut stored = src.object(&key).unwrap().to_vec();
                    match (g + j as u64) % 3 {
                        0 => {}
                        1 => { store_prefetched(&pf, obj.offset, &stored).unwrap(); }
                        _ => { stored[0] ^= 1; store_prefetched(&pf, obj.offset, &stored).unwrap(); }
                    }
                }
                rt.block_on(apply(&src, &prefix(), &m, image.clone(), &o)).unwrap();
                applied = Some(g);
                let got = std::fs::read(dir.path().join("img.raw")).unwrap();
                prop_assert_eq!(got.len(), model.len());
                prop_assert!(got == model, "image differs from the model after generation {}", g);
                // Re-applying the same generation changes nothing (idempotent).
                if g.is_multiple_of(2) {
                    rt.block_on(apply(&src, &prefix(), &m, image.clone(), &opts(dir.path()))).unwrap();
                    prop_assert!(std::fs::read(dir.path().join("img.raw")).unwrap() == model);
                }
            }
        }
    }

    /// A base and one increment in memory, plus the image after the base.
    async fn setup() -> (
        tempfile::TempDir,
        pilotlight_cloud::MemoryStore,
        Arc<FileImage>,
        Manifest,
        Vec<u8>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let src = MemoryStore::default();
        let image = Arc::new(FileImage::open(&dir.path().join("img.raw")).unwrap());
        let mut model = Vec::new();
        let base = Gen {
            base: true,
            size_sectors: 128,
            pack: false,
            ops: vec![Op {
                gap: 0,
                len: 16,
                zero: false,
                seed: 7,
                compress: false,
            }],
        };
        let m1 = build(&src, 1, &base, None, &mut model);
        apply(&src, &prefix(), &m1, image.clone(), &opts(dir.path()))
            .await
            .unwrap();
        let inc = Gen {
            base: false,
            size_sectors: 128,
            pack: false,
            ops: vec![
                Op {
                    gap: 2,
                    len: 8,
                    zero: false,
                    seed: 5,
                    compress: true,
                },
                Op {
                    gap: 4,
                    len: 8,
                    zero: false,
                    seed: 11,
                    compress: false,
                },
                Op {
                    gap: 1,
                    len: 4,
                    zero: true,
                    seed: 0,
                    compress: false,
                },
            ],
        };
        let before = std::fs::read(dir.path().join("img.raw")).unwrap();
        let m2 = build(&src, 2, &inc, Some(1), &mut model);
        (dir, src, image, m2, before)
    }

    async fn expect_rejected(
        dir: &tempfile::TempDir,
        src: &MemoryStore,
        image: Arc<FileImage>,
        m: &Manifest,
        before: &[u8],
        want: &str,
    ) {
        let err = apply(src, &prefix(), m, image, &opts(dir.path()))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{want}: {err}");
        assert_eq!(
            std::fs::read(dir.path().join("img.raw")).unwrap(),
            before,
            "image unchanged after: {err}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".staging"))
            .collect();
        assert!(leftovers.is_empty(), "staging removed");
    }

    fn key(m: &Manifest, i: usize) -> String {
        ObjectKey::Data {
            disk: disk(),
            generation: m.generation,
            offset: m.objects[i].offset,
        }
        .to_key(&prefix())
    }

    #[tokio::test]
    async fn checksum_mismatch_leaves_the_image_unchanged() {
        let (dir, src, image, m, before) = setup().await;
        // The second object is raw: flip a byte.
        let k = key(&m, 1);
        let mut b = src.object(&k).unwrap().to_vec();
        b[100] ^= 1;
        src.insert(&k, b);
        expect_rejected(&dir, &src, image, &m, &before, "SHA-256").await;
    }

    #[tokio::test]
    async fn short_and_long_objects_are_rejected() {
        let (dir, src, image, m, before) = setup().await;
        let k = key(&m, 1);
        let good = src.object(&k).unwrap();
        src.insert(&k, good.slice(..good.len() - 512));
        expect_rejected(&dir, &src, image.clone(), &m, &before, "stored length").await;
        let mut long = good.to_vec();
        long.extend_from_slice(&[0u8; 512]);
        src.insert(&k, long);
        expect_rejected(&dir, &src, image.clone(), &m, &before, "more than").await;
        src.insert(&k, good);
        src.remove(&key(&m, 0));
        expect_rejected(&dir, &src, image, &m, &before, "does not exist").await;
    }

    #[tokio::test]
    async fn a_zstd_object_that_inflates_past_its_length_is_rejected() {
        let (dir, src, image, mut m, before) = setup().await;
        assert_eq!(m.objects[0].encoding, Encoding::Zstd);
        // Claim a shorter decoded length than the object really has.
        m.objects[0].length -= 512;
        expect_rejected(&dir, &src, image, &m, &before, "cannot decode").await;
    }

    /// An image whose space runs out at `reserve`, as a full filesystem does.
    struct FullDisk(Arc<FileImage>);

    impl Image for FullDisk {
        fn size(&self) -> std::io::Result<u64> {
            self.0.size()
        }
        fn set_size(&self, s: u64) -> std::io::Result<()> {
            self.0.set_size(s)
        }
        fn reserve(&self, _o: u64, _l: u64) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(
                nix::errno::Errno::ENOSPC as i32,
            ))
        }
        fn write_at(&self, o: u64, d: &[u8]) -> std::io::Result<()> {
            self.0.write_at(o, d)
        }
        fn punch(&self, o: u64, l: u64) -> std::io::Result<()> {
            self.0.punch(o, l)
        }
        fn sync(&self) -> std::io::Result<()> {
            self.0.sync()
        }
    }

    #[tokio::test]
    async fn disk_full_fails_before_any_byte_changes() {
        let (dir, src, image, m, before) = setup().await;
        let err = apply(
            &src,
            &prefix(),
            &m,
            Arc::new(FullDisk(image)),
            &opts(dir.path()),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(err.is_transient());
        assert_eq!(std::fs::read(dir.path().join("img.raw")).unwrap(), before);
    }
}

#[cfg(test)]
mod prefetch_tests {
    use super::*;
    use crate::image::FileImage;
    use chrono::DateTime;
    use pilotlight_cloud::MemoryStore;
    use pilotlight_protocol::{Consistency, DiskId, Sha256Hex, FORMAT_VERSION};

    fn setup(dir: &Path) -> (MemoryStore, Manifest, String, Vec<u8>) {
        let data = vec![7u8; 4096];
        let m = Manifest {
            format_version: FORMAT_VERSION,
            disk: DiskId::new("s", "v", "d").unwrap(),
            generation: 1,
            parent: None,
            disk_size: 65536,
            max_object: 65536,
            source_kind: "test".into(),
            source_change_id: None,
            snapshot_time: DateTime::from_timestamp(0, 0).unwrap(),
            consistency: Consistency::Crash,
            objects: vec![DataObject {
                offset: 8192,
                length: 4096,
                encoding: Encoding::Raw,
                stored_length: 4096,
                sha256: Sha256Hex(Sha256::digest(&data).into()),
                pieces: Vec::new(),
            }],
            zero_ranges: vec![],
            created_by: "test".into(),
        };
        let key = ObjectKey::Data {
            disk: m.disk.clone(),
            generation: 1,
            offset: 8192,
        }
        .to_key(&Prefix::new("p").unwrap());
        let src = MemoryStore::default();
        src.insert(&key, data.clone());
        std::fs::create_dir_all(dir.join("prefetch")).unwrap();
        (src, m, key, data)
    }

    fn opts(dir: &Path) -> ApplyOptions {
        ApplyOptions {
            concurrency: 2,
            staging_dir: dir.to_path_buf(),
            image_name: "test".into(),
            prefetch_dir: Some(dir.join("prefetch")),
        }
    }

    #[tokio::test]
    async fn a_prefetched_copy_is_used_and_a_bad_one_is_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let (src, m, key, data) = setup(dir.path());
        let prefix = Prefix::new("p").unwrap();
        let image = Arc::new(FileImage::open(&dir.path().join("img.raw")).unwrap());
        let pf = dir.path().join("prefetch");

        // A good copy is used, neither fetched nor staged: the object can be gone.
        store_prefetched(&pf, 8192, &data).unwrap();
        src.remove(&key);
        let r = apply(&src, &prefix, &m, image.clone(), &opts(dir.path()))
            .await
            .unwrap();
        assert_eq!(
            (r.bytes_written, r.objects_prefetched, r.bytes_fetched),
            (4096, 1, 0)
        );
        assert_eq!(
            &std::fs::read(dir.path().join("img.raw")).unwrap()[8192..12288],
            &data[..]
        );

        // Another upload of the same offset (other bytes) is not the manifest's: the
        // object is fetched.
        std::fs::remove_dir_all(&pf).unwrap();
        store_prefetched(&pf, 8192, &[9u8; 4096]).unwrap();
        src.insert(&key, data.clone());
        let r = apply(&src, &prefix, &m, image.clone(), &opts(dir.path()))
            .await
            .unwrap();
        assert_eq!((r.objects_prefetched, r.bytes_fetched), (0, 4096));

        // Then the bucket's copy is verified as ever: corrupt, the apply fails.
        src.insert(&key, vec![9u8; 4096]);
        let err = apply(&src, &prefix, &m, image, &opts(dir.path()))
            .await
            .unwrap_err();
        assert!(matches!(err, ApplyError::Checksum { .. }), "{err}");
    }

    #[test]
    fn a_prefetched_zstd_frame_is_stored_decoded_and_anything_else_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"pilotlight ".repeat(1000);
        let sha = |b: &[u8]| Sha256Hex(Sha256::digest(b).into()).to_string();

        let frame = zstd::bulk::compress(&data, 3).unwrap();
        let p = store_prefetched(dir.path(), 0, &frame).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), data);
        assert!(p.ends_with(format!("{:020}.{}", 0, sha(&data))));

        // Not a frame, or a broken one: kept as is (the apply then fetches the object).
        let p = store_prefetched(dir.path(), 512, &data).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), data);
        let mut broken = frame.clone();
        broken.truncate(frame.len() - 1);
        let p = store_prefetched(dir.path(), 1024, &broken).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), broken);
        // Only complete files: no temp file left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        assert_eq!(names.len(), 3);
    }
}
