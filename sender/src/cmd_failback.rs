//! `pilotlight-sender failback`: write what a recovered instance changed back into the
//! site's disk, one round per run (see the `pilotlight-failback` crate).

use anyhow::{Context, Result};
use clap::Args;
use pilotlight_cloud::s3::SdkS3;
use pilotlight_cloud::AwsSettings;
use pilotlight_failback::{Mode, Options, Progress, RoundRequest, RoundSummary, Target};
use pilotlight_protocol::{
    DiskId, Name, Prefix, ReturnDoc, ReturnPoint, RoundDoc, FAILBACK_VERSION,
};
use pilotlight_store::DocError;
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
    /// The DR run being failed back (`pilotlight-dr failback start RUN_ID`): the point and
    /// the newest return snapshot of this disk come from the bucket, and the round is
    /// reported there for `pilotlight-dr failback status` and cutover.
    #[arg(long, required_unless_present_all = ["point", "snapshot"], conflicts_with_all = ["point", "snapshot"])]
    run: Option<String>,
    /// Without --run: the recovery point the instance was launched from (its EBS
    /// snapshot id).
    #[arg(long, requires = "snapshot")]
    point: Option<String>,
    /// Without --run: the return snapshot to make the target equal (a snapshot of the
    /// recovered instance's volume).
    #[arg(long, requires = "point")]
    snapshot: Option<String>,
    /// Where to write: a file or block device, or a writable NBD export
    /// (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH). Power the VM off first.
    #[arg(long)]
    target: String,
    /// What the site wrote after the point (its change tracking since the point's change
    /// id), as an extent list (PowerCLI "offset length" text or JSON): rewritten from the
    /// snapshot in the first round.
    #[arg(long)]
    site_changes: Option<PathBuf>,
    /// The site's disk ran after the point but has no change tracking to say where it
    /// wrote: the first round reads every block of the snapshot and compares its SHA-256
    /// with the target's, writing only where they differ (every block crosses the
    /// network once; the target is written only where needed).
    #[arg(long, conflicts_with = "site_changes")]
    compare: bool,
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
    /// After the round, also compare the SHA-256 of the whole target with the snapshot's
    /// over the same bytes (reads the whole target and every block of the snapshot: the
    /// egress of a full copy; for the final round).
    #[arg(long)]
    whole_disk_sha256: bool,
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
    /// The replication bucket and prefix (for --run).
    pub bucket: Option<String>,
    pub prefix: String,
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
        Mode::Compared => "every block compared: the site's changes are unknown",
    }
}

