//! Where changed bytes come from. Every source is opened read-only and never written.
//!
//! Opening a source validates all of its input before anything is uploaded, and yields
//! the ranges to read plus the changed ranges already known to be zero (holes in the
//! allocation map), which are never read.

pub mod alloc;
pub mod direct;
pub mod extent_list;
pub mod nbd;

use crate::read_buf::{BufferPool, ReadBuf};
use direct::DirectFile;
use pilotlight_protocol::extent::coalesce;
use pilotlight_protocol::{Extent, SECTOR_SIZE};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use extent_list::ExtentListError;

/// What to read, as given by the user.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    /// A changed-extent list (PowerCLI text or JSON) plus the disk file or block device.
    ExtentList { list: PathBuf, disk: PathBuf },
    /// Every allocated byte of a sparse file (holes become zero ranges), or the whole
    /// device. Self-contained: the generation needs no parent.
    Full { disk: PathBuf },
    /// A directory of files named by decimal byte offset (`delta/<offset>`), as the
    /// seed's modified vixDiskLibSample writes them.
    Spool { dir: PathBuf, disk_size: u64 },
    /// An NBD export (`nbd://host:port/export`, `nbd+unix:///export?socket=PATH`): with a
    /// qemu dirty bitmap, what it marks; without, every allocated byte.
    Nbd { uri: String, bitmap: Option<String> },
    /// An NBD export whose changed areas are known from elsewhere (vSphere
    /// `QueryChangedDiskAreas`). `full`: the areas are every allocated byte of the disk
    /// (changeId `*`), so the generation describes the whole disk and the rest is zero.
    NbdChanged {
        uri: String,
        changed: Vec<Extent>,
        full: bool,
    },
}

