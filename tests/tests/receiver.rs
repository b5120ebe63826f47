//! End-to-end tests of `pilotlight-receiver` with the real sender against the local AWS
//! emulator: events duplicated, reordered, malformed; corrupt objects; SIGKILL.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use pilotlight_protocol::{DiskId, Manifest};
use pilotlight_tests::cli::{
    applied, image_path, receiver, running_receiver_with, send_generation, Running,
};
use pilotlight_tests::disk::{sha256_file, MIB};
use pilotlight_tests::poll_until;
use pilotlight_tests::stack::LocalStack;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

const SIZE: u64 = 128 * MIB;
const WAIT: Duration = Duration::from_secs(60);

fn disk_id() -> DiskId {
    DiskId::parse("site1/vm1/disk0").unwrap()
}

/// Generation `k` of the test disk: a full base first, then PowerCLI lists of
/// overlapping extents. Returns the source's SHA-256 after it.
fn make_generation(stack: &LocalStack, dir: &Path, k: u64) -> [u8; 32] {
    send_generation(
        stack,
        dir,
        SIZE,
        if k == 1 { 400 } else { 150 },
        1000 + k,
        k,
    )
}

/// `pilotlight-receiver sync` into `dir`; asserts it applied up to `want` and returns
/// the image's SHA-256.
fn sync_applies(stack: &LocalStack, dir: &Path, want: u64) -> [u8; 32] {
    let out = receiver(stack, "sync", dir, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(applied(dir, &disk_id()), Some(want));
    sha256_file(&image_path(dir, &disk_id()))
}

async fn wait_applied(dir: &Path, want: u64) {
    poll_until(&format!("generation {want} applied"), WAIT, || async {
        (applied(dir, &disk_id()) == Some(want)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_and_reordered_events_apply_in_order_byte_identical() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    // The bucket notifies stack.queue_url; the test replays those events into its own
    // queue in the order and multiplicity it wants.
    let (replay, replay_dlq) = stack.extra_queue("replay", 30, 5).await;
    let mut expected = Vec::new();
    let mut events = Vec::new();
    for k in 1..=5 {
        expected.push(make_generation(&stack, tmp.path(), k));
        events.push(stack.drain(&stack.queue_url).await);
        if k == 4 {
            // Boundary 4 through the reconcile path: a separate receiver lists and applies.
            let side = tmp.path().join("side");
            assert_eq!(sync_applies(&stack, &side, 4), expected[3], "boundary 4");
        }
    }
    assert!(events
        .iter()
        .all(|e| e.iter().any(|b| b.contains("manifest.json"))));

    let rx = tmp.path().join("rx");
    let receiver_proc = running_receiver_with(
        &stack,
        &rx,
        &[
            "--queue-url",
            &replay,
            "--reconcile-every",
            "off",
            "--wait-seconds",
            "1",
            "--visibility-timeout",
            "30",
            "--prefetch",
        ],
        &tmp.path().join("receiver.log"),
    );
    let image = image_path(&rx, &disk_id());
    let inject = |k: usize, manifest: bool| {
        let events = &events;
        let stack = &stack;
        let replay = &replay;
        async move {
            for body in events[k - 1]
                .iter()
                .filter(|b| b.contains("manifest.json") == manifest)
            {
                // Every event twice: at-least-once delivery.
                stack.send(replay, body).await;
                stack.send(replay, body).await;
            }
        }
    };
    for k in 1..=3 {
        inject(k, false).await;
        inject(k, true).await;
        wait_applied(&rx, k as u64).await;
        assert_eq!(sha256_file(&image), expected[k - 1], "boundary {k}");
    }
    // Generation 5 arrives before 4: it waits, nothing is applied.
    inject(5, false).await;
    inject(5, true).await;
    poll_until("generation 5's events received", WAIT, || async {
        (stack.depth(&replay).await.0 == 0).then_some(())
    })
    .await;
    assert_eq!(applied(&rx, &disk_id()), Some(3), "5 waits for its parent");
    assert_eq!(sha256_file(&image), expected[2], "image still at 3");
    // Meanwhile its data objects were prefetched, decoded and hashed, one file each.
    let objects5 = events[4]
        .iter()
        .filter(|b| !b.contains("manifest.json"))
        .count();
    let prefetched5 = rx
        .join("state/site1/vm1/disk0.staging/prefetch")
        .join(format!("g{:020}", 5));
    poll_until("generation 5's objects prefetched", WAIT, || async {
        let n = std::fs::read_dir(&prefetched5)
            .map(|d| {
                d.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().ends_with(".tmp"))
                    .count()
            })
            .unwrap_or(0);
        (n == objects5).then_some(())
    })
    .await;
    // The late generation 4 unblocks both.
    inject(4, true).await;
    inject(4, false).await;
    wait_applied(&rx, 5).await;
    assert_eq!(sha256_file(&image), expected[4], "boundary 5");
    // ... and generation 5 was written from those copies, none fetched again.
    let log = std::fs::read_to_string(tmp.path().join("receiver.log")).unwrap();
    let applied5 = log
        .lines()
        .find(|l| l.contains(" applied disk=") && l.contains("generation=5 "))
        .unwrap_or_else(|| panic!("no apply of generation 5 in the log:\n{log}"));
    assert!(
        applied5.contains(&format!("prefetched={objects5} ")),
        "{objects5} objects from prefetched copies: {applied5}"
    );
    assert!(!prefetched5.exists(), "copies removed once applied");
    // Every message, duplicates included, was deleted; none went to the DLQ.
    poll_until("replay queue empty", WAIT, || async {
        (stack.depth(&replay).await == (0, 0)).then_some(())
    })
    .await;
    assert_eq!(stack.depth(&replay_dlq).await, (0, 0));

    // status: applied generation, lag, nothing pending, an allocated sparse image.
    let out = receiver(&stack, "status", &rx, &["--json"])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st[0]["disk"], "site1/vm1/disk0");
    assert_eq!(st[0]["applied"], 5);
    assert_eq!(st[0]["pending"], serde_json::json!([]));
    assert_eq!(st[0]["disk_size"], SIZE);
    assert!(st[0]["lag_seconds"].as_i64().unwrap() >= 0);
    let allocated = st[0]["allocated_bytes"].as_u64().unwrap();
    assert!(
        allocated > 0 && allocated < SIZE,
        "sparse image: {allocated}"
    );

    // SIGTERM: the receiver stops promptly and cleanly.
    let mut rx_proc = receiver_proc;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(rx_proc.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = poll_until("the receiver to exit on SIGTERM", WAIT, || {
        let r = rx_proc.0.try_wait().unwrap();
        async move { r }
    })
    .await;
    assert!(status.success(), "clean exit on SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_and_bad_generations_change_nothing_and_reach_the_dlq() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    // Short visibility and two receives before redrive, so the DLQ fills quickly.
    let (q, dlq) = stack.extra_queue("bad", 2, 2).await;
    let h1 = make_generation(&stack, tmp.path(), 1);
    let g1 = stack.drain(&stack.queue_url).await;
    let rx = tmp.path().join("rx");
    let _receiver = Running(
        receiver(
            &stack,
            "run",
            &rx,
            &[
                "--queue-url",
                &q,
                "--reconcile-every",
                "off",
                "--wait-seconds",
                "1",
                "--visibility-timeout",
                "2",
            ],
        )
        .stderr(std::fs::File::create(tmp.path().join("receiver.log")).unwrap())
        .spawn()
        .unwrap(),
    );
    for b in &g1 {
        stack.send(&q, b).await;
    }
    wait_applied(&rx, 1).await;
    let image = image_path(&rx, &disk_id());
    assert_eq!(sha256_file(&image), h1);

    // Generation 2, with one data object corrupted after upload.
    make_generation(&stack, tmp.path(), 2);
    let g2 = stack.drain(&stack.queue_url).await;
    let m2_key = "dr/site1/vm1/disk0/g/00000000000000000002/manifest.json";
    let m2 = Manifest::from_json(&stack.get(m2_key).await).unwrap();
    let victim = format!(
        "dr/site1/vm1/disk0/g/00000000000000000002/d/{:020}",
        m2.objects[0].offset
    );
    let mut bytes = stack.get(&victim).await;
    bytes[7] ^= 0xff;
    stack.put(&victim, bytes).await;

    // Hand-made manifests: an unknown version, an object past the disk, an unaligned
    // offset, overlapping objects, a missing parent.
    let mut v: serde_json::Value = serde_json::from_slice(&m2.to_json()).unwrap();
    let put_manifest = |g: u64, v: serde_json::Value| {
        let stack = &stack;
        async move {
            let key = format!("dr/site1/vm1/disk0/g/{g:020}/manifest.json");
            stack.put(&key, serde_json::to_vec(&v).unwrap()).await;
            stack.drain(&stack.queue_url).await
        }
    };
    v["generation"] = 3.into();
    v["format_version"] = 2.into();
    let e3 = put_manifest(3, v.clone()).await;
    v["generation"] = 4.into();
    v["format_version"] = 1.into();
    v["objects"][0]["offset"] = (SIZE).into();
    let e4 = put_manifest(4, v.clone()).await;
    let fresh = || serde_json::from_slice::<serde_json::Value>(&m2.to_json()).unwrap();
    let mut unaligned = fresh();
    unaligned["generation"] = 5.into();
    unaligned["objects"][0]["offset"] = (m2.objects[0].offset + 100).into();
    let e5 = put_manifest(5, unaligned).await;
    let mut overlapping = fresh();
    overlapping["generation"] = 6.into();
    overlapping["objects"][1]["offset"] = m2.objects[0].offset.into();
    let e6 = put_manifest(6, overlapping).await;
    let mut waiting = serde_json::from_slice::<serde_json::Value>(&m2.to_json()).unwrap();
    waiting["generation"] = 9.into();
    waiting["parent"] = 8.into();
    let e9 = put_manifest(9, waiting).await;

    let event = |bucket: &str, key: &str| {
        serde_json::json!({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1}}}]})
        .to_string()
    };
    let mut bad = vec![
        "{this is not json".to_string(),
        event("someone-elses-bucket", m2_key),
        event(
            &stack.bucket,
            "dr/site1/../disk0/g/00000000000000000002/manifest.json",
        ),
        event(&stack.bucket, "dr/site1/vm1/disk0/g/2/manifest.json"),
    ];
    bad.extend(g2.iter().filter(|b| b.contains("manifest.json")).cloned());
    bad.extend(
        e3.iter()
            .chain(&e4)
            .chain(&e5)
            .chain(&e6)
            .filter(|b| b.contains("manifest.json"))
            .cloned(),
    );
    for b in &bad {
        stack.send(&q, b).await;
    }
    for b in e9.iter().filter(|b| b.contains("manifest.json")) {
        stack.send(&q, b).await;
    }
    let dead = poll_until("bad messages redriven to the DLQ", WAIT, || async {
        let (visible, _) = stack.depth(&dlq).await;
        (visible as usize >= bad.len()).then_some(visible)
    })
    .await;
    assert_eq!(
        dead as usize,
        bad.len(),
        "exactly the bad messages; receiver log:\n{}",
        std::fs::read_to_string(tmp.path().join("receiver.log")).unwrap_or_default()
    );
    // The waiting manifest (parent 8 missing) is kept in flight, not dead-lettered.
    let (_, in_flight) = stack.depth(&q).await;
    assert!(in_flight >= 1, "the waiting manifest's message is held");
    assert_eq!(applied(&rx, &disk_id()), Some(1), "state unchanged");
    assert_eq!(sha256_file(&image), h1, "image unchanged");
}

