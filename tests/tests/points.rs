//! Recovery points end to end against the emulator: the real sender and receiver, points
//! written through the AWS SDK's EBS direct APIs to moto, listed by `pilotlight-dr points`
//! and read back with ListSnapshotBlocks/GetSnapshotBlock. The test kit's moto extension
//! (tests/moto) makes the emulator follow AWS's documented EBS rules: incremental points
//! inherit their parent's blocks, the encryption outcomes, 512 KiB blocks, checksums,
//! pending until completed; every point is read back as itself, through its chain.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use chrono::{DateTime, DurationRound, Utc};
use pilotlight_cloud::ebs::{EbsApi, SnapshotFilter, SnapshotStatus};
use pilotlight_protocol::points::{tag, Point};
use pilotlight_protocol::DiskId;
use pilotlight_tests::cli::{applied, disk_args, dr, receiver, receiver_state, run_ok, s, send_ok};
use pilotlight_tests::disk::{create_sparse, powercli_list, scribble, MIB};
use pilotlight_tests::stack::{emulator, LocalStack};
use std::path::Path;
use std::time::Duration;

const SIZE: u64 = 16 * MIB;

/// The hour the snapshot times of these tests count from: two hours before now, whole,
/// so every point falls within retention's keep-everything day whatever date the tests
/// run on (fixed dates passed only on the day they were written).
fn hour() -> DateTime<Utc> {
    let two_hours_ago = Utc::now() - chrono::Duration::hours(2);
    two_hours_ago
        .duration_trunc(chrono::Duration::hours(1))
        .unwrap()
}

/// `minutes` after [`hour`], as `format` writes it (e.g. `%Y-%m-%dT%H:%M:%SZ`).
fn at(base: DateTime<Utc>, minutes: i64, format: &str) -> String {
    (base + chrono::Duration::minutes(minutes))
        .format(format)
        .to_string()
}

const RFC3339: &str = "%Y-%m-%dT%H:%M:%SZ";

/// Sends generation `k` of `site1/vm1/{name}`: `count` extents scribbled into its file,
/// at snapshot time `t` (the same for every disk of the VM, as one vSphere snapshot); the
/// first a full base, the others changed-area lists.
fn send_disk(stack: &LocalStack, dir: &Path, name: &str, k: u64, count: usize, t: &str) -> Vec<u8> {
    let full = k == 1;
    let disk = dir.join(format!("{name}.raw"));
    let f = create_sparse(&disk, SIZE);
    let w = scribble(
        &f,
        SIZE,
        count,
        7 * k + name.len() as u64 + (name == "disk1") as u64,
    );
    drop(f);
    let state = dir.join(format!("{name}-state"));
    let id = format!("site1/vm1/{name}");
    let mut args = disk_args(&id, &state, &disk).to_vec();
    args.extend(["--snapshot-time", t]);
    let list = dir.join(format!("{name}-{k}.txt"));
    if full {
        args.extend(["--source", "full"]);
    } else {
        std::fs::write(&list, powercli_list(&w)).unwrap();
        args.extend(["--source", "extent-list", "--extents", s(&list)]);
    }
    let summary = send_ok(stack, &args);
    assert_eq!(summary["generation"], k);
    std::fs::read(&disk).unwrap()
}