impl SourceSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceSpec::ExtentList { .. } => "extent-list",
            SourceSpec::Full { .. } => "full",
            SourceSpec::Spool { .. } => "spool",
            SourceSpec::Nbd { .. } => "nbd",
            SourceSpec::NbdChanged { .. } => "vsphere-nbd",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    ExtentList(#[from] ExtentListError),
    #[error(transparent)]
    NbdUri(#[from] pilotlight_nbd::UriError),
    #[error(transparent)]
    Nbd(#[from] pilotlight_nbd::NbdError),
    #[error("{kind} source must be opened with OpenSource::open_async")]
    NeedsAsync { kind: &'static str },
    #[error("cannot open disk {path}: {source}")]
    OpenDisk {
        path: String,
        source: std::io::Error,
    },
    #[error("disk {path} is {size} bytes, not a multiple of {SECTOR_SIZE}: only whole sectors can be replicated")]
    DiskSize { path: String, size: u64 },
    #[error("disk {path} is empty")]
    EmptyDisk { path: String },
    #[error("cannot read the allocation map of {path}: {source}")]
    AllocMap {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read spool directory {path}: {source}")]
    SpoolDir {
        path: String,
        source: std::io::Error,
    },
    #[error("spool file {path}: {why}")]
    SpoolFile { path: String, why: String },
    #[error("spool directory {path} is empty: nothing to send")]
    SpoolEmpty { path: String },
    #[error("read of {extent} from {path} failed: {source}")]
    Read {
        path: String,
        extent: Extent,
        source: std::io::Error,
    },
}

/// An opened, validated source.
#[derive(Debug)]
pub struct OpenSource {
    pub kind: &'static str,
    pub disk_size: u64,
    /// Ranges to read: sorted, coalesced, inside the disk, sector aligned.
    pub to_read: Vec<Extent>,
    /// Changed ranges known to be zero without reading (holes): sorted, coalesced.
    pub known_zero: Vec<Extent>,
    /// True when the generation describes the whole disk (needs no parent).
    pub self_contained: bool,
    reader: Reader,
}

#[derive(Debug)]
enum Reader {
    File {
        path: PathBuf,
        file: File,
        /// The same file opened for unbuffered reads, where the file system allows.
        direct: Option<DirectFile>,
    },
    Spool {
        files: Vec<(Extent, PathBuf)>,
    },
    Nbd {
        uri: String,
        client: pilotlight_nbd::Client,
    },
}

impl OpenSource {
    /// Opens any source (NBD sources connect and ask the server for their maps).
    pub async fn open_async(spec: &SourceSpec) -> Result<Self, SourceError> {
        match spec {
            SourceSpec::Nbd { uri, bitmap } => nbd::open(uri, bitmap.as_deref()).await,
            SourceSpec::NbdChanged { uri, changed, full } => {
                nbd::open_changed(uri, changed, *full).await
            }
            other => Self::open(other),
        }
    }

    /// Opens a file-based source.
    pub fn open(spec: &SourceSpec) -> Result<Self, SourceError> {
        match spec {
            SourceSpec::Nbd { .. } | SourceSpec::NbdChanged { .. } => {
                Err(SourceError::NeedsAsync { kind: spec.kind() })
            }
            SourceSpec::ExtentList { list, disk } => {
                let (file, size) = open_disk(disk)?;
                let extents = extent_list::read_extent_list(list, size)?;
                Self::from_file(spec.kind(), disk, file, size, coalesce(extents), false)
            }
            SourceSpec::Full { disk } => {
                let (file, size) = open_disk(disk)?;
                Self::from_file(
                    spec.kind(),
                    disk,
                    file,
                    size,
                    vec![Extent::new(0, size)],
                    true,
                )
            }
            SourceSpec::Spool { dir, disk_size } => open_spool(dir, *disk_size),
        }
    }

    /// Splits `changed` into data and holes with the file's allocation map.
    fn from_file(
        kind: &'static str,
        path: &Path,
        file: File,
        disk_size: u64,
        changed: Vec<Extent>,
        self_contained: bool,
    ) -> Result<Self, SourceError> {
        let is_regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
        let mut to_read = Vec::new();
        let mut known_zero = Vec::new();
        for range in changed {
            if is_regular {
                let data =
                    alloc::data_segments(&file, range).map_err(|source| SourceError::AllocMap {
                        path: path.display().to_string(),
                        source,
                    })?;
                known_zero.extend(alloc::holes(range, &data));
                to_read.extend(data);
            } else {
                to_read.push(range);
            }
        }
        let direct = DirectFile::reopen(&file);
        Ok(Self {
            kind,
            disk_size,
            to_read: coalesce(to_read),
            known_zero: coalesce(known_zero),
            self_contained,
            reader: Reader::File {
                path: path.to_path_buf(),
                file,
                direct,
            },
        })
    }

    /// Reads `chunks` into one buffer from `pool`, concatenated in order: files in one
    /// blocking task (a reused buffer's pages are mapped already, where a new buffer's
    /// are faulted in by the read), NBD chunk by chunk.
    pub async fn read_chunks(
        self: &std::sync::Arc<Self>,
        chunks: &[Extent],
        pool: &std::sync::Arc<BufferPool>,
    ) -> Result<ReadBuf, SourceError> {
        let total: u64 = chunks.iter().map(|c| c.length).sum();
        if matches!(self.reader, Reader::Nbd { .. }) {
            let mut buf = Vec::new();
            for &c in chunks {
                let part = self.read_chunk(c).await?;
                if buf.is_empty() {
                    buf = part;
                } else {
                    buf.extend_from_slice(&part);
                }
            }
            return Ok(ReadBuf::from_vec(buf));
        }
        let me = self.clone();
        let list = chunks.to_vec();
        let first = chunks[0];
        let mut buf = pool.take(total as usize);
        tokio::task::spawn_blocking(move || {
            let mut pos = 0usize;
            for c in list {
                let end = pos + c.length as usize;
                me.read_at(c.offset, &mut buf[pos..end])?;
                pos = end;
            }
            Ok(buf)
        })
        .await
        .map_err(|e| SourceError::Read {
            path: self.describe(),
            extent: first,
            source: std::io::Error::other(e),
        })?
    }

    /// Reads `chunk`: files from a blocking task, NBD with requests in flight together.
    pub async fn read_chunk(
        self: &std::sync::Arc<Self>,
        chunk: Extent,
    ) -> Result<Vec<u8>, SourceError> {
        if let Reader::Nbd { client, .. } = &self.reader {
            return Ok(client.read(chunk.offset, chunk.length as usize).await?);
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; chunk.length as usize];
            me.read_at(chunk.offset, &mut buf).map(|()| buf)
        })
        .await
        .map_err(|e| SourceError::Read {
            path: self.describe(),
            extent: chunk,
            source: std::io::Error::other(e),
        })?
    }

    /// Reads exactly `buf.len()` bytes at `offset`. Blocking: call from a blocking task.
    /// (NBD sources read with [`OpenSource::read_chunk`].)
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let extent = Extent::new(offset, buf.len() as u64);
        match &self.reader {
            Reader::Nbd { .. } => Err(SourceError::NeedsAsync { kind: self.kind }),
            Reader::File { path, file, direct } => {
                let unbuffered = direct.as_ref().and_then(|d| d.read_exact_at(buf, offset));
                unbuffered
                    .unwrap_or_else(|| file.read_exact_at(buf, offset))
                    .map_err(|source| SourceError::Read {
                        path: path.display().to_string(),
                        extent,
                        source,
                    })
            }
            Reader::Spool { files } => {
                let mut pos = offset;
                let mut filled = 0usize;
                while filled < buf.len() {
                    // The file holding `pos`: the last one starting at or before it.
                    let i = files.partition_point(|(e, _)| e.offset <= pos);
                    let Some((e, path)) = i.checked_sub(1).map(|i| &files[i]) else {
                        return Err(spool_gap(extent));
                    };
                    if pos >= e.end() {
                        return Err(spool_gap(extent));
                    }
                    let n = ((e.end() - pos) as usize).min(buf.len() - filled);
                    let read = File::open(path).and_then(|f| {
                        f.read_exact_at(&mut buf[filled..filled + n], pos - e.offset)
                    });
                    read.map_err(|source| SourceError::Read {
                        path: path.display().to_string(),
                        extent,
                        source,
                    })?;
                    filled += n;
                    pos += n as u64;
                }
                Ok(())
            }
        }
    }

    /// A short description of the input for logs.
    pub fn describe(&self) -> String {
        match &self.reader {
            Reader::File { path, .. } => path.display().to_string(),
            Reader::Spool { files } => format!("{} spool files", files.len()),
            Reader::Nbd { uri, .. } => uri.clone(),
        }
    }
}

fn spool_gap(extent: Extent) -> SourceError {
    SourceError::Read {
        path: "spool".into(),
        extent,
        source: std::io::Error::other("range not covered by any spool file"),
    }
}

fn open_disk(path: &Path) -> Result<(File, u64), SourceError> {
    let p = || path.display().to_string();
    // Read-only, always: the source is never written.
    let mut file =
        File::open(path).map_err(|source| SourceError::OpenDisk { path: p(), source })?;
    // Works for regular files and block devices alike.
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|source| SourceError::OpenDisk { path: p(), source })?;
    if size == 0 {
        return Err(SourceError::EmptyDisk { path: p() });
    }
    if size % SECTOR_SIZE != 0 {
        return Err(SourceError::DiskSize { path: p(), size });
    }
    Ok((file, size))
}

