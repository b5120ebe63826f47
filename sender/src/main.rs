//! `pilotlight-sender`: ship one disk's changed extents to S3, once or on a schedule.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use pilotlight_cloud::config::LazyS3;
use pilotlight_cloud::{AwsSettings, MemoryStore};
use pilotlight_protocol::{
    Consistency, DiskId, Prefix, DEFAULT_MAX_OBJECT, MAX_OBJECT_LIMIT, SPLIT_ALIGN,
};
use pilotlight_sender::source::SourceSpec;
use pilotlight_sender::{
    send_generation, BarProgress, NoProgress, ProgressFactory, Target, UploadSettings,
};
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

mod cmd_failback;
mod cmd_resume;

#[derive(Parser, Debug)]
#[command(
    name = "pilotlight-sender",
    version,
    about = "Ship changed disk extents to S3 as pilotlight generations"
)]
struct Cli {
    #[command(flatten)]
    log: pilotlight_cli::LogArgs,
    /// The settings every subcommand shares: before or after the subcommand (`global`).
    #[command(flatten)]
    shared: SharedArgs,
    #[command(subcommand)]
    command: Command,
}

/// Where the bucket and the local state are: the same for every subcommand, so accepted
/// before or after it. Each also has a key of the same name in the config file.
#[derive(Args, Debug, Default)]
struct SharedArgs {
    /// TOML config file with any of the settings of `send`.
    #[arg(long, global = true, env = "PILOTLIGHT_CONFIG")]
    config: Option<PathBuf>,
    /// S3 bucket.
    #[arg(long, global = true, env = "PILOTLIGHT_BUCKET")]
    bucket: Option<String>,
    /// Key prefix in the bucket [default: pilotlight].
    #[arg(long, global = true, env = "PILOTLIGHT_PREFIX")]
    prefix: Option<String>,
    /// S3-compatible endpoint (the local emulator, MinIO, ...); default: AWS.
    #[arg(long, global = true, env = "PILOTLIGHT_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// AWS region [default: the AWS default chain, else us-east-1].
    #[arg(long, global = true, env = "AWS_REGION")]
    region: Option<String>,
    /// Attempts per S3 request, with exponential backoff [default: 6].
    #[arg(long, global = true)]
    max_attempts: Option<u32>,
    /// Local state directory [default: /var/lib/pilotlight/sender].
    #[arg(long, global = true, env = "PILOTLIGHT_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

impl SharedArgs {
    /// The shared settings given by flag or environment, into the settings of a run (where
    /// the config file then fills what is still unset).
    fn into_send(self, mut a: SendArgs) -> SendArgs {
        a.config = self.config;
        a.bucket = self.bucket;
        a.prefix = self.prefix;
        a.endpoint_url = self.endpoint_url;
        a.region = self.region;
        a.max_attempts = self.max_attempts;
        a.state_dir = self.state_dir;
        a
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send one generation (or one every --every).
    Send(Box<SendArgs>),
    /// Protect a VMware VM: snapshot, QueryChangedDiskAreas, read through nbdkit vddk,
    /// one generation per disk, snapshot removed on every exit path.
    Vsphere(Box<VsphereArgs>),
    /// Show the local state of a disk.
    Status(StatusArgs),
    /// After a real recovery: write what the recovered instance changed (a return
    /// snapshot, EBS direct APIs) back into the site's disk, one round per run.
    Failback(Box<cmd_failback::FailbackArgs>),
    /// After failback's cutover: one incremental generation that brings the replica to
    /// the site's disk (what the instance and the site changed since the point, and the
    /// generations sent after it), read from --disk or --nbd; protection goes on from it.
    Resume(Box<cmd_resume::ResumeArgs>),
}

/// Settings of `vsphere` (plus the S3 and tuning settings of `send`; its --source,
/// --disk and --disk-id are decided per disk here).
#[derive(Args, Debug)]
struct VsphereArgs {
    /// vCenter or ESXi SDK URL, e.g. https://vcenter.example.com/sdk.
    #[arg(long, env = "PILOTLIGHT_VSPHERE_URL")]
    server: String,
    #[arg(long, env = "PILOTLIGHT_VSPHERE_USER")]
    user: String,
    /// File holding the password (else PILOTLIGHT_VSPHERE_PASSWORD).
    #[arg(long, env = "PILOTLIGHT_VSPHERE_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// SHA-256 (or SHA-1) thumbprint of the server certificate (self-signed vCenters).
    #[arg(long, env = "PILOTLIGHT_VSPHERE_THUMBPRINT")]
    thumbprint: Option<String>,
    /// Accept any server certificate (labs only).
    #[arg(long)]
    insecure: bool,
    /// The VM: its name or MoRef id (vm-42).
    #[arg(long)]
    vm: String,
    /// Site part of the disks' ids (SITE/VM/disk-KEY).
    #[arg(long)]
    site: String,
    /// VM part of the disks' ids [default: the VM's name].
    #[arg(long)]
    vm_id: Option<String>,
    /// Turn changed-block tracking on if it is off.
    #[arg(long)]
    enable_cbt: bool,
    /// Quiesce the guest (VMware Tools) for application consistency; falls back to a
    /// crash-consistent snapshot if quiescing fails.
    #[arg(long)]
    quiesce: bool,
    /// The data path command; placeholders {socket} {server} {user} {password_file}
    /// {thumbprint} {libdir} {vm} {snapshot} {file} {key}.
    #[arg(long, default_value = pilotlight_sender::vsphere::VDDK_COMMAND)]
    nbd_command: String,
    /// VDDK's directory (the vddk plugin's libdir).
    #[arg(long, default_value = "/opt/vmware-vix-disklib-distrib")]
    vddk_libdir: String,
    /// Thumbprint for VDDK [default: --thumbprint].
    #[arg(long)]
    vddk_thumbprint: Option<String>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    report_json: bool,
    #[command(flatten)]
    send: SendArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum SourceKind {
    /// A changed-extent list (--extents) plus the disk (--disk).
    ExtentList,
    /// All allocated extents of --disk (a sparse file or block device).
    Full,
    /// A directory of offset-named files (--spool) plus --disk-size.
    Spool,
    /// An NBD export (--nbd URI): with --bitmap NAME the qemu dirty bitmap's areas,
    /// else every allocated byte.
    Nbd,
}

#[derive(Debug, Clone, Copy, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Compression {
    Zstd,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum ConsistencyArg {
    Crash,
    Application,
}

/// Settings of `send`. Each comes from a flag, else its environment variable, else the
/// TOML config file (same names, kebab-case), else its default. The `#[arg(skip)]` ones
/// are the shared settings, given as flags through `SharedArgs` (before or after the
/// subcommand) and read here from the config file.
#[derive(Args, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct SendArgs {
    #[arg(skip)]
    #[serde(skip)]
    config: Option<PathBuf>,
    #[arg(skip)]
    bucket: Option<String>,
    #[arg(skip)]
    prefix: Option<String>,
    #[arg(skip)]
    endpoint_url: Option<String>,
    #[arg(skip)]
    region: Option<String>,
    /// The disk: site/vm/disk.
    #[arg(long, env = "PILOTLIGHT_DISK_ID")]
    disk_id: Option<String>,
    /// Where the changes come from.
    #[arg(long, value_enum)]
    source: Option<SourceKind>,
    /// Disk file or block device (extent-list, full). Opened read-only.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Changed-extent list: PowerCLI "offset length" text or JSON (extent-list).
    #[arg(long)]
    extents: Option<PathBuf>,
    /// Directory of files named by decimal byte offset (spool).
    #[arg(long)]
    spool: Option<PathBuf>,
    /// Disk size in bytes, e.g. 40GiB (spool).
    #[arg(long)]
    disk_size: Option<String>,
    /// NBD export: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (nbd).
    #[arg(long)]
    nbd: Option<String>,
    /// qemu dirty bitmap to read changes from (nbd; qemu-nbd -B NAME); without it, a
    /// full generation of every allocated byte.
    #[arg(long)]
    bitmap: Option<String>,
    /// The source's change id after this run (e.g. the vSphere changeId).
    #[arg(long)]
    change_id: Option<String>,
    /// When the source snapshot was taken (RFC 3339) [default: now].
    #[arg(long)]
    snapshot_time: Option<String>,
    /// crash or application (quiesced) [default: crash].
    #[arg(long, value_enum)]
    consistency: Option<ConsistencyArg>,
    /// Largest data object, a multiple of 512KiB [default: 8MiB].
    #[arg(long)]
    max_object: Option<String>,
    /// zstd or none [default: zstd].
    #[arg(long, value_enum)]
    compression: Option<Compression>,
    /// zstd level [default: 3].
    #[arg(long)]
    zstd_level: Option<i32>,
    /// Send a full generation numbered after the bucket's newest, as a new base (with
    /// --source full): the way back when the state directory was lost or is behind the
    /// bucket, which a normal run refuses.
    #[arg(long)]
    #[serde(default)]
    rebase: bool,
    /// One object per changed range (manifest format v1), for receivers older than
    /// packing; by default scattered ranges are packed into shared objects (v2).
    #[arg(long)]
    #[serde(default)]
    no_pack: bool,
    /// Objects in flight at once [default: 16].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Upload bandwidth limit in bytes per second, e.g. 50MiB.
    #[arg(long)]
    bwlimit: Option<String>,
    #[arg(skip)]
    max_attempts: Option<u32>,
    #[arg(skip)]
    state_dir: Option<PathBuf>,
    /// Read, zero-skip and compress, but upload nothing and keep the state.
    #[arg(long)]
    #[serde(default)]
    dry_run: bool,
    /// Run forever, one generation every DURATION (e.g. 15m).
    #[arg(long)]
    every: Option<String>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    #[serde(default)]
    json: bool,
    /// No progress bar even on a terminal.
    #[arg(long)]
    #[serde(default)]
    no_progress: bool,
}

impl SendArgs {
    /// Fills every setting not given by flag or environment from the config file.
    fn with_file(self) -> Result<Self> {
        let file = self.config.clone();
        pilotlight_cli::with_config_file(self, file.as_deref())
    }
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// The disk: site/vm/disk.
    #[arg(long, env = "PILOTLIGHT_DISK_ID")]
    disk_id: String,
}

const DEFAULT_STATE_DIR: &str = "/var/lib/pilotlight/sender";

fn parse_size(what: &str, s: &str) -> Result<u64> {
    if let Ok(n) = s.trim().parse::<u64>() {
        return Ok(n);
    }
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| anyhow::anyhow!("{what} {s:?} is not a size (e.g. 8MiB, 1048576): {e}"))
}

/// The disk and source from the flags of `send`.
fn resolve_source(a: &SendArgs) -> Result<(DiskId, SourceSpec)> {
    let disk_id = a
        .disk_id
        .as_deref()
        .context("--disk-id site/vm/disk is required")?;
    let disk = DiskId::parse(disk_id).with_context(|| format!("--disk-id {disk_id:?}"))?;
    let source = match a
        .source
        .context("--source extent-list|full|spool|nbd is required")?
    {
        SourceKind::ExtentList => SourceSpec::ExtentList {
            list: a
                .extents
                .clone()
                .context("--source extent-list needs --extents FILE")?,
            disk: a
                .disk
                .clone()
                .context("--source extent-list needs --disk FILE")?,
        },
        SourceKind::Full => SourceSpec::Full {
            disk: a.disk.clone().context("--source full needs --disk FILE")?,
        },
        SourceKind::Nbd => SourceSpec::Nbd {
            uri: a.nbd.clone().context(
                "--source nbd needs --nbd nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH",
            )?,
            bitmap: a.bitmap.clone(),
        },
        SourceKind::Spool => SourceSpec::Spool {
            dir: a
                .spool
                .clone()
                .context("--source spool needs --spool DIR")?,
            disk_size: parse_size(
                "--disk-size",
                a.disk_size
                    .as_deref()
                    .context("--source spool needs --disk-size")?,
            )?,
        },
    };
    Ok((disk, source))
}

struct Resolved {
    upload: UploadSettings,
    /// The disk to send (`send`); `None` where the source decides the disks (vSphere).
    target: Option<Target>,
    bucket: String,
    endpoint_url: Option<String>,
    region: Option<String>,
    max_attempts: u32,
    every: Option<Duration>,
    json: bool,
    progress: bool,
}

/// The run's settings; with `with_target`, also the one disk to send and its source
/// (`send`), which the vSphere source decides for itself.
fn resolve(a: SendArgs, with_target: bool) -> Result<Resolved> {
    let a = a.with_file()?;
    let disk_source = if with_target {
        Some(resolve_source(&a)?)
    } else {
        None
    };
    let prefix_s = a.prefix.as_deref().unwrap_or("pilotlight");
    let prefix = Prefix::new(prefix_s).with_context(|| format!("--prefix {prefix_s:?}"))?;
    let bucket = match a.bucket.clone() {
        Some(b) => b,
        None if a.dry_run => String::new(),
        None => bail!("--bucket is required (or PILOTLIGHT_BUCKET)"),
    };
    let max_object = match &a.max_object {
        Some(s) => parse_size("--max-object", s)?,
        None => DEFAULT_MAX_OBJECT,
    };
    if max_object == 0 || max_object % SPLIT_ALIGN != 0 || max_object > MAX_OBJECT_LIMIT {
        bail!("--max-object {max_object} must be a multiple of 512KiB up to {MAX_OBJECT_LIMIT}");
    }
    let snapshot_time = match &a.snapshot_time {
        Some(s) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .with_context(|| format!("--snapshot-time {s:?} is not RFC 3339"))?
                .with_timezone(&chrono::Utc),
        ),
        None => None,
    };
    let zstd_level = match a.compression.unwrap_or(Compression::Zstd) {
        Compression::Zstd => Some(a.zstd_level.unwrap_or(3)),
        Compression::None => None,
    };
    let bwlimit = a
        .bwlimit
        .as_deref()
        .map(|s| parse_size("--bwlimit", s))
        .transpose()?;
    if bwlimit == Some(0) {
        bail!("--bwlimit must be positive");
    }
    let every = a
        .every
        .as_deref()
        .map(|s| {
            humantime::parse_duration(s)
                .with_context(|| format!("--every {s:?} is not a duration (e.g. 15m)"))
        })
        .transpose()?;
    let concurrency = a.concurrency.unwrap_or(16);
    if concurrency == 0 || concurrency > 256 {
        bail!("--concurrency {concurrency} must be 1 to 256");
    }
    let target = disk_source.map(|(disk, source)| Target {
        disk,
        source,
        // A bitmap names the change set it holds: record it unless told otherwise.
        change_id: a.change_id.clone().or_else(|| {
            matches!(a.source, Some(SourceKind::Nbd))
                .then(|| a.bitmap.as_ref().map(|b| format!("qemu-dirty-bitmap:{b}")))
                .flatten()
        }),
        snapshot_time,
        consistency: match a.consistency.unwrap_or(ConsistencyArg::Crash) {
            ConsistencyArg::Crash => Consistency::Crash,
            ConsistencyArg::Application => Consistency::Application,
        },
    });
    Ok(Resolved {
        upload: UploadSettings {
            prefix,
            max_object,
            zstd_level,
            concurrency,
            bwlimit,
            state_dir: a
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            dry_run: a.dry_run,
            pack: !a.no_pack,
            rebase: a.rebase,
        },
        target,
        bucket,
        endpoint_url: a.endpoint_url.clone(),
        region: a.region.clone(),
        max_attempts: a.max_attempts.unwrap_or(6).max(1),
        every,
        json: a.json,
        progress: !a.no_progress && std::io::stderr().is_terminal(),
    })
}

