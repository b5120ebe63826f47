//! `pilotlight-receiver`: keep sparse raw images up to date from S3 events.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use pilotlight_cloud::ebs::{LockMode, SdkEbs};
use pilotlight_cloud::metrics::SdkMetrics;
use pilotlight_cloud::s3::SdkS3;
use pilotlight_cloud::sqs::SdkSqs;
use pilotlight_cloud::AwsSettings;
use pilotlight_cloud::{MemoryQueue, Queue};
use pilotlight_protocol::points::Tiers;
use pilotlight_protocol::Prefix;
use pilotlight_receiver::engine::{local_status, Engine, EngineConfig};
use pilotlight_receiver::metrics::{metric_data, MetricsConfig, Publisher};
use pilotlight_receiver::points::{PointWriter, PointsConfig};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "pilotlight-receiver",
    version,
    about = "Apply pilotlight generations from S3 into sparse raw images"
)]
struct Cli {
    #[command(flatten)]
    log: pilotlight_cli::LogArgs,
    /// The settings every subcommand shares: before or after the subcommand (`global`).
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run until SIGTERM: SQS events in, generations applied.
    Run,
    /// List the bucket once, apply every generation that can be, and exit.
    Sync,
    /// Per disk: applied generation, snapshot time, lag, pending generations, image.
    Status {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Do not list the bucket for pending generations.
        #[arg(long)]
        local: bool,
    },
    /// Every VM recovery point (a snapshot time every disk of the VM has a point for),
    /// found by the points' snapshot tags.
    Points {
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        vm: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// Each setting: a flag, else its environment variable, else the TOML config file (same
/// names, kebab-case), else its default.
#[derive(Args, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Settings {
    /// TOML config file with any of these settings.
    #[arg(long, global = true, env = "PILOTLIGHT_RECEIVER_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// SQS queue URL receiving the bucket's ObjectCreated events.
    #[arg(long, global = true, env = "PILOTLIGHT_QUEUE_URL")]
    queue_url: Option<String>,
    /// S3 bucket.
    #[arg(long, global = true, env = "PILOTLIGHT_BUCKET")]
    bucket: Option<String>,
    /// Key prefix [default: pilotlight].
    #[arg(long, global = true, env = "PILOTLIGHT_PREFIX")]
    prefix: Option<String>,
    /// Endpoint for S3 and SQS (the local emulator); default: AWS.
    #[arg(long, global = true, env = "PILOTLIGHT_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// AWS region [default: the AWS default chain, else us-east-1].
    #[arg(long, global = true, env = "AWS_REGION")]
    region: Option<String>,
    /// Attempts per S3 or SQS request, the first included (standard retry with
    /// exponential back-off); after them a manifest is held and read again later [default: 6].
    #[arg(long, global = true)]
    max_attempts: Option<u32>,
    /// Where images live: IMAGE_DIR/site/vm/disk.raw [default: /var/lib/pilotlight/images].
    #[arg(long, global = true, env = "PILOTLIGHT_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
    /// Receiver state [default: /var/lib/pilotlight/receiver].
    #[arg(long, global = true, env = "PILOTLIGHT_RECEIVER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Objects fetched and written at once per disk [default: 8].
    #[arg(long, global = true)]
    concurrency: Option<usize>,
    /// MiB of object data held in memory at once, fetches and prefetches together; an
    /// object larger than this is fetched alone [default: 32].
    #[arg(long, global = true)]
    in_flight_mib: Option<u64>,
    /// SQS long-poll wait in seconds, 0 to 20 [default: 20].
    #[arg(long, global = true)]
    wait_seconds: Option<u64>,
    /// Seconds messages stay invisible while their generation waits or applies [default: 300].
    #[arg(long, global = true)]
    visibility_timeout: Option<i32>,
    /// List the bucket this often for manifests whose events were lost, or "off" [default: 5m].
    #[arg(long, global = true)]
    reconcile_every: Option<String>,
    /// Fetch, decode and hash data objects as their events arrive, so that applying a
    /// generation once its manifest arrives is a local copy; `--prefetch=false` fetches
    /// everything at apply time instead [default: true].
    #[arg(long, global = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    prefetch: Option<bool>,
    /// Write a recovery point (an EBS snapshot via the EBS direct APIs) after each applied
    /// generation; `--points=false` keeps the raw images only [default: true].
    #[arg(long, global = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    points: Option<bool>,
    /// The stack's name: tagged on every point; pruning touches only this stack's points
    /// [default: pilotlight].
    #[arg(long, global = true, env = "PILOTLIGHT_STACK")]
    stack: Option<String>,
    /// KMS key (ARN) to encrypt points with; default: EBS's account default.
    #[arg(long, global = true, env = "PILOTLIGHT_POINTS_KMS_KEY")]
    points_kms_key: Option<String>,
    /// Keep every point this long [default: 24h].
    #[arg(long, global = true)]
    keep_all: Option<String>,
    /// Then the first point of each hour up to this age [default: 7d].
    #[arg(long, global = true)]
    keep_hourly: Option<String>,
    /// Then the first point of each day up to this age; older ones are deleted
    /// (except the newest and those a DR run holds) [default: 30d].
    #[arg(long, global = true)]
    keep_daily: Option<String>,
    /// PutSnapshotBlock requests in flight per disk [default: 16].
    #[arg(long, global = true)]
    point_concurrency: Option<usize>,
    /// 512 KiB blocks held in memory by all disks' points at once [default: 64].
    #[arg(long, global = true)]
    point_blocks_in_flight: Option<usize>,
    /// A generation's point has its blocks copied out of the image when applied (so the
    /// image takes the next generation while the point is written) as long as the
    /// disk's staged points hold at most this many MiB; other points (full ones, huge
    /// changes, a long queue) hold the disk's next generation until written. 0: never
    /// staged [default: 1024].
    #[arg(long, global = true)]
    point_stage_max_mib: Option<u64>,
    /// 512 KiB blocks in flight for all points while replication has work at hand
    /// (messages coming in, generations ready): replication comes first [default: 1].
    #[arg(long, global = true)]
    point_blocks_while_replicating: Option<usize>,
    /// Points written at once by all disks (each a pending snapshot: the account's
    /// quota of 100 pending snapshots is shared with its other snapshot tools)
    /// [default: 32].
    #[arg(long, global = true)]
    points_at_once: Option<usize>,
    /// How often `run` applies the retention tiers and deletes what a crash left
    /// unfinished, for every disk in one listing of the stack's points [default: 10m].
    #[arg(long, global = true)]
    prune_every: Option<String>,
    /// Lock each day's kept point against deletion until it leaves the daily tier (EBS
    /// Snapshot Lock): governance, compliance or off [default: off].
    #[arg(long, global = true)]
    point_lock: Option<String>,
    /// Publish CloudWatch metrics (namespace Pilotlight: per disk replication lag,
    /// pending generations, bytes applied, apply time, point lag and failures; a
    /// heartbeat and the largest lag per receiver); `--metrics=false` publishes none
    /// [default: true].
    #[arg(long, global = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    metrics: Option<bool>,
    /// How often metrics are published [default: 1m].
    #[arg(long, global = true)]
    metrics_every: Option<String>,
    /// Endpoint for CloudWatch alone (a VPC endpoint, say) [default: --endpoint-url].
    #[arg(long, global = true, env = "PILOTLIGHT_METRICS_ENDPOINT_URL")]
    metrics_endpoint_url: Option<String>,
    /// The recovery point objective: `status` marks a disk whose lag exceeds it STALLED
    /// (the stack's RPO alarm uses the same target) [default: 30m].
    #[arg(long, global = true)]
    rpo_target: Option<String>,
}

impl Settings {
    fn with_file(self) -> Result<Self> {
        let file = self.config.clone();
        pilotlight_cli::with_config_file(self, file.as_deref())
    }