/// Kills the receiver with SIGKILL at random points of its applies, 20 times. After each
/// kill the state names a generation k, and every 512-byte sector of the image equals
/// generation k's or k+1's (on its way there, never anything else); the state never
/// claims more. Finally the image converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_applies_never_corrupts_and_converges() {
    use rand::Rng;
    const GENS: u64 = 6;
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let snaps = tmp.path().join("snaps");
    std::fs::create_dir(&snaps).unwrap();
    for k in 1..=GENS {
        make_generation(&stack, tmp.path(), k);
        std::fs::copy(tmp.path().join("disk.raw"), snaps.join(k.to_string())).unwrap();
    }
    let read = |p: &Path| std::fs::read(p).unwrap_or_default();
    let snapshot = |k: u64| {
        if k == 0 {
            vec![0u8; SIZE as usize]
        } else {
            read(&snaps.join(k.to_string()))
        }
    };

    // How long a full sync takes, to aim the kills inside it.
    let warm = tmp.path().join("warm");
    let t0 = std::time::Instant::now();
    assert!(receiver(&stack, "sync", &warm, &[])
        .output()
        .unwrap()
        .status
        .success());
    let full = t0.elapsed();
    assert_eq!(read(&image_path(&warm, &disk_id())), snapshot(GENS));

    let rx = tmp.path().join("rx");
    let mut rng = rand::thread_rng();
    let mut mid_apply_kills = 0;
    for trial in 0..20 {
        let mut child = receiver(&stack, "sync", &rx, &[])
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until an apply is under way (its staging file exists) or the run ends...
        let staging = rx.join("state/site1/vm1/disk0.staging");
        let child_ref = &mut child;
        poll_until("an apply to start", WAIT, || {
            let started = std::fs::read_dir(&staging)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false);
            let done = child_ref.try_wait().ok().flatten().is_some();
            async move { (started || done).then_some(()) }
        })
        .await;
        // ...then kill at a random point within about one apply (fault injection).
        let at = full.mul_f64(rng.gen_range(0.0..1.5) / GENS as f64);
        tokio::time::sleep(at).await;
        let _ = child.kill();
        child.wait().unwrap();
        let k = applied(&rx, &disk_id()).unwrap_or(0);
        let img = read(&image_path(&rx, &disk_id()));
        let (now, next) = (snapshot(k), snapshot((k + 1).min(GENS)));
        let mut partial = false;
        // Objects start on sector boundaries: a sector is written whole or not at all.
        for (i, sector) in img.chunks(512).enumerate() {
            let a = &now[i * 512..(i * 512 + sector.len()).min(now.len())];
            let b = &next[i * 512..(i * 512 + sector.len()).min(next.len())];
            assert!(
                sector == a || sector == b,
                "trial {trial}: sector {i} is neither generation {k} nor {}",
                k + 1
            );
            partial |= sector != a;
        }
        mid_apply_kills += usize::from(partial);
        if k == GENS {
            // Start over so later kills land inside applies again.
            std::fs::remove_dir_all(&rx).unwrap();
        }
    }
    // Resume to the end.
    assert!(receiver(&stack, "sync", &rx, &[])
        .output()
        .unwrap()
        .status
        .success());
    assert_eq!(applied(&rx, &disk_id()), Some(GENS));
    assert_eq!(read(&image_path(&rx, &disk_id())), snapshot(GENS));
    eprintln!("{mid_apply_kills} of 20 kills landed with the image between generations");
}

