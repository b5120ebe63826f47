//! The replica function's operator CLI (snapshots mode):
//! - `run`: the function's handler fed from the stack's queues by this process, as
//!   Lambda's SQS event source mapping feeds it on AWS (for the local emulator, the demo,
//!   and a stack whose function cannot be reached); `--until-idle` stops once both queues
//!   stay empty;
//! - `status`: each disk's chain: its newest point, the point being written, errors;
//! - `plan-capacity`: what a number of disks costs in EBS direct requests, pending
//!   snapshots, Lambda concurrency and money, and which limit binds first.

use anyhow::Context;
use clap::{Parser, Subcommand};
use pilotlight_cloud::sqs::Queue;
use pilotlight_cloud::{AwsSettings, ObjectStore};
use pilotlight_protocol::Prefix;
use pilotlight_replica::{capacity, handle_body, Outcome, Replica, ReplicaConfig};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "pilotlight-replica",
    version,
    about = "pilotlight snapshots mode: recovery points written straight from S3 (the replica function's CLI)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[arg(long, global = true, env = "PILOTLIGHT_BUCKET")]
    bucket: Option<String>,
    #[arg(
        long,
        global = true,
        env = "PILOTLIGHT_PREFIX",
        default_value = "pilotlight"
    )]
    prefix: String,
    /// The stack's name (tagged on every point).
    #[arg(
        long,
        global = true,
        env = "PILOTLIGHT_STACK",
        default_value = "pilotlight"
    )]
    stack: String,
    #[arg(long, global = true, env = "PILOTLIGHT_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    #[arg(long, global = true, env = "AWS_REGION")]
    region: Option<String>,
    #[command(flatten)]
    log: pilotlight_cli::LogArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Feed the handler from the queues (the local stand-in for Lambda's event source mapping).
    Run {
        /// The stack's queue (S3 events).
        #[arg(long, env = "PILOTLIGHT_QUEUE_URL")]
        queue_url: String,
        /// The replica function's task queue (shard tasks).
        #[arg(long, env = "PILOTLIGHT_TASK_QUEUE_URL")]
        task_queue_url: String,
        /// Stop once both queues have stayed empty this long (default: run until killed).
        #[arg(long, value_parser = humantime::parse_duration)]
        until_idle: Option<Duration>,
        /// Messages handled at once (Lambda's concurrency).
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Blocks per shard (a generation larger than this is written by several invocations).
        #[arg(long, default_value_t = 2048)]
        shard_blocks: u64,
        /// An export from a point larger than this (MiB) is fanned out over invocations,
        /// a range of this many MiB each.
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(5..))]
        export_range_mib: u64,
        /// Export part size in MiB (S3's smallest is 5; raised for disks past 10 000 parts).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(5..=5120))]
        export_part_mib: u64,
    },
    /// Each disk's chain: newest point, point being written, last error.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Apply retention to the stack's points now (the function's schedule does this).
    Prune {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        retention: Retention,
    },
    /// Sizing: EBS direct request rates, pending snapshots, Lambda concurrency, cost.
    PlanCapacity(capacity::Args),
}

/// The stack's retention settings, under the names its function reads them from, so that
/// a prune run by hand keeps what the schedule keeps (with defaults only, a stack keeping
/// 90 days of daily points would lose the ones from day 30 on).
#[derive(Debug, clap::Args)]
struct Retention {
    /// Every point younger than this is kept (the stack's KeepAllHours).
    #[arg(long, env = "PILOTLIGHT_KEEP_ALL_HOURS", default_value_t = 24, value_parser = clap::value_parser!(i64).range(0..=87_600))]
    keep_all_hours: i64,
    /// Then the first point of each hour (the stack's KeepHourlyDays).
    #[arg(long, env = "PILOTLIGHT_KEEP_HOURLY_DAYS", default_value_t = 7, value_parser = clap::value_parser!(i64).range(0..=3_650))]
    keep_hourly_days: i64,
    /// Then the first point of each UTC day (the stack's KeepDailyDays); older points go.
    #[arg(long, env = "PILOTLIGHT_KEEP_DAILY_DAYS", default_value_t = 30, value_parser = clap::value_parser!(i64).range(0..=3_650))]
    keep_daily_days: i64,
    /// EBS Snapshot Lock for each day's kept point (the stack's PointLock): off,
    /// governance or compliance.
    #[arg(long, env = "PILOTLIGHT_POINT_LOCK", default_value = "off", value_parser = parse_lock)]
    point_lock: PointLock,
}

