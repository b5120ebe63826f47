//! The snapshots-mode test kit: random generations of a few disks published into the
//! in-memory bucket the way the sender writes them (objects first, manifest last), a
//! byte model of every disk at every generation, and a small Lambda simulator over the
//! in-memory queues (batches, several invocations at once, kills, visibility timeouts).

#![allow(dead_code)]

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use futures::future::join_all;
use pilotlight_cloud::ebs::{EbsApi, MemoryEbs, SnapshotFilter, SnapshotStatus, BLOCK_SIZE};
use pilotlight_cloud::sqs::Queue;
use pilotlight_cloud::{MemoryQueue, MemoryStore};
use pilotlight_protocol::points::{tag, Point};
use pilotlight_protocol::replica::ChainHead;
use pilotlight_protocol::{
    DataObject, DiskId, Encoding, Extent, Manifest, ObjectKey, Prefix, Sha256Hex,
};
use pilotlight_replica::{handle_body, Outcome, Replica, ReplicaConfig};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub const SECTOR: u64 = 512;
pub const STACK: &str = "pl-test";

#[derive(Debug, Clone)]
pub struct Case {
    pub seed: u64,
    pub disks: usize,
    pub gens: u64,
    pub shard_blocks: u64,
    pub duplicates: usize,
    pub parallel: usize,
    pub kill_every: Option<u32>,
    pub faults: bool,
    /// Disks under one block (for fleets of many disks: small in memory).
    pub tiny: bool,
    /// Disks of 20-30 MiB (several S3 parts of 5 MiB: fanned-out exports).
    pub big: bool,
}

impl Case {
    pub fn fixed(seed: u64, gens: u64) -> Case {
        Case {
            seed,
            disks: 1,
            gens,
            shard_blocks: 2,
            duplicates: 1,
            parallel: 1,
            kill_every: None,
            faults: false,
            tiny: false,
            big: false,
        }
    }
}

pub fn case_strategy() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        1usize..=2,
        1u64..=5,
        1u64..=4,
        1usize..=2,
        1usize..=3,
        prop_oneof![Just(None), (2u32..6).prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(
            |(seed, disks, gens, shard_blocks, duplicates, parallel, kill_every, faults)| Case {
                seed,
                disks,
                gens,
                shard_blocks,
                duplicates,
                parallel,
                kill_every,
                faults,
                tiny: false,
                big: false,
            },
        )
}

/// Runs `f` on a runtime whose clock is simulated: sleeps and timeouts take no real time.
pub fn paused<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime")
        .block_on(f)
}

