//! The client against real servers: qemu-nbd (qcow2 with persistent dirty bitmaps, Unix
//! socket and TCP) and nbdkit (file and memory plugins).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use pilotlight_nbd::{Client, ConnectOptions, NbdError, NbdUri, Status};

const MIB: u64 = 1 << 20;

fn opts(contexts: &[&str]) -> ConnectOptions {
    ConnectOptions {
        meta_contexts: contexts.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn connect(uri: &str, contexts: &[&str]) -> Result<Client, NbdError> {
    Client::connect(&NbdUri::parse(uri).unwrap(), &opts(contexts)).await
}

/// Offsets covered by descriptors whose flags have `bit`.
fn with_bit(st: &[Status], bit: u32) -> Vec<(u64, u64)> {
    st.iter()
        .filter(|s| s.flags & bit != 0)
        .map(|s| (s.offset, s.length))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_nbd_bitmap_allocation_and_reads_over_unix_and_tcp() {
    if !tool("qemu-nbd") {
        panic!("qemu-nbd is missing: run scripts/setup");
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "d.qcow2", "96M");
    // Data before the bitmap exists is allocated but not dirty.
    qemu_io_writes(&img, &[(0x11, 0, 2 * MIB)]);
    run(
        "qemu-img",
        &["bitmap", "--add", img.to_str().unwrap(), "b0"],
    );
    qemu_io_writes(
        &img,
        &[(0xaa, 5 * MIB, 64 << 10), (0xbb, 70 * MIB + 4096, 4096)],
    );
    let want = raw_bytes(dir.path(), &img, "qcow2");

    for server in [
        qemu_nbd_unix(dir.path(), &img, "qcow2", &["b0"]),
        qemu_nbd_tcp(&img, "qcow2", &["b0"]),
    ] {
        let c = connect(&server.uri, &["base:allocation", "qemu:dirty-bitmap:b0"])
            .await
            .unwrap();
        let info = c.info().clone();
        assert_eq!(info.size, 96 * MIB);
        assert!(info.read_only() && info.structured_replies, "{info:?}");

        // The bitmap: exactly the two written areas, in its 64 KiB granularity.
        let st = c
            .block_status("qemu:dirty-bitmap:b0", 0, info.size)
            .await
            .unwrap();
        assert_eq!(
            with_bit(&st, 1),
            vec![(5 * MIB, 64 << 10), (70 * MIB, 64 << 10)],
            "{st:?}"
        );
        // Descriptors cover the whole range, contiguously.
        assert_eq!(st.first().unwrap().offset, 0);
        assert_eq!(st.iter().map(|s| s.length).sum::<u64>(), info.size);
        // base:allocation: everything never written reads as a hole.
        let alloc = c
            .block_status("base:allocation", 0, info.size)
            .await
            .unwrap();
        let data: u64 = alloc
            .iter()
            .filter(|s| s.flags & 1 == 0)
            .map(|s| s.length)
            .sum();
        assert!((2 * MIB..8 * MIB).contains(&data), "{alloc:?}");
        // A sub-range starting mid-extent is clipped to the request.
        let part = c
            .block_status("qemu:dirty-bitmap:b0", 5 * MIB + 4096, 8192)
            .await
            .unwrap();
        assert_eq!(
            part,
            vec![Status {
                offset: 5 * MIB + 4096,
                length: 8192,
                flags: 1
            }]
        );

        // Reads: the whole disk with many requests in flight (and one read larger than
        // the server's maximum, split), equal to qemu-img's conversion.
        let chunk = 4 * MIB as usize;
        let reads = (0..info.size as usize)
            .step_by(chunk)
            .map(|o| c.read(o as u64, chunk));
        let got = futures::future::try_join_all(reads).await.unwrap().concat();
        assert!(got == want, "reads differ from qemu-img convert");
        let big = c.read(0, 48 * MIB as usize).await.unwrap();
        assert!(big[..] == want[..48 * MIB as usize]);

        // Out of range: refused locally, connection still usable.
        let e = c.read(info.size - 512, 1024).await.unwrap_err();
        assert!(matches!(e, NbdError::Range { .. }), "{e}");
        assert_eq!(c.read(0, 512).await.unwrap(), want[..512]);
        c.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_export_and_missing_bitmap_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "d.qcow2", "8M");
    run(
        "qemu-img",
        &["bitmap", "--add", img.to_str().unwrap(), "b0"],
    );
    let server = qemu_nbd_unix(dir.path(), &img, "qcow2", &["b0"]);

    let other = server.uri.replace("///disk", "///nope");
    let e = connect(&other, &[]).await.unwrap_err();
    assert!(matches!(e, NbdError::NoSuchExport { .. }), "{e}");
    assert!(e.to_string().contains("\"nope\""), "{e}");

    let e = connect(&server.uri, &["qemu:dirty-bitmap:b9"])
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("qemu:dirty-bitmap:b9") && msg.contains("qemu-nbd -B b9"),
        "{msg}"
    );

    // Not negotiated at connect: refused before anything is sent.
    let c = connect(&server.uri, &[]).await.unwrap();
    let e = c
        .block_status("base:allocation", 0, 4096)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not negotiated"), "{e}");

    let e = connect("nbd+unix:///disk?socket=/nonexistent/s", &[])
        .await
        .unwrap_err();
    assert!(matches!(e, NbdError::Connect { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nbdkit_file_and_memory_plugins() {
    if !tool("nbdkit") {
        panic!("nbdkit is missing: run scripts/setup");
    }
    let dir = tempfile::tempdir().unwrap();
    // A sparse file with two data areas.
    let path = dir.path().join("disk.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(64 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&vec![0x5au8; 1 << 20], 3 * MIB).unwrap();
    f.write_all_at(&vec![0xa5u8; 4096], 40 * MIB).unwrap();
    f.sync_all().unwrap();
    let want = std::fs::read(&path).unwrap();

    let server = nbdkit_unix(dir.path(), &["file", path.to_str().unwrap()]);
    let c = connect(&server.uri, &["base:allocation"]).await.unwrap();
    assert_eq!(c.info().size, 64 * MIB);
    let got = c.read(0, 64 * MIB as usize).await.unwrap();
    assert!(got == want);
    let alloc = c
        .block_status("base:allocation", 0, 64 * MIB)
        .await
        .unwrap();
    let data: Vec<(u64, u64)> = alloc
        .iter()
        .filter(|s| s.flags & 1 == 0)
        .map(|s| (s.offset, s.length))
        .collect();
    assert!(
        data.iter().any(|(o, l)| *o <= 3 * MIB && o + l >= 4 * MIB)
            && data.iter().any(|(o, l)| *o <= 40 * MIB && o + l > 40 * MIB),
        "{alloc:?}"
    );
    let hole: u64 = alloc
        .iter()
        .filter(|s| s.flags & 1 != 0)
        .map(|s| s.length)
        .sum();
    assert!(hole >= 50 * MIB, "the file's holes are reported: {alloc:?}");
    c.disconnect().await;

    // The memory plugin: all zero, sparse, 1 GiB.
    let server = nbdkit_unix(dir.path(), &["memory", "1G"]);
    let c = connect(&server.uri, &["base:allocation"]).await.unwrap();
    assert_eq!(c.info().size, 1 << 30);
    let st = c.block_status("base:allocation", 0, 1 << 30).await.unwrap();
    assert!(st.iter().all(|s| s.flags & 1 != 0), "{st:?}");
    assert!(c
        .read(512 * MIB, 1 << 20)
        .await
        .unwrap()
        .iter()
        .all(|b| *b == 0));
}