/// The bucket through the SDK, configured on its first request (credentials from the AWS
/// default chain only: environment, profile, instance role).
fn s3_store(r: &Resolved) -> LazyS3 {
    let settings =
        AwsSettings::new(r.region.clone(), r.endpoint_url.clone()).max_attempts(r.max_attempts);
    LazyS3::new(settings, r.bucket.clone())
}

async fn send_once(r: &Resolved, target: &Target, store: &LazyS3) -> Result<()> {
    let progress: &dyn ProgressFactory = if r.progress {
        &BarProgress
    } else {
        &NoProgress
    };
    let summary = if r.upload.dry_run {
        send_generation(&r.upload, target, &MemoryStore::discarding(), progress).await?
    } else {
        send_generation(&r.upload, target, store, progress).await?
    };
    if r.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{}", summary.line());
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let shared = cli.shared;
    match cli.command {
        Command::Resume(a) => cmd_resume::run(*a, shared).await,
        Command::Failback(a) => {
            let s = shared.into_send(SendArgs::default()).with_file()?;
            let shared = cmd_failback::Shared {
                bucket: s.bucket,
                prefix: s.prefix.unwrap_or_else(|| "pilotlight".into()),
                region: s.region,
                endpoint_url: s.endpoint_url,
                max_attempts: s.max_attempts.unwrap_or(6).max(1),
                state_dir: s
                    .state_dir
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            };
            cmd_failback::run(*a, shared).await
        }
        Command::Status(a) => {
            let disk =
                DiskId::parse(&a.disk_id).with_context(|| format!("--disk-id {:?}", a.disk_id))?;
            let state_dir = shared
                .into_send(SendArgs::default())
                .with_file()?
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
            match pilotlight_sender::state::peek(&state_dir, &disk)? {
                Some(st) => println!("{}", serde_json::to_string_pretty(&st)?),
                None => println!(
                    "{disk}: no state in {} (nothing sent yet)",
                    state_dir.display()
                ),
            }
            cmd_failback::status(&state_dir, &disk)?;
            Ok(())
        }
        Command::Vsphere(v) => {
            let v = *v;
            let password = match &v.password_file {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read --password-file {}", p.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
                None => std::env::var("PILOTLIGHT_VSPHERE_PASSWORD").context(
                    "no password: give --password-file FILE or set PILOTLIGHT_VSPHERE_PASSWORD",
                )?,
            };
            let vm_id = v.vm_id.clone().unwrap_or_else(|| v.vm.clone());
            // Each disk's id is site/vm-id/disk-KEY: check the names now, not mid-run.
            for (what, name) in [("--site", &v.site), ("VM id", &vm_id)] {
                pilotlight_protocol::Name::new(name).with_context(|| {
                    format!("{what} {name:?}: names are [A-Za-z0-9._-]; give --vm-id")
                })?;
            }
            let r = resolve(shared.into_send(v.send), false)?;
            let store = s3_store(&r);
            let run = pilotlight_sender::vsphere::VsphereRun {
                connect: pilotlight_vsphere::ConnectOptions {
                    url: v.server.clone(),
                    user: v.user.clone(),
                    password,
                    thumbprint: v.thumbprint.clone(),
                    insecure: v.insecure,
                    timeout: Duration::from_secs(120),
                },
                vm: v.vm.clone(),
                site: v.site.clone(),
                vm_id,
                enable_cbt: v.enable_cbt,
                quiesce: v.quiesce,
                nbd_command: v.nbd_command.clone(),
                vddk_libdir: v.vddk_libdir.clone(),
                vddk_thumbprint: v
                    .vddk_thumbprint
                    .clone()
                    .or(v.thumbprint.clone())
                    .unwrap_or_default(),
                upload: r.upload.clone(),
            };
            let progress: &dyn ProgressFactory = if r.progress {
                &BarProgress
            } else {
                &NoProgress
            };
            // Listen for signals from now on (a signal during the snapshot task must
            // still lead to its removal), not from the first poll of the copy phase.
            let (signalled, stop) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                pilotlight_cli::shutdown_signal().await;
                let _ = signalled.send(());
            });
            let stop = async move {
                if stop.await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let report = if r.upload.dry_run {
                pilotlight_sender::vsphere::protect_vm(
                    &run,
                    &MemoryStore::discarding(),
                    progress,
                    stop,
                )
                .await?
            } else {
                pilotlight_sender::vsphere::protect_vm(&run, &store, progress, stop).await?
            };
            if v.report_json || r.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                for d in &report.disks {
                    println!(
                        "{} ({}{}): {}",
                        d.disk,
                        if d.full { "full" } else { "changes" },
                        if d.reset { ", after a CBT reset" } else { "" },
                        d.summary.line()
                    );
                }
                println!(
                    "VM {}: snapshot {} ({:?}) removed",
                    report.vm, report.snapshot, report.consistency
                );
            }
            Ok(())
        }
        Command::Send(a) => {
            let r = resolve(shared.into_send(*a), true)?;
            let target = r.target.clone().context("no disk to send")?;
            let store = s3_store(&r);
            let Some(every) = r.every else {
                return send_once(&r, &target, &store).await;
            };
            // Daemon mode: a failed run is logged and retried at the next tick; a stop
            // signal cancels the current run, whose state says where to resume.
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let stop = pilotlight_cli::shutdown_signal();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => { tracing::info!("stop signal: exiting"); return Ok(()) }
                    _ = tick.tick() => {}
                }
                tokio::select! {
                    _ = &mut stop => { tracing::info!("stop signal: run cancelled, it resumes next time"); return Ok(()) }
                    res = send_once(&r, &target, &store) => {
                        if let Err(e) = res { tracing::error!("run failed: {}", pilotlight_cli::error_line(&e)); }
                    }
                }
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    pilotlight_cli::run_main("pilotlight-sender", cli.log.log_format, run(cli))
}
