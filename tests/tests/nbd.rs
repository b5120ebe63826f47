//! NBD source end to end: a qcow2 image with persistent dirty bitmaps, served by
//! qemu-nbd through `scripts/qemu-bitmap-send` (bitmap rotation), the real sender to the
//! emulator, the real receiver applying from SQS; after every round the receiver's image
//! equals the qcow2 image per `qemu-img compare` (an independent reader).
#![allow(clippy::unwrap_used)]

use pilotlight_protocol::DiskId;
use pilotlight_tests::cli::{applied, image_path, receiver, running_receiver, s, Running};
use pilotlight_tests::stack::{free_port, LocalStack};
use pilotlight_tests::{bin, poll_until, repo_root};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts an NBD server command and waits (polling, with a deadline) until it accepts
/// connections on `socket`.
async fn serve_unix(mut cmd: Command, socket: &Path) -> Running {
    let server = Running(cmd.spawn().unwrap());
    poll_until(
        "the NBD server listening",
        Duration::from_secs(20),
        || async {
            std::os::unix::net::UnixStream::connect(socket)
                .ok()
                .map(|_| ())
        },
    )
    .await;
    server
}

/// `qemu-io` writes: (pattern or None for a zero write, offset, length).
fn writes(image: &Path, w: &[(Option<u8>, u64, u64)]) {
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    for (p, o, l) in w {
        args.push("-c".into());
        args.push(match p {
            Some(p) => format!("write -P {p:#x} {o} {l}"),
            None => format!("write -z {o} {l}"),
        });
    }
    args.push(s(image).into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &args);
}

