//! `--thumbprint` is checked in the TLS handshake: against a TLS server presenting
//! another certificate, the connection fails before any request byte is written (the
//! server records nothing, so no login, no password); the pinned certificate, by its
//! SHA-256 or SHA-1, gets the request through.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use pilotlight_vsphere::{ConnectOptions, Session};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::Digest;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A self-signed certificate and its PKCS#8 key, DER, made by the openssl CLI.
fn self_signed(dir: &Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    let (pem_key, der_key, der_cert) = (
        dir.join(format!("{name}.key.pem")),
        dir.join(format!("{name}.key.der")),
        dir.join(format!("{name}.der")),
    );
    let ok = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        pem_key.to_str().unwrap(),
        "-out",
        der_cert.to_str().unwrap(),
        "-outform",
        "DER",
        "-days",
        "2",
        "-subj",
        &format!("/CN={name}"),
        "-addext",
        "subjectAltName=IP:127.0.0.1",
    ]);
    ok(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        pem_key.to_str().unwrap(),
        "-outform",
        "DER",
        "-out",
        der_key.to_str().unwrap(),
    ]);
    (
        std::fs::read(der_cert).unwrap(),
        std::fs::read(der_key).unwrap(),
    )
}

/// What the TLS server saw: connections whose handling ended, and every application byte.
#[derive(Default)]
struct Seen {
    finished: AtomicUsize,
    bytes: Mutex<Vec<u8>>,
}

/// A TLS server on loopback presenting `cert`; answers any request with a 500.
async fn tls_server(cert: Vec<u8>, key: Vec<u8>) -> (u16, Arc<Seen>) {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(cert)],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, s) = (acceptor.clone(), s.clone());
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = vec![0u8; 65536];
                    if let Ok(n) = tls.read(&mut buf).await {
                        s.bytes.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = tls
                        .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    let _ = tls.shutdown().await;
                }
                s.finished.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (port, seen)
}

async fn wait_finished(seen: &Seen, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.finished.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "the server never finished a connection"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await; // polling with a deadline
    }
}

fn opts(port: u16, thumbprint: &str) -> ConnectOptions {
    ConnectOptions {
        url: format!("https://127.0.0.1:{port}/sdk"),
        user: "administrator@vsphere.local".into(),
        password: "never-on-the-wire".into(),
        thumbprint: Some(thumbprint.into()),
        insecure: false,
        timeout: Duration::from_secs(5),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_other_than_the_pinned_one_gets_no_request_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (server_cert, server_key) = self_signed(dir.path(), "vcenter");
    let (other_cert, _) = self_signed(dir.path(), "other");
    let (port, seen) = tls_server(server_cert.clone(), server_key).await;

    // Pinned to another certificate: the handshake fails, nothing is sent.
    let other = hex::encode(sha2::Sha256::digest(&other_cert));
    let e = Session::connect(opts(port, &other)).await.unwrap_err();
    let msg = chain(&e);
    assert!(msg.contains("thumbprint"), "{msg}");
    wait_finished(&seen, 1).await;
    assert!(
        seen.bytes.lock().unwrap().is_empty(),
        "the server saw request bytes"
    );

    // Pinned to its certificate (SHA-256, colon-separated as vCenter shows it): the
    // request goes through (and the test server answers 500).
    let sha256: Vec<String> = sha2::Sha256::digest(&server_cert)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    let e = Session::connect(opts(port, &sha256.join(":")))
        .await
        .unwrap_err();
    assert!(!chain(&e).contains("thumbprint"), "{}", chain(&e));
    wait_finished(&seen, 2).await;
    let got = String::from_utf8_lossy(&seen.bytes.lock().unwrap()).to_string();
    assert!(got.starts_with("POST /sdk"), "{got}");

    // SHA-1, as older vCenter pages show it.
    seen.bytes.lock().unwrap().clear();
    let sha1 = hex::encode(sha1::Sha1::digest(&server_cert));
    let _ = Session::connect(opts(port, &sha1)).await;
    wait_finished(&seen, 3).await;
    assert!(
        !seen.bytes.lock().unwrap().is_empty(),
        "SHA-1 pin let the request through"
    );

    // A thumbprint that is not one is refused before connecting.
    let e = Session::connect(opts(port, "abc")).await.unwrap_err();
    assert!(
        chain(&e).contains("40 (SHA-1) or 64 (SHA-256)"),
        "{}",
        chain(&e)
    );
}