/// `off`, `governance` or `compliance` (as the function reads `PILOTLIGHT_POINT_LOCK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PointLock(Option<pilotlight_cloud::ebs::LockMode>);

fn parse_lock(s: &str) -> Result<PointLock, String> {
    pilotlight_cloud::ebs::LockMode::from_setting(s).map(PointLock)
}

impl Retention {
    fn tiers(&self) -> pilotlight_protocol::points::Tiers {
        pilotlight_protocol::points::Tiers {
            keep_all: chrono::Duration::hours(self.keep_all_hours),
            keep_hourly: chrono::Duration::days(self.keep_hourly_days),
            keep_daily: chrono::Duration::days(self.keep_daily_days),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    pilotlight_cli::run_main("pilotlight-replica", cli.log.log_format, run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::PlanCapacity(args) = &cli.cmd {
        print!("{}", capacity::report(&capacity::estimate(args)?));
        return Ok(());
    }
    let bucket = cli
        .bucket
        .clone()
        .context("--bucket is required (or PILOTLIGHT_BUCKET)")?;
    let prefix = Prefix::new(&cli.prefix).map_err(|e| anyhow::anyhow!("--prefix: {e}"))?;
    let aws = AwsSettings::new(cli.region.clone(), cli.endpoint_url.clone())
        .load()
        .await;
    match cli.cmd {
        Cmd::Run {
            queue_url,
            task_queue_url,
            until_idle,
            concurrency,
            shard_blocks,
            export_range_mib,
            export_part_mib,
        } => {
            let mut cfg = ReplicaConfig::new(&bucket, prefix, &cli.stack);
            cfg.shard_blocks =
                shard_blocks.clamp(1, pilotlight_protocol::replica::MAX_SHARD_BLOCKS);
            cfg.export_range_bytes = export_range_mib << 20;
            cfg.export_part_bytes = export_part_mib << 20;
            let r = Replica {
                store: aws.s3(&bucket),
                ebs: aws.ebs(),
                tasks: aws.sqs(&task_queue_url),
                cfg,
            };
            let events = aws.sqs(&queue_url);
            feed(&r, &events, until_idle, concurrency.max(1)).await
        }
        Cmd::Status { json } => {
            let store = aws.s3(&bucket);
            let heads = pilotlight_replica::chain::all(&store, &prefix, chrono::Utc::now()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&heads)?);
            } else if heads.is_empty() {
                println!(
                    "no disk has a chain yet (snapshots mode writes one with its first point)"
                );
            } else {
                for h in &heads {
                    println!("{}", pilotlight_replica::chain::describe(h));
                }
            }
            Ok(())
        }
        Cmd::Prune { json, retention } => {
            let mut cfg = ReplicaConfig::new(&bucket, prefix, &cli.stack);
            cfg.tiers = retention.tiers();
            cfg.lock = retention.point_lock.0;
            let r = Replica {
                store: aws.s3(&bucket),
                ebs: aws.ebs(),
                tasks: (),
                cfg,
            };
            let pruned =
                pilotlight_replica::prune::prune(&r, &r.cfg.tiers, chrono::Utc::now()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&pruned)?);
            } else {
                println!(
                    "{} points, {} deleted{}",
                    pruned.points,
                    pruned.deleted.len(),
                    if pruned.failed > 0 {
                        format!(
                            ", {} could not be deleted (tried again next run)",
                            pruned.failed
                        )
                    } else {
                        String::new()
                    }
                );
            }
            Ok(())
        }
        Cmd::PlanCapacity(_) => Ok(()),
    }
}

