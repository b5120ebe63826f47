//! The vSphere source end to end: `pilotlight-sender vsphere` against vcsim (VMware's
//! simulator: login, inventory, reconfigure, snapshots, tasks) through a SOAP proxy that
//! answers what vcsim lacks (`QueryChangedDiskAreas`, paged; CBT change ids) and injects
//! session expiry and delays. The data path is nbdkit's file plugin standing in for
//! `nbdkit vddk` (VDDK is not redistributable); the rest is real: emulator S3, the
//! receiver, the image compared with the disk.
#![allow(clippy::unwrap_used)]

use pilotlight_protocol::DiskId;
use pilotlight_tests::cli::{applied, image_path, receiver, s};
use pilotlight_tests::disk::sha256_file;
use pilotlight_tests::stack::{free_port, LocalStack};
use pilotlight_tests::vcsim::{SoapProxy, Vcsim};
use pilotlight_tests::{bin, poll_until};
use pilotlight_vsphere::{ConnectOptions, Session};
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const KIB: u64 = 1024;
const VM: &str = "DC0_H0_VM0";

async fn session(url: &str) -> Session {
    Session::connect(ConnectOptions {
        url: url.into(),
        user: "user".into(),
        password: "pass".into(),
        thumbprint: None,
        insecure: false,
        timeout: Duration::from_secs(30),
    })
    .await
    .unwrap()
}

/// The VM's snapshot names, straight from vcsim.
async fn snapshots(vcsim: &Vcsim) -> Vec<String> {
    let s = session(&vcsim.url).await;
    let vm = s.find_vm(VM).await.unwrap();
    let names = s
        .vm_info(&vm)
        .await
        .unwrap()
        .snapshots
        .into_iter()
        .map(|x| x.name)
        .collect();
    s.logout().await;
    names
}

struct Env {
    stack: LocalStack,
    vcsim: Vcsim,
    proxy: SoapProxy,
    dir: tempfile::TempDir,
    /// The VM's disks: (device key, capacity); vcsim's own plus one the test adds.
    disks: Vec<(i32, u64)>,
}

