//! Failback end to end against the emulator: a two-disk VM protected by the real sender
//! and receiver (its recovery points written through EBS direct to moto, with the test
//! kit's extension keeping parent chains and ListChangedBlocks' lineage rule), "changed
//! in AWS" by return snapshots written through EBS direct (standing for the recovered
//! instance's writes), then failed back by the real `pilotlight-sender failback` into a
//! raw file and a qcow2 served by qemu-nbd, over two rounds; a site disk that changed
//! after the point is corrected; SIGKILL of the applier mid-round resumes and converges.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use bytes::Bytes;
use pilotlight_cloud::ebs::{
    block_checksum, linear_checksum, EbsApi, SdkEbs, StartSnapshot, BLOCK_SIZE,
};
use pilotlight_tests::cli::{disk_args, receiver, run_ok, s, send_ok, Running};
use pilotlight_tests::disk::{create_sparse, scribble, MIB};
use pilotlight_tests::stack::{emulator, LocalStack};
use pilotlight_tests::{bin, poll_until};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const SIZE: u64 = 48 * MIB;
const B: usize = BLOCK_SIZE as usize;
const BLOCKS: u64 = SIZE / BLOCK_SIZE;

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A completed return snapshot on `parent` with `blocks` written (EBS direct, as the
/// recovered instance's volume snapshot would hold them).
async fn return_snapshot(ebs: &SdkEbs, parent: &str, blocks: &BTreeMap<u64, Vec<u8>>) -> String {
    let id = ebs
        .start_snapshot(&StartSnapshot {
            volume_size_gib: 1,
            parent: Some(parent.into()),
            description: "return snapshot (test)".into(),
            tags: vec![],
            client_token: format!(
                "ret-{parent}-{}",
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            encrypted: None,
            kms_key_arn: None,
            timeout_minutes: 60,
        })
        .await
        .unwrap();
    let mut digests = Vec::new();
    for (i, data) in blocks {
        let d: [u8; 32] = Sha256::digest(data).into();
        ebs.put_snapshot_block(&id, *i, Bytes::from(data.clone()), &block_checksum(&d))
            .await
            .unwrap();
        digests.push(d);
    }
    ebs.complete_snapshot(&id, digests.len() as u64, &linear_checksum(digests.iter()))
        .await
        .unwrap();
    id
}

/// Random blocks at random indices: what "the instance wrote".
fn changes(seed: u64, count: usize) -> BTreeMap<u64, Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = BTreeMap::new();
    while out.len() < count {
        let mut data = vec![0u8; B];
        if rng.gen_bool(0.9) {
            rng.fill(&mut data[..]);
        } // else a block of zeroes written (it is still a change)
        out.insert(rng.gen_range(0..BLOCKS), data);
    }
    out
}

fn failback(
    stack: &LocalStack,
    state: &Path,
    disk: &str,
    point: &str,
    snap: &str,
    target: &str,
    extra: &[&str],
) -> Command {
    let mut c = Command::new(bin("pilotlight-sender"));
    c.args([
        "--state-dir",
        s(state),
        "failback",
        "--disk-id",
        disk,
        "--point",
        point,
    ])
    .args([
        "--snapshot",
        snap,
        "--target",
        target,
        "--json",
        "--no-progress",
    ])
    .args(extra)
    .envs(stack.env())
    .env("RUST_LOG", "warn");
    c
}

fn rounds(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_disk_vm_fails_back_in_two_rounds_into_a_raw_file_and_qemu_nbd() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let ebs = emulator(&stack.endpoint).await.ebs();

    // Protection: one full generation per disk (one snapshot time, as one VM snapshot),
    // applied with recovery points on.
    let t = (chrono::Utc::now() - chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let mut site = Vec::new();
    for (n, name) in ["disk0", "disk1"].iter().enumerate() {
        let disk = tmp.path().join(format!("{name}.raw"));
        let f = create_sparse(&disk, SIZE);
        scribble(&f, SIZE, 30, 11 + n as u64);
        drop(f);
        let id = format!("site1/vm1/{name}");
        let state = tmp.path().join(format!("{name}-state"));
        let mut args = disk_args(&id, &state, &disk).to_vec();
        args.extend(["--source", "full", "--snapshot-time", &t]);
        send_ok(&stack, &args);
        site.push(disk);
    }
    let rx = tmp.path().join("rx");
    run_ok(&mut receiver(&stack, "sync", &rx, &["--stack", "e2e"]));
    let out = run_ok(&mut pilotlight_tests::cli::dr(
        &stack,
        "ok",
        &["points", "--site", "site1", "--vm", "vm1", "--json"],
    ));
    let points: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let point = |i: usize| {
        points[0]["disks"][i]["snapshot_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (p0, p1) = (point(0), point(1));

    // The site: disk0 stays a raw file, and kept running after the point (its change
    // tracking lists what it wrote); disk1 becomes a qcow2 served by qemu-nbd.
    let mut disk0 = std::fs::read(&site[0]).unwrap();
    disk0[5 * B + 1024..5 * B + 9216].fill(0xee);
    disk0[(BLOCKS as usize - 1) * B..].fill(0xdd);
    std::fs::write(&site[0], &disk0).unwrap();
    let site_changes = tmp.path().join("site-changes.txt");
    std::fs::write(
        &site_changes,
        format!(
            "{} 8192\n{} {}\n",
            5 * B + 1024,
            (BLOCKS - 1) * BLOCK_SIZE,
            BLOCK_SIZE
        ),
    )
    .unwrap();
    let qcow = tmp.path().join("disk1.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&site[1]),
        s(&qcow),
    ]);
    let sock = tmp.path().join("disk1.sock");
    let _nbd = Running(
        Command::new("qemu-nbd")
            .args(["-t", "-f", "qcow2", "-x", "disk1", "-k"])
            .arg(&sock)
            .arg(&qcow)
            .spawn()
            .unwrap(),
    );
    poll_until("qemu-nbd listening", Duration::from_secs(20), || async {
        std::os::unix::net::UnixStream::connect(&sock)
            .ok()
            .map(|_| ())
    })
    .await;
    let nbd_uri = format!("nbd+unix:///disk1?socket={}", sock.display());
    // One state directory per disk, as a site runs it: protection, failback and resume.
    let state = tmp.path().join("disk0-state");
    let state1 = tmp.path().join("disk1-state");

    // Two rounds: each moves only what changed since the last.
    let mut last = (p0.clone(), p1.clone());
    for (round, count) in [(1u64, 12usize), (2, 3)] {
        let r0 = return_snapshot(&ebs, &last.0, &changes(round * 10, count)).await;
        let r1 = return_snapshot(&ebs, &last.1, &changes(round * 10 + 1, count)).await;
        let site_arg = ["--site-changes", s(&site_changes)];
        let out = run_ok(&mut failback(
            &stack,
            &state,
            "site1/vm1/disk0",
            &p0,
            &r0,
            s(&site[0]),
            &site_arg,
        ));
        let done = rounds(&out);
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(done[0]["mode"], "changed");
        // Written: the instance's changes, plus (first round) the site's two blocks.
        let site_blocks = if round == 1 { 2 } else { 0 };
        let written = done[0]["blocks_written"].as_u64().unwrap();
        assert!(
            written <= count as u64 + site_blocks && written >= count as u64,
            "{done:?}"
        );
        assert_eq!(done[0]["blocks_verified"], written);
        assert_eq!(
            std::fs::read(&site[0]).unwrap(),
            pilotlight_tests::points::read_back(&ebs, &r0, SIZE as usize).await,
            "disk0 round {round}"
        );

        let out = run_ok(&mut failback(
            &stack,
            &state1,
            "site1/vm1/disk1",
            &p1,
            &r1,
            &nbd_uri,
            &[],
        ));
        let done = rounds(&out);
        assert_eq!(
            done[0]["blocks_written"].as_u64().unwrap(),
            count as u64,
            "{done:?}"
        );
        let want = tmp.path().join(format!("want1-{round}.raw"));
        std::fs::write(
            &want,
            pilotlight_tests::points::read_back(&ebs, &r1, SIZE as usize).await,
        )
        .unwrap();
        // qemu-img reads the qcow2 itself: an independent check of what reached it.
        let cmp = Command::new("qemu-img")
            .args([
                "compare",
                "-U",
                "-f",
                "qcow2",
                "-F",
                "raw",
                s(&qcow),
                s(&want),
            ])
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "disk1 round {round}: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        last = (r0, r1);
    }

    // `status` tells where the failback stands.
    let out = run_ok(Command::new(bin("pilotlight-sender")).args([
        "--state-dir",
        s(&state),
        "status",
        "--disk-id",
        "site1/vm1/disk0",
    ]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("the target equals {}", last.0)),
        "{said}"
    );
    assert!(said.contains("2 rounds"), "{said}");

    // Without the site's changes the first round would have left them: a fresh target
    // with the site's writes, failed back to the first snapshot without the list, differs.
    // (As a drill: the rounds write into a sparse copy, the site's disk stays as it was.)
    let site_copy = tmp.path().join("site-as-it-was.raw");
    std::fs::write(&site_copy, &disk0).unwrap();
    let again = tmp.path().join("again.raw");
    let r = return_snapshot(&ebs, &p0, &changes(10, 12)).await;
    run_ok(&mut failback(
        &stack,
        &tmp.path().join("state2"),
        "site1/vm1/disk0",
        &p0,
        &r,
        s(&again),
        &["--drill-from", s(&site_copy)],
    ));
    assert_ne!(
        std::fs::read(&again).unwrap(),
        pilotlight_tests::points::read_back(&ebs, &r, SIZE as usize).await
    );
    assert_eq!(std::fs::read(&site_copy).unwrap(), disk0);

    // SIGKILL mid-round: afterwards every block is the old round's or the new one's;
    // the next run finishes the round and the target equals the snapshot.
    let before = pilotlight_tests::points::read_back(&ebs, &last.0, SIZE as usize).await;
    let big = return_snapshot(&ebs, &last.0, &changes(99, 40)).await;
    let after = pilotlight_tests::points::read_back(&ebs, &big, SIZE as usize).await;
    let one = |extra: &[&str]| {
        failback(
            &stack,
            &state,
            "site1/vm1/disk0",
            &p0,
            &big,
            s(&site[0]),
            extra,
        )
    };
    let state_file = state.join("failback/site1/vm1/disk0.json");
    let under_way = || {
        std::fs::read_to_string(&state_file).is_ok_and(|st| {
            st.contains(&format!("\"snapshot\": \"{big}\"")) && st.contains("\"round\": {")
        })
    };
    let mut rng = rand::thread_rng();
    let mut mid_round = 0;
    for trial in 0..4 {
        let mut child = one(&["--concurrency", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Once the round is under way (its state saved), kill at a random moment of it.
        let child_ref = &mut child;
        poll_until("the round to start", Duration::from_secs(30), || {
            let started = under_way();
            let done = child_ref.try_wait().ok().flatten().is_some();
            async move { (started || done).then_some(()) }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..250))).await;
        let _ = child.kill();
        child.wait().unwrap();
        let now = std::fs::read(&site[0]).unwrap();
        for (i, c) in now.chunks(B).enumerate() {
            let (a, b) = (&before[i * B..(i + 1) * B], &after[i * B..(i + 1) * B]);
            assert!(
                c == a || c == b,
                "trial {trial}: block {i} is neither the old round's nor the new one's"
            );
        }
        if !under_way() {
            break; // the round finished before the kill: nothing left to cut
        }
        mid_round += 1;
    }
    let out = run_ok(&mut one(&[]));
    assert!(rounds(&out).len() <= 1);
    assert_eq!(std::fs::read(&site[0]).unwrap(), after);
    assert!(mid_round > 0, "no kill landed inside the round");

    // Cutover done: protection resumes with one incremental generation holding exactly
    // what changed since the point (the instance's blocks of every round and the site's
    // own), and the replica equals the site's disk again.
    let mut changed: std::collections::BTreeSet<u64> = [5, BLOCKS - 1].into();
    for (seed, n) in [(10, 12), (20, 3), (99, 40)] {
        changed.extend(changes(seed, n).keys());
    }
    let resume = |generation: &str| {
        let mut c = Command::new(bin("pilotlight-sender"));
        c.args([
            "--state-dir",
            s(&state),
            "resume",
            "--point-generation",
            generation,
        ])
        .args(["--disk-id", "site1/vm1/disk0", "--disk", s(&site[0])])
        .args(["--json", "--no-progress"])
        .envs(stack.env())
        .env("RUST_LOG", "warn");
        c
    };
    // A point generation the bucket does not have is refused, nothing sent.
    let out = resume("7").output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("no such generation"),
        "{said}"
    );
    let out = run_ok(&mut resume("1"));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["generation"], 2, "{summary}");
    assert_eq!(summary["parent"], 1, "{summary}");
    let covered = summary["bytes_data"].as_u64().unwrap() + summary["bytes_zero"].as_u64().unwrap();
    assert_eq!(covered, changed.len() as u64 * BLOCK_SIZE, "{summary}");
    assert!(covered < SIZE, "{summary}");
    run_ok(&mut receiver(&stack, "sync", &rx, &["--stack", "e2e"]));
    let image = pilotlight_tests::cli::image_path(
        &rx,
        &pilotlight_protocol::DiskId::parse("site1/vm1/disk0").unwrap(),
    );
    assert_eq!(
        std::fs::read(image).unwrap(),
        std::fs::read(&site[0]).unwrap()
    );
}

/// `pilotlight-dr` with the e2e stack's tag, JSON out.
fn dr_json(stack: &LocalStack, args: &[&str]) -> serde_json::Value {
    let out = run_ok(&mut pilotlight_tests::cli::dr(
        stack,
        "ok",
        &[&["--stack", "e2e", "--json"], args].concat(),
    ));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    match v {
        serde_json::Value::Array(mut all) if all.len() == 1 => all.pop().unwrap(),
        v => v,
    }
}

/// What the recovered instance "writes" to a volume: the test kit's moto extension turns
/// `pilotlight-test:write:<block>` = `<byte>` tags into the volume's blocks.
async fn instance_writes(ec2: &aws_sdk_ec2::Client, volume: &str, blocks: &[(u64, u8)]) {
    let mut req = ec2.create_tags().resources(volume);
    for (i, b) in blocks {
        req = req.tags(
            aws_sdk_ec2::types::Tag::builder()
                .key(format!("pilotlight-test:write:{i}"))
                .value(b.to_string())
                .build(),
        );
    }
    req.send().await.unwrap();
}

/// The whole way home through the binaries: a real snapshot-method recovery of a two-disk
/// VM, `pilotlight-dr failback start` (return snapshots of the instance's volumes, with
/// what it wrote), `pilotlight-sender failback --run` per disk (the point and the newest
/// return snapshot from the bucket), `failback cutover` (instance stopped, final set),
/// the final rounds, and `returned`: each site disk equals its final return snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_recovery_fails_back_through_return_snapshots_and_cutover() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let ebs = emulator(&stack.endpoint).await.ebs();
    let ec2 = stack.ec2().await;
    let t = (chrono::Utc::now() - chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let mut site = Vec::new();
    for (n, name) in ["disk0", "disk1"].iter().enumerate() {
        let disk = tmp.path().join(format!("{name}.raw"));
        let f = create_sparse(&disk, SIZE);
        scribble(&f, SIZE, 30, 21 + n as u64);
        drop(f);
        let state = tmp.path().join(format!("{name}-state"));
        let id = format!("site1/vm1/{name}");
        let mut args = disk_args(&id, &state, &disk).to_vec();
        args.extend(["--source", "full", "--snapshot-time", &t]);
        send_ok(&stack, &args);
        site.push(disk);
    }
    run_ok(&mut receiver(
        &stack,
        "sync",
        &tmp.path().join("rx"),
        &["--stack", "e2e"],
    ));
    let vm = [
        "--site", "site1", "--vm", "vm1", "--disk", "disk0", "--disk", "disk1",
    ];
    let run = dr_json(
        &stack,
        &[
            &[
                "start",
                "--method",
                "snapshot",
                "--wait",
                "--poll-every",
                "200ms",
            ][..],
            &vm,
        ]
        .concat(),
    );
    assert_eq!(run["phase"], "done", "{run:#}");
    assert_eq!(run["drill"], false);
    let id = run["run_id"].as_str().unwrap().to_string();

    // A sender cannot fail back before the DR side offers anything.
    let early = Command::new(bin("pilotlight-sender"))
        .args(["failback", "--run", &id, "--disk-id", "site1/vm1/disk0"])
        .args(["--target", s(&site[0]), "--no-progress"])
        .envs(stack.env())
        .output()
        .unwrap();
    assert!(!early.status.success());
    let why = String::from_utf8_lossy(&early.stderr);
    assert!(
        why.contains("no return snapshots") && why.contains("failback start"),
        "{why}"
    );
    assert_eq!(std::fs::read(&site[0]).unwrap().len() as u64, SIZE);

    let fb = dr_json(
        &stack,
        &["failback", "start", &id, "--every", "5m", "--keep", "2"],
    );
    assert_eq!(fb["phase"], "returning", "{fb:#}");
    let volumes: Vec<String> = fb["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["volume_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(fb["disks"][1]["device"], "/dev/sdf");
    // That first set was taken before the instance wrote anything. It writes now; the
    // set the rounds use is taken at cutover below, and a second round brings it home.
    let fb = dr_json(&stack, &["failback", "status", &id]);
    assert_eq!(fb["sets"][0]["state"], "completed", "{fb:#}");

    let round = |disk: &str, target: &Path| {
        let out = run_ok(
            Command::new(bin("pilotlight-sender"))
                .args(["--state-dir", s(&tmp.path().join(format!("{disk}-fb")))])
                .args([
                    "failback",
                    "--run",
                    &id,
                    "--disk-id",
                    &format!("site1/vm1/{disk}"),
                ])
                .args(["--target", s(target), "--json", "--no-progress"])
                .envs(stack.env())
                .env("RUST_LOG", "warn"),
        );
        rounds(&out)
    };
    // Round 1: to the first set (nothing written yet: the site already holds it).
    for (n, disk) in ["disk0", "disk1"].iter().enumerate() {
        let before = std::fs::read(&site[n]).unwrap();
        let done = round(disk, &site[n]);
        assert!(done.len() <= 1, "{done:?}");
        assert_eq!(
            std::fs::read(&site[n]).unwrap(),
            before,
            "nothing changed yet"
        );
    }
    let fb = dr_json(&stack, &["failback", "status", &id]);
    assert!(
        fb["disks"][0]["round"]["verified"].as_bool().unwrap(),
        "{fb:#}"
    );

    // The instance writes; cutover stops it and takes the final set.
    instance_writes(&ec2, &volumes[0], &[(3, 0x33), (40, 0x40), (95, 0x95)]).await;
    instance_writes(&ec2, &volumes[1], &[(7, 0x07)]).await;
    let fb = dr_json(&stack, &["failback", "cutover", &id]);
    assert!(
        ["stopping", "final_snapshot", "final_round"].contains(&fb["phase"].as_str().unwrap()),
        "{fb:#}"
    );
    let fb = poll_until(
        "final snapshot complete",
        Duration::from_secs(60),
        || async {
            let fb = dr_json(&stack, &["failback", "status", &id]);
            (fb["phase"] == "final_round").then_some(fb)
        },
    )
    .await;
    let inst = ec2
        .describe_instances()
        .instance_ids(run["instance_ids"][0].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let state = inst.reservations()[0].instances()[0]
        .state()
        .unwrap()
        .name()
        .unwrap()
        .as_str()
        .to_string();
    assert_eq!(state, "stopped");
    let fin = fb["sets"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(fin["final"], true);

    // The final rounds: exactly the instance's writes move; each site disk equals its
    // final return snapshot, block for block.
    for (n, (disk, writes)) in [("disk0", 3u64), ("disk1", 1)].iter().enumerate() {
        let done = if n == 1 {
            // The optional whole-disk check: reported equal with the round.
            let out = run_ok(
                Command::new(bin("pilotlight-sender"))
                    .args(["--state-dir", s(&tmp.path().join(format!("{disk}-fb")))])
                    .args(["failback", "--run", &id, "--disk-id", "site1/vm1/disk1"])
                    .args(["--target", s(&site[n]), "--json", "--no-progress"])
                    .arg("--whole-disk-sha256")
                    .envs(stack.env())
                    .env("RUST_LOG", "warn"),
            );
            rounds(&out)
        } else {
            round(disk, &site[n])
        };
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(done[0]["blocks_written"], *writes, "{done:?}");
        let snap = fin["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p[0] == volumes[n].as_str())
            .unwrap()[1]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            std::fs::read(&site[n]).unwrap(),
            pilotlight_tests::points::read_back(&ebs, &snap, SIZE as usize).await,
            "{disk}"
        );
    }
    let disk0 = std::fs::read(&site[0]).unwrap();
    assert!(disk0[40 * B..41 * B].iter().all(|b| *b == 0x40));
    let fb = dr_json(&stack, &["failback", "status", &id]);
    assert_eq!(fb["phase"], "returned", "{fb:#}");
    let whole = fb["disks"][1]["round"]["whole_disk_sha256"]
        .as_str()
        .unwrap();
    assert_eq!(
        whole,
        hex::encode(Sha256::digest(std::fs::read(&site[1]).unwrap()))
    );
    assert!(fb["log"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l.as_str().unwrap().contains("final round")));
    // The text view says what comes next.
    let out = run_ok(&mut pilotlight_tests::cli::dr(
        &stack,
        "ok",
        &["failback", "status", &id],
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Returned")
            && text.contains("pilotlight-sender resume")
            && text.contains("the final snapshot")
            && text.contains("% of the disk"),
        "{text}"
    );
    let html = tmp.path().join("fb.html");
    run_ok(&mut pilotlight_tests::cli::dr(
        &stack,
        "ok",
        &["failback", "report", &id, "--out", s(&html)],
    ));
    let html = std::fs::read_to_string(&html).unwrap();
    assert!(
        html.contains("Returned: every disk") && html.contains("site1/vm1/disk0"),
        "{html}"
    );
}
