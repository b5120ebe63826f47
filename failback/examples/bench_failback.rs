//! Benchmark driver of `scripts/bench-failback` (not a test): one failback round of an
//! 8 GiB disk of which 5 % changed in AWS, side by side with reading those blocks alone
//! (ListChangedBlocks + GetSnapshotBlock, nothing written) and with a full copy (every
//! block of the return snapshot read and written).
//!
//! The recovery point holds a quarter of the disk (random bytes); the return snapshot is
//! its child with 5 % of the blocks rewritten (random bytes). The target is a sparse file
//! equal to the point. Run against (a) the in-memory EBS with a per-call latency standing
//! in for the service's round trip, and (b) the emulator through the AWS SDK when
//! `--endpoint` is given.
//!
//!   bench_failback --work DIR [--endpoint URL] [--latency-ms 20] [--concurrency 16]
//!                  [--size-gib 8] [--changed-pct 5]
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use bytes::Bytes;
use futures::StreamExt;
use pilotlight_cloud::ebs::{
    block_checksum, linear_checksum, EbsApi, MemoryEbs, PageStart, StartSnapshot, BLOCK_SIZE,
};
use pilotlight_cloud::AwsSettings;
use pilotlight_failback::{apply, Options, RoundRequest, Target};
use pilotlight_protocol::DiskId;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

struct Args {
    work: PathBuf,
    endpoint: Option<String>,
    latency: Duration,
    concurrency: usize,
    size_gib: u64,
    changed_pct: u64,
}

fn args() -> Args {
    let mut a = Args {
        work: std::env::temp_dir(),
        endpoint: None,
        latency: Duration::from_millis(20),
        concurrency: 16,
        size_gib: 8,
        changed_pct: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_default();
        match k.as_str() {
            "--work" => a.work = v.into(),
            "--endpoint" => a.endpoint = Some(v),
            "--latency-ms" => a.latency = Duration::from_millis(v.parse().unwrap()),
            "--concurrency" => a.concurrency = v.parse().unwrap(),
            "--size-gib" => a.size_gib = v.parse().unwrap(),
            "--changed-pct" => a.changed_pct = v.parse().unwrap(),
            _ => panic!("unknown argument {k}"),
        }
    }
    a
}

fn block_of(seed: u64, index: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (index << 8));
    let mut v = vec![0u8; BLOCK_SIZE as usize];
    rng.fill(&mut v[..]);
    v
}

/// A completed snapshot on `parent` holding `blocks` (seeded random bytes).
async fn snapshot<E: EbsApi>(
    ebs: &E,
    parent: Option<&str>,
    seed: u64,
    blocks: &[u64],
    gib: u64,
    c: usize,
) -> String {
    let id = ebs
        .start_snapshot(&StartSnapshot {
            volume_size_gib: gib,
            parent: parent.map(String::from),
            description: "bench".into(),
            tags: vec![],
            client_token: format!("bench-{seed}-{}", std::process::id()),
            encrypted: None,
            kms_key_arn: None,
            timeout_minutes: 60,
        })
        .await
        .unwrap();
    let digests: Vec<(u64, [u8; 32])> = futures::stream::iter(blocks.iter().copied())
        .map(|i| {
            let id = &id;
            async move {
                let data = block_of(seed, i);
                let d: [u8; 32] = Sha256::digest(&data).into();
                ebs.put_snapshot_block(id, i, Bytes::from(data), &block_checksum(&d))
                    .await
                    .unwrap();
                (i, d)
            }
        })
        .buffer_unordered(c)
        .collect()
        .await;
    let mut sorted = digests;
    sorted.sort_unstable_by_key(|(i, _)| *i);
    ebs.complete_snapshot(
        &id,
        sorted.len() as u64,
        &linear_checksum(sorted.iter().map(|(_, d)| d)),
    )
    .await
    .unwrap();
    id
}

