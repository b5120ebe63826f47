//! End-to-end tests of `pilotlight-sender` against the local AWS emulator: real binary,
//! real SDK, real sparse files. Each test starts its own moto server.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use pilotlight_protocol::{DiskId, Extent, Manifest, Prefix, SPLIT_ALIGN};
use pilotlight_tests::cli::{s, send_ok as run_ok, sender};
use pilotlight_tests::disk::{create_sparse, powercli_list, scribble, sha256_file, MIB};
use pilotlight_tests::reassemble::{manifests, reassemble};
use pilotlight_tests::stack::{free_port, LocalStack};
use pilotlight_tests::{bin, poll_until};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const DISK_SIZE: u64 = 256 * MIB;
const SNAP: &str = "2026-11-23T10:00:00Z";

/// `--disk-id site1/vm1/disk0 --source full --disk DISK --state-dir STATE`.
fn full_args<'a>(disk: &'a Path, state: &'a Path) -> [&'a str; 8] {
    let id = "site1/vm1/disk0";
    [
        "--disk-id",
        id,
        "--source",
        "full",
        "--disk",
        s(disk),
        "--state-dir",
        s(state),
    ]
}

/// The same with `--source extent-list --extents LIST`.
fn list_args<'a>(list: &'a Path, disk: &'a Path, state: &'a Path) -> Vec<&'a str> {
    let mut v = full_args(disk, state).to_vec();
    v[3] = "extent-list";
    v.extend(["--extents", s(list)]);
    v
}

fn disk_id() -> DiskId {
    DiskId::parse("site1/vm1/disk0").unwrap()
}

/// Every 512 KiB block of every data object holds a non-zero byte: zero blocks are
/// never uploaded.
fn assert_no_zero_blocks_uploaded(m: &Manifest, image: &Path) {
    let f = std::fs::File::open(image).unwrap();
    for part in m.objects.iter().flat_map(|o| o.parts()) {
        let mut pos = part.offset;
        while pos < part.end() {
            let end = ((pos / SPLIT_ALIGN + 1) * SPLIT_ALIGN).min(part.end());
            let mut buf = vec![0u8; (end - pos) as usize];
            f.read_exact_at(&mut buf, pos).unwrap();
            assert!(
                buf.iter().any(|&b| b != 0),
                "uploaded an all-zero block at {pos}"
            );
            pos = end;
        }
    }
}

