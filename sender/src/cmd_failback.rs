//! `pilotlight-sender failback`: write what a recovered instance changed back into the
//! site's disk, one round per run (see the `pilotlight-failback` crate).

use anyhow::{Context, Result};
use clap::Args;
use pilotlight_cloud::AwsSettings;
use pilotlight_failback::{Mode, Options, Progress, RoundRequest, RoundSummary, Target};
use pilotlight_protocol::DiskId;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of `failback` (plus the shared --region, --endpoint-url, --max-attempts and
/// --state-dir).
#[derive(Args, Debug)]
pub struct FailbackArgs {
    /// The disk: site/vm/disk (names the state file of this failback).
    #[arg(long, env = "PILOTLIGHT_DISK_ID")]
    disk_id: String,
    /// The recovery point the instance was launched from (its EBS snapshot id).
    #[arg(long)]
    point: String,
    /// The return snapshot to make the target equal (a snapshot of the recovered
    /// instance's volume, newest first round by round).
    #[arg(long)]
    snapshot: String,
    /// Where to write: a file or block device, or a writable NBD export
    /// (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH). Power the VM off first.
    #[arg(long)]
    target: String,
    /// What the site wrote after the point (its change tracking since the point's change
    /// id), as an extent list (PowerCLI "offset length" text or JSON): rewritten from the
    /// snapshot in the first round.
    #[arg(long)]
    site_changes: Option<PathBuf>,
    /// A drill: make --target (which must not exist yet) a sparse copy of this disk, and
    /// fail back into the copy; the site's disk is never written. Later rounds of the
    /// same drill give the same --target without --drill-from.
    #[arg(long)]
    drill_from: Option<PathBuf>,
    /// GetSnapshotBlock calls in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Do not read written blocks back to compare their SHA-256 (faster, less sure).
    #[arg(long)]
    no_verify: bool,
    /// Print each finished round as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

/// Where the shared settings put things.
#[derive(Debug)]
pub struct Shared {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub max_attempts: u32,
    pub state_dir: PathBuf,
}

struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn round(&self, base: &str, snapshot: &str, mode: Mode) {
        self.0
            .set_message(format!("{base} -> {snapshot} ({})", mode_name(mode)));
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Changed => "changed blocks",
        Mode::Full => "every block: not one lineage",
    }
}

/// One line per round, like the sender's summary.
pub fn line(disk: &DiskId, r: &RoundSummary) -> String {
    let c = &r.counters;
    format!(
        "{disk}: {} -> {} ({}): {} blocks written ({}), {} zeroed, {} read back, {} site blocks, {:.1} s",
        r.base,
        r.snapshot,
        mode_name(r.mode),
        c.blocks_written,
        bytesize::ByteSize(c.bytes_written),
        bytesize::ByteSize(c.bytes_zeroed),
        c.blocks_verified,
        r.site_blocks,
        r.seconds()
    )
}

fn site_extents(path: &Path, size: u64) -> Result<Vec<(u64, u64)>> {
    let extents = pilotlight_sender::source::extent_list::read_extent_list(path, size)
        .with_context(|| format!("--site-changes {}", path.display()))?;
    Ok(extents.into_iter().map(|e| (e.offset, e.length)).collect())
}

pub async fn run(a: FailbackArgs, shared: Shared) -> Result<()> {
    let disk = DiskId::parse(&a.disk_id).with_context(|| format!("--disk-id {:?}", a.disk_id))?;
    if a.concurrency == 0 || a.concurrency > 256 {
        anyhow::bail!("--concurrency {} must be 1 to 256", a.concurrency);
    }
    if let Some(from) = &a.drill_from {
        let copied = pilotlight_failback::target::sparse_copy(from, Path::new(&a.target))
            .with_context(|| {
                format!(
                    "--drill-from {}: cannot make {} a copy of it (it must not exist yet)",
                    from.display(),
                    a.target
                )
            })?;
        tracing::info!(
            "drill: {} is a copy of {} ({} of data)",
            a.target,
            from.display(),
            bytesize::ByteSize(copied)
        );
    }
    let target = Target::open(&a.target).await?;
    let site_changes = match &a.site_changes {
        Some(p) => site_extents(p, target.size())?,
        None => Vec::new(),
    };
    let aws = AwsSettings::new(shared.region, shared.endpoint_url)
        .max_attempts(shared.max_attempts)
        .load()
        .await;
    let ebs = aws.ebs();
    let req = RoundRequest {
        disk: disk.clone(),
        point: a.point,
        snapshot: a.snapshot,
        site_changes,
    };
    let opts = Options {
        concurrency: a.concurrency,
        verify: !a.no_verify,
        ..Options::default()
    };
    let bar = (!a.no_progress && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bytes} {binary_bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar(bar)
    });
    let progress: &dyn Progress = match &bar {
        Some(b) => b,
        None => &(),
    };
    let rounds =
        pilotlight_failback::apply(&ebs, &target, &shared.state_dir, &req, &opts, progress).await;
    if let Some(b) = &bar {
        b.0.finish_and_clear();
    }
    let rounds = rounds?;
    if rounds.is_empty() {
        println!("{disk}: the target already equals {}", req.snapshot);
    }
    for r in &rounds {
        if a.json {
            println!("{}", serde_json::to_string(r)?);
        } else {
            println!("{}", line(&disk, r));
        }
    }
    Ok(())
}

/// The disk's failback, when there is one: what the target equals, the round under way,
/// the rounds so far (for `pilotlight-sender status`).
pub fn status(state_dir: &Path, disk: &DiskId) -> Result<()> {
    let path = pilotlight_failback::state::path(state_dir, disk);
    let Some(st) = pilotlight_failback::state::load(&path)? else {
        return Ok(());
    };
    println!(
        "failback into {} from point {}: the target equals {}",
        st.target,
        st.point,
        st.applied
            .as_deref()
            .unwrap_or("the point (no round finished yet)")
    );
    if let Some(r) = &st.round {
        println!(
            "  round under way: {} -> {}, {} blocks written so far, resumes at block {} (run failback again)",
            r.base, r.snapshot, r.done.blocks_written, r.next_index
        );
    }
    let total = st.total();
    println!(
        "  {} rounds: {} blocks written ({}), {} zeroed",
        st.rounds.len(),
        total.blocks_written,
        bytesize::ByteSize(total.bytes_written),
        bytesize::ByteSize(total.bytes_zeroed)
    );
    for r in &st.rounds {
        println!("  {}", line(disk, r));
    }
    Ok(())
}