fn open_spool(dir: &Path, disk_size: u64) -> Result<OpenSource, SourceError> {
    let dir_err = |source| SourceError::SpoolDir {
        path: dir.display().to_string(),
        source,
    };
    if disk_size == 0 || !disk_size.is_multiple_of(SECTOR_SIZE) {
        return Err(SourceError::SpoolFile {
            path: dir.display().to_string(),
            why: format!("--disk-size {disk_size} must be a positive multiple of {SECTOR_SIZE}"),
        });
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_err)? {
        let entry = entry.map_err(dir_err)?;
        let path = entry.path();
        let bad = |why: String| SourceError::SpoolFile {
            path: path.display().to_string(),
            why,
        };
        let name = entry.file_name();
        let Some(name) = name
            .to_str()
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        else {
            return Err(bad(
                "name is not a decimal byte offset; remove or move it".into()
            ));
        };
        let offset: u64 = name
            .parse()
            .map_err(|_| bad("offset does not fit in 64 bits".into()))?;
        // Follows symlinks: a dangling link or a directory is an unreadable spool file.
        let meta = std::fs::metadata(&path).map_err(|e| bad(format!("cannot read: {e}")))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        File::open(&path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let e = Extent::new(offset, meta.len());
        if e.length == 0 {
            return Err(bad("file is empty".into()));
        }
        if !e.is_sector_aligned() {
            return Err(bad(format!(
                "extent {e} is not aligned to {SECTOR_SIZE}-byte sectors"
            )));
        }
        if e.checked_end().is_none_or(|end| end > disk_size) {
            return Err(bad(format!(
                "extent {e} ends past the disk size {disk_size}"
            )));
        }
        files.push((e, path));
    }
    if files.is_empty() {
        return Err(SourceError::SpoolEmpty {
            path: dir.display().to_string(),
        });
    }
    files.sort_by_key(|(e, _)| e.offset);
    for w in files.windows(2) {
        if w[1].0.offset < w[0].0.end() {
            return Err(SourceError::SpoolFile {
                path: w[1].1.display().to_string(),
                why: format!(
                    "extent {} overlaps {} ({})",
                    w[1].0,
                    w[0].0,
                    w[0].1.display()
                ),
            });
        }
    }
    Ok(OpenSource {
        kind: "spool",
        disk_size,
        to_read: coalesce(files.iter().map(|(e, _)| *e)),
        known_zero: Vec::new(),
        self_contained: false,
        reader: Reader::Spool { files },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Whatever mix of large page-aligned (unbuffered) and other (buffered) chunks a
        /// group holds, each lands at its place in the buffer with the disk's bytes.
        #[test]
        fn grouped_reads_return_the_disks_bytes(
            picks in proptest::collection::vec((0u64..64, 1u64..160, proptest::bool::ANY), 1..6),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let disk = dir.path().join("disk.raw");
            let bytes: Vec<u8> = (0..8u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
            std::fs::write(&disk, &bytes).unwrap();
            // Disjoint, sorted chunks of whole sectors; `page`: of whole pages at page
            // offsets (up to 640 KiB: most long enough to be read unbuffered).
            let mut chunks = Vec::new();
            let mut at = 0u64;
            for (gap, len, page) in picks {
                let unit = if page { 4096 } else { 512 };
                let c = Extent::new((at + gap * unit).div_ceil(unit) * unit, len * unit);
                at = c.end();
                chunks.push(c);
            }
            proptest::prop_assume!(at <= bytes.len() as u64);
            let source = std::sync::Arc::new(
                OpenSource::open(&SourceSpec::Full { disk: disk.clone() }).unwrap(),
            );
            let pool = BufferPool::new(1, 1 << 20);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            // Twice: the second read reuses the first one's buffer.
            for _ in 0..2 {
                let got = rt.block_on(source.read_chunks(&chunks, &pool)).unwrap();
                let want: Vec<u8> = chunks
                    .iter()
                    .flat_map(|c| bytes[c.offset as usize..c.end() as usize].iter().copied())
                    .collect();
                proptest::prop_assert_eq!(&got[..], &want[..]);
            }
        }
    }

    #[test]
    fn spool_reads_across_adjacent_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("0"), [1u8; 512]).unwrap();
        std::fs::write(dir.path().join("512"), [2u8; 1024]).unwrap();
        std::fs::write(dir.path().join("4096"), [3u8; 512]).unwrap();
        let s = OpenSource::open(&SourceSpec::Spool {
            dir: dir.path().into(),
            disk_size: 8192,
        })
        .unwrap();
        assert_eq!(
            s.to_read,
            vec![Extent::new(0, 1536), Extent::new(4096, 512)]
        );
        let mut buf = vec![0u8; 1024];
        s.read_at(256, &mut buf).unwrap();
        assert_eq!(&buf[..256], &[1u8; 256][..]);
        assert_eq!(&buf[256..], &[2u8; 768][..]);
    }

    #[test]
    fn spool_rejections() {
        type Make = Box<dyn Fn(&Path)>;
        let cases: Vec<(Make, &str)> = vec![
            (
                Box::new(|d| std::fs::write(d.join("12x"), [0u8; 512]).unwrap()),
                "decimal",
            ),
            (
                Box::new(|d| std::fs::write(d.join("100"), [0u8; 512]).unwrap()),
                "aligned",
            ),
            (
                Box::new(|d| std::fs::write(d.join("0"), [0u8; 100]).unwrap()),
                "aligned",
            ),
            (
                Box::new(|d| std::fs::write(d.join("8192"), [0u8; 512]).unwrap()),
                "past the disk",
            ),
            (
                Box::new(|d| std::fs::create_dir(d.join("512")).unwrap()),
                "not a regular file",
            ),
            (
                Box::new(|d| std::os::unix::fs::symlink(d.join("missing"), d.join("512")).unwrap()),
                "cannot read",
            ),
            (
                Box::new(|d| {
                    std::fs::write(d.join("0"), [0u8; 1024]).unwrap();
                    std::fs::write(d.join("512"), [0u8; 512]).unwrap();
                }),
                "overlaps",
            ),
            (Box::new(|_| {}), "empty"),
        ];
        for (make, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            make(dir.path());
            let err = OpenSource::open(&SourceSpec::Spool {
                dir: dir.path().into(),
                disk_size: 8192,
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn disk_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.raw");
        let err = OpenSource::open(&SourceSpec::Full { disk: missing }).unwrap_err();
        assert!(err.to_string().contains("nope.raw"), "{err}");
        let odd = dir.path().join("odd.raw");
        std::fs::write(&odd, [0u8; 1000]).unwrap();
        let err = OpenSource::open(&SourceSpec::Full { disk: odd }).unwrap_err();
        assert!(matches!(err, SourceError::DiskSize { .. }), "{err}");
    }

    #[test]
    fn full_source_splits_data_and_holes() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mib = 1u64 << 20;
        f.as_file().set_len(32 * mib).unwrap();
        f.as_file().write_all_at(&[9u8; 8192], 4 * mib).unwrap();
        let s = OpenSource::open(&SourceSpec::Full {
            disk: f.path().into(),
        })
        .unwrap();
        assert!(s.self_contained);
        let read: u64 = s.to_read.iter().map(|e| e.length).sum();
        let zero: u64 = s.known_zero.iter().map(|e| e.length).sum();
        assert_eq!(read + zero, 32 * mib, "the whole disk is covered");
        assert!(read < 8 * mib, "holes are not read: {:?}", s.to_read);
    }
}
