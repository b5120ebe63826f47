//! NBD source: an export served by qemu-nbd, nbdkit (e.g. its vddk plugin) or any NBD
//! server. Without a bitmap: every allocated byte (a self-contained full generation).
//! With `--bitmap NAME`: only what the qemu dirty bitmap marks (exported by
//! `qemu-nbd -B NAME` as meta context `qemu:dirty-bitmap:NAME`). Either way the
//! server's `base:allocation` map turns zero areas into zero ranges without reading them.

use super::{OpenSource, Reader, SourceError};
use pilotlight_nbd::proto::{STATE_DIRTY, STATE_ZERO};
use pilotlight_nbd::{Client, ConnectOptions, NbdUri};
use pilotlight_protocol::extent::coalesce;
use pilotlight_protocol::{Extent, SECTOR_SIZE};
use std::time::Duration;

pub const ALLOCATION: &str = "base:allocation";

pub fn bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

async fn connect(uri: &str, bitmap: Option<&str>) -> Result<(Client, u64), SourceError> {
    let parsed = NbdUri::parse(uri)?;
    let mut contexts = vec![ALLOCATION.to_string()];
    if let Some(b) = bitmap {
        contexts.push(bitmap_context(b));
    }
    let opts = ConnectOptions {
        meta_contexts: contexts,
        timeout: Duration::from_secs(60),
    };
    let client = Client::connect(&parsed, &opts).await?;
    let size = client.info().size;
    if size == 0 {
        return Err(SourceError::EmptyDisk { path: uri.into() });
    }
    if size % SECTOR_SIZE != 0 {
        return Err(SourceError::DiskSize {
            path: uri.into(),
            size,
        });
    }
    Ok((client, size))
}

/// The export's areas that hold data (not reported zero), whole sectors.
async fn nonzero(client: &Client, size: u64) -> Result<Vec<Extent>, SourceError> {
    Ok(coalesce(
        client
            .block_status(ALLOCATION, 0, size)
            .await?
            .into_iter()
            .filter(|s| s.flags & STATE_ZERO == 0)
            .map(|s| sector_out(Extent::new(s.offset, s.length), size)),
    ))
}

/// An export whose changed areas come from elsewhere (vSphere CBT). With `full`, the
/// areas are all the disk holds: everything else becomes zero ranges.
pub async fn open_changed(
    uri: &str,
    changed: &[Extent],
    full: bool,
) -> Result<OpenSource, SourceError> {
    let (client, size) = connect(uri, None).await?;
    let mut listed = Vec::with_capacity(changed.len());
    for e in changed {
        match e.checked_end() {
            Some(end) if end <= size => listed.push(sector_out(*e, size)),
            _ => {
                return Err(SourceError::Read {
                    path: uri.into(),
                    extent: *e,
                    source: std::io::Error::other(format!(
                        "changed area past the end of the {size}-byte disk"
                    )),
                })
            }
        }
    }
    listed.sort();
    let listed = coalesce(listed);
    let data = nonzero(&client, size).await?;
    let (to_read, known_zero) = if full {
        // Unlisted areas are unallocated on the source: zero.
        let (read, _) = split_by_data(&listed, &data);
        let zero = super::alloc::holes(Extent::new(0, size), &read);
        (read, zero)
    } else {
        split_by_data(&listed, &data)
    };
    Ok(OpenSource {
        kind: "vsphere-nbd",
        disk_size: size,
        to_read,
        known_zero,
        self_contained: full,
        reader: Reader::Nbd {
            uri: uri.to_string(),
            client,
        },
    })
}

pub async fn open(uri: &str, bitmap: Option<&str>) -> Result<OpenSource, SourceError> {
    let (client, size) = connect(uri, bitmap).await?;
    let changed = match bitmap {
        Some(b) => coalesce(
            client
                .block_status(&bitmap_context(b), 0, size)
                .await?
                .into_iter()
                .filter(|s| s.flags & STATE_DIRTY != 0)
                .map(|s| sector_out(Extent::new(s.offset, s.length), size)),
        ),
        None => vec![Extent::new(0, size)],
    };
    let data = nonzero(&client, size).await?;
    let (to_read, known_zero) = split_by_data(&changed, &data);
    Ok(OpenSource {
        kind: "nbd",
        disk_size: size,
        to_read,
        known_zero,
        self_contained: bitmap.is_none(),
        reader: Reader::Nbd {
            uri: uri.to_string(),
            client,
        },
    })
}

/// `e` widened to whole sectors, inside the disk.
fn sector_out(e: Extent, size: u64) -> Extent {
    let start = e.offset - e.offset % SECTOR_SIZE;
    let end = e
        .end()
        .div_ceil(SECTOR_SIZE)
        .saturating_mul(SECTOR_SIZE)
        .min(size);
    Extent::new(start, end - start)
}

/// Each changed range cut into the parts that hold data (to read) and the rest (known
/// zero). Both inputs sorted and coalesced.
fn split_by_data(changed: &[Extent], data: &[Extent]) -> (Vec<Extent>, Vec<Extent>) {
    let mut to_read = Vec::new();
    let mut zero = Vec::new();
    let mut i = 0;
    for range in changed {
        while i < data.len() && data[i].end() <= range.offset {
            i += 1;
        }
        let mut inside = Vec::new();
        let mut j = i;
        while j < data.len() && data[j].offset < range.end() {
            let start = data[j].offset.max(range.offset);
            let end = data[j].end().min(range.end());
            inside.push(Extent::new(start, end - start));
            j += 1;
        }
        zero.extend(super::alloc::holes(*range, &inside));
        to_read.extend(inside);
    }
    (coalesce(to_read), coalesce(zero))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_ranges_split_into_data_and_zero() {
        let changed = [Extent::new(0, 100 << 10), Extent::new(1 << 20, 64 << 10)];
        let data = [
            Extent::new(4096, 8192),
            Extent::new(96 << 10, (1 << 20) - (96 << 10) + (32 << 10)),
        ];
        let (r, z) = split_by_data(&changed, &data);
        assert_eq!(
            r,
            vec![
                Extent::new(4096, 8192),
                Extent::new(96 << 10, 4 << 10),
                Extent::new(1 << 20, 32 << 10)
            ]
        );
        assert_eq!(
            z,
            vec![
                Extent::new(0, 4096),
                Extent::new(12288, (96 << 10) - 12288),
                Extent::new((1 << 20) + (32 << 10), 32 << 10)
            ]
        );
        let covered: u64 = r.iter().chain(&z).map(|e| e.length).sum();
        assert_eq!(covered, (100 << 10) + (64 << 10));
    }

    #[test]
    fn sectors_round_outward_within_the_disk() {
        assert_eq!(
            sector_out(Extent::new(700, 100), 4096),
            Extent::new(512, 512)
        );
        assert_eq!(
            sector_out(Extent::new(3800, 296), 4096),
            Extent::new(3584, 512)
        );
    }
}
