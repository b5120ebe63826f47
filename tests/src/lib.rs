//! Test helpers for pilotlight's end-to-end tests: the local AWS emulator, the project's
//! binaries, sample disks, and an independent reassembler of disks from S3.
//!
//! Every test starts its own emulator through [`stack::LocalStack`]; running them against
//! real AWS (design.md asks for it, env-gated, never in CI) is not wired up yet:
//! `LocalStack` is the one place to add it.

pub mod browser;
pub mod cli;
pub mod disk;
pub mod lambda;
pub mod points;
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

/// Path of a workspace binary, built beside the test executable (`cargo build --workspace
/// --bins`, which `scripts/test` runs first). A binary older than any source file it was
/// built from (cargo's own dep-info, `<bin>.d`, lists them) fails the test with a clear
/// message instead of testing yesterday's code. `PILOTLIGHT_BIN_DIR` overrides the
/// directory (binaries from elsewhere are taken as they are).
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
    let path = existing(dir.join(name));
    if let Some(src) = newer_source(&path) {
        panic!(
            "{} is older than {}: rebuild with `cargo build --workspace --all-targets` (scripts/test does) so the test runs today's code",
            path.display(),
            src.display()
        );
    }
    path
}

fn existing(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} not found: build it first with `cargo build --workspace --bins` (scripts/test does)",
        path.display()
    );
    path
}

/// A source file of `bin` (from cargo's dep-info `<bin>.d` beside it) newer than `bin`.
pub fn newer_source(bin: &std::path::Path) -> Option<PathBuf> {
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok()?;
    let dep_info = std::fs::read_to_string(bin.with_extension("d")).ok()?;
    // `target: dep dep ...`; spaces inside paths are escaped as `\ `.
    let deps = dep_info.split_once(": ").map_or("", |(_, d)| d);
    deps.replace("\\ ", "\u{0}")
        .split_whitespace()
        .map(|p| PathBuf::from(p.replace('\u{0}', " ")))
        .find(|p| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > built)
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_older_than_a_source_it_lists_is_stale() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (bin, src) = (dir.path().join("tool"), dir.path().join("my src.rs"));
        let at = |p: &std::path::Path, secs: u64| {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            std::fs::File::options()
                .write(true)
                .open(p)
                .and_then(|f| f.set_modified(t))
                .expect("set time");
        };
        std::fs::write(&src, "fn main() {}").expect("write");
        std::fs::write(&bin, "binary").expect("write");
        at(&src, 1_000);
        at(&bin, 2_000);
        let escaped = src.display().to_string().replace(' ', "\\ ");
        std::fs::write(
            dir.path().join("tool.d"),
            format!("{}: {escaped}\n", bin.display()),
        )
        .expect("write");
        assert_eq!(newer_source(&bin), None, "built after its source");
        at(&src, 3_000);
        assert_eq!(
            newer_source(&bin),
            Some(src),
            "source edited after the build"
        );
    }
}
