//! Applying one generation to an image.
//!
//! 1. Verify: every data object without a verified prefetched copy (see
//!    [`store_prefetched`]) is fetched (bounded concurrency) and streamed as it arrives:
//!    stored length, decoding (never past the manifest's length), decoded length and
//!    SHA-256 checked on the way, the decoded bytes staged at the object's slot in a
//!    local file. Nothing touches the image until every object has passed.
//! 2. Reserve: size the image and allocate the object ranges, so a full disk fails here,
//!    before any byte of the image changes.
//! 3. Write: copy each object from its prefetched copy or the staging file to its offset
//!    (copy_file_range), punch zero ranges (for a base, everything
//!    the generation does not write), fsync.
//!
//! The caller persists "applied N" only after this returns. A crash anywhere leaves the
//! state at N-1 and re-applying N gives the same image (idempotent). Memory stays bounded
//! by the bytes-in-flight budget ([`crate::budget`]), whatever the disk, generation or
//! object size.

use crate::image::Image;
use futures::{StreamExt, TryStreamExt};
use pilotlight_cloud::{ChunksError, CloudError, ObjectStore};
use pilotlight_protocol::{DataObject, Extent, Manifest, ObjectKey, Prefix};
use pilotlight_store::objects::{ObjectError, StreamError, Streamed};
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
    /// Bytes of objects held in memory at once (shared with the prefetch).
    pub budget: crate::budget::Budget,
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
                // Streamed: the body is checked and decoded as it arrives and staged at
                // its slot in batches; what is held is a batch, and for zstd the
                // decoder's window, never the object (the budget counts that).
                let _bytes = opts.budget.acquire(streaming_held(&o)).await;
                let mut check = Streamed::new(&o).map_err(|e| object_error(&key, e))?;
                let mut out = StagingWriter {
                    file: &staging,
                    at,
                    batch: Vec::new(),
                    batch_at: 0,
                    one_writer: &write_lock,
                };
                let read = src
                    .get_chunks(&key, o.stored_length, |chunk| {
                        check.feed(chunk, |off, bytes| out.write(off, bytes))
                    })
                    .await;
                let staging_err = |source| ApplyError::Staging {
                    path: staging_path.display().to_string(),
                    source,
                };
                match read {
                    Ok(_) => {}
                    Err(ChunksError::Read(e)) => return Err(e.into()),
                    Err(ChunksError::Sink(StreamError::Object(e))) => {
                        return Err(object_error(&key, e))
                    }
                    Err(ChunksError::Sink(StreamError::Sink(e))) => return Err(staging_err(e)),
                }
                out.flush().map_err(staging_err)?;
                // Nothing staged is used unless the whole object checks out.
                check.finish().map_err(|e| object_error(&key, e))?;
                Ok::<u64, ApplyError>(o.stored_length)
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
                    // The device writes this object while the next ones are copied.
                    // (Pieces are validated sorted from o.offset; saturating anyway.)
                    let end = o.parts().map(|p| p.end()).max().unwrap_or(o.offset);
                    image.start_writeback(o.offset, end.saturating_sub(o.offset));
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
/// a bomb is simply not used. A frame that states more than `max_decoded` bytes is kept
/// as is (memory: the caller budgets that much). Returns the file's path.
pub fn store_prefetched(
    dir: &Path,
    offset: u64,
    stored: &[u8],
    max_decoded: u64,
) -> std::io::Result<PathBuf> {
    let decoded = match zstd::zstd_safe::get_frame_content_size(stored) {
        Ok(Some(n)) if n <= max_decoded.min(pilotlight_protocol::MAX_OBJECT_LIMIT) => {
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

/// The apply's error for an object that failed its check against the manifest.
fn object_error(key: &str, e: ObjectError) -> ApplyError {
    let key = key.to_string();
    match e {
        ObjectError::StoredLength { expected, got } => {
            ApplyError::StoredLength { key, expected, got }
        }
        ObjectError::Decode(detail) => ApplyError::Decode { key, detail },
        ObjectError::DecodedLength { expected, got } => {
            ApplyError::DecodedLength { key, expected, got }
        }
        ObjectError::Checksum { expected, got } => ApplyError::Checksum { key, expected, got },
    }
}

/// Staged bytes are written in batches of this much (fewer, larger writes).
const STAGE_BATCH: u64 = 1 << 20;
/// What a body's chunk from the network holds at most, about.
const CHUNK: u64 = 64 * 1024;

/// Bytes an object holds while it is streamed: a staging batch and a chunk, and for zstd
/// the decoder's window (at most the object's length) and its output buffer.
fn streaming_held(o: &DataObject) -> u64 {
    let batch = STAGE_BATCH.min(o.length) + CHUNK;
    match o.encoding {
        pilotlight_protocol::Encoding::Raw => batch,
        pilotlight_protocol::Encoding::Zstd => batch + o.length.next_power_of_two() + (256 << 10),
    }
}

/// An object's decoded bytes into its slot of the staging file, in batches.
struct StagingWriter<'a> {
    file: &'a File,
    /// The slot's start.
    at: u64,
    batch: Vec<u8>,
    /// Where `batch` starts in the object.
    batch_at: u64,
    one_writer: &'a std::sync::Mutex<()>,
}

impl StagingWriter<'_> {
    fn write(&mut self, off: u64, bytes: &[u8]) -> std::io::Result<()> {
        if self.batch.is_empty() {
            self.batch_at = off;
        }
        self.batch.extend_from_slice(bytes);
        if self.batch.len() as u64 >= STAGE_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        // A page-cache write of at most a batch: short enough for the async task.
        let _one = self.one_writer.lock().unwrap_or_else(|p| p.into_inner());
        self.file
            .write_all_at(&self.batch, self.at + self.batch_at)?;
        self.batch.clear();
        Ok(())
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
mod prefetch_tests;
#[cfg(test)]
mod tests;