fn covered(m: &Manifest) -> Vec<Extent> {
    let mut v: Vec<Extent> = m
        .objects
        .iter()
        .flat_map(|o| o.parts())
        .chain(m.zero_ranges.iter().copied())
        .collect();
    v.sort();
    pilotlight_protocol::extent::coalesce(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incremental_reassemble_byte_identical() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.raw");
    let state = tmp.path().join("state");
    let f = create_sparse(&disk, DISK_SIZE);
    let w1 = scribble(&f, DISK_SIZE, 1000, 1);
    assert!(
        w1.iter().any(|w| w.length > 8 * MIB),
        "some extents > 8 MiB"
    );
    assert!(w1.iter().any(|w| w.zero), "some extents all zero");
    drop(f);
    let sha_before = sha256_file(&disk);
    let mtime_before = std::fs::metadata(&disk).unwrap().modified().unwrap();

    let g1 = run_ok(&stack, &full_args(&disk, &state));
    assert_eq!(g1["generation"], 1);
    assert_eq!(g1["parent"], serde_json::Value::Null);
    // The source is opened read-only and never written.
    assert_eq!(sha256_file(&disk), sha_before, "source bytes unchanged");
    assert_eq!(
        std::fs::metadata(&disk).unwrap().modified().unwrap(),
        mtime_before,
        "source mtime unchanged"
    );

    let prefix = Prefix::new(&stack.prefix).unwrap();
    let image = tmp.path().join("image.raw");
    let used = reassemble(&stack, &prefix, &disk_id(), 1, &image).await;
    assert_eq!(used.len(), 1);
    assert_eq!(
        sha256_file(&image),
        sha256_file(&disk),
        "generation 1 reassembles to the source"
    );
    assert_no_zero_blocks_uploaded(&used[0], &image);
    assert!(used[0].zero_bytes() > 0 && used[0].stored_bytes() < used[0].data_bytes());
    assert_eq!(
        covered(&used[0]),
        vec![Extent::new(0, DISK_SIZE)],
        "a full generation covers the disk"
    );

    // Incremental: 1200 more extents, described by a PowerCLI-style list.
    let f = create_sparse(&disk, DISK_SIZE);
    let w2 = scribble(&f, DISK_SIZE, 1200, 2);
    drop(f);
    let list = tmp.path().join("changes.txt");
    std::fs::write(&list, powercli_list(&w2)).unwrap();
    let g2 = run_ok(
        &stack,
        &[
            &list_args(&list, &disk, &state)[..],
            &["--change-id", "52 3c/7"],
        ]
        .concat(),
    );
    assert_eq!(g2["generation"], 2);
    assert_eq!(g2["parent"], 1);
    let used = reassemble(&stack, &prefix, &disk_id(), 2, &image).await;
    assert_eq!(used.len(), 2);
    assert_eq!(
        sha256_file(&image),
        sha256_file(&disk),
        "generation 2 reassembles to the source"
    );
    let m2 = &used[1];
    assert_eq!(m2.source_change_id.as_deref(), Some("52 3c/7"));
    let mut listed: Vec<Extent> = w2.iter().map(|w| Extent::new(w.offset, w.length)).collect();
    listed.sort();
    assert_eq!(
        covered(m2),
        pilotlight_protocol::extent::coalesce(listed),
        "generation 2 covers exactly the listed extents"
    );
    assert_no_zero_blocks_uploaded(m2, &image);
    assert!(m2.objects.iter().all(|o| o.length <= 8 * MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_upload_then_rerun_converges_to_the_same_manifest() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.raw");
    let f = create_sparse(&disk, DISK_SIZE);
    scribble(&f, DISK_SIZE, 1000, 3);
    drop(f);
    let state = tmp.path().join("state");
    let base = [
        "--disk-id",
        "site1/vm1/disk0",
        "--source",
        "full",
        "--disk",
        s(&disk),
        "--snapshot-time",
        SNAP,
    ];

    // A slow run (bandwidth limit), killed with SIGKILL once some objects are up.
    let mut child = sender(&stack, &base)
        .args([
            "--state-dir",
            s(&state),
            "--bwlimit",
            "8MiB",
            "--concurrency",
            "2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let gen_prefix = format!("{}/site1/vm1/disk0/g/00000000000000000001/d/", stack.prefix);
    let up = poll_until(
        "some data objects uploaded",
        Duration::from_secs(60),
        || async {
            let n = stack.keys(&gen_prefix).await.len();
            (n >= 4).then_some(n)
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(up >= 4);
    assert!(
        stack.manifests(&stack.prefix).await.is_empty(),
        "no manifest after the crash"
    );
    let status = Command::new(bin("pilotlight-sender"))
        .args([
            "status",
            "--disk-id",
            "site1/vm1/disk0",
            "--state-dir",
            s(&state),
        ])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(st["pending"]["generation"], 1);
    assert_eq!(st["pending"]["phase"], "uploading");

    // The re-run reuses generation 1 and commits it.
    let again = run_ok(&stack, &[&base[..], &["--state-dir", s(&state)]].concat());
    assert_eq!(again["generation"], 1);
    assert_eq!(again["resumed"], true);

    // A clean run of the same data elsewhere gives the same manifest.
    let clean = run_ok(
        &stack,
        &[
            &base[..],
            &[
                "--state-dir",
                s(&tmp.path().join("clean-state")),
                "--prefix",
                "clean",
            ],
        ]
        .concat(),
    );
    assert_eq!(clean["resumed"], false);
    let prefix = Prefix::new(&stack.prefix).unwrap();
    let crashed = manifests(&stack, &prefix, &disk_id()).await;
    let reference = manifests(&stack, &Prefix::new("clean").unwrap(), &disk_id()).await;
    assert_eq!(crashed.len(), 1);
    assert_eq!(
        crashed, reference,
        "crash + re-run converges to the clean run's manifest"
    );

    let image = tmp.path().join("image.raw");
    reassemble(&stack, &prefix, &disk_id(), 1, &image).await;
    assert_eq!(sha256_file(&image), sha256_file(&disk));
}

/// Each bad input: non-zero exit, a one-line error naming the input, no manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_with_one_line_naming_it_and_uploads_no_manifest() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.raw");
    let f = create_sparse(&disk, 64 * MIB);
    f.write_all_at(&[1u8; 65536], 0).unwrap();
    drop(f);
    let p = |name: &str| tmp.path().join(name);
    let lists = [
        ("overlap.txt", "0 1048576\n524288 1048576\n", "overlaps"),
        ("unsorted.txt", "1048576 512\n0 512\n", "sorted"),
        ("unaligned.txt", "1000 512\n", "aligned"),
        ("negative.txt", "0 512\n-512 512\n", "negative"),
        ("pastend.txt", "67108352 1024\n", "past the end"),
        ("garbage.txt", "0 512\nlorem ipsum dolor\n", "line 2"),
    ];
    let spool = p("spool");
    std::fs::create_dir(&spool).unwrap();
    std::fs::write(spool.join("0"), [1u8; 512]).unwrap();
    std::os::unix::fs::symlink(p("gone"), spool.join("4096")).unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());

    let mut cases: Vec<(Vec<String>, String, &str)> = Vec::new();
    for (name, text, want) in lists {
        std::fs::write(p(name), text).unwrap();
        cases.push((
            vec![
                "--source".into(),
                "extent-list".into(),
                "--extents".into(),
                s(&p(name)).into(),
                "--disk".into(),
                s(&disk).into(),
            ],
            name.to_string(),
            want,
        ));
    }
    let full = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--source", "full", "--disk", s(&disk)]
            .iter()
            .map(|x| x.to_string())
            .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    cases.push((
        vec![
            "--source".into(),
            "full".into(),
            "--disk".into(),
            s(&p("missing.raw")).into(),
        ],
        "missing.raw".into(),
        "cannot open disk",
    ));
    cases.push((
        vec![
            "--source".into(),
            "spool".into(),
            "--spool".into(),
            s(&spool).into(),
            "--disk-size".into(),
            "64MiB".into(),
        ],
        "4096".into(),
        "cannot read",
    ));
    cases.push((
        full(&["--bucket", "no-such-bucket"]),
        "no-such-bucket".into(),
        "does not exist",
    ));
    cases.push((
        full(&["--endpoint-url", &dead, "--max-attempts", "2"]),
        dead.clone(),
        "cannot reach",
    ));

    for (i, (args, names, want)) in cases.iter().enumerate() {
        let state = p(&format!("state-{i}"));
        let mut c = sender(
            &stack,
            &["--disk-id", "site1/vm1/disk0", "--state-dir", s(&state)],
        );
        let out: Output = c.args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {names}: should fail");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(
            errors.len(),
            1,
            "case {names}: one error line, got {stderr}"
        );
        assert!(
            errors[0].starts_with("pilotlight-sender: error: "),
            "{}",
            errors[0]
        );
        assert!(
            errors[0].contains(names.as_str()),
            "case {names}: error names the input: {}",
            errors[0]
        );
        assert!(
            errors[0].contains(want),
            "case {names}: error says {want:?}: {}",
            errors[0]
        );
    }
    assert!(
        stack.manifests("").await.is_empty(),
        "no manifest uploaded by any bad run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powercli_fixture_on_a_sparse_40_gib_disk_reads_only_data() {
    let fixture =
        pilotlight_tests::repo_root().join("../shared/fixtures/powercli-changed-areas.txt");
    let fixture = if fixture.exists() {
        fixture
    } else {
        pilotlight_tests::repo_root().join("tests/fixtures/powercli-changed-areas.txt")
    };
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("vmdk-flat.raw");
    let f = create_sparse(&disk, 42_949_672_960);
    // A little data inside some of the listed areas; the rest is holes.
    for off in [
        0u64,
        3_536_846_848 + 10 * MIB,
        10_209_984_512,
        42_947_575_808,
    ] {
        f.write_all_at(&vec![0xA5u8; MIB as usize], off).unwrap();
    }
    drop(f);
    let state = tmp.path().join("state");
    let g = run_ok(&stack, &list_args(&fixture, &disk, &state));
    let holes = g["bytes_holes"].as_u64().unwrap();
    let read = g["bytes_read"].as_u64().unwrap();
    assert!(
        holes > 7_000_000_000,
        "holes known from the allocation map: {holes}"
    );
    assert!(read < 64 * MIB, "only allocated bytes are read: {read}");
    let m = &manifests(&stack, &Prefix::new(&stack.prefix).unwrap(), &disk_id()).await[0];
    assert_eq!(m.disk_size, 42_949_672_960);
    assert_eq!(m.data_bytes(), 4 * MIB);
    let listed: u64 = std::fs::read_to_string(&fixture)
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(1)
                .map(|n| n.parse::<u64>().unwrap())
        })
        .sum();
    assert_eq!(listed, 8_349_810_688, "the fixture's 27 extents");
    assert_eq!(
        m.data_bytes() + m.zero_bytes(),
        listed,
        "objects + zeros cover the list"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_source_with_config_file_and_dry_run_and_lock() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("delta");
    std::fs::create_dir(&spool).unwrap();
    let mut expect = vec![0u8; 16 * MIB as usize];
    for (off, len, byte) in [
        (0u64, 4096usize, 1u8),
        (4096, 512, 2),
        (9 * MIB, 3 * MIB as usize, 3),
    ] {
        std::fs::write(spool.join(off.to_string()), vec![byte; len]).unwrap();
        expect[off as usize..off as usize + len].fill(byte);
    }
    let state = tmp.path().join("state");
    let config = tmp.path().join("sender.toml");
    std::fs::write(&config, format!(
        "disk-id = \"site1/vm1/disk0\"\nsource = \"spool\"\nspool = \"{}\"\ndisk-size = \"16MiB\"\nstate-dir = \"{}\"\nmax-object = \"1MiB\"\n",
        s(&spool), s(&state)
    )).unwrap();
    let cfg = ["--config", s(&config)];

    // Dry run: reads and reports, uploads nothing, keeps no state.
    let dry = run_ok(&stack, &[&cfg[..], &["--dry-run"]].concat());
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["bytes_data"], 4096 + 512 + 3 * MIB);
    assert!(stack.keys("").await.is_empty(), "dry run uploads nothing");
    assert!(!state.join("site1/vm1/disk0/state.json").exists());

    // A second run while the lock is held is refused.
    let held = pilotlight_sender::state::StateDir::open(&state, &disk_id()).unwrap();
    let out = sender(&stack, &cfg).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds the lock"));
    drop(held);

    let g = run_ok(&stack, &cfg);
    assert_eq!(g["generation"], 1);
    let ms = manifests(&stack, &Prefix::new(&stack.prefix).unwrap(), &disk_id()).await;
    assert_eq!(ms[0].source_kind, "spool");
    assert!(
        ms[0].objects.iter().all(|o| o.length <= MIB),
        "--max-object from the config file"
    );
    let image = tmp.path().join("image.raw");
    reassemble(
        &stack,
        &Prefix::new(&stack.prefix).unwrap(),
        &disk_id(),
        1,
        &image,
    )
    .await;
    assert_eq!(std::fs::read(&image).unwrap(), expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runs_on_a_schedule_and_stops_cleanly_on_sigterm() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.raw");
    let f = create_sparse(&disk, 8 * MIB);
    f.write_all_at(&[3u8; 65536], MIB).unwrap();
    drop(f);
    let state = tmp.path().join("state");
    let mut child = sender(
        &stack,
        &[&full_args(&disk, &state)[..], &["--every", "1s"]].concat(),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    // Three ticks, three committed generations.
    poll_until(
        "three scheduled generations",
        Duration::from_secs(60),
        || async { (stack.manifests(&stack.prefix).await.len() >= 3).then_some(()) },
    )
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = poll_until(
        "the sender to exit on SIGTERM",
        Duration::from_secs(30),
        || {
            let r = child.try_wait().unwrap();
            async move { r }
        },
    )
    .await;
    assert!(status.success(), "clean exit: {status}");
    let st = pilotlight_sender::state::peek(&state, &disk_id())
        .unwrap()
        .unwrap();
    assert!(st.last_committed.unwrap() >= 3);
}
