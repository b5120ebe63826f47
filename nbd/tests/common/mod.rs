//! Real NBD servers for the tests: qemu-nbd and nbdkit on Unix sockets or loopback TCP.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process, killed on drop.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub uri: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tool(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Waits (polling, with a deadline) until `connects` succeeds; fails if the server exits.
fn wait_listening(what: &str, child: &mut Child, connects: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !connects() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("NBD server exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "NBD server never listened on {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_socket(socket: &Path, child: &mut Child) {
    wait_listening(&socket.display().to_string(), child, || {
        std::os::unix::net::UnixStream::connect(socket).is_ok()
    });
}

fn wait_tcp(port: u16, child: &mut Child) {
    wait_listening(&format!("port {port}"), child, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `qemu-nbd` serving `image` read-only (persistent, named export `disk`) on a Unix
/// socket in `dir`, exporting `bitmaps`.
pub fn qemu_nbd_unix(dir: &Path, image: &Path, format: &str, bitmaps: &[&str]) -> Server {
    let socket = dir.join(format!("qemu-nbd-{}.sock", rand_suffix()));
    let mut c = Command::new("qemu-nbd");
    c.args([
        "--read-only",
        "--persistent",
        "--shared=8",
        "-x",
        "disk",
        "-f",
        format,
    ])
    .arg("-k")
    .arg(&socket);
    for b in bitmaps {
        c.args(["-B", b]);
    }
    let mut child = c.arg(image).stderr(Stdio::inherit()).spawn().unwrap();
    wait_socket(&socket, &mut child);
    Server {
        child,
        uri: format!("nbd+unix:///disk?socket={}", socket.display()),
    }
}

/// `qemu-nbd` on loopback TCP.
pub fn qemu_nbd_tcp(image: &Path, format: &str, bitmaps: &[&str]) -> Server {
    let port = free_port();
    let mut c = Command::new("qemu-nbd");
    c.args([
        "--read-only",
        "--persistent",
        "--shared=8",
        "-x",
        "disk",
        "-f",
        format,
    ])
    .args(["-b", "127.0.0.1", "-p", &port.to_string()]);
    for b in bitmaps {
        c.args(["-B", b]);
    }
    let mut child = c.arg(image).stderr(Stdio::inherit()).spawn().unwrap();
    wait_tcp(port, &mut child);
    Server {
        child,
        uri: format!("nbd://127.0.0.1:{port}/disk"),
    }
}

/// `nbdkit PLUGIN ARGS` on a Unix socket in `dir` (foreground, read-only).
pub fn nbdkit_unix(dir: &Path, plugin_args: &[&str]) -> Server {
    let socket = dir.join(format!("nbdkit-{}.sock", rand_suffix()));
    let mut child = Command::new("nbdkit")
        .args(["--foreground", "--readonly", "--exportname", "disk", "-U"])
        .arg(&socket)
        .args(plugin_args)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_socket(&socket, &mut child);
    Server {
        child,
        uri: format!("nbd+unix:///disk?socket={}", socket.display()),
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 image of `size` bytes in `dir`.
pub fn qcow2(dir: &Path, name: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), size],
    );
    p
}

/// `qemu-io -c "write -P pattern offset length"` for each write.
pub fn qemu_io_writes(image: &Path, writes: &[(u8, u64, u64)]) {
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    for (pattern, offset, length) in writes {
        args.push("-c".into());
        args.push(format!("write -P {pattern:#x} {offset} {length}"));
    }
    args.push(image.to_str().unwrap().into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &args);
}

/// The raw bytes of an image, by `qemu-img convert` (an independent reader).
pub fn raw_bytes(dir: &Path, image: &Path, format: &str) -> Vec<u8> {
    let out = dir.join(format!("raw-{}.img", rand_suffix()));
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            format,
            "-O",
            "raw",
            image.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    b
}
