use super::*;
use crate::fault::Fault;
use futures::executor::block_on;

#[test]
fn memory_store_behaves_like_s3() {
    let s = MemoryStore::new("b");
    block_on(async {
        s.put("a/1", Bytes::from_static(b"hello"), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(s.get("a/1", 5).await.unwrap(), Bytes::from_static(b"hello"));
        assert_eq!(s.get("a/1", 4).await.unwrap_err().kind, ErrorKind::TooLarge);
        assert_eq!(s.get("a/2", 9).await.unwrap_err().kind, ErrorKind::NotFound);
        assert_eq!(s.get_if_exists("a/2", 9).await.unwrap(), None);
        assert_eq!(
            s.get_range("a/1", 1, 3).await.unwrap(),
            Bytes::from_static(b"ell")
        );
        assert_eq!(
            s.get_range("a/1", 3, 10).await.unwrap(),
            Bytes::from_static(b"lo")
        );
        assert_eq!(s.head("a/1").await.unwrap(), Some(5));
        assert_eq!(s.head("a/2").await.unwrap(), None);
        // If-None-Match: *
        let e = s
            .put(
                "a/1",
                Bytes::from_static(b"x"),
                PutOptions::default().create_only(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::PreconditionFailed);
        assert_eq!(s.object("a/1").unwrap(), Bytes::from_static(b"hello"));
        // A wrong checksum is refused, as S3 does (BadDigest).
        let e = s
            .put(
                "a/3",
                Bytes::from_static(b"x"),
                PutOptions::checksum([0; 32]),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code.as_deref(), Some("BadDigest"));
        s.insert("a/d/2", b"d".to_vec());
        s.insert("b/1", b"d".to_vec());
        assert_eq!(s.list("a/", |_| true).await.unwrap(), vec!["a/1", "a/d/2"]);
        assert_eq!(
            s.list("a/", |k| !k.contains("/d/")).await.unwrap(),
            vec!["a/1"]
        );
        // Multipart: parts in order, each but the last at least 5 MiB, each named by the
        // ETag of its last upload; an unknown upload refused.
        let id = s.create_multipart("big").await.unwrap();
        let e2 = s
            .upload_part("big", &id, 2, Bytes::from_static(b"world"))
            .await
            .unwrap();
        let small = s
            .upload_part("big", &id, 1, Bytes::from_static(b"hello "))
            .await
            .unwrap();
        let code = |e: CloudError| e.code.unwrap_or_default();
        let e = s
            .complete_multipart("big", &id, vec![(1, small.clone()), (2, e2.clone())])
            .await
            .unwrap_err();
        assert_eq!(code(e), "EntityTooSmall");
        let first = Bytes::from(vec![b'h'; 5 << 20]);
        let e1 = s.upload_part("big", &id, 1, first.clone()).await.unwrap();
        // The first upload's ETag no longer names part 1.
        let e = s
            .complete_multipart("big", &id, vec![(1, small), (2, e2.clone())])
            .await
            .unwrap_err();
        assert_eq!(code(e), "InvalidPart");
        assert_eq!(s.open_uploads(), 1);
        s.complete_multipart("big", &id, vec![(1, e1), (2, e2)])
            .await
            .unwrap();
        let mut whole = first.to_vec();
        whole.extend_from_slice(b"world");
        assert_eq!(s.object("big").unwrap(), Bytes::from(whole));
        assert_eq!(s.open_uploads(), 0);
        let e = s
            .upload_part("big", &id, 3, Bytes::new())
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        s.delete("big").await.unwrap();
        assert_eq!(s.head("big").await.unwrap(), None);
    });
}

#[test]
fn faults_fail_the_chosen_calls() {
    let s = MemoryStore::new("b");
    s.insert("g/manifest.json", b"{}".to_vec());
    s.faults.add(
        Fault::on("GetObject")
            .resource_contains("manifest.json")
            .times(2)
            .throttle(),
    );
    block_on(async {
        let e = s.get("g/manifest.json", 10).await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(s.get("g/manifest.json", 10).await.is_err());
        assert!(s.get("g/manifest.json", 10).await.is_ok());
    });
    assert_eq!(s.faults.calls("GetObject"), 3);
}

#[test]
fn conditional_writes_let_one_of_two_writers_of_a_version_win() {
    let s = MemoryStore::new("b");
    block_on(async {
        let v1 = s
            .put(
                "r",
                Bytes::from_static(b"v1"),
                PutOptions::default().create_only(),
            )
            .await
            .unwrap()
            .unwrap();
        let read = s.get_versioned("r", 9).await.unwrap().unwrap();
        assert_eq!(read.etag, v1);
        // Two writers read v1; the first wins, the second is refused (412).
        s.put(
            "r",
            Bytes::from_static(b"a"),
            PutOptions::default().replacing(&v1),
        )
        .await
        .unwrap();
        let e = s
            .put(
                "r",
                Bytes::from_static(b"b"),
                PutOptions::default().replacing(&v1),
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::PreconditionFailed);
        assert_eq!(s.object("r").unwrap(), Bytes::from_static(b"a"));
        // If-Match on a missing key: 404, as S3.
        let e = s
            .put(
                "gone",
                Bytes::from_static(b"x"),
                PutOptions::default().replacing(&v1),
            )
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert_eq!(s.get_versioned("gone", 9).await.unwrap(), None);
    });
}

#[test]
fn a_403_for_a_missing_key_is_told_from_a_real_denial_by_listing() {
    let s = MemoryStore::new("b");
    s.insert("p/here", Bytes::from_static(b"x"));
    s.deny_missing_keys(true);
    block_on(async {
        // Missing: S3 says 403 to a caller without ListBucket; the listing says absent.
        assert_eq!(
            s.get("p/missing", 9).await.unwrap_err().kind,
            ErrorKind::AccessDenied
        );
        assert_eq!(s.get_if_exists("p/missing", 9).await.unwrap(), None);
        assert_eq!(s.get_versioned("p/missing", 9).await.unwrap(), None);
        // A key that is listed but denied is a real denial (a planted one here).
        s.faults.add(
            Fault::on("GetObject")
                .resource_contains("p/here")
                .kind(ErrorKind::AccessDenied, Some("AccessDenied")),
        );
        let e = s.get_if_exists("p/here", 9).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::AccessDenied);
        // Listing denied too: an error that says what to grant, never "absent".
        s.faults.add(
            Fault::on("ListObjectsV2")
                .always()
                .kind(ErrorKind::AccessDenied, Some("AccessDenied")),
        );
        let e = s.get_if_exists("p/missing", 9).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::AccessDenied);
        assert!(e.to_string().contains("s3:ListBucket"), "{e}");
    });
}