/// The bucket stops answering reads of manifests for a while (a proxy in front of the
/// emulator closes those connections unanswered): the SDK's retries run out, the receiver
/// holds the message, reads the manifest again after a back-off and applies it. The
/// message never goes to the dead-letter queue; the image equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_unreadable_for_a_while_is_retried_and_applied_not_dead_lettered() {
    use pilotlight_tests::proxy::FaultProxy;
    let stack = LocalStack::start().await;
    let proxy = FaultProxy::start(&stack.endpoint).await;
    let tmp = tempfile::tempdir().unwrap();
    let rx = tmp.path().join("rx");
    let log = tmp.path().join("receiver.log");
    let _receiver = Running(
        receiver(
            &stack,
            "run",
            &rx,
            &[
                "--queue-url",
                &stack.queue_url,
                "--endpoint-url",
                &proxy.endpoint,
                "--reconcile-every",
                "off",
                "--wait-seconds",
                "1",
                "--max-attempts",
                "2",
            ],
        )
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap(),
    );
    let first = make_generation(&stack, tmp.path(), 1);
    wait_applied(&rx, 1).await;
    assert_eq!(sha256_file(&image_path(&rx, &disk_id())), first);
    // Five reads of generation 2's manifest get no answer: more than one receive's
    // worth of SDK attempts (2), so the engine's own retry has to do the rest.
    proxy.fail_next(
        "GET /pilotlight-test/dr/site1/vm1/disk0/g/00000000000000000002/manifest.json",
        5,
    );
    let second = make_generation(&stack, tmp.path(), 2);
    wait_applied(&rx, 2).await;
    assert_eq!(proxy.failed(), 5, "every planned failure was hit");
    assert_eq!(sha256_file(&image_path(&rx, &disk_id())), second);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("held and read again later"),
        "the engine held the message: {text}"
    );
    assert!(!text.contains("rejected"), "nothing was rejected: {text}");
    assert_eq!(
        stack.depth(&stack.dlq_url).await,
        (0, 0),
        "nothing dead-lettered"
    );
}

