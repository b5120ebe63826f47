//! `pilotlight-dr failback`: return snapshots of a recovered instance for the site's
//! sender, then cutover.

use super::{call, Cli};
use anyhow::{bail, Context};
use pilotlight_dr::failback::{Failback, FailbackPhase};
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Subcommand)]
pub enum FailbackCmd {
    /// Start failing a real recovery back: snapshots of its instance's volumes on a
    /// schedule (the DR function's schedule takes them), offered to the site's sender
    /// (`pilotlight-sender failback --run RUN_ID`).
    Start {
        run_id: String,
        /// Time between return snapshots (at least 5m).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        every: Duration,
        /// Return snapshot sets to keep (2 to 16; the set a round starts from is kept too).
        #[arg(long, default_value_t = 3)]
        keep: usize,
    },
    /// Advance and show one failback (its return sets and each disk's newest round), or
    /// every unfinished one.
    Status {
        run_id: Option<String>,
        /// With a run id: poll until the failback is returned or failed.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        poll_every: Duration,
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        wait_timeout: Duration,
    },
    /// Cut over: stop the instance, take the final return snapshot (instance stopped);
    /// the failback is returned once the sender's final round of every disk verified it.
    Cutover { run_id: String },
    /// Write the failback's HTML report (return sets, each disk's newest round, the
    /// cutover's duration, what happened), rendered from its record now.
    Report {
        run_id: String,
        /// Where [default: RUN_ID-failback.html in the current directory].
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

pub async fn run(cli: &Cli, cmd: &FailbackCmd) -> anyhow::Result<()> {
    match cmd {
        FailbackCmd::Start {
            run_id,
            every,
            keep,
        } => {
            let v = call(
                cli,
                json!({"action": "failback_start", "run_id": run_id, "every_seconds": every.as_secs(), "keep": keep}),
            )
            .await?;
            let fb: Failback =
                serde_json::from_value(v).context("unexpected answer to failback start")?;
            show(cli, &fb);
        }
        FailbackCmd::Report { run_id, out } => {
            let v = call(cli, json!({"action": "failback_status", "run_id": run_id})).await?;
            let mut all: Vec<Failback> =
                serde_json::from_value(v).context("unexpected answer to failback status")?;
            let fb = all.pop().context("no failback in the answer")?;
            let html = pilotlight_dr::report::failback::render(&fb, chrono::Utc::now());
            let path = out
                .clone()
                .unwrap_or_else(|| format!("{run_id}-failback.html").into());
            std::fs::write(&path, html)
                .with_context(|| format!("writing the report to {}", path.display()))?;
            println!("failback report of {run_id} written to {}", path.display());
        }
        FailbackCmd::Cutover { run_id } => {
            let v = call(cli, json!({"action": "failback_cutover", "run_id": run_id})).await?;
            let fb: Failback =
                serde_json::from_value(v).context("unexpected answer to failback cutover")?;
            show(cli, &fb);
        }
        FailbackCmd::Status {
            run_id,
            wait,
            poll_every,
            wait_timeout,
        } => {
            let started = Instant::now();
            loop {
                let v = call(cli, json!({"action": "failback_status", "run_id": run_id})).await?;
                let all: Vec<Failback> =
                    serde_json::from_value(v).context("unexpected answer to failback status")?;
                let done = all.iter().all(|f| f.phase.is_final());
                if !*wait || run_id.is_none() || done || started.elapsed() > *wait_timeout {
                    if all.is_empty() && !cli.json {
                        println!("no unfinished failbacks");
                    }
                    for fb in &all {
                        show(cli, fb);
                    }
                    if let Some(f) = all.iter().find(|f| f.phase == FailbackPhase::Failed) {
                        bail!(
                            "failback of {} failed: {}",
                            f.run_id,
                            f.reason.clone().unwrap_or_default()
                        );
                    }
                    if *wait && !done {
                        bail!(
                            "still not returned after {}",
                            humantime::format_duration(*wait_timeout)
                        );
                    }
                    return Ok(());
                }
                tokio::time::sleep(*poll_every).await;
            }
        }
    }
    Ok(())
}

/// What a person needs: where it is, the newest return snapshot per disk, what the
/// sender's rounds did, what to do next.
fn show(cli: &Cli, fb: &Failback) {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(fb).unwrap_or_default());
        return;
    }
    println!(
        "failback of {} ({}/{}, instance {}): {:?}{}",
        fb.run_id,
        fb.site,
        fb.vm,
        fb.instance_id,
        fb.phase,
        fb.reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    let newest = fb.completed().last();
    for d in &fb.disks {
        let snap = newest
            .and_then(|s| s.snapshots.iter().find(|(v, _)| *v == d.volume_id))
            .map_or("none yet", |(_, s)| s.as_str());
        let round = match &d.round {
            Some(r) => {
                // How far the site is behind the instance: the age of the return
                // snapshot its newest round reached (none once the final one is in).
                let taken = fb
                    .sets
                    .iter()
                    .find(|s| s.snapshots.iter().any(|(_, id)| *id == r.snapshot_id));
                let lag = match taken {
                    Some(s) if s.r#final => "the final snapshot".to_string(),
                    Some(s) => format!(
                        "{} behind the instance",
                        humantime::format_duration(std::time::Duration::from_secs(
                            (chrono::Utc::now() - s.requested_at).num_seconds().max(0) as u64
                        ))
                    ),
                    None => "a snapshot no longer listed".into(),
                };
                let moved = match (r.total_bytes_written, r.disk_bytes) {
                    (Some(m), Some(size)) if size > 0 => format!(
                        ", {m} bytes moved in {} rounds ({:.2} % of the disk)",
                        r.rounds.unwrap_or(1),
                        m as f64 * 100.0 / size as f64
                    ),
                    _ => String::new(),
                };
                format!(
                    "site at {} ({lag}; {} blocks written in {:.1} s, {}{}{moved})",
                    r.snapshot_id,
                    r.blocks_written,
                    r.seconds,
                    if r.verified {
                        "verified"
                    } else {
                        "NOT verified"
                    },
                    if r.drill { ", drill" } else { "" }
                )
            }
            None => "no round yet".into(),
        };
        println!(
            "  {} ({} {}): point {}, newest return {snap}; {round}",
            d.disk, d.device, d.volume_id, d.point_snapshot
        );
    }
    for s in &fb.sets {
        println!(
            "  set {} {}{}: {}",
            s.set_id,
            s.state,
            if s.r#final { " (final)" } else { "" },
            s.requested_at.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
    let next = match fb.phase {
        FailbackPhase::Returning => format!(
            "next: on the site, `pilotlight-sender failback --run {} --disk-id SITE/VM/DISK --target ...` per disk (repeat; each round is smaller); then `pilotlight-dr failback cutover {}`",
            fb.run_id, fb.run_id
        ),
        FailbackPhase::Stopping | FailbackPhase::FinalSnapshot => {
            format!("next: wait (`pilotlight-dr failback status {} --wait`)", fb.run_id)
        }
        FailbackPhase::FinalRound => format!(
            "next: the final round on the site, `pilotlight-sender failback --run {} ...` per disk",
            fb.run_id
        ),
        FailbackPhase::Returned => "next: start the VM on the site and resume protection (`pilotlight-sender resume`)".into(),
        FailbackPhase::Failed => "see the reason above".into(),
    };
    println!("  {next}");
}