    fn engine_config(&self) -> Result<EngineConfig> {
        let prefix_s = self.prefix.as_deref().unwrap_or("pilotlight");
        let reconcile_every = match self.reconcile_every.as_deref().unwrap_or("5m") {
            "off" | "never" => None,
            s => Some(self.duration("reconcile-every", Some(s), "5m")?),
        };
        let concurrency = self.concurrency.unwrap_or(8);
        if concurrency == 0 || concurrency > 64 {
            bail!("--concurrency {concurrency} must be 1 to 64");
        }
        let in_flight = match self.in_flight_mib {
            None => pilotlight_receiver::budget::DEFAULT_IN_FLIGHT,
            Some(m @ 1..=4096) => m << 20,
            Some(m) => bail!("--in-flight-mib {m} must be 1 to 4096"),
        };
        Ok(EngineConfig {
            bucket: self
                .bucket
                .clone()
                .context("--bucket is required (or PILOTLIGHT_BUCKET)")?,
            prefix: Prefix::new(prefix_s).with_context(|| format!("--prefix {prefix_s:?}"))?,
            image_dir: self.image_dir(),
            state_dir: self.state_dir(),
            concurrency,
            wait: Duration::from_secs(self.wait_seconds.unwrap_or(20).min(20)),
            visibility_secs: self.visibility_timeout.unwrap_or(300).clamp(10, 43_200),
            reconcile_every,
            prefetch: self.prefetch.unwrap_or(true),
            retry_base: Duration::from_secs(1),
            budget: pilotlight_receiver::budget::Budget::new(in_flight),
        })
    }