/// The packing upgrade: a generation written as format v1 (`--no-pack`, as senders
/// before packing wrote) is in the bucket; the next generations come packed (v2); the
/// receiver applies both kinds, in order, to the byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_generation_then_packed_v2_ones_apply_to_the_byte() {
    use pilotlight_tests::cli::{disk_args, s, send_ok};
    use pilotlight_tests::disk::{create_sparse, scribble};
    use std::os::unix::fs::FileExt;
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.raw");
    let state = tmp.path().join("sender-state");
    let size = 64 * MIB;
    let f = create_sparse(&disk, size);
    scribble(&f, size, 40, 3);
    let base = disk_args("site1/vm1/disk0", &state, &disk);
    let v1 = send_ok(
        &stack,
        &[&base[..], &["--source", "full", "--no-pack"]].concat(),
    );
    assert_eq!(v1["generation"], 1);

    // Scattered small writes: 300 extents of 64 KiB, 128 KiB apart, random bytes.
    let mut list = String::new();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for i in 0..300u64 {
        let off = i * 192 * 1024;
        let data: Vec<u8> = (0..64 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        f.write_all_at(&data, off).unwrap();
        list.push_str(&format!("{off} {}\n", 64 * 1024));
    }
    drop(f);
    let changes = tmp.path().join("changes.txt");
    std::fs::write(&changes, list).unwrap();
    let v2 = send_ok(
        &stack,
        &[
            &base[..],
            &["--source", "extent-list", "--extents", s(&changes)],
        ]
        .concat(),
    );
    assert_eq!(v2["generation"], 2);
    // 300 extents of 64 KiB (18.75 MiB) in 3 objects of at most 8 MiB, plus the manifest.
    assert_eq!(v2["objects"], 3, "{v2}");
    assert_eq!(v2["put_requests"], 4, "{v2}");

    let prefix = pilotlight_protocol::Prefix::new(&stack.prefix).unwrap();
    let ms = pilotlight_tests::reassemble::manifests(&stack, &prefix, &disk_id()).await;
    assert_eq!(ms[0].format_version, 1, "written as v1");
    assert!(ms[0].objects.iter().all(|o| o.pieces.is_empty()));
    assert_eq!(ms[1].format_version, 2, "packed: v2");
    assert_eq!(
        ms[1].objects.iter().map(|o| o.pieces.len()).sum::<usize>(),
        300
    );

    let rx = tmp.path().join("rx");
    assert_eq!(
        sync_applies(&stack, &rx, 2),
        sha256_file(&disk),
        "the image is the source, to the byte"
    );
}

