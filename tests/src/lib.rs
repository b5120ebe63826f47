//! Test helpers for pilotlight's end-to-end tests: the local AWS emulator, the project's
//! binaries, sample disks, and an independent reassembler of disks from S3.
//!
//! Every test starts its own emulator through [`stack::LocalStack`]; running them against
//! real AWS (design.md asks for it, env-gated, never in CI) is not wired up yet:
//! `LocalStack` is the one place to add it.

pub mod cli;
pub mod disk;
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

/// Path of a workspace binary, built beside the test executable
/// (`cargo build --workspace --bins`, which the README's test command runs first).
/// `PILOTLIGHT_BIN_DIR` overrides the directory.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("PILOTLIGHT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
            let exe = std::env::current_exe().unwrap_or_default();
            let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
            if dir.ends_with("deps") {
                dir.parent().map(PathBuf::from).unwrap_or_default()
            } else {
                dir
            }
        });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build it first with `cargo build --workspace --bins` (scripts/test does)",
        path.display()
    );
    path
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
