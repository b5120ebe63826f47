use super::*;
use crate::image::FileImage;
use chrono::DateTime;
use pilotlight_cloud::MemoryStore;
use pilotlight_protocol::{DiskId, Encoding, Sha256Hex, MAX_OBJECT_LIMIT};
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
                    && gr.iter().map(|x| x.0.length).sum::<u64>() + w.0.length <= m.max_object =>
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
        budget: Default::default(),
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
                    1 => { store_prefetched(&pf, obj.offset, &stored, MAX_OBJECT_LIMIT).unwrap(); }
                    _ => { stored[0] ^= 1; store_prefetched(&pf, obj.offset, &stored, MAX_OBJECT_LIMIT).unwrap(); }
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
    // Claim a shorter decoded length than the object really has: decoding stops at the
    // manifest's length (streamed, nothing past the object's slot is staged).
    m.objects[0].length -= 512;
    expect_rejected(
        &dir,
        &src,
        image,
        &m,
        &before,
        "decodes to 4096 bytes, the manifest says 3584",
    )
    .await;
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

/// An image that records what it was asked to write back early, and when it synced.
struct Recording {
    inner: Arc<FileImage>,
    log: std::sync::Mutex<Vec<Option<Extent>>>,
}

impl Image for Recording {
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
    fn set_size(&self, s: u64) -> std::io::Result<()> {
        self.inner.set_size(s)
    }
    fn reserve(&self, o: u64, l: u64) -> std::io::Result<()> {
        self.inner.reserve(o, l)
    }
    fn write_at(&self, o: u64, d: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(o, d)
    }
    fn punch(&self, o: u64, l: u64) -> std::io::Result<()> {
        self.inner.punch(o, l)
    }
    fn start_writeback(&self, o: u64, l: u64) {
        self.inner.start_writeback(o, l);
        self.log.lock().unwrap().push(Some(Extent::new(o, l)));
    }
    fn sync(&self) -> std::io::Result<()> {
        self.log.lock().unwrap().push(None);
        self.inner.sync()
    }
}

#[tokio::test]
async fn every_written_range_is_sent_to_the_device_before_the_final_sync() {
    let (dir, src, image, m, _) = setup().await;
    let rec = Arc::new(Recording {
        inner: image,
        log: std::sync::Mutex::new(Vec::new()),
    });
    apply(&src, &prefix(), &m, rec.clone(), &opts(dir.path()))
        .await
        .unwrap();
    let log = rec.log.lock().unwrap().clone();
    assert_eq!(log.last(), Some(&None), "the sync comes last: {log:?}");
    let kicked: Vec<Extent> = log.iter().flatten().copied().collect();
    assert_eq!(kicked.len(), m.objects.len(), "one per object: {log:?}");
    for part in m.objects.iter().flat_map(DataObject::parts) {
        assert!(
            kicked
                .iter()
                .any(|k| k.offset <= part.offset && part.end() <= k.end()),
            "{part} was written but not sent early: {kicked:?}"
        );
    }
}

#[tokio::test]
async fn objects_are_fetched_only_within_the_bytes_in_flight_budget() {
    let (dir, src, image, m, _) = setup().await;
    let mut o = opts(dir.path());
    // The whole budget held elsewhere (a prefetch, another disk): nothing is fetched.
    o.budget = crate::budget::Budget::new(64 * 1024);
    let held = o.budget.acquire(u64::MAX).await;
    let gets_before = src.faults.calls("GetObject");
    let pfx = prefix();
    let run = apply(&src, &pfx, &m, image, &o);
    tokio::pin!(run);
    // Polled in this task while the budget is held: it cannot finish.
    for _ in 0..50 {
        assert!(futures::FutureExt::now_or_never(&mut run).is_none());
        tokio::task::yield_now().await;
    }
    assert_eq!(
        src.faults.calls("GetObject"),
        gets_before,
        "waits for the budget"
    );
    drop(held);
    run.await.unwrap();
    assert_eq!(
        src.faults.calls("GetObject"),
        gets_before + m.objects.len() as u64
    );
    assert_eq!(
        o.budget.available(),
        o.budget.bytes(),
        "every byte given back"
    );
}