/// ListChangedBlocks and GetSnapshotBlock of every changed block, nothing written.
async fn read_alone<E: EbsApi>(ebs: &E, first: &str, second: &str, c: usize) -> u64 {
    let mut token: Option<String> = None;
    let mut bytes = 0;
    loop {
        let start = token
            .as_deref()
            .map_or(PageStart::Index(0), PageStart::Token);
        let page = ebs
            .list_changed_blocks_page(first, second, start)
            .await
            .unwrap();
        let got: Vec<u64> = futures::stream::iter(page.blocks.iter().filter_map(|b| {
            b.second.clone().map(|t| pilotlight_cloud::ebs::BlockRef {
                index: b.index,
                token: t,
            })
        }))
        .map(|r| async move { ebs.get_snapshot_block(second, &r).await.unwrap().len() as u64 })
        .buffered(c)
        .collect()
        .await;
        bytes += got.iter().sum::<u64>();
        match page.next_token {
            Some(t) => token = Some(t),
            None => return bytes,
        }
    }
}

/// Every block of the snapshot read and written into a fresh sparse file.
async fn full_copy<E: EbsApi>(ebs: &E, snap: &str, path: &Path, size: u64, c: usize) -> u64 {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let f = &f;
    let blocks = ebs.list_snapshot_blocks(snap).await.unwrap();
    let n: Vec<u64> = futures::stream::iter(blocks)
        .map(|b| async move {
            let data = ebs.get_snapshot_block(snap, &b).await.unwrap();
            f.write_all_at(&data, b.index * BLOCK_SIZE).unwrap();
            data.len() as u64
        })
        .buffered(c)
        .collect()
        .await;
    f.sync_all().unwrap();
    n.iter().sum()
}