/// The sender's state lost after generation 3: the next run refuses with the way back
/// and writes nothing (generations 1 to 3 byte-identical before and after); `--rebase`
/// sends a full generation 4 that the receiver applies as a new base; replication goes
/// on from there, to the byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_sender_state_overwrites_nothing_and_rebase_continues() {
    use pilotlight_tests::cli::{disk_args, send_ok, sender};
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    for k in 1..=3 {
        send_generation(&stack, tmp.path(), 64 * MIB, 30, 40 + k, k);
    }
    let prefix = format!("{}/site1/vm1/disk0/", stack.prefix);
    let snapshot = |keys: Vec<String>| async {
        let mut out = Vec::new();
        for k in keys {
            out.push((k.clone(), stack.get(&k).await));
        }
        out
    };
    let before = snapshot(stack.keys(&prefix).await).await;
    assert!(before
        .iter()
        .any(|(k, _)| k.contains("/g/00000000000000000003/manifest.json")));

    std::fs::remove_dir_all(tmp.path().join("sender-state")).unwrap();
    let disk = tmp.path().join("disk.raw");
    let state = tmp.path().join("sender-state");
    let base = disk_args("site1/vm1/disk0", &state, &disk);
    let out = sender(&stack, &[&base[..], &["--source", "full"]].concat())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("already has generation 3 (") && err.contains("--rebase"),
        "{err}"
    );
    let after = snapshot(stack.keys(&prefix).await).await;
    assert!(after == before, "generations 1 to 3 changed");

    let v = send_ok(
        &stack,
        &[&base[..], &["--source", "full", "--rebase"]].concat(),
    );
    assert_eq!(
        (v["generation"].as_u64(), v["parent"].is_null()),
        (Some(4), true)
    );
    let rx = tmp.path().join("rx");
    assert_eq!(sync_applies(&stack, &rx, 4), sha256_file(&disk));
    // Replication continues on top of the new base.
    let sha = send_generation(&stack, tmp.path(), 64 * MIB, 30, 99, 5);
    assert_eq!(sync_applies(&stack, &rx, 5), sha);
}

