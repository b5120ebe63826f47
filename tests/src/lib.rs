//! Test helpers for pilotlight's end-to-end tests: the local AWS emulator, the project's
//! binaries, sample disks, and an independent reassembler of disks from S3.
//!
//! Every test starts its own emulator through [`stack::LocalStack`]; running them against
//! real AWS (design.md asks for it, env-gated, never in CI) is not wired up yet:
//! `LocalStack` is the one place to add it.

pub mod cli;
pub mod disk;
pub mod proxy;
pub mod reassemble;
pub mod stack;
pub mod vcsim;

use std::path::PathBuf;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Path of a workspace binary, built beside the test executable. A binary older than
/// any source file of the workspace is rebuilt first (`cargo build --workspace --bins`),
/// so a test never runs yesterday's binary against today's code; `scripts/test` builds
/// them up front, so this costs nothing there. `PILOTLIGHT_BIN_DIR` overrides the
/// directory (and the check: binaries from elsewhere are taken as they are).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("PILOTLIGHT_BIN_DIR") {
        return existing(PathBuf::from(dir).join(name));
    }
    // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir = dir.parent().map(PathBuf::from).unwrap_or_default();
    }
    let path = dir.join(name);
    if is_stale(&path) {
        // Cargo leaves a binary whose inputs did not change as it is: after this build
        // it is current even if its file time stays old.
        rebuild(&dir);
    }
    existing(path)
}

fn existing(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} not found: build it first with `cargo build --workspace --bins` (scripts/test does)",
        path.display()
    );
    path
}

/// True when `bin` is missing or older than a source file (`*.rs`, `Cargo.toml`,
/// `Cargo.lock`) of the workspace, integration tests (`<crate>/tests/`) aside.
pub fn is_stale(bin: &std::path::Path) -> bool {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return true;
    };
    newest_source(&repo_root()).is_some_and(|t| t > built)
}

fn newest_source(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                let integration_tests = name == "tests" && d != dir;
                if !name.starts_with('.')
                    && name != "target"
                    && name != "node_modules"
                    && !integration_tests
                {
                    stack.push(e.path());
                }
            } else if name.ends_with(".rs") || name == "Cargo.toml" || name == "Cargo.lock" {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    newest = newest.max(Some(t));
                }
            }
        }
    }
    newest
}

/// Builds the workspace's binaries into the profile directory `dir` (once per test
/// process; cargo's own lock serializes concurrent tests).
fn rebuild(dir: &std::path::Path) {
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if *built {
        return;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(repo_root())
        .args(["build", "--workspace", "--bins", "--quiet"]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    eprintln!("test kit: binaries older than the sources; rebuilding them first");
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build --workspace --bins failed");
    *built = true;
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: std::time::Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