fn sync(stack: &LocalStack, rx: &Path) {
    run_ok(&mut receiver(stack, "sync", rx, &["--stack", "e2e"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_generations_of_a_two_disk_vm_are_five_vm_points_that_read_back() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let rx = tmp.path().join("rx");
    let base = hour();
    let mut history = vec![];
    for k in 1..=5u64 {
        let t = at(base, 5 * k as i64, RFC3339);
        let d0 = send_disk(&stack, tmp.path(), "disk0", k, 40, &t);
        let d1 = send_disk(&stack, tmp.path(), "disk1", k, 25, &t);
        sync(&stack, &rx);
        history.push((t, [d0, d1]));
    }
    // A sixth generation of disk0 only (disk1's still uploading): the VM stays at :25.
    send_disk(&stack, tmp.path(), "disk0", 6, 10, &at(base, 30, RFC3339));
    sync(&stack, &rx);
    assert_eq!(
        applied(&rx, &DiskId::parse("site1/vm1/disk0").unwrap()),
        Some(6)
    );

    let out = run_ok(&mut dr(
        &stack,
        "ok",
        &["points", "--site", "site1", "--vm", "vm1", "--json"],
    ));
    let points: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(points.len(), 5, "{points:#?}");
    let ebs = emulator(&stack.endpoint).await.ebs();
    for (p, (t, disks)) in points.iter().zip(history.iter().rev()) {
        assert_eq!(p["snapshot_time"].as_str().unwrap(), t.as_str());
        let ds = p["disks"].as_array().unwrap();
        assert_eq!(ds.len(), 2);
        for (d, want) in ds.iter().zip(disks) {
            let got = pilotlight_tests::points::read_back(
                &ebs,
                d["snapshot_id"].as_str().unwrap(),
                SIZE as usize,
            )
            .await;
            let bad = differing_blocks(&got, want);
            assert!(
                bad.is_empty(),
                "{} at {t}: blocks {bad:?} differ",
                d["disk"]
            );
        }
    }
    // The text form names each disk's generation and snapshot.
    let out = run_ok(&mut dr(
        &stack,
        "ok",
        &["points", "--site", "site1", "--vm", "vm1"],
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("site1/vm1 {}", at(base, 25, RFC3339))),
        "{text}"
    );
    assert_eq!(text.matches("generation 5").count(), 2, "{text}");
    assert_eq!(text.matches("MiB written").count(), 10, "{text}");
    // The receiver lists the same.
    let out = run_ok(&mut receiver(&stack, "points", &rx, &["--json"]));
    let same: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(same, points);
}

/// kill -9 at random moments while points are being written (ten trials): after each
/// restart the receiver converges; no snapshot is left pending or in error, each
/// generation has exactly one point, and every point reads back as the disk was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_writing_points_leaves_no_incomplete_or_wrong_point() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let rx = tmp.path().join("rx");
    let id = DiskId::parse("site1/vm1/disk0").unwrap();
    let ebs = emulator(&stack.endpoint).await.ebs();
    let mut history = vec![];
    let mut killed_in_point = 0;
    let base = hour();
    for k in 1..=10u64 {
        let t = at(base, 60 + k as i64, RFC3339);
        history.push(send_disk(&stack, tmp.path(), "disk0", k, 60, &t));
        let mut child = receiver(
            &stack,
            "sync",
            &rx,
            &["--stack", "e2e", "--point-concurrency", "2"],
        )
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
        // Wait until the point is under way (its snapshot started), then kill at once
        // or a little later: a different moment of the point each trial.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if under_way(&rx, &id).is_some() || child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no point started");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(40 * (k % 5)));
        if child.try_wait().unwrap().is_none() {
            killed_in_point += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        sync(&stack, &rx);
        assert_eq!(applied(&rx, &id), Some(k));
    }
    assert!(
        killed_in_point >= 5,
        "only {killed_in_point} kills landed in a point"
    );
    let all = ebs
        .describe_snapshots(&SnapshotFilter::default().tag(tag::DISK, "disk0"))
        .await
        .unwrap();
    assert!(
        all.iter().all(|s| s.status == SnapshotStatus::Completed),
        "{all:#?}"
    );
    let mut by_gen = std::collections::BTreeMap::new();
    for s in &all {
        let p = Point::from_tags(&s.id, &s.tags).unwrap();
        assert!(
            by_gen.insert(p.generation, p.snapshot_id).is_none(),
            "two points of one generation"
        );
    }
    assert_eq!(by_gen.len(), 10);
    for (g, sid) in &by_gen {
        let got = pilotlight_tests::points::read_back(&ebs, sid, SIZE as usize).await;
        let bad = differing_blocks(&got, &history[*g as usize - 1]);
        assert!(
            bad.is_empty(),
            "point of generation {g}: blocks {bad:?} differ"
        );
    }
}

/// The snapshot of the point under way, from the receiver's state.
fn under_way(rx: &Path, id: &DiskId) -> Option<String> {
    receiver_state(rx, id).point_due?.snapshot_id
}

/// The 512 KiB blocks where two disks differ.
fn differing_blocks(got: &[u8], want: &[u8]) -> Vec<usize> {
    assert_eq!(got.len(), want.len());
    got.chunks(512 * 1024)
        .zip(want.chunks(512 * 1024))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect()
}

/// `pilotlight-dr` with the stack's points, `--json`: the run it printed.
fn dr_run(stack: &LocalStack, args: &[&str]) -> serde_json::Value {
    let out = run_ok(&mut dr(
        stack,
        "ok",
        &[&["--stack", "e2e", "--json"], args].concat(),
    ));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    match v {
        serde_json::Value::Array(mut runs) => runs.pop().unwrap(),
        v => v,
    }
}

/// The snapshot method end to end: a two-disk VM replicated over four generations (a
/// point each), a drill `--method snapshot --at` generation 2's time registers an AMI
/// from that point's snapshots and launches it on the emulator, passes verification,
/// marks the VM snapshot-ready (so `auto` now chooses snapshot); cleanup removes exactly
/// its AMI and instance and gives the point back to retention. The AMI maps exactly the
/// point's snapshots (the test kit's moto extension keeps RegisterImage's mappings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_drill_from_a_past_point_launches_verifies_and_cleans_up_on_the_emulator() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let rx = tmp.path().join("rx");
    let base = hour();
    for k in 1..=4u64 {
        let t = at(base, 5 * k as i64, RFC3339);
        send_disk(&stack, tmp.path(), "disk0", k, 30, &t);
        send_disk(&stack, tmp.path(), "disk1", k, 20, &t);
        sync(&stack, &rx);
    }
    let ec2 = stack.ec2().await;
    // A bystander AMI and instance: cleanup leaves them.
    let bystander_ami = ec2
        .register_image()
        .name("bystander")
        .root_device_name("/dev/xvda")
        .send()
        .await
        .unwrap()
        .image_id
        .unwrap();
    let bystander = ec2
        .run_instances()
        .image_id("ami-12c6146b")
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap()
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_string();
    let vm = [
        "--site", "site1", "--vm", "vm1", "--disk", "disk0", "--disk", "disk1",
    ];

    // Never verified: auto chooses import, and says why.
    let plan = dr_run(&stack, &[&["start", "--dry-run"][..], &vm].concat());
    assert_eq!(plan["method"], "import", "{plan:#}");
    assert!(plan["method_reason"]
        .as_str()
        .unwrap()
        .contains("no snapshot-method run that passed"));

    // The points at :10 (generation 2), as `points` lists them.
    let out = run_ok(&mut dr(&stack, "ok", &["points", "--vm", "vm1", "--json"]));
    let points: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let p2 = points
        .iter()
        .find(|p| p["snapshot_time"] == at(base, 10, RFC3339).as_str())
        .unwrap();
    let want: Vec<&str> = p2["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["snapshot_id"].as_str().unwrap())
        .collect();

    // `--json --wait` prints one document: the finished run (dr_run parses exactly one).
    let run = dr_run(
        &stack,
        &[
            &[
                "start",
                "--drill",
                "--method",
                "snapshot",
                "--at",
                &at(base, 12, "%Y-%m-%dT%H:%MZ"),
                "--wait",
                "--poll-every",
                "200ms",
            ][..],
            &vm,
        ]
        .concat(),
    );
    let id = run["run_id"].as_str().unwrap().to_string();
    assert_eq!(run["phase"], "done", "{run:#}");
    assert_eq!(run["method"], "snapshot");
    let gens: Vec<u64> = run["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(gens, [2, 2]);
    let snaps: Vec<&str> = run["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["snapshot_id"].as_str().unwrap())
        .collect();
    assert_eq!(snaps, want, "the run uses exactly generation 2's points");
    let phases: Vec<&str> = run["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["registering", "launching", "verifying"]);
    assert_eq!(run["verification"]["passed"], true, "{run:#}");

    // The AMI as the emulator keeps it, and the instance launched from it.
    let ami = run["image_id"].as_str().unwrap();
    let images = ec2.describe_images().image_ids(ami).send().await.unwrap();
    let image = &images.images()[0];
    assert!(image.name().unwrap().contains(&id), "{image:?}");
    assert!(image
        .description()
        .unwrap()
        .contains(&at(base, 10, RFC3339)));
    // Its block device mappings are the point's snapshots, boot disk first (the test
    // kit's moto extension keeps them, as EC2 does).
    let mapped: Vec<&str> = image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
        .collect();
    assert_eq!(mapped, want, "{image:?}");
    let inst = run["instance_ids"][0].as_str().unwrap();
    let out = ec2
        .describe_instances()
        .instance_ids(inst)
        .send()
        .await
        .unwrap();
    let i = &out.reservations()[0].instances()[0];
    assert_eq!(i.image_id(), Some(ami));
    assert!(i
        .tags()
        .iter()
        .any(|t| t.key() == Some("pilotlight:dr-run") && t.value() == Some(id.as_str())));
    // The point is held by the drill.
    let ebs = emulator(&stack.endpoint).await.ebs();
    let hold = format!("pilotlight:hold:{id}");
    for s in &want {
        let info = ebs
            .describe_snapshots(&SnapshotFilter::id(*s))
            .await
            .unwrap();
        assert_eq!(info[0].tags.get(&hold).map(String::as_str), Some("1"));
    }
    // Snapshot-ready: auto now chooses the snapshot method, naming the drill.
    assert!(!stack
        .get("pilotlight-dr/ready/site1/vm1.json")
        .await
        .is_empty());
    let plan = dr_run(&stack, &[&["start", "--dry-run"][..], &vm].concat());
    assert_eq!(plan["method"], "snapshot", "{plan:#}");
    assert!(plan["method_reason"].as_str().unwrap().contains(&id));

    // Cleanup: exactly its AMI and instance; the points stay, released.
    let cleaned = dr_run(&stack, &["cleanup", &id]);
    assert_eq!(cleaned["phase"], "cleaned_up", "{cleaned:#}");
    let left = ec2
        .describe_images()
        .owners("self")
        .send()
        .await
        .unwrap()
        .images()
        .iter()
        .filter_map(|i| i.image_id().map(String::from))
        .collect::<Vec<_>>();
    assert!(
        left.contains(&bystander_ami) && !left.iter().any(|i| i == ami),
        "{left:?}"
    );
    let state = |id: String| {
        let ec2 = ec2.clone();
        async move {
            let out = ec2
                .describe_instances()
                .instance_ids(id)
                .send()
                .await
                .unwrap();
            out.reservations()[0].instances()[0]
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_string())
                .unwrap()
        }
    };
    assert_eq!(state(inst.to_string()).await, "terminated");
    assert_eq!(state(bystander).await, "running");
    for s in &want {
        let info = ebs
            .describe_snapshots(&SnapshotFilter::id(*s))
            .await
            .unwrap();
        assert_eq!(info[0].status, SnapshotStatus::Completed, "the point stays");
        assert!(!info[0].tags.contains_key(&hold), "released");
    }

    // The drill's report: written when it ended, rewritten by the cleanup, downloaded by
    // `pilotlight-dr report`, and as headless Chromium draws it: the figures, the
    // resources, and a bar in each phase's colour on the timeline.
    let page = tmp.path().join("report.html");
    let out = run_ok(&mut dr(
        &stack,
        "ok",
        &["--stack", "e2e", "report", &id, "--out", s(&page)],
    ));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("as kept in the bucket"), "{said}");
    let png = tmp.path().join("report.png");
    let shot = pilotlight_tests::browser::render(&page, &png, 1000, 1700);
    let text = shot.text();
    let point_time = at(base, 10, "%Y-%m-%d %H:%M:%S UTC");
    for want in [
        "pilotlight DR drill report: site1/vm1",
        "Drill succeeded: running and verified, cleaned up",
        "RPO achieved",
        "RTO achieved",
        &point_time,
        "snapshot",
        ami,
        inst,
        "Removed by cleanup",
        "site1/vm1/disk1",
    ] {
        assert!(text.contains(want), "{want} not on the page: {text}");
    }
    for (phase, rgb) in [
        ("registering", [0xd7, 0x9b, 0x00]),
        ("launching", [0x82, 0xb3, 0x66]),
        ("verifying", [0x3a, 0x9e, 0x8f]),
    ] {
        assert!(text.contains(phase), "{phase}");
        let n = shot.pixels_of(rgb, 6);
        assert!(
            n >= 30,
            "the {phase} bar: {n} pixels of its colour in {}",
            png.display()
        );
    }
    // `pilotlight-dr status`: the VM's newest point (generation 4, :20) and its age,
    // STALLED over the RPO target, as the receiver's PointLagSeconds carries it.
    let status = |target: &str| {
        let out = run_ok(&mut dr(
            &stack,
            "ok",
            &["--stack", "e2e", "status", "--rpo-target", target],
        ));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let stalled = status("30m");
    assert!(
        stalled.contains(&format!(
            "site1/vm1 STALLED (over the RPO target 30m): newest recovery point {}",
            at(base, 20, RFC3339)
        )),
        "{stalled}"
    );
    assert_eq!(
        stalled.matches("newest point generation 4").count(),
        2,
        "{stalled}"
    );
    let fine = status("1000days");
    assert!(
        !fine.contains("STALLED") && fine.contains("site1/vm1: newest recovery point"),
        "{fine}"
    );

    // Kept for the README when asked (`PILOTLIGHT_SCREENSHOT_DIR=docs`).
    if let Some(dir) = std::env::var_os("PILOTLIGHT_SCREENSHOT_DIR") {
        std::fs::copy(&png, Path::new(&dir).join("drill-report.png")).unwrap();
    }

    // Saved settings, and several VMs by name: vm1 from its settings, an unconfigured VM
    // failing on its own (the command says so and exits non-zero).
    let out = run_ok(&mut dr(
        &stack,
        "ok",
        &[
            "configure",
            "--site",
            "site1",
            "--vm",
            "vm1",
            "--disk",
            "disk0",
            "--disk",
            "disk1",
            "--method",
            "snapshot",
            "--instance-type",
            "t3.large",
        ],
    ));
    assert!(String::from_utf8_lossy(&out.stdout).contains("saved recovery settings of site1/vm1"));
    // `start --vm vm1 --vm ghost` plus `how`, `--json`: one document per run.
    let vm1_and_ghost = |how: &str| {
        let out = dr(
            &stack,
            "ok",
            &[
                "--stack", "e2e", "--json", "start", "--site", "site1", "--vm", "vm1", "--vm",
                "ghost", how,
            ],
        )
        .output()
        .unwrap();
        let runs: Vec<serde_json::Value> = serde_json::Deserializer::from_slice(&out.stdout)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        (out, runs)
    };
    let (out, runs) = vm1_and_ghost("--dry-run");
    assert!(!out.status.success(), "one VM failed: the command says so");
    assert_eq!(runs.len(), 2, "{runs:#?}");
    assert_eq!(runs[0]["phase"], "planned", "{:#}", runs[0]);
    assert_eq!(runs[0]["method"], "snapshot", "the saved method");
    assert_eq!(
        runs[0]["disks"].as_array().unwrap().len(),
        2,
        "the saved disks"
    );
    assert_eq!(runs[0]["group"], runs[1]["group"]);
    assert_eq!(runs[1]["phase"], "failed");
    assert!(runs[1]["reason"]
        .as_str()
        .unwrap()
        .contains("pilotlight-dr configure"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ghost"));

    // The same for real (a drill): vm1 recovers, ghost fails on its own; one report for
    // the group names both, from the runs as they ended.
    let (out, runs) = vm1_and_ghost("--drill");
    assert!(!out.status.success(), "ghost failed");
    let group = runs[0]["group"].as_str().unwrap().to_string();
    let vm1 = runs[0]["run_id"].as_str().unwrap().to_string();
    let done = dr_run(&stack, &["status", &vm1, "--wait", "--poll-every", "200ms"]);
    assert_eq!(done["phase"], "done", "{done:#}");
    let page = tmp.path().join("group.html");
    let out = run_ok(&mut dr(
        &stack,
        "ok",
        &["--stack", "e2e", "report", &group, "--out", s(&page)],
    ));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&group));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        html.contains("2 VMs, each recovered independently; 1 without failure")
            && html.contains("<h2>site1/vm1</h2>")
            && html.contains("<h2>site1/ghost</h2>")
            && html.contains("pilotlight-dr configure"),
        "{html}"
    );
    assert!(!stack
        .get(&format!("pilotlight-dr/runs/{group}.html"))
        .await
        .is_empty());
    let cleaned = dr_run(&stack, &["cleanup", &vm1]);
    assert_eq!(cleaned["phase"], "cleaned_up", "{cleaned:#}");
}

/// Import from any point, end to end: generation 2 of a two-disk VM recovered by
/// `--method import` after generation 4 was applied. The receiver exports each disk from
/// its generation-2 recovery point, an incremental one read through its chain; the
/// exported objects' SHA-256 equal the disks at generation 2; the import is started with
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_of_an_older_point_exports_it_from_the_recovery_point() {
    use sha2::{Digest, Sha256};
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let rx = tmp.path().join("rx");
    let mut at_2 = vec![];
    let base = hour();
    for k in 1..=4u64 {
        let t = at(base, 5 * k as i64, RFC3339);
        let d0 = send_disk(&stack, tmp.path(), "disk0", k, 30, &t);
        let d1 = send_disk(&stack, tmp.path(), "disk1", k, 20, &t);
        if k == 2 {
            at_2 = vec![d0, d1];
        }
        sync(&stack, &rx);
    }
    let run = dr_run(
        &stack,
        &[
            "start",
            "--drill",
            "--method",
            "import",
            "--at",
            &at(base, 10, "%Y-%m-%dT%H:%MZ"),
            "--site",
            "site1",
            "--vm",
            "vm1",
            "--disk",
            "disk0",
            "--disk",
            "disk1",
        ],
    );
    assert_eq!(run["phase"], "exporting", "{run:#}");
    assert_eq!(run["method"], "import");
    let id = run["run_id"].as_str().unwrap().to_string();
    // The receiver answers the export requests (its image is at generation 4).
    sync(&stack, &rx);
    let run = dr_run(&stack, &["status", &id, "--wait", "--poll-every", "200ms"]);
    assert_eq!(run["phase"], "done", "{run:#}");
    for (d, want) in run["disks"].as_array().unwrap().iter().zip(&at_2) {
        assert_eq!(d["generation"], 2);
        let sha = hex::encode(Sha256::digest(want));
        assert_eq!(d["sha256"].as_str().unwrap(), sha, "{}", d["disk"]);
        let object = stack.get(d["image_key"].as_str().unwrap()).await;
        assert_eq!(hex::encode(Sha256::digest(&object)), sha);
    }
    // The import was started with those objects.
    assert!(run["import"]["task_id"].as_str().is_some(), "{run:#}");
    // The points were held while exporting, and given back once exported.
    assert_eq!(run["held"].as_array().map(Vec::len), Some(0), "{run:#}");
    let ebs = emulator(&stack.endpoint).await.ebs();
    let hold = format!("pilotlight:hold:{id}");
    for d in run["disks"].as_array().unwrap() {
        let s = d["snapshot_id"].as_str().expect("the point was found");
        let info = ebs
            .describe_snapshots(&SnapshotFilter::id(s))
            .await
            .unwrap();
        assert!(
            !info[0].tags.contains_key(&hold),
            "released: {:?}",
            info[0].tags
        );
    }
    assert!(run["created"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["kind"] == "import-image-task"));
}
