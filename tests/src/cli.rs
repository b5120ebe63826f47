//! Running the project's binaries against a local stack.

use crate::bin;
use crate::stack::LocalStack;
use pilotlight_protocol::DiskId;
use std::path::Path;
use std::process::{Child, Command};

/// `pilotlight-sender send ARGS` pointed at the stack.
pub fn sender(stack: &LocalStack, args: &[&str]) -> Command {
    let mut c = Command::new(bin("pilotlight-sender"));
    c.arg("send")
        .args(args)
        .envs(stack.env())
        .env("RUST_LOG", "warn");
    c
}

/// Runs `cmd` to the end; panics with its stderr unless it succeeded.
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd.get_program(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the sender with `--json` and returns its summary; panics with its stderr on failure.
pub fn send_ok(stack: &LocalStack, args: &[&str]) -> serde_json::Value {
    let out = run_ok(sender(stack, args).arg("--json"));
    serde_json::from_slice(&out.stdout).expect("JSON summary on stdout")
}

/// `pilotlight-receiver SUBCOMMAND` pointed at the stack, with its directories.
pub fn receiver(stack: &LocalStack, sub: &str, dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin("pilotlight-receiver"));
    c.arg(sub)
        .arg("--image-dir")
        .arg(dir.join("images"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(args)
        .envs(stack.env())
        .env("RUST_LOG", "info");
    c
}

/// `pilotlight-receiver run` on `queue`, reconciling every `reconcile_every`, its log in
/// `log`; killed when the result is dropped.
pub fn running_receiver(
    stack: &LocalStack,
    dir: &Path,
    queue: &str,
    reconcile_every: &str,
    log: &Path,
) -> Running {
    running_receiver_with(
        stack,
        dir,
        &["--queue-url", queue, "--reconcile-every", reconcile_every],
        log,
    )
}

/// `pilotlight-receiver run ARGS`, its log in `log`; killed when the result is dropped.
pub fn running_receiver_with(stack: &LocalStack, dir: &Path, args: &[&str], log: &Path) -> Running {
    Running(
        receiver(stack, "run", dir, args)
            .stderr(std::fs::File::create(log).expect("create the receiver log"))
            .spawn()
            .expect("start pilotlight-receiver"),
    )
}

/// `pilotlight-dr ARGS` pointed at the stack, running the handler locally with the
/// simulated EC2 image import (`simulate`: `ok` or a failure's StatusMessage), since the
/// emulator has no ImportImage.
pub fn dr(stack: &LocalStack, simulate: &str, args: &[&str]) -> Command {
    let mut c = Command::new(bin("pilotlight-dr"));
    c.args(args)
        .envs(stack.env())
        .env("PILOTLIGHT_DR_SIMULATE_IMPORT", simulate)
        .env("RUST_LOG", "warn");
    c
}

/// A child process killed when dropped.
#[derive(Debug)]
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The generation a receiver's state says its image holds.
pub fn applied(dir: &Path, disk: &DiskId) -> Option<u64> {
    receiver_state(dir, disk).applied
}

/// The receiver's state of `disk` under `dir`.
pub fn receiver_state(dir: &Path, disk: &DiskId) -> pilotlight_receiver::state::DiskState {
    let paths =
        pilotlight_receiver::state::DiskPaths::new(&dir.join("images"), &dir.join("state"), disk);
    pilotlight_receiver::state::load(&paths, disk).expect("receiver state readable")
}

/// The receiver's image of `disk` under `dir`.
pub fn image_path(dir: &Path, disk: &DiskId) -> std::path::PathBuf {
    pilotlight_receiver::state::DiskPaths::new(&dir.join("images"), &dir.join("state"), disk).image
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The sender's flags for a test disk: its id, state and file.
pub fn disk_args<'a>(id: &'a str, state: &'a Path, disk: &'a Path) -> [&'a str; 6] {
    ["--disk-id", id, "--state-dir", s(state), "--disk", s(disk)]
}

/// Writes generation `k` of the disk `site1/vm1/disk0` in `dir` and sends it: `count`
/// random extents (seeded by `seed`) into a sparse `size`-byte file; generation 1 as a
/// full base, later ones as PowerCLI lists of what was written (overlapping earlier
/// ones). Returns the source's SHA-256 after it.
pub fn send_generation(
    stack: &LocalStack,
    dir: &Path,
    size: u64,
    count: usize,
    seed: u64,
    k: u64,
) -> [u8; 32] {
    use crate::disk::{create_sparse, powercli_list, scribble, sha256_file};
    let disk = dir.join("disk.raw");
    let f = create_sparse(&disk, size);
    let w = scribble(&f, size, count, seed);
    drop(f);
    let state = dir.join("sender-state");
    let base = disk_args("site1/vm1/disk0", &state, &disk);
    let list = dir.join(format!("changes-{k}.txt"));
    let summary = if k == 1 {
        send_ok(stack, &[&base[..], &["--source", "full"]].concat())
    } else {
        std::fs::write(&list, powercli_list(&w)).expect("write the changed-area list");
        send_ok(
            stack,
            &[
                &base[..],
                &["--source", "extent-list", "--extents", s(&list)],
            ]
            .concat(),
        )
    };
    assert_eq!(summary["generation"], k, "sender committed generation {k}");
    sha256_file(&disk)
}
