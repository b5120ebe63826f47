//! What the receiver's integration tests share: generations of a test disk built as
//! manifests plus objects, with the image after each, and the engine's test config.
#![allow(dead_code, clippy::unwrap_used)]

use chrono::DateTime;
use pilotlight_cloud::ebs::{EbsApi, MemoryEbs, SnapshotFilter, SnapshotStatus};
use pilotlight_cloud::MemoryStore;
use pilotlight_protocol::points::{tag, Point};
use pilotlight_protocol::{
    DataObject, DiskId, Encoding, Extent, Manifest, ObjectKey, Prefix, Sha256Hex,
};
use pilotlight_receiver::engine::EngineConfig;
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

pub const SECTOR: u64 = 512;
pub const VISIBILITY: Duration = Duration::from_secs(30);

pub fn prefix() -> Prefix {
    Prefix::new("p").unwrap()
}

pub fn disk(i: usize) -> DiskId {
    DiskId::new("s", &format!("vm{}", i / 2), &format!("d{i}")).unwrap()
}

/// One write of a generation: `len` sectors at sector `at`, zeroes or a pattern.
#[derive(Debug, Clone)]
pub struct Write {
    pub at: u64,
    pub len: u64,
    pub zero: bool,
    pub seed: u8,
}

/// One generation of one disk: a base (full) or a child of the previous one.
#[derive(Debug, Clone)]
pub struct GenSpec {
    pub base: bool,
    pub writes: Vec<Write>,
}

/// A write of up to `max_len` sectors inside a disk of `disk_sectors`; about one in eight
/// writes zeroes.
pub fn write_strategy(disk_sectors: u64, max_len: u64) -> impl Strategy<Value = Write> {
    (0..disk_sectors, 1..max_len, any::<bool>(), 1u8..250).prop_map(move |(at, len, zero, seed)| {
        Write {
            at,
            len: len.min(disk_sectors - at),
            zero: zero && seed % 4 == 0,
            seed,
        }
    })
}

/// A generation of `writes` such writes; one in ten a base.
pub fn gen_strategy(
    disk_sectors: u64,
    max_len: u64,
    writes: std::ops::Range<usize>,
) -> impl Strategy<Value = GenSpec> {
    (
        prop::bool::weighted(0.1),
        prop::collection::vec(write_strategy(disk_sectors, max_len), writes),
    )
        .prop_map(|(base, writes)| GenSpec { base, writes })
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed) ^ seed.rotate_left(3) ^ (i >> 9) as u8)
        .collect()
}

/// A disk's generations as manifests plus objects, and the image after each.
pub struct Chain {
    pub manifests: Vec<Manifest>,
    pub objects: Vec<Vec<(String, Vec<u8>)>>,
    pub images: Vec<Vec<u8>>,
}

pub fn build_chain(d: usize, specs: &[GenSpec], disk_sectors: u64) -> Chain {
    let size = disk_sectors * SECTOR;
    let mut image = vec![0u8; size as usize];
    let mut chain = Chain {
        manifests: vec![],
        objects: vec![],
        images: vec![],
    };
    for (i, spec) in specs.iter().enumerate() {
        let g = i as u64 + 1;
        let base = i == 0 || spec.base;
        if base {
            image = vec![0u8; size as usize];
        }
        // Sector-level "last write wins", then cut into objects and zero ranges.
        let mut sectors: BTreeMap<u64, Option<Vec<u8>>> = BTreeMap::new();
        for w in &spec.writes {
            let data = pattern(w.seed, (w.len * SECTOR) as usize);
            for s in 0..w.len {
                let v = (!w.zero)
                    .then(|| data[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize].to_vec());
                sectors.insert(w.at + s, v);
            }
        }
        let mut m = Manifest::new(
            disk(d),
            g,
            if base { None } else { Some(g - 1) },
            size,
            DateTime::from_timestamp(1_700_000_000 + g as i64, 0).unwrap(),
            "test",
        );
        m.max_object = 8 * SECTOR;
        let mut objects = vec![];
        // Runs of consecutive sectors of the same kind; data runs split at max_object.
        let mut run: Option<(u64, u64, bool, Vec<u8>)> = None;
        let flush = |run: &mut Option<(u64, u64, bool, Vec<u8>)>,
                     m: &mut Manifest,
                     objects: &mut Vec<(String, Vec<u8>)>| {
            if let Some((start, n, zero, bytes)) = run.take() {
                if zero {
                    m.zero_ranges.push(Extent::new(start * SECTOR, n * SECTOR));
                } else {
                    let off = start * SECTOR;
                    m.objects.push(DataObject {
                        offset: off,
                        length: n * SECTOR,
                        encoding: Encoding::Raw,
                        stored_length: bytes.len() as u64,
                        sha256: Sha256Hex(Sha256::digest(&bytes).into()),
                        pieces: Vec::new(),
                    });
                    let key = ObjectKey::Data {
                        disk: disk(d),
                        generation: g,
                        offset: off,
                    }
                    .to_key(&prefix());
                    objects.push((key, bytes));
                }
            }
        };
        for (s, v) in &sectors {
            let zero = v.is_none();
            let contiguous = run
                .as_ref()
                .is_some_and(|(start, n, z, _)| start + n == *s && *z == zero && (zero || *n < 8));
            if !contiguous {
                flush(&mut run, &mut m, &mut objects);
                run = Some((*s, 0, zero, vec![]));
            }
            if let Some((_, n, _, bytes)) = run.as_mut() {
                *n += 1;
                if let Some(v) = v {
                    bytes.extend_from_slice(v);
                }
            }
            let r = (*s * SECTOR) as usize..((*s + 1) * SECTOR) as usize;
            match v {
                Some(v) => image[r].copy_from_slice(v),
                None => image[r].fill(0),
            }
        }
        flush(&mut run, &mut m, &mut objects);
        m.validate().unwrap();
        chain.manifests.push(m);
        chain.objects.push(objects);
        chain.images.push(image.clone());
    }
    chain
}

