//! The demo behind `scripts/demo`: a sample disk replicated end to end through the local
//! AWS emulator: sender -> S3 -> SQS -> receiver -> sparse image, checked with `cmp` at
//! each generation, each generation also written as a recovery point (an EBS snapshot);
//! then a one-click DR drill (`pilotlight-dr start --drill`): the
//! receiver exports the image, an EC2 image import (simulated: the emulator has none)
//! makes an AMI, an instance is launched in the emulator's EC2, and the drill is cleaned
//! up. Last, the other replica mode (`ReplicaMode=snapshots`): a second emulator, no
//! receiver and no image, the replica function's handler writing the disk straight into
//! a recovery point, read back and compared.

use anyhow::{bail, Context, Result};
use pilotlight_protocol::DiskId;
use pilotlight_tests::cli::{applied, dr, image_path, receiver, send_ok, Running};
use pilotlight_tests::disk::{create_sparse, powercli_list, scribble, MIB};
use pilotlight_tests::repo_root;
use pilotlight_tests::stack::LocalStack;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DISK_SIZE: u64 = 256 * MIB;

#[tokio::main]
async fn main() -> Result<()> {
    let started = Instant::now();
    let work = repo_root().join(".local/demo");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let disk = work.join("disk.raw");
    let rx = work.join("receiver");
    let disk_id = DiskId::parse("site1/web-01/disk0")?;
    let disk_arg = disk.to_str().context("disk path")?;
    let state_arg = work.join("sender-state");
    let state_arg = state_arg.to_str().context("state path")?;

    println!(
        "== local AWS emulator (moto): bucket, queue + dead-letter queue, bucket notification"
    );
    let stack = LocalStack::start().await;
    println!(
        "   endpoint {}  bucket {}  prefix {}",
        stack.endpoint, stack.bucket, stack.prefix
    );

    println!(
        "== receiver: consuming S3 events from SQS into {}",
        rx.join("images").display()
    );
    let log = std::fs::File::create(work.join("receiver.log"))?;
    let _receiver = Running(
        receiver(
            &stack,
            "run",
            &rx,
            &["--queue-url", &stack.queue_url, "--wait-seconds", "1"],
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start pilotlight-receiver")?,
    );

    println!(
        "== sample disk: {} (256 MiB sparse, 1000 extents of mixed sizes, some all zero)",
        disk.display()
    );
    let f = create_sparse(&disk, DISK_SIZE);
    scribble(&f, DISK_SIZE, 1000, 42);
    drop(f);

    let mut rows = Vec::new();
    for generation in 1..=2u64 {
        let summary = if generation == 1 {
            println!("== generation 1: full (allocated extents via SEEK_DATA/SEEK_HOLE)");
            send_ok(
                &stack,
                &[
                    "--disk-id",
                    "site1/web-01/disk0",
                    "--state-dir",
                    state_arg,
                    "--source",
                    "full",
                    "--disk",
                    disk_arg,
                ],
            )
        } else {
            println!("== the VM writes 300 more extents; generation 2 from a PowerCLI-style changed-area list");
            let f = create_sparse(&disk, DISK_SIZE);
            let changed = scribble(&f, DISK_SIZE, 300, 43);
            drop(f);
            let list = work.join("changed-areas.txt");
            std::fs::write(&list, powercli_list(&changed))?;
            send_ok(
                &stack,
                &[
                    "--disk-id",
                    "site1/web-01/disk0",
                    "--state-dir",
                    state_arg,
                    "--source",
                    "extent-list",
                    "--extents",
                    list.to_str().context("list path")?,
                    "--disk",
                    disk_arg,
                    "--change-id",
                    "demo-change-2",
                ],
            )
        };
        let committed = Instant::now();
        let mib = |k: &str| summary[k].as_u64().unwrap_or(0) as f64 / MIB as f64;
        println!(
            "   sender: {} objects; read {:.1} MiB, uploaded {:.1} MiB, zero {:.1} MiB ({:.1} MiB holes never read) in {:.2} s",
            summary["objects"], mib("bytes_read"), mib("bytes_uploaded"), mib("bytes_zero"), mib("bytes_holes"),
            summary["seconds"].as_f64().unwrap_or(0.0)
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        while applied(&rx, &disk_id) != Some(generation) {
            if Instant::now() > deadline {
                bail!(
                    "the receiver did not apply generation {generation} within 120 s; see {}",
                    work.join("receiver.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let applied_after = committed.elapsed().as_secs_f64();
        let image = image_path(&rx, &disk_id);
        let cmp = Command::new("cmp")
            .arg(&disk)
            .arg(&image)
            .status()
            .context("run cmp")?;
        if !cmp.success() {
            bail!("replica differs from the source after generation {generation} (cmp)");
        }
        println!("   receiver: applied {applied_after:.2} s after the commit; cmp: {} is byte-identical to the source", image.display());
        rows.push((
            generation,
            mib("bytes_data"),
            mib("bytes_uploaded"),
            summary["seconds"].as_f64().unwrap_or(0.0),
            applied_after,
        ));
    }

    let status = receiver(&stack, "status", &rx, &["--local"]).output()?;
    println!(
        "== receiver status\n   {}",
        String::from_utf8_lossy(&status.stdout).trim()
    );
    println!("== recovery points: pilotlight-dr points --site site1 --vm web-01");
    println!("   (EBS snapshots written with the EBS direct APIs, one per generation, the second parented on the first)");
    let deadline = Instant::now() + Duration::from_secs(120);
    let points = loop {
        let out = dr(
            &stack,
            "ok",
            &["points", "--site", "site1", "--vm", "web-01"],
        )
        .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.matches("generation ").count() >= 2 {
            break text;
        }
        if Instant::now() > deadline {
            bail!("the receiver wrote no recovery point of generation 2 within 120 s (see receiver.log): {text}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for line in points.lines() {
        println!("   {line}");
    }
    println!(
        "== DR drill: pilotlight-dr start --site site1 --vm web-01 --disk disk0 --drill --wait"
    );
    println!("   (EC2 image import is simulated: the emulator has none; export, S3, RunInstances and cleanup are real calls)");
    let (last, run_id) = drill(&stack, &[])?;
    let source_sha = hex::encode(pilotlight_tests::disk::sha256_file(&disk));
    if !last.contains(&format!("sha256 {source_sha}")) {
        bail!("the exported image's SHA-256 is not the source's ({source_sha})");
    }
    println!("   the exported image's SHA-256 is the source disk's: byte-identical");
    let cleaned = dr_ok(&stack, &["cleanup", &run_id])?;
    println!(
        "== drill cleanup: pilotlight-dr cleanup {run_id}: {} resources removed",
        cleaned.matches("removed ").count()
    );
    report(&stack, &run_id, &work.join("import-drill-report.html"))?;

    println!(
        "== DR drill, snapshot method: pilotlight-dr start --site site1 --vm web-01 --disk disk0 --drill --method snapshot --wait"
    );
    println!("   (RegisterImage from the point's EBS snapshot, RunInstances, status checks: real emulator calls; no export, no import)");
    let (_, run_id) = drill(&stack, &["--method", "snapshot"])?;
    dr_ok(&stack, &["cleanup", &run_id])?;
    println!("== drill cleanup: pilotlight-dr cleanup {run_id}: its AMI and instance removed, the point kept and released; web-01 is now snapshot-ready, so `auto` chooses the snapshot method");
    report(&stack, &run_id, &work.join("snapshot-drill-report.html"))?;

    snapshots_mode(&work, disk_arg)?;

    println!("== summary");
    println!("   generation   changed MiB   uploaded MiB   send s   commit-to-applied s");
    for (g, data, up, send, lag) in rows {
        println!("   {g:>10}   {data:>11.1}   {up:>12.1}   {send:>6.2}   {lag:>19.2}");
    }
    println!(
        "   done in {:.1} s; files and receiver.log in {}",
        started.elapsed().as_secs_f64(),
        work.display()
    );
    Ok(())
}

/// `pilotlight-dr ARGS` on the emulator: its stdout, or its stderr as the error.
fn dr_ok(stack: &LocalStack, args: &[&str]) -> anyhow::Result<String> {
    let out = dr(stack, "ok", args).output()?;
    if !out.status.success() {
        bail!(
            "pilotlight-dr {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `pilotlight-dr report RUN_ID --out PATH`: the drill's HTML report, for a browser.
fn report(stack: &LocalStack, run_id: &str, path: &std::path::Path) -> anyhow::Result<()> {
    dr_ok(
        stack,
        &["report", run_id, "--out", &path.display().to_string()],
    )?;
    println!(
        "== report: pilotlight-dr report {run_id}: {} (RPO and RTO achieved, timeline, resources; open it in a browser)",
        path.display()
    );
    Ok(())
}

/// The last run block `pilotlight-dr` printed: from the last line starting with "run ".
fn last_run(shown: &str) -> &str {
    if shown.starts_with("run ") && !shown.contains("\nrun ") {
        return shown;
    }
    shown.rfind("\nrun ").map_or(shown, |i| &shown[i + 1..])
}

/// A drill of web-01's disk0 (`pilotlight-dr start ... --drill --wait` plus `extra`):
/// prints the finished run's block and returns it with the run id.
fn drill(stack: &LocalStack, extra: &[&str]) -> anyhow::Result<(String, String)> {
    let base = [
        "start",
        "--site",
        "site1",
        "--vm",
        "web-01",
        "--disk",
        "disk0",
        "--drill",
        "--instance-type",
        "t3.small",
        "--tag",
        "Name=web-01-drill",
        "--wait",
        "--poll-every",
        "500ms",
        "--wait-timeout",
        "120s",
    ];
    let out = dr(stack, "ok", &[&base[..], extra].concat())
        .stderr(Stdio::inherit())
        .output()
        .context("run pilotlight-dr")?;
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!("the DR drill failed:\n{shown}");
    }
    let last = last_run(&shown).to_string();
    for line in last.lines() {
        println!("   {line}");
    }
    let run_id = last
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((last, run_id))
}

/// The snapshots replica mode on a second emulator: the disk sent in full, the replica
/// function's handler (fed from the queues by `pilotlight-replica run`, as Lambda's event
/// source mapping feeds it on AWS) writing it straight into a point, no instance, no
/// image; the point read back and compared with the disk.
fn snapshots_mode(work: &std::path::Path, disk_arg: &str) -> Result<()> {
    let rt = tokio::runtime::Handle::current();
    let stack = tokio::task::block_in_place(|| rt.block_on(LocalStack::start()));
    println!("== snapshots mode (ReplicaMode=snapshots): no receiver, no image volume; a second emulator at {}", stack.endpoint);
    let (tasks, _) =
        tokio::task::block_in_place(|| rt.block_on(stack.extra_queue("replica-tasks", 60, 5)));
    let state = work.join("sender-state-snapshots");
    let t0 = Instant::now();
    send_ok(
        &stack,
        &[
            "--disk-id",
            "site1/web-01/disk0",
            "--state-dir",
            state.to_str().context("state path")?,
            "--source",
            "full",
            "--disk",
            disk_arg,
        ],
    );
    let replica = |args: &[&str]| {
        let mut c = Command::new(pilotlight_tests::bin("pilotlight-replica"));
        c.args(args)
            .envs(stack.env())
            .env("PILOTLIGHT_STACK", "demo");
        c
    };
    let out = replica(&[
        "run",
        "--queue-url",
        &stack.queue_url,
        "--task-queue-url",
        &tasks,
        "--until-idle",
        "3s",
        "--shard-blocks",
        "128",
    ])
    .stderr(std::fs::File::create(work.join("replica.log"))?)
    .output()?;
    if !out.status.success() {
        bail!(
            "pilotlight-replica run failed: see {}",
            work.join("replica.log").display()
        );
    }
    let status = replica(&["status"]).output()?;
    println!(
        "   pilotlight-replica status ({:.1} s after the send started):",
        t0.elapsed().as_secs_f64()
    );
    for line in String::from_utf8_lossy(&status.stdout).lines() {
        println!("   {line}");
    }
    let heads: serde_json::Value =
        serde_json::from_slice(&replica(&["status", "--json"]).output()?.stdout)?;
    let sid = heads[0]["point"]["snapshot_id"]
        .as_str()
        .context("no point written")?
        .to_string();
    let size = std::fs::metadata(disk_arg)?.len();
    let got = tokio::task::block_in_place(|| {
        rt.block_on(async {
            use pilotlight_cloud::ebs::EbsApi;
            let ebs = pilotlight_tests::stack::emulator(&stack.endpoint)
                .await
                .ebs();
            let mut out = vec![0u8; size as usize];
            for b in ebs.list_snapshot_blocks(&sid).await? {
                let data = ebs.get_snapshot_block(&sid, &b).await?;
                let at = b.index as usize * 512 * 1024;
                out[at..at + data.len()].copy_from_slice(&data);
            }
            Ok::<_, pilotlight_cloud::CloudError>(out)
        })
    })?;
    if got != std::fs::read(disk_arg)? {
        bail!("the point {sid} differs from the disk");
    }
    println!("   point {sid} read back (ListSnapshotBlocks, GetSnapshotBlock): byte-identical to the disk");
    Ok(())
}