    /// The recovery points settings, or none when they are off.
    fn points_config(&self) -> Result<Option<PointsConfig>> {
        if !self.points.unwrap_or(true) {
            return Ok(None);
        }
        let dur = |name: &str, v: &Option<String>, default: &str| -> Result<chrono::Duration> {
            Ok(chrono::Duration::from_std(self.duration(
                name,
                v.as_deref(),
                default,
            )?)?)
        };
        let tiers = Tiers {
            keep_all: dur("keep-all", &self.keep_all, "24h")?,
            keep_hourly: dur("keep-hourly", &self.keep_hourly, "7d")?,
            keep_daily: dur("keep-daily", &self.keep_daily, "30d")?,
        };
        if !(tiers.keep_all <= tiers.keep_hourly && tiers.keep_hourly <= tiers.keep_daily) {
            bail!("--keep-all <= --keep-hourly <= --keep-daily, each an age (e.g. 24h, 7d, 30d)");
        }
        let concurrency = self.point_concurrency.unwrap_or(16);
        if concurrency == 0 || concurrency > 64 {
            bail!("--point-concurrency {concurrency} must be 1 to 64");
        }
        let mut cfg = PointsConfig::new(self.stack.clone().unwrap_or_else(|| "pilotlight".into()));
        // An empty key (the stack without one) is no key.
        cfg.kms_key_arn = self.points_kms_key.clone().filter(|k| !k.is_empty());
        cfg.tiers = tiers;
        cfg.concurrency = concurrency;
        cfg.blocks_in_flight = match self.point_blocks_in_flight.unwrap_or(64) {
            n @ 1..=1024 => n,
            n => bail!("--point-blocks-in-flight {n} must be 1 to 1024"),
        };
        cfg.stage_max_bytes = match self.point_stage_max_mib.unwrap_or(1024) {
            n @ 0..=1_048_576 => n << 20,
            n => bail!("--point-stage-max-mib {n} must be 0 to 1048576"),
        };
        cfg.blocks_while_replicating = match self.point_blocks_while_replicating.unwrap_or(1) {
            n @ 1..=1024 => n,
            n => bail!("--point-blocks-while-replicating {n} must be 1 to 1024"),
        };
        cfg.points_at_once = match self.points_at_once.unwrap_or(32) {
            n @ 1..=100 => n,
            n => bail!(
                "--points-at-once {n} must be 1 to 100 (EBS: 100 pending snapshots per account)"
            ),
        };
        cfg.prune_every = self.duration("prune-every", self.prune_every.as_deref(), "10m")?;
        if cfg.prune_every < Duration::from_secs(1) {
            bail!("--prune-every must be at least 1s");
        }
        cfg.lock = LockMode::from_setting(self.point_lock.as_deref().unwrap_or("off"))
            .map_err(|e| anyhow::anyhow!("--point-lock {e}"))?;
        Ok(Some(cfg))
    }