/// The pilotlight-N bitmaps of the image.
fn bitmaps(image: &Path) -> Vec<String> {
    let info: Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", s(image)])).unwrap();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| b["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// One run of the rotation script; the sender's JSON summary on success.
fn rotate(
    stack: &LocalStack,
    dir: &Path,
    image: &Path,
    extra_env: &[(&str, String)],
) -> Result<Value, String> {
    let state = dir.join("sender-state");
    let out = Command::new(repo_root().join("scripts/qemu-bitmap-send"))
        .arg(image)
        .args(["--disk-id", "site1/vm1/disk0", "--state-dir", s(&state)])
        .args(["--json", "--no-progress", "--max-attempts", "1"])
        .envs(stack.env())
        .env("PILOTLIGHT_SENDER", bin("pilotlight-sender"))
        .env("RUST_LOG", "warn")
        .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Waits for generation `k`, then `qemu-img compare`s the receiver's raw image with the
/// qcow2 image.
async fn converged(rx: &Path, image: &Path, k: u64) {
    let disk = DiskId::parse("site1/vm1/disk0").unwrap();
    poll_until(
        &format!("generation {k} applied"),
        Duration::from_secs(60),
        || async { (applied(rx, &disk) == Some(k)).then_some(()) },
    )
    .await;
    let raw = image_path(rx, &disk);
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(image)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "generation {k}: image differs from the source: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn qcow2_bitmaps_through_qemu_nbd_replicate_exactly_across_rotations() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("vm.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&image), "64M"],
    );
    // Some data before replication starts.
    writes(
        &image,
        &[
            (Some(0x11), 0, MIB),
            (Some(0x22), 10 * MIB, 3 * MIB),
            (Some(0x33), 63 * MIB, MIB),
        ],
    );
    let rx = tmp.path().join("rx");
    let _receiver = running_receiver(
        &stack,
        &rx,
        &stack.queue_url,
        "2s",
        &tmp.path().join("receiver.log"),
    );

    // Round 1: no bitmap yet: a full generation; pilotlight-1 starts recording.
    let g1 = rotate(&stack, tmp.path(), &image, &[]).unwrap();
    assert_eq!(g1["generation"], 1);
    assert!(
        g1["bytes_read"].as_u64().unwrap() <= 6 * MIB,
        "holes not read: {g1}"
    );
    assert_eq!(bitmaps(&image), ["pilotlight-1"]);
    converged(&rx, &image, 1).await;

    // Rounds 2-3: overlapping writes, new data, a zeroed range; only what the bitmap
    // marks is read.
    let rounds: [&[(Option<u8>, u64, u64)]; 2] = [
        &[
            (Some(0x44), 512 * 1024, MIB),
            (Some(0x55), 30 * MIB + 4096, 8192),
            (None, 10 * MIB, MIB),
        ],
        &[(Some(0x66), 0, 64 * 1024), (Some(0x77), 40 * MIB, 2 * MIB)],
    ];
    for (i, w) in rounds.iter().enumerate() {
        let k = i as u64 + 2;
        writes(&image, w);
        let g = rotate(&stack, tmp.path(), &image, &[]).unwrap();
        assert_eq!(g["generation"], k);
        assert!(
            g["bytes_read"].as_u64().unwrap() <= 3 * MIB,
            "only dirty areas: {g}"
        );
        assert_eq!(bitmaps(&image), [format!("pilotlight-{k}")]);
        converged(&rx, &image, k).await;
    }
    let manifest: Value = serde_json::from_slice(
        &stack
            .get("dr/site1/vm1/disk0/g/00000000000000000002/manifest.json")
            .await,
    )
    .unwrap();
    assert_eq!(manifest["parent"], 1, "{manifest}");
    assert_eq!(
        manifest["source_change_id"],
        "qemu-dirty-bitmap:pilotlight-1"
    );
    assert_eq!(manifest["source_kind"], "nbd");

    // A failed run (S3 unreachable) keeps the old bitmap: the writes before it and the
    // writes after it all arrive with the next run.
    writes(&image, &[(Some(0x88), 20 * MIB, MIB)]);
    let unreachable = format!("http://127.0.0.1:{}", free_port());
    let err = rotate(
        &stack,
        tmp.path(),
        &image,
        &[("PILOTLIGHT_ENDPOINT_URL", unreachable)],
    )
    .unwrap_err();
    assert!(err.contains("nothing is lost"), "{err}");
    assert_eq!(bitmaps(&image), ["pilotlight-3"], "the old bitmap stays");
    writes(&image, &[(Some(0x99), 50 * MIB, MIB)]);
    let g = rotate(&stack, tmp.path(), &image, &[]).unwrap();
    assert_eq!(g["generation"], 4);
    assert_eq!(bitmaps(&image), ["pilotlight-4"]);
    converged(&rx, &image, 4).await;

    // A run that died between commit and cleanup left two bitmaps: the oldest is kept.
    run("qemu-img", &["bitmap", "--add", s(&image), "pilotlight-5"]);
    writes(&image, &[(Some(0xaa), 5 * MIB, MIB)]);
    let g = rotate(&stack, tmp.path(), &image, &[]).unwrap();
    assert_eq!(g["generation"], 5);
    assert_eq!(bitmaps(&image), ["pilotlight-5"]);
    converged(&rx, &image, 5).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nbd_source_errors_are_clear() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let send = |args: &[&str]| {
        let out = Command::new(bin("pilotlight-sender"))
            .args([
                "send",
                "--disk-id",
                "site1/vm1/disk0",
                "--state-dir",
                s(&state),
            ])
            .args(["--source", "nbd", "--max-attempts", "1", "--no-progress"])
            .args(args)
            .envs(stack.env())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = send(&[]);
    assert!(e.contains("--source nbd needs --nbd"), "{e}");
    let e = send(&["--nbd", "http://x/y"]);
    assert!(e.contains("scheme must be nbd"), "{e}");
    let e = send(&["--nbd", &format!("nbd://127.0.0.1:{}/disk", free_port())]);
    assert!(e.contains("cannot connect to nbd://127.0.0.1"), "{e}");

    // A served image without the asked bitmap.
    let image = tmp.path().join("d.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&image), "8M"],
    );
    let socket = tmp.path().join("q.sock");
    let mut qemu_nbd = Command::new("qemu-nbd");
    qemu_nbd
        .args([
            "--read-only",
            "--persistent",
            "-x",
            "disk",
            "-f",
            "qcow2",
            "-k",
        ])
        .arg(&socket)
        .arg(&image);
    let _server = serve_unix(qemu_nbd, &socket).await;
    let uri = format!("nbd+unix:///disk?socket={}", socket.display());
    let e = send(&["--nbd", &uri, "--bitmap", "nope"]);
    assert!(
        e.contains("qemu:dirty-bitmap:nope") && e.contains("qemu-nbd -B nope"),
        "{e}"
    );
    let e = send(&["--nbd", &uri.replace("///disk", "///other")]);
    assert!(e.contains("export \"other\" does not exist"), "{e}");
    // Nothing was committed by any of these.
    assert!(stack.manifests("dr/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_generation_from_nbdkit_serving_a_sparse_file() {
    use pilotlight_tests::disk::{create_sparse, scribble, sha256_file};
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.raw");
    let f = create_sparse(&disk, 48 * MIB);
    scribble(&f, 48 * MIB, 40, 9);
    drop(f);
    let socket = tmp.path().join("nbdkit.sock");
    let mut nbdkit = Command::new("nbdkit");
    nbdkit
        .args(["--foreground", "--readonly", "--exportname", "disk", "-U"])
        .arg(&socket)
        .args(["file", s(&disk)]);
    let _server = serve_unix(nbdkit, &socket).await;
    let state = tmp.path().join("state");
    let uri = format!("nbd+unix:///disk?socket={}", socket.display());
    let out = Command::new(bin("pilotlight-sender"))
        .args([
            "send",
            "--disk-id",
            "site1/vm1/disk0",
            "--state-dir",
            s(&state),
        ])
        .args(["--source", "nbd", "--nbd", &uri, "--json", "--no-progress"])
        .envs(stack.env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    // nbdkit reports the file's holes (base:allocation): they are zero ranges, not read.
    let (read, holes) = (
        summary["bytes_read"].as_u64().unwrap(),
        summary["bytes_holes"].as_u64().unwrap(),
    );
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&disk).unwrap().blocks() * 512;
    assert!(holes > 0 && read + holes == 48 * MIB, "{summary}");
    assert!(
        read <= allocated,
        "read {read} > allocated {allocated}: {summary}"
    );
    let rx = tmp.path().join("rx");
    let status = receiver(&stack, "sync", &rx, &[]).status().unwrap();
    assert!(status.success());
    let d = DiskId::parse("site1/vm1/disk0").unwrap();
    assert_eq!(applied(&rx, &d), Some(1));
    assert_eq!(sha256_file(&image_path(&rx, &d)), sha256_file(&disk));
}

/// The NBD client writes (failback's target): WRITE, WRITE_ZEROES and FLUSH into a qcow2
/// served by qemu-nbd and a raw file served by nbdkit; what the client wrote is what
/// `qemu-img compare` finds against a file written the same way; a read-only export
/// refuses writes with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_land_in_qemu_nbd_and_nbdkit_exports() {
    use pilotlight_nbd::{Client, ConnectOptions, NbdUri};
    let tmp = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let expected = tmp.path().join("expected.raw");
    let mut want = vec![0u8; size as usize];
    let qcow = tmp.path().join("t.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&qcow), "8M"]);
    // Data everywhere first, so zeroes must really be written.
    writes(&qcow, &[(Some(0x11), 0, size)]);
    let raw = tmp.path().join("t.raw");
    std::fs::write(&raw, vec![0x11u8; size as usize]).unwrap();
    want.fill(0x11);
    let edits: Vec<(u64, Option<u8>, u64)> = vec![
        (0, Some(0xa1), 512 * 1024),
        (3 * MIB + 4096, Some(0xb2), 40 * 1024),
        (MIB, None, 2 * MIB),
        (size - 512 * 1024, None, 512 * 1024),
    ];
    for (at, byte, len) in &edits {
        want[*at as usize..(*at + *len) as usize].fill(byte.unwrap_or(0));
    }
    std::fs::write(&expected, &want).unwrap();

    let qsock = tmp.path().join("q.sock");
    let mut qemu_nbd = Command::new("qemu-nbd");
    qemu_nbd
        .args(["-t", "-f", "qcow2", "-x", "disk", "-k"])
        .arg(&qsock)
        .arg(&qcow);
    let ksock = tmp.path().join("k.sock");
    let mut nbdkit = Command::new("nbdkit");
    nbdkit
        .args(["--foreground", "--exportname", "disk", "-U"])
        .arg(&ksock)
        .args(["file", s(&raw)]);
    for (server, sock, image, format) in [
        (qemu_nbd, &qsock, &qcow, "qcow2"),
        (nbdkit, &ksock, &raw, "raw"),
    ] {
        let running = serve_unix(server, sock).await;
        let uri = NbdUri::parse(&format!("nbd+unix:///disk?socket={}", sock.display())).unwrap();
        let c = Client::connect(&uri, &ConnectOptions::default())
            .await
            .unwrap();
        assert!(!c.info().read_only());
        for (at, byte, len) in &edits {
            match byte {
                Some(b) => c.write(*at, &vec![*b; *len as usize]).await.unwrap(),
                None => c.write_zeroes(*at, *len).await.unwrap(),
            }
        }
        c.flush().await.unwrap();
        assert_eq!(c.read(3 * MIB + 4096, 4).await.unwrap(), [0xb2; 4]);
        let e = c.write(size - 512, &[0u8; 1024]).await.unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        c.disconnect().await;
        drop(running);
        run(
            "qemu-img",
            &["compare", "-f", format, "-F", "raw", s(image), s(&expected)],
        );
    }

    // A read-only export: writes are refused before anything is sent.
    let rsock = tmp.path().join("r.sock");
    let mut ro = Command::new("nbdkit");
    ro.args(["--foreground", "--readonly", "--exportname", "disk", "-U"])
        .arg(&rsock)
        .args(["file", s(&raw)]);
    let _ro = serve_unix(ro, &rsock).await;
    let uri = NbdUri::parse(&format!("nbd+unix:///disk?socket={}", rsock.display())).unwrap();
    let c = Client::connect(&uri, &ConnectOptions::default())
        .await
        .unwrap();
    let e = c.write(0, &[1u8; 512]).await.unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
}
