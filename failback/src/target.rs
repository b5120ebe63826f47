//! Where failback writes: a raw file or block device, or an NBD export (qemu-nbd, nbdkit;
//! nbdkit's vddk plugin for a vSphere disk). One interface: positioned writes, zeroes,
//! reads (for the read-back check) and a flush that makes everything written durable.

use crate::FailbackError;
use bytes::Bytes;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

/// A disk failback writes into.
#[derive(Debug, Clone)]
pub enum Target {
    File {
        path: PathBuf,
        file: Arc<File>,
        size: u64,
    },
    Nbd(pilotlight_nbd::Client),
}

impl Target {
    /// `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH` is an NBD export
    /// (it must be writable); anything else is a path to an existing file or block
    /// device, opened for writing.
    pub async fn open(spec: &str) -> Result<Target, FailbackError> {
        let target = if spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") {
            let uri = pilotlight_nbd::NbdUri::parse(spec).map_err(|e| FailbackError::Target {
                target: spec.into(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
            })?;
            let client =
                pilotlight_nbd::Client::connect(&uri, &pilotlight_nbd::ConnectOptions::default())
                    .await?;
            if client.info().read_only() {
                return Err(FailbackError::Target {
                    target: spec.into(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        "the export is read-only: serve it writable (qemu-nbd without -r, nbdkit without -r)",
                    ),
                });
            }
            Target::Nbd(client)
        } else {
            let path = PathBuf::from(spec);
            let io = |source| FailbackError::Target {
                target: spec.into(),
                source,
            };
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io)?;
            // A block device's metadata says 0 bytes: its end says how large it is.
            let size = {
                use std::io::Seek;
                (&file).seek(std::io::SeekFrom::End(0)).map_err(io)?
            };
            Target::File {
                path,
                file: Arc::new(file),
                size,
            }
        };
        if target.size() % 512 != 0 {
            return Err(FailbackError::NotSectors {
                target: spec.into(),
                size: target.size(),
            });
        }
        Ok(target)
    }

    pub fn name(&self) -> String {
        match self {
            Target::File { path, .. } => path.display().to_string(),
            Target::Nbd(c) => c.uri().to_string(),
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Target::File { size, .. } => *size,
            Target::Nbd(c) => c.info().size,
        }
    }

    fn io(&self, source: std::io::Error) -> FailbackError {
        FailbackError::Target {
            target: self.name(),
            source,
        }
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), FailbackError> {
        match self {
            Target::File { file, .. } => {
                let file = file.clone();
                blocking(move || file.write_all_at(&data, offset))
                    .await
                    .map_err(|e| self.io(e))
            }
            Target::Nbd(c) => Ok(c.write(offset, &data).await?),
        }
    }

    /// `[offset, offset+len)` reads as zeroes afterwards: a punched hole in a file (zero
    /// writes where the file system cannot punch), WRITE_ZEROES on NBD.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), FailbackError> {
        if len == 0 {
            return Ok(());
        }
        match self {
            Target::File { file, .. } => {
                let file = file.clone();
                blocking(move || pilotlight_durable::sparse::punch_or_zero(&file, offset, len))
                    .await
                    .map_err(|e| self.io(e))
            }
            Target::Nbd(c) => Ok(c.write_zeroes(offset, len).await?),
        }
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, FailbackError> {
        match self {
            Target::File { file, .. } => {
                let file = file.clone();
                blocking(move || {
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, offset).map(|()| buf)
                })
                .await
                .map_err(|e| self.io(e))
            }
            Target::Nbd(c) => Ok(c.read(offset, len).await?),
        }
    }

    /// Everything written so far is durable when this returns.
    pub async fn flush(&self) -> Result<(), FailbackError> {
        match self {
            Target::File { file, .. } => {
                let file = file.clone();
                blocking(move || file.sync_data())
                    .await
                    .map_err(|e| self.io(e))
            }
            Target::Nbd(c) => Ok(c.flush().await?),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}
/// A drill's target: a new sparse copy of the site's disk at `to` (never over an existing
/// file), its data segments copied and its holes left holes, fsynced. The rounds then
/// write into the copy and the site's disk is never touched. Returns the bytes copied.
pub fn sparse_copy(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let src = File::open(from)?;
    let size = (&src).seek(SeekFrom::End(0))?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    dst.set_len(size)?;
    let mut copied = 0;
    let mut buf = vec![0u8; 1 << 20];
    let range = pilotlight_protocol::Extent::new(0, size);
    for seg in pilotlight_durable::sparse::data_segments(&src, range)? {
        let mut pos = seg.offset;
        while pos < seg.end() {
            let n = (seg.end() - pos).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], pos)?;
            dst.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
            copied += n as u64;
        }
    }
    dst.sync_all()?;
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(copied)
}
