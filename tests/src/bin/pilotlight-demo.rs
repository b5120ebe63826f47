//! The demo behind `scripts/demo`: a sample disk replicated through the local AWS
//! emulator, a full then an incremental generation, checked by an independent tool.
//!
//! Until the receiver exists (issue 3) the replica is rebuilt by the test kit's
//! reassembler from the manifests and objects in S3, and compared with `cmp`.

use anyhow::{bail, Context, Result};
use pilotlight_protocol::{parse_notification, DiskId, ObjectKey, Prefix, S3Notification};
use pilotlight_tests::disk::{create_sparse, powercli_list, scribble, MIB};
use pilotlight_tests::reassemble::reassemble;
use pilotlight_tests::stack::LocalStack;
use pilotlight_tests::{bin, repo_root};
use std::process::Command;
use std::time::Instant;

const DISK_SIZE: u64 = 256 * MIB;

#[tokio::main]
async fn main() -> Result<()> {
    let started = Instant::now();
    let work = repo_root().join(".local/demo");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let disk = work.join("disk.raw");
    let state = work.join("sender-state");
    let replica = work.join("replica.raw");
    let disk_id = DiskId::parse("site1/web-01/disk0")?;

    println!("== starting the local AWS emulator (moto) with bucket, queue and notification");
    let stack = LocalStack::start().await;
    println!(
        "   endpoint {}  bucket {}  prefix {}",
        stack.endpoint, stack.bucket, stack.prefix
    );

    println!(
        "== sample disk: {} (256 MiB sparse, 1000 extents of mixed sizes, some all zero)",
        disk.display()
    );
    let f = create_sparse(&disk, DISK_SIZE);
    scribble(&f, DISK_SIZE, 1000, 42);
    drop(f);

    let send = |extra: &[&str]| -> Result<serde_json::Value> {
        let out = Command::new(bin("pilotlight-sender"))
            .arg("send")
            .args(["--disk-id", "site1/web-01/disk0", "--state-dir"])
            .arg(&state)
            .args(extra)
            .arg("--json")
            .envs(stack.env())
            .env("RUST_LOG", "warn")
            .output()
            .context("run pilotlight-sender")?;
        if !out.status.success() {
            bail!(
                "sender failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let show = |s: &serde_json::Value| {
        let mib = |k: &str| s[k].as_u64().unwrap_or(0) as f64 / MIB as f64;
        println!(
            "   generation {} (parent {}): {} objects; read {:.1} MiB, uploaded {:.1} MiB, zero {:.1} MiB ({:.1} MiB holes never read) in {:.2} s",
            s["generation"], s["parent"].as_u64().map_or("none".to_string(), |p| p.to_string()), s["objects"], mib("bytes_read"), mib("bytes_uploaded"),
            mib("bytes_zero"), mib("bytes_holes"), s["seconds"].as_f64().unwrap_or(0.0)
        );
    };

    println!("== generation 1: full (allocated extents via SEEK_DATA/SEEK_HOLE)");
    let disk_arg = disk.to_str().context("disk path")?;
    show(&send(&["--source", "full", "--disk", disk_arg])?);

    println!(
        "== the VM writes 300 more extents; generation 2 from a PowerCLI-style changed-area list"
    );
    let f = create_sparse(&disk, DISK_SIZE);
    let changed = scribble(&f, DISK_SIZE, 300, 43);
    drop(f);
    let list = work.join("changed-areas.txt");
    std::fs::write(&list, powercli_list(&changed))?;
    let list_arg = list.to_str().context("list path")?;
    show(&send(&[
        "--source",
        "extent-list",
        "--extents",
        list_arg,
        "--disk",
        disk_arg,
        "--change-id",
        "demo-change-2",
    ])?);

    println!("== S3 event notifications delivered to the queue (what the receiver consumes)");
    let prefix = Prefix::new(&stack.prefix)?;
    let (mut data, mut manifests, mut tests) = (0, 0, 0);
    loop {
        let msgs = stack
            .sqs
            .receive_message()
            .queue_url(&stack.queue_url)
            .max_number_of_messages(10)
            .send()
            .await?;
        let msgs = msgs.messages();
        if msgs.is_empty() {
            break;
        }
        for m in msgs {
            match parse_notification(m.body().unwrap_or_default().as_bytes())? {
                S3Notification::Test { .. } => tests += 1,
                S3Notification::Records(rs) => {
                    for r in rs {
                        match ObjectKey::parse(&prefix, &r.key)? {
                            ObjectKey::Manifest { .. } => manifests += 1,
                            ObjectKey::Data { .. } => data += 1,
                        }
                    }
                }
            }
            if let Some(h) = m.receipt_handle() {
                stack
                    .sqs
                    .delete_message()
                    .queue_url(&stack.queue_url)
                    .receipt_handle(h)
                    .send()
                    .await?;
            }
        }
    }
    println!("   {data} data-object events, {manifests} manifest events, {tests} s3:TestEvent");

    println!(
        "== replica rebuilt from S3 (manifests + verified objects) at {}",
        replica.display()
    );
    let used = reassemble(&stack, &prefix, &disk_id, u64::MAX, &replica).await;
    let cmp = Command::new("cmp")
        .arg(&disk)
        .arg(&replica)
        .status()
        .context("run cmp")?;
    if !cmp.success() {
        bail!("replica differs from the source (cmp)");
    }
    println!(
        "   cmp: replica is byte-identical to the source after generation {}",
        used.len()
    );
    println!(
        "== done in {:.1} s; files in {}",
        started.elapsed().as_secs_f64(),
        work.display()
    );
    Ok(())
}