/// Receives from the task queue first (shards of points already started), then the event
/// queue; handles up to `concurrency` messages at once; deletes what is done. A message
/// not done comes back after its visibility timeout, as with Lambda's batch item failures.
async fn feed<S: ObjectStore, E: pilotlight_cloud::ebs::EbsApi, T: Queue, Q: Queue>(
    r: &Replica<S, E, T>,
    events: &Q,
    until_idle: Option<Duration>,
    concurrency: usize,
) -> anyhow::Result<()> {
    let mut idle_since = tokio::time::Instant::now();
    loop {
        let mut batch = Vec::new();
        let want = concurrency.min(10) as i32;
        for m in r.tasks.receive(want, Duration::ZERO).await? {
            batch.push((true, m));
        }
        if batch.len() < concurrency {
            let want = (concurrency - batch.len()).min(10) as i32;
            let wait = if batch.is_empty() {
                Duration::from_secs(1)
            } else {
                Duration::ZERO
            };
            for m in events.receive(want, wait).await? {
                batch.push((false, m));
            }
        }
        if batch.is_empty() {
            if until_idle.is_some_and(|d| idle_since.elapsed() >= d) {
                return Ok(());
            }
            continue;
        }
        let outcomes = futures::future::join_all(
            batch
                .iter()
                .map(|(_, m)| handle_body(r, &m.body, chrono::Utc::now)),
        )
        .await;
        for ((task, m), out) in batch.iter().zip(outcomes) {
            match &out {
                Outcome::Delete(why) => tracing::info!("done: {why}"),
                Outcome::Retry(why) => tracing::info!("later: {why}"),
                Outcome::Reject(why) => tracing::error!("refused: {why}"),
            }
            if out.is_delete() {
                let q: Vec<String> = vec![m.receipt.clone()];
                if *task {
                    r.tasks.delete_batch(&q).await?;
                } else {
                    events.delete_batch(&q).await?;
                }
            } else if matches!(out, Outcome::Retry(_)) {
                // Back soon (a parent point, a shard in flight), not after the whole
                // visibility timeout.
                let q = if *task { None } else { Some(events) };
                match q {
                    Some(q) => q.change_visibility(&m.receipt, 2).await.ok(),
                    None => r.tasks.change_visibility(&m.receipt, 2).await.ok(),
                };
            }
        }
        idle_since = tokio::time::Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prune_args(args: &[&str]) -> Result<Retention, clap::Error> {
        let mut all = vec!["pilotlight-replica", "prune"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all)?.cmd {
            Cmd::Prune { retention, .. } => Ok(retention),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn prune_keeps_what_the_stack_keeps() {
        // The function's defaults (main.rs), in the absence of settings.
        let d = prune_args(&[]).unwrap();
        let t = d.tiers();
        assert_eq!(t.keep_all, chrono::Duration::hours(24));
        assert_eq!(t.keep_hourly, chrono::Duration::days(7));
        assert_eq!(t.keep_daily, chrono::Duration::days(30));
        assert_eq!(d.point_lock, PointLock(None));
        // A stack's own settings.
        let r = prune_args(&[
            "--keep-daily-days",
            "90",
            "--keep-all-hours",
            "48",
            "--point-lock",
            "governance",
        ])
        .unwrap();
        assert_eq!(r.tiers().keep_daily, chrono::Duration::days(90));
        assert_eq!(r.tiers().keep_all, chrono::Duration::hours(48));
        assert_eq!(
            r.point_lock,
            PointLock(Some(pilotlight_cloud::ebs::LockMode::Governance))
        );
        // Nonsense is refused, not read as a default.
        for bad in [
            &["--keep-daily-days", "-1"][..],
            &["--point-lock", "forever"][..],
            &["--keep-hourly-days", "x"][..],
        ] {
            assert!(prune_args(bad).is_err(), "{bad:?}");
        }
    }
}