async fn bench<E: EbsApi>(name: &str, ebs: &E, a: &Args) {
    let size = a.size_gib * GIB;
    let blocks = size / BLOCK_SIZE;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut point_blocks: Vec<u64> = (0..blocks).filter(|_| rng.gen_ratio(1, 4)).collect();
    point_blocks.sort_unstable();
    let changed_n = (blocks * a.changed_pct / 100) as usize;
    let mut changed: Vec<u64> = Vec::new();
    while changed.len() < changed_n {
        let i = rng.gen_range(0..blocks);
        if !changed.contains(&i) {
            changed.push(i);
        }
    }
    changed.sort_unstable();
    let c = a.concurrency;
    let t = Instant::now();
    let point = snapshot(ebs, None, 1, &point_blocks, a.size_gib, c).await;
    let back = snapshot(ebs, Some(&point), 2, &changed, a.size_gib, c).await;
    let setup = t.elapsed();
    // Each timed step three times, alternating (min and median reported): the emulator
    // shares the two cores with the applier, so one run alone is noisy.
    let target_path = a.work.join(format!("{name}-site.raw"));
    let make_target = || {
        let f = std::fs::File::create(&target_path).unwrap();
        f.set_len(size).unwrap();
        for &i in &point_blocks {
            f.write_all_at(&block_of(1, i), i * BLOCK_SIZE).unwrap();
        }
        f.sync_all().unwrap();
    };
    let req = RoundRequest {
        disk: DiskId::parse("bench/vm/disk0").unwrap(),
        point: point.clone(),
        snapshot: back.clone(),
        site_changes: vec![],
        compare: false,
    };
    let (mut reads, mut fbs, mut fbs_nv) = (Vec::new(), Vec::new(), Vec::new());
    let mut read = 0;
    let mut r = Default::default();
    for run in 0..3 {
        let t = Instant::now();
        read = read_alone(ebs, &point, &back, c).await;
        reads.push(t.elapsed());
        for verify in [true, false] {
            make_target();
            let target = Target::open(target_path.to_str().unwrap()).await.unwrap();

            let opts = Options {
                concurrency: c,
                verify,
                ..Options::default()
            };
            let state = a.work.join(format!("{name}-state-{run}-{verify}"));
            let t = Instant::now();
            let rounds = apply(ebs, &target, &state, &req, &opts, &()).await.unwrap();
            if verify {
                fbs.push(t.elapsed());
                r = rounds[0].counters;
            } else {
                fbs_nv.push(t.elapsed());
            }
        }
    }
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        (v[0], v[v.len() / 2])
    };
    let (t_read, t_read_med) = stats(&mut reads);
    let (t_fb, t_fb_med) = stats(&mut fbs);
    let (t_nv, _) = stats(&mut fbs_nv);
    let r: pilotlight_failback::state::Counters = r;
    make_target();
    let target = Target::open(target_path.to_str().unwrap()).await.unwrap();
    apply(
        ebs,
        &target,
        &a.work.join(format!("{name}-state-final")),
        &req,
        &Options::default(),
        &(),
    )
    .await
    .unwrap();

    let full_path = a.work.join(format!("{name}-full.raw"));
    let t = Instant::now();
    let full = full_copy(ebs, &back, &full_path, size, c).await;
    let t_full = t.elapsed();
    // The failed-back disk equals the full copy, block for block.
    let (x, y) = (
        std::fs::File::open(&target_path).unwrap(),
        std::fs::File::open(&full_path).unwrap(),
    );
    let mut same = true;
    for &i in changed.iter().chain(point_blocks.iter().take(64)) {
        let (mut p, mut q) = (
            vec![0u8; BLOCK_SIZE as usize],
            vec![0u8; BLOCK_SIZE as usize],
        );
        x.read_exact_at(&mut p, i * BLOCK_SIZE).unwrap();
        y.read_exact_at(&mut q, i * BLOCK_SIZE).unwrap();
        same &= p == q;
    }
    let _ = std::fs::remove_file(&target_path);
    let _ = std::fs::remove_file(&full_path);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let s = |d: Duration| d.as_secs_f64();
    println!(
        "\n== {name} (setup {:.1} s: point {} blocks, return snapshot {} blocks changed)",
        s(setup),
        point_blocks.len(),
        changed.len()
    );
    println!(
        "  disk {:.0} MiB; changed {:.0} MiB ({:.1} % of the disk)",
        mib(size),
        mib(changed.len() as u64 * BLOCK_SIZE),
        100.0 * changed.len() as f64 / blocks as f64
    );
    println!(
        "  read those blocks alone:  {:>7.2} s  (median {:.2} s; {:.0} MiB read)",
        s(t_read),
        s(t_read_med),
        mib(read)
    );
    println!("  failback round:           {:>7.2} s  (median {:.2} s; {:.0} MiB read and written = {:.2} % of the disk, {} blocks read back)  = {:.2}x reading alone (medians {:.2}x)", s(t_fb), s(t_fb_med), mib(r.bytes_written), 100.0 * r.bytes_written as f64 / size as f64, r.blocks_verified, s(t_fb) / s(t_read), s(t_fb_med) / s(t_read_med));
    println!(
        "  without the read-back:    {:>7.2} s  = {:.2}x reading alone",
        s(t_nv),
        s(t_nv) / s(t_read)
    );
    println!("  full copy:                {:>7.2} s  ({:.0} MiB read and written)  = {:.2}x the failback round", s(t_full), mib(full), s(t_full) / s(t_fb));
    println!("  failed-back disk equals the full copy on the blocks compared: {same}");
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = args();
    let twin = MemoryEbs::new().with_latency(a.latency);
    bench(
        &format!("in-memory EBS, {} ms per call", a.latency.as_millis()),
        &twin,
        &a,
    )
    .await;
    drop(twin);
    if let Some(ep) = &a.endpoint {
        let mut settings = AwsSettings::new(Some("us-east-1".into()), Some(ep.clone()));
        settings.static_credentials = Some(("testing".into(), "testing".into()));
        let ebs = settings.load().await.ebs();
        bench("emulator (moto) through the AWS SDK", &ebs, &a).await;
    }
}