    async fn aws(&self) -> pilotlight_cloud::Aws {
        // Credentials come only from the AWS default chain (instance profile on EC2).
        AwsSettings::new(self.region.clone(), self.endpoint_url.clone())
            .max_attempts(self.max_attempts.unwrap_or(6))
            .load()
            .await
    }

    /// The engine of `run`: the bucket, the queue and EBS through the SDK.
    fn engine(
        &self,
        aws: &pilotlight_cloud::Aws,
        cfg: EngineConfig,
        queue_url: String,
    ) -> Result<Engine<SdkS3, SdkSqs, SdkEbs>> {
        let bucket = aws.s3(cfg.bucket.clone());
        self.with_points(Engine::new(cfg, bucket, aws.sqs(queue_url)), aws)
    }

    /// The engine of `sync` and `status`, which list the bucket and read no queue: an
    /// empty in-memory queue stands in for it, so nothing is ever sent to SQS.
    async fn listing_engine(
        &self,
        cfg: EngineConfig,
    ) -> Result<Engine<SdkS3, Arc<MemoryQueue>, SdkEbs>> {
        let aws = self.aws().await;
        let bucket = aws.s3(cfg.bucket.clone());
        self.with_points(
            Engine::new(cfg, bucket, Arc::new(MemoryQueue::default())),
            &aws,
        )
    }

    fn with_points<Q: Queue + Clone + 'static>(
        &self,
        engine: Engine<SdkS3, Q>,
        aws: &pilotlight_cloud::Aws,
    ) -> Result<Engine<SdkS3, Q, SdkEbs>> {
        Ok(match self.points_config()? {
            Some(pc) => engine.with_points(PointWriter::new(aws.ebs(), pc)),
            None => engine.without_points(),
        })
    }

    fn duration(&self, what: &str, v: Option<&str>, default: &str) -> Result<Duration> {
        let s = v.unwrap_or(default);
        humantime::parse_duration(s)
            .with_context(|| format!("--{what} {s:?} is not a duration (e.g. 1m, 30m, 24h, 7d)"))
    }

    fn rpo_target(&self) -> Result<Duration> {
        self.duration("rpo-target", self.rpo_target.as_deref(), "30m")
    }

    /// The metrics publisher of `run`, or none when metrics are off.
    fn metrics(&self, aws: &pilotlight_cloud::Aws) -> Result<Option<Publisher<SdkMetrics>>> {
        if !self.metrics.unwrap_or(true) {
            return Ok(None);
        }
        let mut cfg = MetricsConfig::new(self.stack.as_deref().unwrap_or("pilotlight"));
        cfg.interval = self.duration("metrics-every", self.metrics_every.as_deref(), "1m")?;
        Ok(Some(Publisher::new(
            Arc::new(aws.metrics(self.metrics_endpoint_url.as_deref())),
            cfg,
        )))
    }

    fn image_dir(&self) -> PathBuf {
        self.image_dir
            .clone()
            .unwrap_or_else(|| "/var/lib/pilotlight/images".into())
    }

    fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| "/var/lib/pilotlight/receiver".into())
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run => {
            let s = cli.settings.with_file()?;
            let cfg = s.engine_config()?;
            let queue_url = s
                .queue_url
                .clone()
                .context("--queue-url is required (or PILOTLIGHT_QUEUE_URL)")?;
            // One SDK configuration for the bucket, the queue, EBS and CloudWatch.
            let aws = s.aws().await;
            let mut engine = s.engine(&aws, cfg, queue_url)?;
            let mut metrics = s.metrics(&aws)?;
            engine.load_known_disks();
            tracing::info!("receiver started");
            let stop = pilotlight_cli::shutdown_signal();
            tokio::pin!(stop);
            loop {
                // A stop abandons the current step: nothing is marked applied that is not
                // fsynced, and messages not deleted come back.
                tokio::select! {
                    _ = &mut stop => { tracing::info!("stop signal: exiting; state says where to resume"); return Ok(()) }
                    r = engine.step() => {
                        if let Err(e) = r {
                            tracing::error!("{e}; retrying in 5 s");
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                    }
                }
                // Never waits for CloudWatch: a put runs on its own.
                if let Some(m) = metrics.as_mut() {
                    if m.due() {
                        let data = metric_data(
                            &m.cfg.stack,
                            &engine.status(),
                            &engine.take_applied(),
                            std::time::SystemTime::now(),
                        );
                        m.queue(data).await;
                    } else {
                        m.pump().await;
                    }
                }
            }
        }
        Command::Sync => {
            let s = cli.settings.with_file()?;
            let cfg = s.engine_config()?;
            let mut engine = s.listing_engine(cfg).await?;
            engine.load_known_disks();
            let n = engine.sync_once().await;
            for d in engine.status() {
                println!("{}", serde_json::to_string(&d)?);
            }
            tracing::info!(applied = n, "sync done");
            let stuck: Vec<_> = engine
                .status()
                .into_iter()
                .filter(|d| !d.pending.is_empty())
                .map(|d| format!("{} {:?}", d.disk, d.pending))
                .collect();
            if !stuck.is_empty() {
                bail!(
                    "generations not applied (parent missing or apply failed; see the log): {}",
                    stuck.join(", ")
                );
            }
            Ok(())
        }
        Command::Status { json, local } => {
            let s = cli.settings.with_file()?;
            let rpo = s.rpo_target()?;
            // Without a bucket (or with --local), status shows the local state only and
            // makes no AWS call.
            let st = if !local && s.bucket.is_some() {
                let mut cfg = s.engine_config()?;
                cfg.reconcile_every = None;
                let mut engine = s.listing_engine(cfg).await?;
                engine.load_known_disks();
                // A bucket that cannot be listed is an error, never an empty status.
                engine
                    .reconcile()
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot read the bucket: {e}"))?;
                engine.status()
            } else {
                local_status(&s.image_dir(), &s.state_dir())
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else if st.is_empty() {
                println!("no disks yet");
            } else {
                for d in st {
                    // DRS's word for a disk whose replication stopped keeping up.
                    let stalled = d
                        .lag_seconds
                        .is_some_and(|l| pilotlight_cli::points::stalled(l, rpo));
                    println!(
                        "{}{}: applied {} (snapshot {}, lag {}), pending {:?}, image {} ({} of {} bytes allocated)",
                        d.disk,
                        if stalled {
                            format!(" STALLED (lag over the RPO target {})", humantime::format_duration(rpo))
                        } else {
                            String::new()
                        },
                        d.applied.map_or("none".into(), |g| g.to_string()),
                        d.snapshot_time.map_or("-".into(), |t| t.to_rfc3339()),
                        d.lag_seconds.map_or("-".into(), |l| humantime::format_duration(Duration::from_secs(l.max(0) as u64)).to_string()),
                        d.pending,
                        d.image,
                        d.allocated_bytes,
                        d.disk_size
                    );
                    if d.newest_point.is_some() || d.point_due.is_some() || d.points_failed > 0 {
                        println!(
                            "  recovery point: newest {}, due {}, given up {}{}",
                            d.newest_point
                                .as_ref()
                                .map_or("-".into(), |(s, g)| format!("{s} (generation {g})")),
                            d.point_due.map_or("-".into(), |g| g.to_string()),
                            d.points_failed,
                            d.point_error
                                .as_ref()
                                .map_or(String::new(), |e| format!(" (last: {e})"))
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Points { site, vm, json } => {
            let s = cli.settings.with_file()?;
            let ebs = s.aws().await.ebs();
            let points =
                pilotlight_store::points::list(&ebs, site.as_deref(), vm.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&points)?);
            } else {
                print!(
                    "{}",
                    pilotlight_cli::points::render(&points, chrono::Utc::now())
                );
            }
            Ok(())
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    pilotlight_cli::run_main("pilotlight-receiver", cli.log.log_format, run(cli))
}
