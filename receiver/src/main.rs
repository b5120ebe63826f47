//! `pilotlight-receiver`: keep sparse raw images up to date from S3 events.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use pilotlight_cloud::s3::SdkS3;
use pilotlight_cloud::sqs::SqsQueue;
use pilotlight_cloud::AwsSettings;
use pilotlight_cloud::MemoryQueue;
use pilotlight_protocol::Prefix;
use pilotlight_receiver::engine::{local_status, Engine, EngineConfig};
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run until SIGTERM: SQS events in, generations applied.
    Run(Settings),
    /// List the bucket once, apply every generation that can be, and exit.
    Sync(Settings),
    /// Per disk: applied generation, snapshot time, lag, pending generations, image.
    Status {
        #[command(flatten)]
        settings: Settings,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Do not list the bucket for pending generations.
        #[arg(long)]
        local: bool,
    },
}

/// Each setting: a flag, else its environment variable, else the TOML config file (same
/// names, kebab-case), else its default.
#[derive(Args, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Settings {
    /// TOML config file with any of these settings.
    #[arg(long, env = "PILOTLIGHT_RECEIVER_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// SQS queue URL receiving the bucket's ObjectCreated events.
    #[arg(long, env = "PILOTLIGHT_QUEUE_URL")]
    queue_url: Option<String>,
    /// S3 bucket.
    #[arg(long, env = "PILOTLIGHT_BUCKET")]
    bucket: Option<String>,
    /// Key prefix [default: pilotlight].
    #[arg(long, env = "PILOTLIGHT_PREFIX")]
    prefix: Option<String>,
    /// Endpoint for S3 and SQS (the local emulator); default: AWS.
    #[arg(long, env = "PILOTLIGHT_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// AWS region [default: the AWS default chain, else us-east-1].
    #[arg(long, env = "AWS_REGION")]
    region: Option<String>,
    /// Attempts per S3 or SQS request, the first included (standard retry with
    /// exponential back-off); after them a manifest is held and read again later [default: 6].
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Where images live: IMAGE_DIR/site/vm/disk.raw [default: /var/lib/pilotlight/images].
    #[arg(long, env = "PILOTLIGHT_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
    /// Receiver state [default: /var/lib/pilotlight/receiver].
    #[arg(long, env = "PILOTLIGHT_RECEIVER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Objects fetched and written at once per disk [default: 8].
    #[arg(long)]
    concurrency: Option<usize>,
    /// SQS long-poll wait in seconds, 0 to 20 [default: 20].
    #[arg(long)]
    wait_seconds: Option<u64>,
    /// Seconds messages stay invisible while their generation waits or applies [default: 300].
    #[arg(long)]
    visibility_timeout: Option<i32>,
    /// List the bucket this often for manifests whose events were lost, or "off" [default: 5m].
    #[arg(long)]
    reconcile_every: Option<String>,
    /// Fetch, decode and hash data objects as their events arrive, so that applying a
    /// generation once its manifest arrives is a local copy; `--prefetch=false` fetches
    /// everything at apply time instead [default: true].
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    prefetch: Option<bool>,
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
            s => Some(humantime::parse_duration(s).with_context(|| {
                format!("--reconcile-every {s:?} is not a duration (e.g. 5m) or off")
            })?),
        };
        let concurrency = self.concurrency.unwrap_or(8);
        if concurrency == 0 || concurrency > 64 {
            bail!("--concurrency {concurrency} must be 1 to 64");
        }
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
        })
    }

    async fn aws(&self) -> pilotlight_cloud::Aws {
        // Credentials come only from the AWS default chain (instance profile on EC2).
        AwsSettings::new(self.region.clone(), self.endpoint_url.clone())
            .max_attempts(self.max_attempts.unwrap_or(6))
            .load()
            .await
    }

    /// The engine of `run`: the bucket and the queue through the SDK.
    async fn engine(&self, cfg: EngineConfig, queue_url: String) -> Engine<SdkS3, SqsQueue> {
        let aws = self.aws().await;
        let bucket = aws.s3(cfg.bucket.clone());
        Engine::new(cfg, bucket, aws.sqs(queue_url))
    }

    /// The engine of `sync` and `status`, which list the bucket and read no queue: an
    /// empty in-memory queue stands in for it, so nothing is ever sent to SQS.
    async fn listing_engine(&self, cfg: EngineConfig) -> Engine<SdkS3, Arc<MemoryQueue>> {
        let bucket = self.aws().await.s3(cfg.bucket.clone());
        Engine::new(cfg, bucket, Arc::new(MemoryQueue::default()))
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
        Command::Run(s) => {
            let s = s.with_file()?;
            let cfg = s.engine_config()?;
            let queue_url = s
                .queue_url
                .clone()
                .context("--queue-url is required (or PILOTLIGHT_QUEUE_URL)")?;
            let mut engine = s.engine(cfg, queue_url).await;
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
            }
        }
        Command::Sync(s) => {
            let s = s.with_file()?;
            let cfg = s.engine_config()?;
            let mut engine = s.listing_engine(cfg).await;
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
        Command::Status {
            settings,
            json,
            local,
        } => {
            let s = settings.with_file()?;
            // Without a bucket (or with --local), status shows the local state only and
            // makes no AWS call.
            let st = if !local && s.bucket.is_some() {
                let mut cfg = s.engine_config()?;
                cfg.reconcile_every = None;
                let mut engine = s.listing_engine(cfg).await;
                engine.load_known_disks();
                engine.reconcile().await;
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
                    println!(
                        "{}: applied {} (snapshot {}, lag {}), pending {:?}, image {} ({} of {} bytes allocated)",
                        d.disk,
                        d.applied.map_or("none".into(), |g| g.to_string()),
                        d.snapshot_time.map_or("-".into(), |t| t.to_rfc3339()),
                        d.lag_seconds.map_or("-".into(), |l| humantime::format_duration(Duration::from_secs(l.max(0) as u64)).to_string()),
                        d.pending,
                        d.image,
                        d.allocated_bytes,
                        d.disk_size
                    );
                }
            }
            Ok(())
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    pilotlight_cli::run_main("pilotlight-receiver", cli.log.log_format, run(cli))
}
