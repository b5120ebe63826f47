//! Benchmark driver of `scripts/bench-points` (not a test): one recovery point written
//! from an image, side by side with reading the same blocks back from the image.
//!
//! For each change pattern it prints: bytes changed, 512 KiB blocks touched, bytes the
//! point writes per GiB changed (whole blocks: small scattered writes cost a block each),
//! the image read of those blocks (read + SHA-256, the writer's own read path, same
//! concurrency), and the point written to (a) the in-memory EBS with a per-call latency
//! standing in for the service's round trip, and (b) the emulator through the AWS SDK,
//! when `--endpoint` is given.
//!
//!   bench_points --work DIR [--endpoint URL] [--latency-ms 20] [--concurrency 16]
#![allow(clippy::unwrap_used, clippy::print_stdout)]
// The point writer's future (phases timed inside) is deeper than the default limit.
#![recursion_limit = "256"]

use pilotlight_cloud::ebs::{EbsApi, MemoryEbs, BLOCK_SIZE};
use pilotlight_cloud::AwsSettings;
use pilotlight_protocol::points::Tiers;
use pilotlight_protocol::{Consistency, DiskId, Extent};
use pilotlight_receiver::points::{block_ranges, read_block, PointDue, PointWriter, PointsConfig};
use pilotlight_receiver::state::{DiskPaths, DiskState};
use rand::{Rng, SeedableRng};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

struct Args {
    work: PathBuf,
    endpoint: Option<String>,
    latency: Duration,
    concurrency: usize,
}

fn args() -> Args {
    let mut a = Args {
        work: std::env::temp_dir(),
        endpoint: None,
        latency: Duration::from_millis(20),
        concurrency: 16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_default();
        match k.as_str() {
            "--work" => a.work = v.into(),
            "--endpoint" => a.endpoint = Some(v),
            "--latency-ms" => a.latency = Duration::from_millis(v.parse().unwrap()),
            "--concurrency" => a.concurrency = v.parse().unwrap(),
            _ => panic!("unknown argument {k}"),
        }
    }
    a
}

/// A sparse 8 GiB image holding only `extents` (random bytes): a full point of it
/// touches exactly their blocks.
fn make_image(path: &Path, extents: &[Extent]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(8 * GIB).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for e in extents {
        let mut buf = vec![0u8; e.length as usize];
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, e.offset).unwrap();
    }
    f.sync_all().unwrap();
}

fn patterns() -> Vec<(&'static str, Vec<Extent>)> {
    let mib = 1u64 << 20;
    // 256 MiB in 8 MiB extents, 64 MiB apart: large sequential changes.
    let sequential = (0..32)
        .map(|i| Extent::new(i * 64 * mib, 8 * mib))
        .collect();
    // 2 048 writes of 16 KiB at pseudo-random 16 KiB-aligned places: a database's pages.
    let mut x: u64 = 7;
    let mut scattered: Vec<Extent> = (0..2048)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            Extent::new((x >> 20) % (8 * GIB / (16 << 10)) * (16 << 10), 16 << 10)
        })
        .collect();
    scattered.sort_by_key(|e| e.offset);
    scattered.dedup_by_key(|e| e.offset);
    vec![("sequential", sequential), ("scattered", scattered)]
}

/// Reads and hashes `blocks` of the image, `concurrency` at once, as the writer does.
async fn read_blocks(image: &Path, blocks: &[u64], concurrency: usize) -> Duration {
    use futures::StreamExt;
    let file = Arc::new(std::fs::File::open(image).unwrap());
    let t = Instant::now();
    futures::stream::iter(blocks.iter().copied())
        .map(|i| {
            let f = file.clone();
            tokio::task::spawn_blocking(move || read_block(&f, i, 8 * GIB).unwrap())
        })
        .buffer_unordered(concurrency)
        .for_each(|_| async {})
        .await;
    t.elapsed()
}

async fn write_point<E: EbsApi + 'static>(
    ebs: E,
    dir: &Path,
    id: &DiskId,
    concurrency: usize,
) -> (Duration, u64) {
    let paths = DiskPaths::new(&dir.join("images"), &dir.join("state"), id);
    let mut cfg = PointsConfig::new("bench");
    cfg.concurrency = concurrency;
    cfg.tiers = Tiers::default();
    let pw = PointWriter::new(ebs, cfg);
    let mut st = DiskState::new(id);
    st.applied = Some(1);
    st.point_due = Some(PointDue {
        generation: 1,
        parent_generation: None,
        snapshot_time: chrono::Utc::now(),
        consistency: Consistency::Crash,
        change_id: None,
        disk_size: 8 * GIB,
        blocks: vec![],
        attempt: 0,
        snapshot_id: None,
        sealed: false,
        parent_snapshot: None,
        token_salt: None,
        staged: false,
    });
    let t = Instant::now();
    let p = pw.write_due(id, &mut st, &paths).await.unwrap().unwrap();
    (t.elapsed(), p.blocks_written.unwrap_or(0))
}

#[tokio::main]
async fn main() {
    let a = args();
    let id = DiskId::new("bench", "vm", "disk0").unwrap();
    println!(
        "{:<11} {:>9} {:>7} {:>14} {:>12} {:>18} {:>16}",
        "pattern", "changed", "blocks", "written/GiB", "image read", "EBS twin", "emulator"
    );
    for (name, extents) in patterns() {
        let dir = a.work.join(name);
        let paths = DiskPaths::new(&dir.join("images"), &dir.join("state"), &id);
        paths.create_dirs().unwrap();
        make_image(&paths.image, &extents);
        let changed: u64 = extents.iter().map(|e| e.length).sum();
        let blocks: Vec<u64> = block_ranges(extents.iter().copied())
            .into_iter()
            .flat_map(|(s, e)| s..e)
            .collect();
        let written = blocks.len() as u64 * BLOCK_SIZE;
        let per_gib = written as f64 / (changed as f64 / GIB as f64) / GIB as f64;
        let read = read_blocks(&paths.image, &blocks, a.concurrency).await;
        let twin = MemoryEbs::new().with_latency(a.latency);
        let (t_twin, n) = write_point(twin, &dir, &id, a.concurrency).await;
        assert_eq!(
            n,
            blocks.len() as u64,
            "the point wrote every touched block"
        );
        let emu = match &a.endpoint {
            Some(ep) => {
                let mut s = AwsSettings::new(Some("us-east-1".into()), Some(ep.clone()));
                s.static_credentials = Some(("bench".into(), "bench".into()));
                let ebs = s.load().await.ebs();
                let (t, _) = write_point(ebs, &dir, &id, a.concurrency).await;
                format!("{:.0} blocks/s", n as f64 / t.as_secs_f64())
            }
            None => "-".into(),
        };
        let mibs = |d: Duration| written as f64 / (1 << 20) as f64 / d.as_secs_f64();
        println!(
            "{:<11} {:>6} MiB {:>7} {:>10.2} GiB {:>7.0} MiB/s {:>7.0} blocks/s {:>16}",
            name,
            changed >> 20,
            blocks.len(),
            per_gib,
            mibs(read),
            n as f64 / t_twin.as_secs_f64(),
            emu
        );
        println!(
            "{:<11} image read {:.2} s, EBS twin {:.2} s ({:.1}x the read; {} calls of {} ms, {} in flight: bound {:.0} blocks/s)",
            "",
            read.as_secs_f64(),
            t_twin.as_secs_f64(),
            t_twin.as_secs_f64() / read.as_secs_f64(),
            n + 3,
            a.latency.as_millis(),
            a.concurrency,
            a.concurrency as f64 / a.latency.as_secs_f64()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