/// Stray objects at manifest keys never stop a disk: garbage far above and another disk's
/// valid manifest under this disk's keys are stepped over by the sender (its next
/// generation is numbered past them, parented on the last valid one), ignored by the
/// receiver, and what follows applies to the byte. Both objects are left as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_manifest_keys_are_stepped_over_and_replication_goes_on() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    for k in 1..=2 {
        send_generation(&stack, tmp.path(), 64 * MIB, 30, 60 + k, k);
    }
    let g = |n: u64| format!("{}/site1/vm1/disk0/g/{n:020}/manifest.json", stack.prefix);
    let garbage = b"{\"format_version\": 1, \"not\": \"a manifest\"}".to_vec();
    stack.put(&g(99990), garbage.clone()).await;
    let mut foreign = Manifest::from_json(&stack.get(&g(2)).await).unwrap();
    foreign.disk = DiskId::parse("site1/vm1/disk9").unwrap();
    foreign.generation = 7;
    stack.put(&g(7), foreign.to_json()).await;

    let sha = send_generation(&stack, tmp.path(), 64 * MIB, 30, 77, 99991);
    let m = Manifest::from_json(&stack.get(&g(99991)).await).unwrap();
    assert_eq!(m.parent, Some(2));
    let rx = tmp.path().join("rx");
    assert_eq!(
        sync_applies(&stack, &rx, 99991),
        sha,
        "the image is the source, to the byte"
    );
    assert_eq!(stack.get(&g(99990)).await, garbage);
    assert_eq!(stack.get(&g(7)).await, foreign.to_json());
    // And the next one follows on.
    let sha = send_generation(&stack, tmp.path(), 64 * MIB, 30, 78, 99992);
    assert_eq!(sync_applies(&stack, &rx, 99992), sha);
}