pub fn event(key: &str) -> String {
    serde_json::json!({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "eventTime": "2026-11-23T11:31:26.746", "s3": {"bucket": {"name": "b"}, "object": {"key": key, "size": 1}}}]})
    .to_string()
}

pub fn config(root: &Path) -> EngineConfig {
    EngineConfig {
        bucket: "b".into(),
        prefix: prefix(),
        image_dir: root.join("images"),
        state_dir: root.join("state"),
        concurrency: 2,
        wait: Duration::ZERO,
        visibility_secs: VISIBILITY.as_secs() as i32,
        reconcile_every: None,
        prefetch: true,
        retry_base: Duration::ZERO,
        budget: Default::default(),
    }
}

/// Commits generation `i` of `chain` into the store: its objects, then its manifest.
pub fn commit(store: &MemoryStore, chain: &Chain, i: usize) {
    for (key, bytes) in &chain.objects[i] {
        store.insert(key, bytes.clone());
    }
    let m = &chain.manifests[i];
    let key = ObjectKey::Manifest {
        disk: m.disk.clone(),
        generation: m.generation,
    }
    .to_key(&prefix());
    store.insert(&key, serde_json::to_vec(m).unwrap());
}

/// Completed points of a disk, by generation.
pub async fn points_of(ebs: &MemoryEbs, id: &DiskId) -> BTreeMap<u64, Vec<Point>> {
    let f = SnapshotFilter::default()
        .tag(tag::POINT, "1")
        .tag(tag::DISK, id.disk.as_str())
        .tag(tag::VM, id.vm.as_str());
    let mut out: BTreeMap<u64, Vec<Point>> = BTreeMap::new();
    for s in ebs.describe_snapshots(&f).await.unwrap() {
        if s.status == SnapshotStatus::Completed {
            let p = Point::from_tags(&s.id, &s.tags).unwrap();
            out.entry(p.generation).or_default().push(p);
        }
    }
    out
}

/// A point's disk as the service serves it: every listed block, read with its token.
pub async fn read_point(ebs: &MemoryEbs, id: &str, size: usize) -> Vec<u8> {
    const BLOCK: usize = 512 * 1024;
    let mut out = vec![0u8; size.div_ceil(BLOCK) * BLOCK];
    for b in ebs.list_snapshot_blocks(id).await.unwrap() {
        let data = ebs.get_snapshot_block(id, &b).await.unwrap();
        let at = b.index as usize * BLOCK;
        // Past the disk (the snapshot is whole GiB): must be zero.
        if at >= out.len() {
            assert!(
                data.iter().all(|&x| x == 0),
                "block {} past the disk",
                b.index
            );
            continue;
        }
        out[at..at + data.len()].copy_from_slice(&data);
    }
    out.truncate(size);
    out
}

/// A write of `len` sectors at sector `at`, of pattern `seed`.
pub fn w(at: u64, len: u64, seed: u8) -> Write {
    Write {
        at,
        len,
        zero: false,
        seed,
    }
}
