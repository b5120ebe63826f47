//! Headless Chromium (Debian's `chromium`, installed by `scripts/setup`): renders a local
//! page to a PNG and dumps the DOM it built, so a test can check what a reader sees.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A rendered page: the screenshot's pixels and the DOM's text.
#[derive(Debug)]
pub struct Rendered {
    pub png: PathBuf,
    pub width: u32,
    pub height: u32,
    /// RGBA, row by row.
    pub rgba: Vec<u8>,
    /// The DOM as Chromium serialised it after loading the page.
    pub dom: String,
}

impl Rendered {
    /// Pixels within `tolerance` of `rgb` on every channel.
    pub fn pixels_of(&self, rgb: [u8; 3], tolerance: u8) -> usize {
        self.rgba
            .chunks_exact(4)
            .filter(|p| (0..3).all(|i| p[i].abs_diff(rgb[i]) <= tolerance))
            .count()
    }

    /// The page's text: the DOM without its tags and the style sheet.
    pub fn text(&self) -> String {
        let body = self.dom.split("</style>").last().unwrap_or(&self.dom);
        let mut out = String::new();
        let mut in_tag = false;
        for c in body.chars() {
            match c {
                '<' => {
                    in_tag = true;
                    out.push(' ');
                }
                '>' => in_tag = false,
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// A command without the shifted clock of `scripts/lib/a-year-ahead` (libfaketime,
/// inherited through `LD_PRELOAD`): Chromium only renders a page, and stalls under it.
fn real_clock(exe: &str) -> Command {
    let mut cmd = Command::new(exe);
    cmd.env_remove("LD_PRELOAD")
        .env_remove("FAKETIME")
        .env_remove("FAKETIME_DONT_FAKE_MONOTONIC");
    cmd
}

fn chromium() -> Command {
    let exe = ["chromium", "/usr/bin/chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            real_clock(c)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .unwrap_or_else(|| panic!("chromium is not installed: run scripts/setup (apt: chromium)"));
    let mut cmd = real_clock(exe);
    // As root in a sandboxed machine with no network: no sandbox, no GPU, and none of
    // the background connections a closed network refuses.
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
    ]);
    cmd
}

/// Runs `cmd` to its end within `deadline`; its stdout.
fn run(mut cmd: Command, what: &str, deadline: Duration) -> Vec<u8> {
    let out_file = tempfile::NamedTempFile::new().expect("a temp file");
    let err_file = tempfile::NamedTempFile::new().expect("a temp file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out_file.reopen().expect("reopen a temp file"))
        .stderr(err_file.reopen().expect("reopen a temp file"))
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            let err = std::fs::read_to_string(err_file.path()).unwrap_or_default();
            assert!(status.success(), "{what}: {status}: {err}");
            return std::fs::read(out_file.path()).expect("read chromium's output");
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = std::fs::read_to_string(err_file.path()).unwrap_or_default();
            panic!("{what}: not done after {deadline:?}: {err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Renders `page` (a local file) at `width` x `height` into `png`.
pub fn render(page: &Path, png: &Path, width: u32, height: u32) -> Rendered {
    let url = format!(
        "file://{}",
        page.canonicalize().expect("the page exists").display()
    );
    let deadline = Duration::from_secs(120);
    let profile = tempfile::tempdir().expect("a temp dir");
    let mut shot = chromium();
    shot.arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size={width},{height}"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(&url);
    run(shot, "chromium --screenshot", deadline);
    let profile = tempfile::tempdir().expect("a temp dir");
    let mut dump = chromium();
    dump.arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(&url);
    let dom = String::from_utf8_lossy(&run(dump, "chromium --dump-dom", deadline)).into_owned();

    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png).expect("chromium wrote the screenshot"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("a PNG's size")];
    let info = reader.next_frame(&mut buf).expect("a PNG frame");
    buf.truncate(info.buffer_size());
    let rgba = match info.color_type {
        png::ColorType::Rgba => buf,
        png::ColorType::Rgb => buf
            .chunks_exact(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect(),
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    Rendered {
        png: png.to_path_buf(),
        width: info.width,
        height: info.height,
        rgba,
        dom,
    }
}
