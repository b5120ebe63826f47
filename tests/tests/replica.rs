//! Snapshots mode end to end against the emulator: no receiver, no image. The real sender
//! uploads a two-disk VM over several generations; the replica function's handler (fed
//! from the stack's queue and its task queue by `pilotlight-replica run`, as Lambda's
//! event source mapping feeds it on AWS) writes each generation straight into an EBS
//! snapshot parented on the previous point, through the AWS SDK, into moto with the test
//! kit's EBS extension. Every point reads back equal to its disk; a snapshot drill and an
//! import drill (the export from a point, by the replica function) from past points.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use chrono::{DateTime, DurationRound, Utc};
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_tests::cli::{disk_args, dr, run_ok, s, send_ok, Running};
use pilotlight_tests::disk::{create_sparse, powercli_list, scribble, Written, MIB};
use pilotlight_tests::lambda::LambdaEmulator;
use pilotlight_tests::stack::{emulator, LocalStack};
use pilotlight_tests::{bin, poll_until};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const SIZE: u64 = 16 * MIB;
const WAIT: Duration = Duration::from_secs(120);
const RFC3339: &str = "%Y-%m-%dT%H:%M:%SZ";

/// Two whole hours before now: every point is within retention's keep-everything day
/// whatever date the test runs on.
fn hour() -> DateTime<Utc> {
    (Utc::now() - chrono::Duration::hours(2))
        .duration_trunc(chrono::Duration::hours(1))
        .unwrap()
}

fn send_disk(stack: &LocalStack, dir: &Path, name: &str, k: u64, count: usize, t: &str) -> Vec<u8> {
    let disk = dir.join(format!("{name}.raw"));
    let f = create_sparse(&disk, SIZE);
    let w = scribble(
        &f,
        SIZE,
        count,
        11 * k + name.len() as u64 + (name == "disk1") as u64,
    );
    drop(f);
    let state = dir.join(format!("{name}-state"));
    let id = format!("site1/vm1/{name}");
    let mut args = disk_args(&id, &state, &disk).to_vec();
    args.extend(["--snapshot-time", t]);
    let list = dir.join(format!("{name}-{k}.txt"));
    if k == 1 {
        args.extend(["--source", "full"]);
    } else {
        std::fs::write(&list, powercli_list(&w)).unwrap();
        args.extend(["--source", "extent-list", "--extents", s(&list)]);
    }
    assert_eq!(send_ok(stack, &args)["generation"], k);
    std::fs::read(&disk).unwrap()
}

fn replica(stack: &LocalStack, args: &[&str]) -> Command {
    let mut c = Command::new(bin("pilotlight-replica"));
    c.args(args)
        .envs(stack.env())
        .env("PILOTLIGHT_STACK", "e2e")
        .env("RUST_LOG", "info");
    c
}