/// The first hour (issue 33): a status that cannot read the bucket fails with the cause,
/// never an empty listing; the DR CLI takes its settings after the subcommand too; and a
/// machine without credentials is told so, not sent to check the network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_hours_mistakes_fail_with_their_cause() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let text = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
    };

    // A bucket that does not exist: the receiver's status fails and says so.
    let out = receiver(
        &stack,
        "status",
        tmp.path(),
        &["--bucket", "no-such-bucket"],
    )
    .output()
    .unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("the bucket does not exist"), "{said}");
    assert!(!said.contains("no disks yet"), "{said}");
    // The receiver's settings before the subcommand too.
    let out = std::process::Command::new(pilotlight_tests::bin("pilotlight-receiver"))
        .args(["--bucket", "no-such-bucket", "--state-dir"])
        .arg(tmp.path().join("state"))
        .arg("status")
        .envs(stack.env())
        .output()
        .unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("the bucket does not exist"), "{said}");

    // Limits out of range are refused with the range, before any AWS call.
    for (flag, value) in [
        ("--in-flight-mib", "0"),
        ("--in-flight-mib", "17592186044417"),
        ("--concurrency", "0"),
        ("--points-at-once", "0"),
        ("--points-at-once", "101"),
        ("--point-blocks-while-replicating", "0"),
        ("--point-stage-max-mib", "1048577"),
    ] {
        let out = receiver(&stack, "sync", tmp.path(), &[flag, value])
            .output()
            .unwrap();
        let said = text(&out);
        assert!(!out.status.success(), "{said}");
        assert!(said.contains(&format!("{flag} {value} must be ")), "{said}");
    }

    // The DR CLI's settings after the subcommand: accepted, and a missing bucket is an error.
    let out = pilotlight_tests::cli::dr(&stack, "ok", &["status", "--bucket", "no-such-bucket"])
        .output()
        .unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(!said.contains("unexpected argument"), "{said}");
    assert!(said.contains("the bucket does not exist"), "{said}");
    let out = pilotlight_tests::cli::dr(&stack, "ok", &["status", "--bucket", &stack.bucket])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // The sender's shared settings before the subcommand: a missing bucket is named, and
    // the state directory given first is the one `status` and `send` use.
    let disk = tmp.path().join("disk.raw");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let state = tmp.path().join("sender-state");
    let sender_first = |bucket: &str, rest: &[&str]| {
        let mut c = std::process::Command::new(pilotlight_tests::bin("pilotlight-sender"));
        c.args(["--bucket", bucket, "--state-dir"])
            .arg(&state)
            .args(rest)
            .envs(stack.env())
            .env("RUST_LOG", "warn");
        c
    };
    let send = |bucket: &str| {
        let mut c = sender_first(bucket, &["send", "--disk-id", "s/v/d", "--source", "full"]);
        c.arg("--disk").arg(&disk);
        c.output().unwrap()
    };
    let out = send("no-such-bucket");
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(!said.contains("unexpected argument"), "{said}");
    assert!(said.contains("the bucket does not exist"), "{said}");
    let out = send(&stack.bucket);
    assert!(out.status.success(), "{}", text(&out));
    let out = sender_first(&stack.bucket, &["status", "--disk-id", "s/v/d"])
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("\"last_committed\": 1"), "{said}");
    assert!(!said.contains("no state"), "{said}");

    // No credentials anywhere the default chain looks: named as such, with how to give
    // some, and never as a network problem.
    let mut c = pilotlight_tests::cli::dr(&stack, "ok", &["status"]);
    for v in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        c.env_remove(v);
    }
    let out = c
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            tmp.path().join("no-credentials"),
        )
        .env("AWS_CONFIG_FILE", tmp.path().join("no-config"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("no AWS credentials"), "{said}");
    assert!(said.contains("AWS_PROFILE"), "{said}");
    assert!(!said.contains("check the endpoint URL"), "{said}");
}
