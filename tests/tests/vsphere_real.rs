//! The vSphere source against a real vCenter with VDDK (environment-gated; never in CI).
//! Skipped unless PILOTLIGHT_REAL_VCENTER_URL is set. Also needs:
//! PILOTLIGHT_REAL_VCENTER_USER, PILOTLIGHT_REAL_VCENTER_PASSWORD_FILE,
//! PILOTLIGHT_REAL_VCENTER_THUMBPRINT, PILOTLIGHT_REAL_VCENTER_VM (a test VM),
//! PILOTLIGHT_REAL_VDDK_LIBDIR, and the sender's bucket settings (PILOTLIGHT_BUCKET,
//! AWS credentials in the environment). Runs two generations (full, then incremental)
//! and checks that no pilotlight snapshot is left on the VM.
#![allow(clippy::unwrap_used)]

use pilotlight_tests::bin;
use std::process::Command;

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is needed for the real-vCenter test"))
}

#[tokio::test(flavor = "multi_thread")]
async fn real_vcenter_two_generations_and_no_leftover_snapshot() {
    let Ok(url) = std::env::var("PILOTLIGHT_REAL_VCENTER_URL") else {
        eprintln!("skipped: set PILOTLIGHT_REAL_VCENTER_URL (and the others) to run against a real vCenter");
        return;
    };
    let state = tempfile::tempdir().unwrap();
    for round in 1..=2 {
        let out = Command::new(bin("pilotlight-sender"))
            .arg("vsphere")
            .args([
                "--server",
                &url,
                "--user",
                &var("PILOTLIGHT_REAL_VCENTER_USER"),
            ])
            .args([
                "--password-file",
                &var("PILOTLIGHT_REAL_VCENTER_PASSWORD_FILE"),
            ])
            .args(["--thumbprint", &var("PILOTLIGHT_REAL_VCENTER_THUMBPRINT")])
            .args([
                "--vm",
                &var("PILOTLIGHT_REAL_VCENTER_VM"),
                "--site",
                "realtest",
            ])
            .args([
                "--vm-id",
                "vm",
                "--enable-cbt",
                "--quiesce",
                "--report-json",
            ])
            .args(["--vddk-libdir", &var("PILOTLIGHT_REAL_VDDK_LIBDIR")])
            .args(["--state-dir", state.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!("round {round}: {report}");
        let full = report["disks"][0]["full"].as_bool().unwrap();
        assert_eq!(full, round == 1, "round 1 full, round 2 incremental");
    }
    let s = pilotlight_vsphere::Session::connect(pilotlight_vsphere::ConnectOptions {
        url,
        user: var("PILOTLIGHT_REAL_VCENTER_USER"),
        password: std::fs::read_to_string(var("PILOTLIGHT_REAL_VCENTER_PASSWORD_FILE"))
            .unwrap()
            .trim()
            .into(),
        thumbprint: Some(var("PILOTLIGHT_REAL_VCENTER_THUMBPRINT")),
        insecure: false,
        timeout: std::time::Duration::from_secs(60),
    })
    .await
    .unwrap();
    let vm = s.find_vm(&var("PILOTLIGHT_REAL_VCENTER_VM")).await.unwrap();
    let info = s.vm_info(&vm).await.unwrap();
    assert!(
        info.snapshots
            .iter()
            .all(|x| !x.name.starts_with("pilotlight-")),
        "{:?}",
        info.snapshots
    );
    s.logout().await;
}