/// One line per round, like the sender's summary.
pub fn line(disk: &DiskId, r: &RoundSummary) -> String {
    let c = &r.counters;
    format!(
        "{disk}: {} -> {} ({}): {} blocks written ({}), {} zeroed, {} read back, {} site blocks, {} found equal, {:.1} s",
        r.base,
        r.snapshot,
        mode_name(r.mode),
        c.blocks_written,
        bytesize::ByteSize(c.bytes_written),
        bytesize::ByteSize(c.bytes_zeroed),
        c.blocks_verified,
        r.site_blocks,
        c.blocks_same,
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
        let marker = drill_marker(&shared.state_dir, &disk);
        if let Some(dir) = marker.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&marker, &a.target)
            .with_context(|| format!("writing {}", marker.display()))?;
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
    // With --run: what the DR function offers this disk, and where to report.
    let from_run = match &a.run {
        Some(run) => Some(returns_of(&aws, &shared.bucket, &shared.prefix, &disk, run).await?),
        None => None,
    };
    let (point, snapshot, is_final) = match &from_run {
        Some((_, _, doc, newest)) => (
            doc.point_snapshot.clone(),
            newest.snapshot_id.clone(),
            newest.r#final,
        ),
        None => (
            a.point.clone().unwrap_or_default(),
            a.snapshot.clone().unwrap_or_default(),
            false,
        ),
    };
    let req = RoundRequest {
        disk: disk.clone(),
        point,
        snapshot,
        site_changes,
        compare: a.compare,
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
    let whole = if a.whole_disk_sha256 {
        let w = pilotlight_failback::whole_disk_sha256(&ebs, &target, &req.snapshot).await?;
        if !a.json {
            println!(
                "{disk}: whole-disk SHA-256 {} the snapshot's: {} (target) {} {} ({})",
                if w.equal() { "equals" } else { "DIFFERS FROM" },
                w.target,
                if w.equal() { "=" } else { "!=" },
                w.snapshot,
                req.snapshot
            );
        }
        Some(w)
    } else {
        None
    };
    let whole_ok = whole.as_ref().is_none_or(|w| w.equal());
    if let Some((store, prefix, doc, _)) = &from_run {
        // The target equals req.snapshot now (apply returns only then): say so, with
        // whether every written block was read back and compared.
        let so_far = pilotlight_failback::state::load(&pilotlight_failback::state::path(
            &shared.state_dir,
            &disk,
        ))
        .ok()
        .flatten();
        let written: (u64, u64, f64) = rounds.iter().fold((0, 0, 0.0), |t, r| {
            (
                t.0 + r.counters.blocks_written,
                t.1 + r.counters.bytes_written,
                t.2 + r.seconds(),
            )
        });
        let round = RoundDoc {
            version: FAILBACK_VERSION,
            run_id: doc.run_id.clone(),
            disk: disk.clone(),
            snapshot_id: req.snapshot.clone(),
            r#final: is_final,
            verified: !a.no_verify && whole_ok,
            blocks_written: written.0,
            bytes_written: written.1,
            target: a.target.clone(),
            drill: drill_target(&shared.state_dir, &disk, &a.target),
            seconds: written.2,
            finished_at: chrono::Utc::now(),
            disk_bytes: Some(target.size()),
            rounds: so_far.as_ref().map(|st| st.rounds.len() as u64),
            total_bytes_written: so_far.as_ref().map(|st| {
                let t = st.total();
                t.bytes_written + t.bytes_zeroed
            }),
            whole_disk_sha256: whole
                .as_ref()
                .filter(|w| w.equal())
                .map(|w| w.target.clone()),
        };
        let key = pilotlight_store::failback::write_round(store, prefix, &round)
            .await
            .context("the round is done, but reporting it to the bucket failed (run failback again to report it)")?;
        tracing::info!(key, "round reported for `pilotlight-dr failback status`");
        if is_final && !a.json {
            println!(
                "{disk}: final round done{}: `pilotlight-dr failback status {}` completes the cutover once every disk reports",
                if round.verified { ", every written block verified" } else { " (NOT verified: --no-verify)" },
                doc.run_id
            );
        }
    }
    if !whole_ok {
        anyhow::bail!(
            "{disk}: the target's whole-disk SHA-256 differs from {}'s although every written block matched: the target holds changes no round knew of (the site wrote after the point without change tracking?); run the round again with a fresh state directory and --compare",
            req.snapshot
        );
    }
    Ok(())
}

/// Where a drill remembers its scratch target: later rounds into it are the drill's too.
fn drill_marker(state_dir: &Path, disk: &DiskId) -> PathBuf {
    pilotlight_failback::state::path(state_dir, disk).with_extension("drill")
}

/// The target is the scratch copy the first round's --drill-from made.
fn drill_target(state_dir: &Path, disk: &DiskId, target: &str) -> bool {
    std::fs::read_to_string(drill_marker(state_dir, disk)).is_ok_and(|t| t == target)
}

/// The DR function's return document of this disk and its newest return snapshot.
async fn returns_of(
    aws: &pilotlight_cloud::Aws,
    bucket: &Option<String>,
    prefix: &str,
    disk: &DiskId,
    run: &str,
) -> Result<(SdkS3, Prefix, ReturnDoc, ReturnPoint)> {
    let bucket = bucket.clone().context(
        "--run reads the failback from the bucket: give --bucket (or a --config with bucket)",
    )?;
    let prefix = Prefix::new(prefix).with_context(|| format!("--prefix {prefix:?}"))?;
    let run_id = Name::new(run).with_context(|| format!("--run {run:?} is not a DR run id"))?;
    let store = aws.s3(bucket);
    let doc = match pilotlight_store::failback::read_return(&store, &prefix, disk, &run_id).await {
        Ok(d) => d,
        Err(DocError::Missing { key }) => anyhow::bail!(
            "no return snapshots of {disk} for run {run} ({key}): start the failback (`pilotlight-dr failback start {run}`) and wait for its first set to complete (`pilotlight-dr failback status {run}`); is {disk} a disk of that run?"
        ),
        Err(e) => return Err(e).context(format!("the return snapshots of {disk} for run {run}")),
    };
    let newest = doc.newest().cloned().with_context(|| {
        format!("run {run} offers no completed return snapshot of {disk} yet: wait (`pilotlight-dr failback status {run}`)")
    })?;
    Ok((store, prefix, doc, newest))
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
