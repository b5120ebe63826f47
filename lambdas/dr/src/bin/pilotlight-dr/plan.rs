//! `pilotlight-dr plan`: recovery plans as code (check, put, show), their runs (start,
//! status, cleanup, report).

use super::{call, parse_time, Cli};
use anyhow::{bail, Context};
use pilotlight_dr::plans::run::{PlanPhase, PlanRun};
use pilotlight_dr::plans::PlanProblem;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Subcommand)]
pub enum PlanCmd {
    /// Check a plan file (its own rules, and that every VM has saved settings); touches
    /// nothing. Each problem is printed with its line.
    Check { file: PathBuf },
    /// Check and store a plan file (under its name).
    Put { file: PathBuf },
    /// Print a stored plan as it was put.
    Show { name: String },
    /// Run a stored plan: one point time for every VM, wave by wave.
    Start {
        name: String,
        /// A drill: instances tagged as such, DNS only in the plan's drill zone; removable
        /// by `plan cleanup`.
        #[arg(long)]
        drill: bool,
        /// The newest point every VM has at or before this time (RFC 3339).
        #[arg(long)]
        at: Option<String>,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        poll_every: Duration,
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        wait_timeout: Duration,
    },
    /// Advance and show one plan run, or every unfinished one.
    Status { plan_run_id: Option<String> },
    /// Remove what a drill of a plan made: every run's resources, every DNS record.
    Cleanup { plan_run_id: String },
    /// A plan's guarded automatic failover: its phase and every decision it made.
    Automation { name: String },
    /// Re-arm a plan's automatic failover after it ran, was cancelled or its fence failed
    /// (a person's decision: the latch is removed).
    Arm { name: String },
}

fn problems(v: &Value, file: &std::path::Path) -> anyhow::Result<()> {
    if v["ok"] == true {
        return Ok(());
    }
    let ps: Vec<PlanProblem> = serde_json::from_value(v["problems"].clone()).unwrap_or_default();
    for p in &ps {
        eprintln!("{}:{p}", file.display());
    }
    bail!(
        "{}: {} problem(s); nothing was stored",
        file.display(),
        ps.len()
    )
}

pub async fn run(cli: &Cli, cmd: &PlanCmd) -> anyhow::Result<()> {
    match cmd {
        PlanCmd::Check { file } | PlanCmd::Put { file } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read plan file {}", file.display()))?;
            let action = if matches!(cmd, PlanCmd::Check { .. }) {
                "plan_check"
            } else {
                "plan_put"
            };
            let v = call(cli, json!({"action": action, "text": text})).await?;
            problems(&v, file)?;
            let waves = v["plan"]["waves"].as_array().map_or(0, Vec::len);
            println!(
                "{}: plan {} is good: {waves} waves{}",
                file.display(),
                v["plan"]["name"].as_str().unwrap_or("?"),
                if action == "plan_put" { "; stored" } else { "" }
            );
        }
        PlanCmd::Show { name } => {
            let v = call(cli, json!({"action": "plan_show", "name": name})).await?;
            print!("{}", v.as_str().unwrap_or_default());
        }
        PlanCmd::Start {
            name,
            drill,
            at,
            wait,
            poll_every,
            wait_timeout,
        } => {
            let at = at.as_deref().map(parse_time).transpose()?;
            let v = call(
                cli,
                json!({"action": "plan_start", "plan": name, "drill": drill, "at": at}),
            )
            .await?;
            let mut r: PlanRun =
                serde_json::from_value(v).context("unexpected answer to plan start")?;
            if !cli.json || !wait {
                show(cli, &r);
            }
            let started = Instant::now();
            while *wait && !r.phase.is_final() && started.elapsed() < *wait_timeout {
                tokio::time::sleep(*poll_every).await;
                let v = call(
                    cli,
                    json!({"action": "plan_status", "plan_run_id": r.plan_run_id}),
                )
                .await?;
                let mut all: Vec<PlanRun> =
                    serde_json::from_value(v).context("unexpected answer to plan status")?;
                r = all.pop().context("no plan run in the answer")?;
            }
            if *wait {
                show(cli, &r);
            }
            if r.phase == PlanPhase::Failed {
                bail!(
                    "plan run {} failed: {}",
                    r.plan_run_id,
                    r.reason.unwrap_or_default()
                );
            }
        }
        PlanCmd::Status { plan_run_id } => {
            let v = call(
                cli,
                json!({"action": "plan_status", "plan_run_id": plan_run_id}),
            )
            .await?;
            let all: Vec<PlanRun> =
                serde_json::from_value(v).context("unexpected answer to plan status")?;
            if all.is_empty() && !cli.json {
                println!("no unfinished plan runs");
            }
            for r in &all {
                show(cli, r);
            }
        }
        PlanCmd::Automation { name } | PlanCmd::Arm { name } => {
            let action = if matches!(cmd, PlanCmd::Arm { .. }) {
                "plan_arm"
            } else {
                "plan_automation"
            };
            let v = call(cli, json!({"action": action, "plan": name})).await?;
            show_automation(cli, &v);
        }
        PlanCmd::Cleanup { plan_run_id } => {
            let v = call(
                cli,
                json!({"action": "plan_cleanup", "plan_run_id": plan_run_id}),
            )
            .await?;
            let r: PlanRun =
                serde_json::from_value(v).context("unexpected answer to plan cleanup")?;
            show(cli, &r);
            if r.phase != PlanPhase::CleanedUp {
                bail!(
                    "cleanup of {plan_run_id} is incomplete: {}",
                    r.reason.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

fn show(cli: &Cli, r: &PlanRun) {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
        return;
    }
    println!(
        "plan run {} ({}{}): {:?}{} from the point at {}",
        r.plan_run_id,
        r.plan.name,
        if r.drill { ", drill" } else { "" },
        r.phase,
        r.reason
            .as_deref()
            .map(|x| format!(": {x}"))
            .unwrap_or_default(),
        r.point_time.to_rfc3339()
    );
    for (i, w) in r.waves.iter().enumerate() {
        println!(
            "  wave {}{}",
            i + 1,
            if w.ended_at.is_some() {
                " (done)"
            } else if w.started_at.is_some() {
                " (under way)"
            } else {
                ""
            }
        );
        for v in &w.vms {
            println!(
                "    {}: {:?}{}{}",
                v.vm,
                v.stage,
                v.run_id
                    .as_deref()
                    .map(|id| format!(" (run {id})"))
                    .unwrap_or_default(),
                v.reason
                    .as_deref()
                    .map(|x| format!(": {x}"))
                    .unwrap_or_default()
            );
        }
    }
    for c in &r.dns {
        println!(
            "  dns {} A {}{}",
            c.record.name,
            c.record.addresses.join(","),
            if c.removed_at.is_some() {
                " (removed)"
            } else {
                ""
            }
        );
    }
}

/// A plan's automation: where it is, then its decisions, oldest first.
pub fn show_automation(cli: &Cli, v: &Value) {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    println!(
        "automatic failover of plan {}: {}{}",
        v["plan"].as_str().unwrap_or("?"),
        v["phase"].as_str().unwrap_or("?"),
        v["countdown_until"]
            .as_str()
            .map(|t| format!(" (countdown until {t})"))
            .unwrap_or_default()
    );
    if let Some(id) = v["plan_run_id"].as_str() {
        println!("  ran: plan run {id}");
    }
    for d in v["decisions"].as_array().into_iter().flatten() {
        println!(
            "  {} {}",
            d["at"].as_str().unwrap_or(""),
            d["what"].as_str().unwrap_or("")
        );
    }
}