#[test]
fn discarding_store_keeps_no_bytes() {
    let s = MemoryStore::discarding();
    block_on(s.put("k", Bytes::from(vec![1u8; 1 << 20]), PutOptions::default())).unwrap();
    assert_eq!(s.object("k").unwrap().len(), 0);
    // Nor does it hash them (a dry run's CPU is the sender's own): a checksum is not
    // checked there, where a keeping store refuses a wrong one.
    let wrong = PutOptions::checksum([9; 32]);
    block_on(s.put("w", Bytes::from_static(b"x"), wrong.clone())).unwrap();
    let keeping = MemoryStore::default();
    let e = block_on(keeping.put("w", Bytes::from_static(b"x"), wrong)).unwrap_err();
    assert!(e.to_string().contains("BadDigest"), "{e}");
}

/// What the SDK sends for a PutObject, read off the wire by a one-shot HTTP server.
#[cfg(feature = "s3")]
fn put_headers(opts: PutOptions) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        // Headers, then the 5-byte body.
        while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"hello") {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed early");
            got.extend_from_slice(&buf[..n]);
        }
        conn.write_all(b"HTTP/1.1 200 OK\r\nETag: \"e\"\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        String::from_utf8_lossy(&got).to_lowercase()
    });
    let settings = crate::config::AwsSettings {
        static_credentials: Some(("AKIDEXAMPLE".into(), "secret".into())),
        region: Some("us-east-1".into()),
        endpoint_url: Some(format!("http://127.0.0.1:{port}")),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s3 = settings.load().await.s3("b");
        s3.put("k", Bytes::from_static(b"hello"), opts)
            .await
            .unwrap();
    });
    server.join().unwrap()
}

#[cfg(feature = "s3")]
#[test]
fn a_put_with_its_checksum_is_not_hashed_again_for_the_signature() {
    use sha2::Digest;
    let sum: [u8; 32] = sha2::Sha256::digest(b"hello").into();
    let with = put_headers(PutOptions::checksum(sum));
    assert!(
        with.contains("x-amz-content-sha256: unsigned-payload"),
        "{with}"
    );
    assert!(with.contains("x-amz-checksum-sha256: "), "{with}");
    // Without a checksum of ours, the payload stays signed.
    let without = put_headers(PutOptions::json());
    assert!(
        without.contains(&format!("x-amz-content-sha256: {}", hex(&sum))),
        "{without}"
    );
}