impl Env {
    async fn start() -> Self {
        let stack = LocalStack::start().await;
        let vcsim = Vcsim::start();
        let proxy = SoapProxy::start(&vcsim.url).await;
        let dir = tempfile::tempdir().unwrap();
        let s = session(&vcsim.url).await;
        let vm = s.find_vm(VM).await.unwrap();
        // A second disk: one run must send both from one snapshot.
        s.run_task(
            "ReconfigVM_Task",
            &vm,
            r#"<spec><deviceChange><operation>add</operation><fileOperation>create</fileOperation><device xsi:type="VirtualDisk"><key>-1</key><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName></fileName><diskMode>persistent</diskMode><thinProvisioned>true</thinProvisioned></backing><controllerKey>202</controllerKey><unitNumber>1</unitNumber><capacityInKB>512</capacityInKB></device></deviceChange></spec>"#,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        let info = s.vm_info(&vm).await.unwrap();
        let disks: Vec<(i32, u64)> = info.disks.iter().map(|d| (d.key, d.capacity)).collect();
        assert_eq!(disks.len(), 2, "{info:?}");
        // The VM's disks, as the data path serves them.
        for (key, cap) in &disks {
            let f = std::fs::File::create(dir.path().join(format!("disk-{key}.raw"))).unwrap();
            f.set_len(*cap).unwrap();
        }
        proxy.script.lock().unwrap().capacities = disks.iter().copied().collect();
        s.logout().await;
        std::fs::write(dir.path().join("password"), "pass\n").unwrap();
        Self {
            stack,
            vcsim,
            proxy,
            dir,
            disks,
        }
    }

    fn disk_file(&self, key: i32) -> std::path::PathBuf {
        self.dir.path().join(format!("disk-{key}.raw"))
    }

    /// The big disk's key (the one the byte counts below are about).
    fn key(&self) -> i32 {
        self.disks.iter().max_by_key(|(_, c)| *c).unwrap().0
    }

    /// Writes to every disk (clipped to its size), as the scripted areas say.
    fn write(&self, offset: u64, len: u64, byte: u8) {
        for (key, cap) in &self.disks {
            if offset >= *cap {
                continue;
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(self.disk_file(*key))
                .unwrap();
            f.write_all_at(&vec![byte; len.min(cap - offset) as usize], offset)
                .unwrap();
        }
    }

    fn command(&self, extra: &[&str]) -> Command {
        self.command_for(VM, extra)
    }

    fn command_for(&self, vm: &str, extra: &[&str]) -> Command {
        self.command_at(&self.proxy.url, vm, extra)
    }

    fn command_at(&self, server: &str, vm: &str, extra: &[&str]) -> Command {
        let nbd = format!(
            "nbdkit --foreground --readonly --exit-with-parent -U {{socket}} file {}/disk-{{key}}.raw",
            self.dir.path().display()
        );
        let mut c = Command::new(bin("pilotlight-sender"));
        c.arg("vsphere")
            .args(["--server", server, "--user", "user"])
            .args(["--password-file", s(&self.dir.path().join("password"))])
            .args(["--vm", vm, "--site", "site1", "--vm-id", "vm0"])
            .args(["--nbd-command", &nbd])
            .args(["--state-dir", s(&self.dir.path().join("state"))])
            .args(["--report-json", "--no-progress", "--max-attempts", "1"])
            .args(extra)
            .envs(self.stack.env())
            .env("RUST_LOG", "warn");
        c
    }

    fn run(&self, extra: &[&str]) -> Output {
        self.command(extra).output().unwrap()
    }

    fn run_ok(&self, extra: &[&str]) -> Value {
        let out = self.run(extra);
        assert!(
            out.status.success(),
            "pilotlight-sender vsphere failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The receiver applies everything; each image must equal its disk file.
    fn receiver_converges(&self, generation: u64) {
        let rx = self.dir.path().join("rx");
        let st = receiver(&self.stack, "sync", &rx, &[]).status().unwrap();
        assert!(st.success());
        for (key, _) in &self.disks {
            let disk = DiskId::parse(&format!("site1/vm0/disk-{key}")).unwrap();
            assert_eq!(applied(&rx, &disk), Some(generation), "{disk}");
            assert_eq!(
                sha256_file(&image_path(&rx, &disk)),
                sha256_file(&self.disk_file(*key)),
                "generation {generation}: image of {disk} differs from the VM's disk"
            );
        }
    }

    fn script(&self) -> std::sync::MutexGuard<'_, pilotlight_tests::vcsim::Script> {
        self.proxy.script.lock().unwrap()
    }
}

/// The report of the big disk; and every disk of the VM went in this run.
fn big<'a>(r: &'a Value, env: &Env) -> &'a Value {
    let disks = r["disks"].as_array().unwrap();
    assert_eq!(
        disks.len(),
        env.disks.len(),
        "one run sends every disk: {r}"
    );
    let name = format!("site1/vm0/disk-{}", env.key());
    disks.iter().find(|d| d["disk"] == name.as_str()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_lifecycle_cbt_paging_relogin_reset_and_errors() {
    let env = Env::start().await;

    // CBT is off and not to be enabled: a clear error, and no snapshot was made.
    let out = env.run(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("changed-block tracking is off") && err.contains("--enable-cbt"),
        "{err}"
    );
    assert!(snapshots(&env.vcsim).await.is_empty());

    // A snapshot a crashed run left behind.
    {
        let s = session(&env.vcsim.url).await;
        let vm = s.find_vm(VM).await.unwrap();
        s.create_snapshot(
            &vm,
            "pilotlight-20260101T000000Z",
            pilotlight_sender::vsphere::SNAPSHOT_NOTE,
            false,
        )
        .await
        .unwrap();
        s.create_snapshot(&vm, "before-upgrade", "the admin's own", false)
            .await
            .unwrap();
        s.logout().await;
    }

    // Run 1: CBT enabled, orphan removed (the admin's snapshot kept), changeId "*" in
    // two pages, the session expires at the first QueryChangedDiskAreas and is renewed.
    env.write(0, 256 * KIB, 0x11);
    env.write(768 * KIB, 128 * KIB, 0x22);
    {
        let mut sc = env.script();
        sc.allocated = vec![(0, 256 * KIB), (768 * KIB, 128 * KIB)];
        sc.page_bytes = 512 * KIB;
        sc.expire_session_at = Some("QueryChangedDiskAreas".into());
    }
    *env.proxy.seen.lock().unwrap() = Default::default();
    let r = env.run_ok(&["--enable-cbt"]);
    assert_eq!(
        r["orphans_removed"],
        serde_json::json!(["pilotlight-20260101T000000Z"])
    );
    assert_eq!(r["cbt_enabled_now"], true);
    assert_eq!(r["logins"], 2, "re-logged in after NotAuthenticated: {r}");
    let d = big(&r, &env);
    assert_eq!(d["full"], true);
    assert_eq!(d["from_change_id"], "*");
    assert_eq!(d["summary"]["generation"], 1);
    assert_eq!(d["summary"]["bytes_read"], 384 * KIB);
    // The disk's changeId as the run's snapshot holds it (the proxy's stand-in for CBT).
    assert!(
        d["to_change_id"].as_str().unwrap().contains("/snapshot-"),
        "{d}"
    );
    {
        let seen = env.proxy.seen.lock().unwrap();
        // The 1 MiB disk in three pages (the last one empty; the first call met the
        // expired session), then the 512 KiB disk in two.
        assert_eq!(seen.start_offsets, [0, 512 * KIB, 896 * KIB, 0, 256 * KIB]);
        assert_eq!(seen.methods.iter().filter(|m| *m == "Login").count(), 2);
    }
    assert_eq!(
        snapshots(&env.vcsim).await,
        ["before-upgrade"],
        "only ours removed"
    );
    env.receiver_converges(1);
    let manifest: Value = serde_json::from_slice(
        &env.stack
            .get(&format!(
                "dr/site1/vm0/disk-{}/g/00000000000000000001/manifest.json",
                env.key()
            ))
            .await,
    )
    .unwrap();
    assert_eq!(manifest["source_change_id"], d["to_change_id"]);
    assert_eq!(manifest["source_kind"], "vsphere-nbd");

    // Run 2: incremental from the saved changeId.
    let saved = d["to_change_id"].as_str().unwrap().to_string();
    env.write(64 * KIB, 64 * KIB, 0x33);
    env.write(512 * KIB, 64 * KIB, 0x44);
    env.script().changed = vec![(64 * KIB, 64 * KIB), (512 * KIB, 64 * KIB)];
    let r = env.run_ok(&[]);
    let d = big(&r, &env);
    assert_eq!(d["full"], false);
    assert_eq!(d["from_change_id"], saved.as_str());
    assert_eq!(d["summary"]["parent"], 1);
    assert_eq!(d["summary"]["bytes_read"], 128 * KIB);
    env.receiver_converges(2);

    // Run 3: the changeId is rejected (CBT reset): a full generation, said so.
    env.write(0, 64 * KIB, 0); // zeroed since: a full generation must carry it
    env.write(900 * KIB, 4 * KIB, 0x55);
    {
        let mut sc = env.script();
        sc.reject_change_ids = true;
        sc.allocated = vec![
            (64 * KIB, 192 * KIB),
            (512 * KIB, 64 * KIB),
            (768 * KIB, 136 * KIB),
        ];
    }
    let r = env.run_ok(&[]);
    let d = big(&r, &env);
    assert_eq!(d["reset"], true);
    assert_eq!(d["full"], true);
    assert_eq!(
        d["summary"]["parent"],
        Value::Null,
        "a full generation is a base"
    );
    env.receiver_converges(3);
    let saved = d["to_change_id"].as_str().unwrap().to_string();
    env.script().reject_change_ids = false;

    // An error mid-run (S3 unreachable): nonzero exit, snapshot removed, changeId kept.
    env.write(0, 4 * KIB, 0x66);
    env.script().changed = vec![(0, 4 * KIB)];
    let unreachable = format!("http://127.0.0.1:{}", free_port());
    let out = env
        .command(&[])
        .env("PILOTLIGHT_ENDPOINT_URL", unreachable)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(snapshots(&env.vcsim).await, ["before-upgrade"]);
    let ids =
        pilotlight_sender::vsphere::load_change_ids(&env.dir.path().join("state"), "site1", "vm0")
            .unwrap();
    assert_eq!(
        ids.disks[&format!("disk-{}", env.key())],
        saved,
        "not advanced by a failed run"
    );

    // The next run sends from the kept changeId: nothing is lost.
    let r = env.run_ok(&[]);
    assert_eq!(big(&r, &env)["from_change_id"], saved.as_str());
    env.receiver_converges(4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_removes_the_snapshot_and_a_killed_run_leaves_an_orphan_the_next_run_removes() {
    let env = Env::start().await;
    env.write(0, 64 * KIB, 0x77);
    {
        let mut sc = env.script();
        sc.allocated = vec![(0, 64 * KIB)];
        sc.delay = Duration::from_secs(30);
    }

    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let child = env
            .command(&["--enable-cbt"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the run is inside its snapshot (its QueryChangedDiskAreas is held).
        let proxy = env.proxy.clone();
        poll_until(
            "the run reaches QueryChangedDiskAreas",
            Duration::from_secs(60),
            || {
                let proxy = proxy.clone();
                async move {
                    let n = proxy.seen.lock().unwrap().change_ids.len();
                    (n > 0).then_some(())
                }
            },
        )
        .await;
        env.proxy.seen.lock().unwrap().change_ids.clear();
        assert_eq!(snapshots(&env.vcsim).await.len(), 1);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(!out.status.success());
        if signal == nix::sys::signal::Signal::SIGTERM {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("stopped by a signal"), "{err}");
            assert!(
                snapshots(&env.vcsim).await.is_empty(),
                "SIGTERM removes the snapshot"
            );
        } else {
            let left = snapshots(&env.vcsim).await;
            assert_eq!(left.len(), 1, "SIGKILL leaves the snapshot");
            assert!(left[0].starts_with("pilotlight-"));
        }
    }

    // The next run removes the orphan and completes.
    env.script().delay = Duration::ZERO;
    let r = env.run_ok(&[]);
    assert_eq!(r["orphans_removed"].as_array().unwrap().len(), 1);
    assert!(snapshots(&env.vcsim).await.is_empty());
    env.receiver_converges(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_vm_and_a_bad_password_are_clear_errors() {
    let env = Env::start().await;
    let out = env.command_for("no-such-vm", &[]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no VM named \"no-such-vm\""), "{err}");

    // vcsim accepts any password, so: no password at all, and no server.
    std::fs::remove_file(env.dir.path().join("password")).unwrap();
    let out = env.run(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read --password-file"), "{err}");
    std::fs::write(env.dir.path().join("password"), "pass").unwrap();
    let nowhere = format!("http://127.0.0.1:{}/sdk", free_port());
    let out = env.command_at(&nowhere, VM, &[]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&nowhere), "{err}");
    // --insecure is said out loud (the certificate is not checked: the password is
    // anyone's on the path), and a thumbprint that is not one is refused.
    let nowhere_tls = format!("https://127.0.0.1:{}/sdk", free_port());
    let out = env
        .command_at(&nowhere_tls, VM, &["--insecure"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--insecure") && err.contains("not checked"),
        "{err}"
    );
    let out = env
        .command_at(&nowhere_tls, VM, &["--thumbprint", "12:34"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a certificate thumbprint"), "{err}");
}