pub fn event(bucket: &str, key: &str) -> String {
    serde_json::json!({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "eventTime": "2026-12-05T02:00:00.000Z", "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1}}}]})
    .to_string()
}

pub fn disk_id(n: usize) -> DiskId {
    DiskId::new("s", "vm", &format!("disk{n}")).unwrap()
}

/// Each disk's bytes after each generation.
pub type Model = BTreeMap<(DiskId, u64), Vec<u8>>;

pub struct World {
    pub store: Arc<MemoryStore>,
    pub ebs: Arc<MemoryEbs>,
    pub tasks: Arc<MemoryQueue>,
    pub events: Arc<MemoryQueue>,
    pub r: Replica<Arc<MemoryStore>, Arc<MemoryEbs>, Arc<MemoryQueue>>,
    pub start: tokio::time::Instant,
}

pub fn prefix() -> Prefix {
    Prefix::new("pl").unwrap()
}

impl World {
    pub fn new(shard_blocks: u64) -> World {
        Self::with(
            shard_blocks,
            MemoryEbs::new().with_latency(Duration::from_millis(2)),
        )
    }

    pub fn with(shard_blocks: u64, ebs: MemoryEbs) -> World {
        let store = Arc::new(MemoryStore::new("b"));
        let ebs = Arc::new(ebs);
        let tasks = Arc::new(MemoryQueue::new(Duration::from_secs(60), None).shuffled(7));
        let events = Arc::new(MemoryQueue::new(Duration::from_secs(60), None).shuffled(11));
        let mut cfg = ReplicaConfig::new("b", prefix(), STACK);
        cfg.shard_blocks = shard_blocks;
        cfg.retry.base = Duration::from_millis(5);
        cfg.retry.max_wait = Duration::from_millis(200);
        cfg.settle_wait = Duration::from_secs(2);
        cfg.visibility_window = Duration::from_secs(5);
        cfg.put_concurrency = 4;
        let r = Replica {
            store: store.clone(),
            ebs: ebs.clone(),
            tasks: tasks.clone(),
            cfg,
        };
        World {
            store,
            ebs,
            tasks,
            events,
            r,
            start: tokio::time::Instant::now(),
        }
    }

    /// The simulated wall clock (moves with tokio's paused clock).
    pub fn now(&self) -> DateTime<Utc> {
        let base = Utc.with_ymd_and_hms(2026, 12, 5, 0, 0, 0).unwrap();
        base + chrono::Duration::from_std(self.start.elapsed()).unwrap_or_default()
    }

    pub async fn handle(&self, body: &str) -> Outcome {
        let start = self.start;
        let now = move || {
            Utc.with_ymd_and_hms(2026, 12, 5, 0, 0, 0).unwrap()
                + chrono::Duration::from_std(start.elapsed()).unwrap_or_default()
        };
        handle_body(&self.r, body, now).await
    }

    pub fn manifest_key(&self, disk: &DiskId, g: u64) -> String {
        ObjectKey::Manifest {
            disk: disk.clone(),
            generation: g,
        }
        .to_key(&prefix())
    }

    pub fn manifest_event(&self, case: &Case, g: u64) -> String {
        let _ = case;
        event("b", &self.manifest_key(&disk_id(0), g))
    }

    /// Every manifest's event, once more.
    pub fn deliver_all(&self, case: &Case) {
        for d in 0..case.disks {
            for g in 1..=case.gens {
                self.events
                    .send(event("b", &self.manifest_key(&disk_id(d), g)));
            }
        }
    }

    /// Generation `g`'s event of every disk.
    pub fn deliver_generation(&self, case: &Case, g: u64) {
        for d in 0..case.disks {
            self.events
                .send(event("b", &self.manifest_key(&disk_id(d), g)));
        }
    }

    /// Writes every generation of every disk as the sender would; returns the model.
    pub fn publish(&self, case: &Case) -> Model {
        let mut model = Model::new();
        let mut rng = StdRng::seed_from_u64(case.seed);
        for d in 0..case.disks {
            let disk = disk_id(d);
            // 1-6 blocks and a part of one: the last block is short.
            let size = if case.tiny {
                rng.gen_range(16..=256) * SECTOR
            } else if case.big {
                rng.gen_range(40..=60) * BLOCK_SIZE + rng.gen_range(0..1024) * SECTOR
            } else {
                rng.gen_range(1..=6) * BLOCK_SIZE + rng.gen_range(0..1024) * SECTOR
            };
            let mut bytes = vec![0u8; size as usize];
            for g in 1..=case.gens {
                let m = self.publish_generation(&mut rng, &disk, g, &mut bytes);
                if m.parent.is_none() {
                    // A base: what it does not write is zeroes.
                    let mut fresh = vec![0u8; size as usize];
                    for o in &m.objects {
                        for p in o.parts() {
                            let r = p.offset as usize..p.end() as usize;
                            fresh[r.clone()].copy_from_slice(&bytes[r]);
                        }
                    }
                    bytes = fresh;
                }
                model.insert((disk.clone(), g), bytes.clone());
            }
        }
        model
    }

    fn publish_generation(
        &self,
        rng: &mut StdRng,
        disk: &DiskId,
        g: u64,
        bytes: &mut [u8],
    ) -> Manifest {
        let size = bytes.len() as u64;
        let sectors = size / SECTOR;
        // Random disjoint extents, sector aligned, some crossing block boundaries.
        let mut extents: Vec<Extent> = Vec::new();
        for _ in 0..rng.gen_range(1..=7) {
            let at = rng.gen_range(0..sectors);
            let len = rng
                .gen_range(1..=(3 * BLOCK_SIZE / SECTOR))
                .min(sectors - at);
            extents.push(Extent::new(at * SECTOR, len * SECTOR));
        }
        extents.sort();
        let mut disjoint: Vec<Extent> = Vec::new();
        for e in extents {
            match disjoint.last() {
                Some(l) if e.offset <= l.end() => {}
                _ => disjoint.push(e),
            }
        }
        let mut m = Manifest::new(
            disk.clone(),
            g,
            (g > 1).then(|| g - 1),
            size,
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap() + chrono::Duration::hours(g as i64),
            "test",
        );
        m.max_object = 1 << 20;
        let mut data: Vec<Extent> = Vec::new();
        for e in disjoint {
            if g > 1 && rng.gen_bool(0.25) {
                m.zero_ranges.push(e);
                bytes[e.offset as usize..e.end() as usize].fill(0);
            } else {
                // Half random, half compressible.
                let fill = rng.gen::<u8>();
                for (i, b) in bytes[e.offset as usize..e.end() as usize]
                    .iter_mut()
                    .enumerate()
                {
                    *b = if fill % 2 == 0 {
                        rng.gen()
                    } else {
                        fill ^ (i / 4096) as u8
                    };
                }
                // Objects of at most max_object: split on max_object boundaries.
                let mut at = e.offset;
                while at < e.end() {
                    let len = (e.end() - at).min(m.max_object);
                    data.push(Extent::new(at, len));
                    at += len;
                }
            }
        }
        // Pack runs of small extents into one object (format v2), the rest alone.
        let mut i = 0;
        while i < data.len() {
            let mut pieces = vec![data[i]];
            while i + pieces.len() < data.len()
                && rng.gen_bool(0.4)
                && pieces.iter().map(|p| p.length).sum::<u64>() + data[i + pieces.len()].length
                    <= m.max_object
            {
                pieces.push(data[i + pieces.len()]);
            }
            i += pieces.len();
            let mut decoded = Vec::new();
            for p in &pieces {
                decoded.extend_from_slice(&bytes[p.offset as usize..p.end() as usize]);
            }
            let sha: [u8; 32] = Sha256::digest(&decoded).into();
            let zipped = zstd::bulk::compress(&decoded, 1).unwrap();
            let (encoding, stored) = if zipped.len() < decoded.len() && rng.gen_bool(0.7) {
                (Encoding::Zstd, zipped)
            } else {
                (Encoding::Raw, decoded.clone())
            };
            let o = DataObject {
                offset: pieces[0].offset,
                length: decoded.len() as u64,
                encoding,
                stored_length: stored.len() as u64,
                sha256: Sha256Hex(sha),
                pieces: if pieces.len() > 1 {
                    pieces.clone()
                } else {
                    vec![]
                },
            };
            let key = ObjectKey::Data {
                disk: disk.clone(),
                generation: g,
                offset: o.offset,
            }
            .to_key(&prefix());
            self.store.insert(&key, stored);
            m.objects.push(o);
        }
        m.objects.sort_by_key(|o| o.offset);
        m.validate().expect("the kit writes valid manifests");
        self.store
            .insert(&self.manifest_key(disk, g), Bytes::from(m.to_json()));
        m
    }

    /// Runs invocations until both queues are empty (or `max_rounds`): up to `parallel`
    /// messages at once; every `kill_every`th invocation is killed after a random
    /// moment; a message not done comes back after the visibility timeout.
    pub async fn run(&self, parallel: usize, kill_every: Option<u32>, max_rounds: usize) {
        let mut n = 0u32;
        let mut last: BTreeMap<String, String> = BTreeMap::new();
        let mut rng = StdRng::seed_from_u64(parallel as u64 * 31 + 1);
        for _ in 0..max_rounds {
            let mut batch = Vec::new();
            for q in [&self.tasks, &self.events] {
                while batch.len() < parallel {
                    // ReceiveMessage takes at most 10.
                    let want = (parallel - batch.len()).min(10) as i32;
                    let got = q.receive(want, Duration::ZERO).await.unwrap();
                    if got.is_empty() {
                        break;
                    }
                    batch.extend(got.into_iter().map(|m| (q.clone(), m)));
                }
            }
            if batch.is_empty() {
                if self.tasks.is_empty() && self.events.is_empty() {
                    return;
                }
                // Nothing visible: time passes (visibility timeouts expire).
                tokio::time::advance(Duration::from_secs(61)).await;
                self.tasks.advance(Duration::from_secs(61));
                self.events.advance(Duration::from_secs(61));
                continue;
            }
            let runs = batch.iter().map(|(_, m)| {
                n += 1;
                let kill = kill_every
                    .filter(|k| n.is_multiple_of(*k))
                    .map(|_| Duration::from_millis(rng.gen_range(1..60)));
                async move {
                    match kill {
                        Some(after) => tokio::time::timeout(after, self.handle(&m.body))
                            .await
                            .unwrap_or(Outcome::Retry("killed".into())),
                        None => self.handle(&m.body).await,
                    }
                }
            });
            let outcomes = join_all(runs).await;
            for ((q, m), out) in batch.iter().zip(outcomes) {
                last.insert(m.body.clone(), format!("{out:?}"));
                match out {
                    Outcome::Delete(_) => {
                        q.delete_batch(std::slice::from_ref(&m.receipt))
                            .await
                            .unwrap();
                    }
                    Outcome::Reject(why) => panic!("refused: {why}\n{}", m.body),
                    Outcome::Retry(_) => {}
                }
            }
        }
        let mut heads = String::new();
        for d in 0..2 {
            if let Ok(h) =
                pilotlight_replica::chain::read(&self.store, &prefix(), &disk_id(d), self.now())
                    .await
            {
                heads.push_str(&format!("\n{:?}", h.head));
            }
        }
        panic!(
            "not settled after {max_rounds} rounds: {} events, {} tasks left; last outcomes {last:#?}; heads {heads}",
            self.events.len(),
            self.tasks.len()
        );
    }

    /// Every snapshot in the twin: id, status, tags.
    pub async fn ebs_snapshots(&self) -> Vec<(String, SnapshotStatus, BTreeMap<String, String>)> {
        self.ebs
            .describe_snapshots(&SnapshotFilter::default())
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.id, s.status, s.tags))
            .collect()
    }

    pub async fn head(&self, case: &Case) -> ChainHead {
        let _ = case;
        pilotlight_replica::chain::read(&self.store, &prefix(), &disk_id(0), self.now())
            .await
            .unwrap()
            .head
    }

    /// Every generation has exactly one completed point, read back (ListSnapshotBlocks,
    /// GetSnapshotBlock) equal to the model; returns how many points were checked.
    pub async fn verify(&self, model: &Model) -> Stats {
        let snaps = self.ebs_snapshots().await;
        let mut points = 0;
        for ((disk, g), want) in model {
            let mine: Vec<_> = snaps
                .iter()
                .filter_map(|(id, st, tags)| Some((Point::from_tags(id, tags)?, *st)))
                .filter(|(p, _)| p.disk == *disk && p.generation == *g)
                .collect();
            assert_eq!(mine.len(), 1, "{disk} generation {g}: {mine:?}");
            let (p, st) = &mine[0];
            assert_eq!(*st, SnapshotStatus::Completed, "{disk} generation {g}");
            assert_eq!(
                snaps
                    .iter()
                    .find(|s| s.0 == p.snapshot_id)
                    .and_then(|s| s.2.get(tag::STACK))
                    .map(String::as_str),
                Some(STACK)
            );
            let got = self.read_point(&p.snapshot_id, want.len() as u64).await;
            assert!(
                got == *want,
                "{disk} generation {g}: the point differs from the disk"
            );
            points += 1;
        }
        Stats { points }
    }

    pub async fn read_point(&self, id: &str, size: u64) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        for b in self.ebs.list_snapshot_blocks(id).await.unwrap() {
            let data = self.ebs.get_snapshot_block(id, &b).await.unwrap();
            let at = b.index * BLOCK_SIZE;
            assert!(at < size, "block {} past the disk's end", b.index);
            let n = (size - at).min(BLOCK_SIZE) as usize;
            out[at as usize..at as usize + n].copy_from_slice(&data[..n]);
            assert!(
                data[n..].iter().all(|&x| x == 0),
                "bytes past the disk's end"
            );
        }
        out
    }
}

#[derive(Debug)]
pub struct Stats {
    pub points: usize,
}
