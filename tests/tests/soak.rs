//! Many disks, one receiver: every disk's image equals its source at the end, nothing
//! reaches the dead-letter queue, memory stays bounded, and no disk is starved.
//!
//! The test runs a short soak (12 disks across 3 VMs, 3 generations). `scripts/soak`
//! runs the same code at full size (100 disks of 64-256 MiB across 10 VMs, 5
//! generations; not in CI) through these environment variables:
//! `PILOTLIGHT_SOAK_DISKS`, `_VMS`, `_GENERATIONS`, `_MIN_MIB`, `_MAX_MIB`, `_EXTENTS`
//! (changed extents per generation), `_SENDERS` (senders at once), `_POINTS` (`off`: the
//! receiver without recovery points), `_LOG` (a path the receiver's log is copied to,
//! for the per-point attribution lines). It prints one line of
//! figures: disks, bytes sent, wall time, receiver peak RSS, per-disk lag spread, and
//! the recovery points (on, as by default): when the last was written, the receiver's
//! DescribeSnapshots calls per point. Every generation of a few sampled disks has exactly
//! one point, reading back (ListSnapshotBlocks, GetSnapshotBlock) as the disk was then.
//!
//! Senders run several at once; the bucket's events go through a forwarder that sends
//! each one twice, in shuffled batches, to the queue the receiver reads (duplicated and
//! reordered delivery).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use pilotlight_cloud::ebs::{EbsApi, SnapshotFilter, SnapshotStatus};
use pilotlight_protocol::points::{tag, Point};
use pilotlight_protocol::DiskId;
use pilotlight_tests::cli::{
    applied, disk_args, image_path, receiver_state, running_receiver_with, s, sender,
};
use pilotlight_tests::disk::{create_sparse, sha256_file, MIB};
use pilotlight_tests::stack::LocalStack;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(format!("PILOTLIGHT_SOAK_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Disk {
    id: DiskId,
    dir: PathBuf,
    size: u64,
}

/// Writes generation `k` of `disk` (`extents` random extents of 4 KiB to 512 KiB, some
/// of them zeroes) and sends it: a full base first, then the changed areas as an extent
/// list; returns the bytes the sender uploaded.
fn send(stack: &LocalStack, d: &Disk, k: u64, extents: usize) -> u64 {
    use rand::Rng;
    use std::os::unix::fs::FileExt;
    let path = d.dir.join("disk.raw");
    let f = create_sparse(&path, d.size);
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(k * 1_000_003 + d.size + d.dir.as_os_str().len() as u64);
    let mut written: Vec<(u64, u64)> = Vec::new();
    for _ in 0..extents {
        let len = rng.gen_range(1..=128u64) * 4096;
        let off = rng.gen_range(0..(d.size - len) / 4096) * 4096;
        let mut buf = vec![0u8; len as usize];
        if !rng.gen_ratio(1, 8) {
            rng.fill(&mut buf[..]);
        }
        f.write_all_at(&buf, off).unwrap();
        written.push((off, off + len));
    }
    // The list is sorted and its overlaps merged, as changed-block tracking reports.
    written.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in written {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let list: String = merged
        .iter()
        .map(|(a, b)| format!("{a} {}\n", b - a))
        .collect();
    drop(f);
    let state = d.dir.join("state");
    let id = d.id.to_string();
    let mut args = disk_args(&id, &state, &path).to_vec();
    args.push("--json");
    let changes = d.dir.join(format!("changes-{k}.txt"));
    if k == 1 {
        args.extend(["--source", "full"]);
    } else {
        std::fs::write(&changes, list).unwrap();
        args.extend(["--source", "extent-list", "--extents", s(&changes)]);
    }
    let out = sender(stack, &args).output().unwrap();
    assert!(
        out.status.success(),
        "{id} generation {k}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["generation"], k, "{id}");
    v["bytes_uploaded"].as_u64().unwrap_or(0)
}

/// The receiver's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_many_disks_one_receiver_all_equal_none_dead_lettered_none_starved() {
    let (disks_n, vms, generations) = (env("DISKS", 12), env("VMS", 3), env("GENERATIONS", 3));
    let (min_mib, max_mib) = (env("MIN_MIB", 8), env("MAX_MIB", 16));
    let (extents, senders) = (env("EXTENTS", 12) as usize, env("SENDERS", 4) as usize);
    let stack = Arc::new(LocalStack::start().await);
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let disks: Arc<Vec<Disk>> = Arc::new(
        (0..disks_n)
            .map(|i| {
                let dir = tmp.path().join(format!("d{i}"));
                std::fs::create_dir_all(&dir).unwrap();
                let mib = min_mib + (i * 7919) % (max_mib - min_mib + 1);
                Disk {
                    id: DiskId::parse(&format!("site1/vm{}/disk{}", i % vms, i / vms)).unwrap(),
                    dir,
                    size: mib * MIB,
                }
            })
            .collect(),
    );

    // Events: the bucket's queue -> (twice each, shuffled) -> the receiver's queue.
    let (replay, replay_dlq) = stack.extra_queue("soak", 60, 5).await;
    let done = Arc::new(AtomicBool::new(false));
    let forwarded = Arc::new(AtomicU64::new(0));
    let forwarder = {
        let (stack, replay, done, forwarded) = (
            stack.clone(),
            replay.clone(),
            done.clone(),
            forwarded.clone(),
        );
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            // Deliveries held back for a later pump: late, and reordered across pumps.
            let mut held: Vec<String> = Vec::new();
            loop {
                let last = done.load(Ordering::SeqCst);
                // Forwarded as they come (at most 200 a pump), as S3 delivers within
                // seconds; draining until the queue ran dry held every event back for
                // as long as the senders ran (tens of seconds of lag that the test
                // then charged to the receiver).
                let fresh = stack.drain_up_to(&stack.queue_url, 200).await;
                let mut batch = std::mem::take(&mut held);
                batch.extend(fresh.iter().cloned());
                batch.extend(fresh);
                batch.shuffle(&mut rng);
                if !last {
                    held = batch.split_off(batch.len() - batch.len() / 4);
                }
                stack.send_all(&replay, &batch).await;
                forwarded.fetch_add(batch.len() as u64, Ordering::SeqCst);
                if last && batch.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await; // a pump, not a sync
            }
        })
    };
    let rx = tmp.path().join("rx");
    let points_on = std::env::var("PILOTLIGHT_SOAK_POINTS").map_or(true, |v| v != "off");
    let mut args = vec![
        "--queue-url",
        &replay,
        "--reconcile-every",
        "off",
        "--wait-seconds",
        "1",
    ];
    if !points_on {
        args.push("--points=false");
    }
    let proc = running_receiver_with(&stack, &rx, &args, &tmp.path().join("receiver.log"));
    let pid = proc.0.id();

    // A few disks whose every generation's point is read back: each one's SHA-256 after
    // each generation.
    let sampled: Vec<usize> = {
        let mut v = vec![0, disks.len() / 2, disks.len() - 1];
        v.dedup();
        v
    };
    let hashes = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let started = Instant::now();
    let bytes = Arc::new(AtomicU64::new(0));
    let mut committed_at: Vec<Instant> = vec![started; disks.len()];
    for k in 1..=generations {
        // Several senders at once, disks in a shuffled order each generation.
        let mut order: Vec<usize> = (0..disks.len()).collect();
        order.shuffle(&mut rng);
        let order = Arc::new(std::sync::Mutex::new(order));
        let times = Arc::new(std::sync::Mutex::new(vec![None; disks.len()]));
        let mut workers = Vec::new();
        for _ in 0..senders {
            let (stack, disks, order, times, bytes, hashes, sampled) = (
                stack.clone(),
                disks.clone(),
                order.clone(),
                times.clone(),
                bytes.clone(),
                hashes.clone(),
                sampled.clone(),
            );
            workers.push(tokio::task::spawn_blocking(move || loop {
                let Some(i) = order.lock().unwrap().pop() else {
                    break;
                };
                bytes.fetch_add(send(&stack, &disks[i], k, extents), Ordering::SeqCst);
                if sampled.contains(&i) {
                    let h = sha256_file(&disks[i].dir.join("disk.raw"));
                    hashes.lock().unwrap().insert((i, k), h);
                }
                times.lock().unwrap()[i] = Some(Instant::now());
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
        if k == generations {
            committed_at = times.lock().unwrap().iter().map(|t| t.unwrap()).collect();
        }
    }
    let sent_s = started.elapsed().as_secs_f64();

    // Every disk reaches the last generation; its lag: from its last commit to applied.
    let deadline = Instant::now() + Duration::from_secs(60 + 10 * disks_n);
    let mut lag: Vec<Option<f64>> = vec![None; disks.len()];
    while lag.iter().any(Option::is_none) {
        for (i, d) in disks.iter().enumerate() {
            if lag[i].is_none() && applied(&rx, &d.id) == Some(generations) {
                lag[i] = Some(committed_at[i].elapsed().as_secs_f64().max(0.0));
            }
        }
        assert!(
            Instant::now() < deadline,
            "not applied in time: {:?}; receiver log in {}",
            disks
                .iter()
                .zip(&lag)
                .filter(|(_, l)| l.is_none())
                .map(|(d, _)| (d.id.to_string(), applied(&rx, &d.id)))
                .collect::<Vec<_>>(),
            tmp.path().display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // polling with a deadline
    }
    let wall_s = started.elapsed().as_secs_f64();

    // Every disk's last point written (none due any more), then the receiver's count of
    // its calls from its log.
    while points_on
        && !disks.iter().all(|d| {
            let st = receiver_state(&rx, &d.id);
            st.point_due.is_none() && st.points.iter().any(|p| p.generation == generations)
        })
    {
        assert!(
            Instant::now() < deadline,
            "points not written in time; receiver log in {}",
            tmp.path().display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling with a deadline
    }
    let points_s = started.elapsed().as_secs_f64();
    let rss_kib = peak_rss_kib(pid);
    done.store(true, Ordering::SeqCst);
    forwarder.await.unwrap();
    drop(proc);

    for d in disks.iter() {
        assert_eq!(
            sha256_file(&image_path(&rx, &d.id)),
            sha256_file(&d.dir.join("disk.raw")),
            "{} differs from its source",
            d.id
        );
    }
    assert_eq!(
        stack.depth(&replay_dlq).await,
        (0, 0),
        "dead-lettered messages"
    );
    // Sampled disks: one completed point per generation, each reading back as the disk
    // was at that generation.
    let ebs = pilotlight_tests::stack::emulator(&stack.endpoint)
        .await
        .ebs();
    let hashes = hashes.lock().unwrap().clone();
    for &i in sampled.iter().filter(|_| points_on) {
        let d = &disks[i];
        let filter = SnapshotFilter::default()
            .tag(tag::POINT, "1")
            .tag(tag::SITE, d.id.site.as_str())
            .tag(tag::VM, d.id.vm.as_str())
            .tag(tag::DISK, d.id.disk.as_str());
        let mut by_generation = std::collections::BTreeMap::new();
        for snap in ebs.describe_snapshots(&filter).await.unwrap() {
            assert_eq!(snap.status, SnapshotStatus::Completed, "{}", d.id);
            let p = Point::from_tags(&snap.id, &snap.tags).unwrap();
            assert!(
                by_generation.insert(p.generation, snap.id).is_none(),
                "{}: two points of generation {}",
                d.id,
                p.generation
            );
        }
        assert_eq!(
            by_generation.keys().copied().collect::<Vec<_>>(),
            (1..=generations).collect::<Vec<_>>(),
            "{}",
            d.id
        );
        for (g, sid) in &by_generation {
            let got = pilotlight_tests::points::read_back(&ebs, sid, d.size as usize).await;
            let got = pilotlight_tests::disk::sha256_bytes(&got);
            assert_eq!(Some(&got), hashes.get(&(i, *g)), "{} generation {g}", d.id);
        }
    }
    let log = std::fs::read_to_string(tmp.path().join("receiver.log")).unwrap_or_default();
    if let Ok(keep) = std::env::var("PILOTLIGHT_SOAK_LOG") {
        std::fs::write(&keep, &log).unwrap();
    }
    let (points, describes) = point_calls(&log);

    let points_line = if points_on {
        format!(
            "points on: last point written at {points_s:.1} s, {points} points, {:.2} DescribeSnapshots per point, {} sampled disks' points all read back equal",
            describes as f64 / points.max(1) as f64,
            sampled.len()
        )
    } else {
        "points off".to_string()
    };
    let mut lags: Vec<f64> = lag.into_iter().map(Option::unwrap).collect();
    lags.sort_by(f64::total_cmp);
    let total: u64 = disks.iter().map(|d| d.size).sum();
    println!(
        "soak: {} disks ({} VMs, {:.0} MiB of disks), {} generations each, {:.1} MiB uploaded, {} event deliveries (every event twice); senders done in {:.1} s, all applied in {:.1} s; receiver peak RSS {:.1} MiB; lag from a disk's last commit to applied: min {:.2} s, median {:.2} s, max {:.2} s; {}; all images equal, dead-letter queue empty",
        disks.len(), vms, total as f64 / MIB as f64, generations,
        bytes.load(Ordering::SeqCst) as f64 / MIB as f64, forwarded.load(Ordering::SeqCst),
        sent_s, wall_s, rss_kib as f64 / 1024.0,
        lags[0], lags[lags.len() / 2], lags[lags.len() - 1],
        points_line,
    );
    // Bounded memory whatever the number of disks (the receiver holds no disk's data).
    assert!(
        rss_kib > 0 && rss_kib < 512 * 1024,
        "peak RSS {rss_kib} KiB"
    );
}

/// The receiver's totals from its log's last point or pruning line: points written and
/// DescribeSnapshots calls made.
fn point_calls(log: &str) -> (u64, u64) {
    let field = |line: &str, name: &str| -> Option<u64> {
        let at = line.find(&format!("{name}="))? + name.len() + 1;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    log.lines()
        .rev()
        .find_map(|l| {
            Some((
                field(l, "points_total")?,
                field(l, "describe_snapshots_total")?,
            ))
        })
        .unwrap_or((0, 0))
}