fn dr_run(stack: &LocalStack, args: &[&str]) -> serde_json::Value {
    let out = run_ok(&mut dr(
        stack,
        "ok",
        &[&["--stack", "e2e", "--json"], args].concat(),
    ));
    match serde_json::from_slice(&out.stdout).unwrap() {
        serde_json::Value::Array(mut runs) => runs.pop().unwrap(),
        v => v,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_disk_vm_in_snapshots_mode_has_every_point_and_drills_from_past_ones() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (tasks, _dlq) = stack.extra_queue("replica-tasks", 30, 5).await;
    let log = std::fs::File::create(tmp.path().join("replica.log")).unwrap();
    // Shards of 4 blocks: the first (full) generation of each disk is written by several
    // invocations into one pending snapshot.
    let _runner = Running(
        replica(
            &stack,
            &[
                "run",
                "--queue-url",
                &stack.queue_url,
                "--task-queue-url",
                &tasks,
                "--shard-blocks",
                "4",
                "--concurrency",
                "4",
                // Exports of these 16 MiB disks fan out: 5 MiB parts, one a range.
                "--export-range-mib",
                "5",
                "--export-part-mib",
                "5",
            ],
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap(),
    );
    let base = hour();
    let mut history = vec![];
    for k in 1..=3u64 {
        let t = (base + chrono::Duration::minutes(5 * k as i64))
            .format(RFC3339)
            .to_string();
        let d0 = send_disk(&stack, tmp.path(), "disk0", k, 40, &t);
        let d1 = send_disk(&stack, tmp.path(), "disk1", k, 25, &t);
        history.push((t, [d0, d1]));
    }
    let log_text = || std::fs::read_to_string(tmp.path().join("replica.log")).unwrap_or_default();
    let heads = poll_until("both disks' chains at generation 3", WAIT, || async {
        let out = replica(&stack, &["status", "--json"]).output().unwrap();
        let heads: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
        (heads.len() == 2
            && heads
                .iter()
                .all(|h| h["point"]["generation"] == 3 && h["pending"].is_null()))
        .then_some(heads)
    })
    .await;
    assert!(
        heads.iter().all(|h| h["points_written"] == 3),
        "{heads:#?}\n{}",
        log_text()
    );
    // The full generations were sharded: records of shard 1 and beyond exist.
    let records = stack
        .keys(&format!("{}/site1/vm1/disk0/r/", stack.prefix))
        .await;
    assert!(
        records.iter().any(|k| k.ends_with("-000001.json")),
        "{records:?}"
    );
    let text = String::from_utf8(replica(&stack, &["status"]).output().unwrap().stdout).unwrap();
    assert!(
        text.contains("site1/vm1/disk0: point generation 3"),
        "{text}"
    );

    // Every point, as `pilotlight-dr points` lists them, reads back equal to its disk.
    let out = run_ok(&mut dr(
        &stack,
        "ok",
        &["points", "--site", "site1", "--vm", "vm1", "--json"],
    ));
    let points: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(points.len(), 3, "{points:#?}");
    let ebs = emulator(&stack.endpoint).await.ebs();
    for (p, (t, disks)) in points.iter().zip(history.iter().rev()) {
        assert_eq!(p["snapshot_time"].as_str().unwrap(), t.as_str());
        for (d, want) in p["disks"].as_array().unwrap().iter().zip(disks) {
            let got = pilotlight_tests::points::read_back(
                &ebs,
                d["snapshot_id"].as_str().unwrap(),
                SIZE as usize,
            )
            .await;
            assert!(got == *want, "{} at {t} differs from the disk", d["disk"]);
        }
    }

    let vm = [
        "--site", "site1", "--vm", "vm1", "--disk", "disk0", "--disk", "disk1",
    ];
    // A snapshot drill from generation 2's point.
    let at2 = (base + chrono::Duration::minutes(12))
        .format("%Y-%m-%dT%H:%MZ")
        .to_string();
    let run = dr_run(
        &stack,
        &[
            &[
                "start",
                "--drill",
                "--method",
                "snapshot",
                "--at",
                &at2,
                "--wait",
                "--poll-every",
                "200ms",
            ][..],
            &vm,
        ]
        .concat(),
    );
    assert_eq!(run["phase"], "done", "{run:#}");
    let gens: Vec<u64> = run["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(gens, [2, 2]);
    assert_eq!(run["verification"]["passed"], true, "{run:#}");
    let cleaned = dr_run(&stack, &["cleanup", run["run_id"].as_str().unwrap()]);
    assert_eq!(cleaned["phase"], "cleaned_up", "{cleaned:#}");

    // An import drill from generation 1's point: the replica function exports the point.
    let at1 = (base + chrono::Duration::minutes(7))
        .format("%Y-%m-%dT%H:%MZ")
        .to_string();
    let run = dr_run(
        &stack,
        &[
            &[
                "start",
                "--drill",
                "--method",
                "import",
                "--at",
                &at1,
                "--wait",
                "--poll-every",
                "200ms",
            ][..],
            &vm,
        ]
        .concat(),
    );
    assert_eq!(run["phase"], "done", "{run:#}\n{}", log_text());
    for (d, want) in run["disks"].as_array().unwrap().iter().zip(&history[0].1) {
        assert_eq!(d["generation"], 1);
        let image = stack.get(d["image_key"].as_str().unwrap()).await;
        assert_eq!(
            hex::encode(Sha256::digest(&image)),
            hex::encode(Sha256::digest(want)),
            "the export of {} differs from the disk at generation 1",
            d["disk"]
        );
        // Fanned out over invocations (four ranges of one 5 MiB part): the run reports
        // the composite checksum of the parts' SHA-256s, computed here independently.
        let mut parts = Sha256::new();
        for chunk in want.chunks(5 * MIB as usize) {
            parts.update(Sha256::digest(chunk));
        }
        let composite = format!(
            "{}-{}",
            hex::encode(parts.finalize()),
            want.len().div_ceil(5 * MIB as usize)
        );
        assert_eq!(
            d["sha256"].as_str().unwrap(),
            format!("parts of {} bytes: {composite}", 5 * MIB),
            "{d:#}"
        );
    }
    let cleaned = dr_run(&stack, &["cleanup", run["run_id"].as_str().unwrap()]);
    assert_eq!(cleaned["phase"], "cleaned_up", "{cleaned:#}");
}

/// 100 disks against the emulator in snapshots mode: a full and an incremental generation
/// of each (the real sender), the replica function fed by `pilotlight-replica run`; every
/// disk's chain ends at generation 2 and every point reads back equal to its disk. The
/// time is printed (`--no-capture`) for docs/replica-modes.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_disks_against_the_emulator_all_have_their_points() {
    const DISKS: usize = 100;
    const SMALL: u64 = MIB;
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (tasks, _dlq) = stack.extra_queue("replica-tasks-100", 30, 5).await;
    let t = (hour() + chrono::Duration::minutes(5))
        .format(RFC3339)
        .to_string();
    let mut want = vec![];
    let started = std::time::Instant::now();
    for k in 1..=2u64 {
        for n in 0..DISKS {
            let name = format!("disk{n:03}");
            let disk = tmp.path().join(format!("{name}.raw"));
            let f = create_sparse(&disk, SMALL);
            // Three small writes (4-64 KiB) somewhere in the disk.
            let mut w: Vec<Written> = (0..3u64)
                .map(|i| {
                    let seed = 31 * k + 7 * n as u64 + i;
                    let length = 4096 * (1 + seed % 16);
                    let offset = (seed * 7919 * 4096) % (SMALL - length) / 512 * 512;
                    let byte = (seed % 251) as u8 + 1;
                    std::os::unix::fs::FileExt::write_all_at(
                        &f,
                        &vec![byte; length as usize],
                        offset,
                    )
                    .unwrap();
                    Written {
                        offset,
                        length,
                        zero: false,
                    }
                })
                .collect();
            w.sort();
            drop(f);
            let state = tmp.path().join(format!("{name}-state"));
            let id = format!("site1/vm{:02}/{name}", n / 4);
            let mut args = disk_args(&id, &state, &disk).to_vec();
            args.extend(["--snapshot-time", &t]);
            let list = tmp.path().join(format!("{name}-{k}.txt"));
            if k == 1 {
                args.extend(["--source", "full"]);
            } else {
                std::fs::write(&list, powercli_list(&w)).unwrap();
                args.extend(["--source", "extent-list", "--extents", s(&list)]);
            }
            send_ok(&stack, &args);
            if k == 2 {
                want.push((id, std::fs::read(&disk).unwrap()));
            }
        }
    }
    let sent = started.elapsed();
    let log = std::fs::File::create(tmp.path().join("replica.log")).unwrap();
    let applying = std::time::Instant::now();
    let _runner = Running(
        replica(
            &stack,
            &[
                "run",
                "--queue-url",
                &stack.queue_url,
                "--task-queue-url",
                &tasks,
                "--concurrency",
                "8",
            ],
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap(),
    );
    let heads = poll_until(
        "100 chains at generation 2",
        Duration::from_secs(600),
        || async {
            let out = replica(&stack, &["status", "--json"]).output().unwrap();
            let heads: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
            (heads.len() == DISKS
                && heads
                    .iter()
                    .all(|h| h["point"]["generation"] == 2 && h["pending"].is_null()))
            .then_some(heads)
        },
    )
    .await;
    let applied = applying.elapsed();
    let ebs = emulator(&stack.endpoint).await.ebs();
    for (id, bytes) in &want {
        let h = heads
            .iter()
            .find(|h| {
                format!(
                    "{}/{}/{}",
                    h["disk"]["site"].as_str().unwrap(),
                    h["disk"]["vm"].as_str().unwrap(),
                    h["disk"]["disk"].as_str().unwrap()
                ) == *id
            })
            .unwrap();
        let sid = h["point"]["snapshot_id"].as_str().unwrap();
        let mut got = vec![0u8; SMALL as usize];
        for b in ebs.list_snapshot_blocks(sid).await.unwrap() {
            let data = ebs.get_snapshot_block(sid, &b).await.unwrap();
            let at = b.index as usize * 512 * 1024;
            got[at..at + data.len()].copy_from_slice(&data);
        }
        assert!(got == *bytes, "{id}: the point differs from the disk");
    }
    println!(
        "100 disks x 2 generations against the emulator: sent in {:.1} s, every point written in {:.1} s (8 invocations at once)",
        sent.as_secs_f64(),
        applied.as_secs_f64()
    );
}

/// The packaged function itself (`pilotlight-replica-lambda`, its thin `main`), run under
/// `cargo lambda`'s runtime emulator: an SQS batch (JSON fixture) with a manifest's event
/// and a malformed body writes the point and reports exactly the malformed message as a
/// batch item failure; the schedule's event (fixture) sweeps and prunes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_lambda_binary_answers_an_sqs_batch_and_its_schedule_under_cargo_lambda() {
    let root = pilotlight_tests::repo_root();
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (tasks, _) = stack.extra_queue("replica-tasks-lambda", 30, 5).await;
    let t = (hour() + chrono::Duration::minutes(5))
        .format(RFC3339)
        .to_string();
    let want = send_disk(&stack, tmp.path(), "disk0", 1, 20, &t);

    let lambda = LambdaEmulator::start(tmp.path()).await;
    let mut env = stack.env();
    for (k, v) in [
        ("PILOTLIGHT_STACK", "e2e"),
        ("PILOTLIGHT_QUEUE_URL", stack.queue_url.as_str()),
        ("PILOTLIGHT_TASK_QUEUE_URL", tasks.as_str()),
    ] {
        env.push((k.into(), v.into()));
    }
    let _function = lambda.function("pilotlight-replica-lambda", &env, tmp.path());
    let fixture = |name: &str| {
        std::fs::read_to_string(root.join("lambdas/replica/tests/fixtures").join(name)).unwrap()
    };
    let key = format!(
        "{}/site1/vm1/disk0/g/00000000000000000001/manifest.json",
        stack.prefix
    );
    let batch = fixture("sqs-manifest-event.json")
        .replace("BUCKET", &stack.bucket)
        .replace("KEY", &key);
    let invoke = |data: &str| lambda.invoke(data);
    let (ok, out) = invoke(&batch);
    let function_log =
        || std::fs::read_to_string(tmp.path().join("function.log")).unwrap_or_default();
    assert!(ok, "{out}\n{}", function_log());
    let answer: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let failures: Vec<&str> = answer["batchItemFailures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap())
        .collect();
    assert_eq!(
        failures,
        ["0c1f5a52-7d0e-4c52-9a57-a6a1f3b5c002"],
        "{answer}"
    );
    // The point is written (it may complete on a later delivery: the sweep finishes it).
    let (ok, out) = invoke(&fixture("scheduled.json"));
    assert!(ok, "{out}");
    let pruned: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(pruned["points"], 1, "{pruned}");
    assert_eq!(pruned["deleted"].as_array().unwrap().len(), 0);
    // The lag lines CloudWatch turns into metrics: the disk's, and the stack's largest
    // (what the RPO alarm watches in snapshots mode).
    for metric in ["\"ReplicationLagSeconds\"", "\"MaxReplicationLagSeconds\""] {
        assert!(
            function_log().contains(metric),
            "{metric}: {}",
            function_log()
        );
    }
    let out = replica(&stack, &["status", "--json"]).output().unwrap();
    let heads: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let sid = heads[0]["point"]["snapshot_id"].as_str().unwrap();
    let ebs = emulator(&stack.endpoint).await.ebs();
    assert!(
        pilotlight_tests::points::read_back(&ebs, sid, SIZE as usize).await == want,
        "the point differs from the disk"
    );
}
