//! How runs are shown: one line per change while waiting, the run as text or JSON.

use super::{call, Cli, PollArgs};
use anyhow::{bail, Context};
use pilotlight_dr::model::{Phase, Run};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Polls a run until it is final, printing each change of phase or progress.
pub async fn wait(cli: &Cli, run_id: &str, poll: &PollArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let v = call(cli, json!({"action": "status", "run_id": run_id})).await?;
        let mut runs: Vec<Run> =
            serde_json::from_value(v).context("unexpected answer to status")?;
        let run = runs.pop().with_context(|| format!("no DR run {run_id}"))?;
        let line = progress_line(&run);
        if line != last && !cli.json {
            eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
            last = line;
        }
        if run.phase.is_final() {
            show(cli, &run);
            if run.phase == Phase::Failed {
                bail!("DR run {run_id} failed: {}", run.reason.unwrap_or_default());
            }
            return Ok(());
        }
        if started.elapsed() > poll.wait_timeout {
            bail!(
                "DR run {run_id} still {:?} after {}; it goes on: `pilotlight-dr status {run_id}`",
                run.phase,
                humantime::format_duration(poll.wait_timeout)
            );
        }
        tokio::time::sleep(poll.poll_every).await;
    }
}

fn progress_line(run: &Run) -> String {
    match (&run.phase, &run.import) {
        (Phase::Importing, Some(i)) => format!(
            "importing: {} {}{}",
            i.status,
            i.status_message.as_deref().unwrap_or(""),
            i.progress_percent
                .map(|p| format!(" {p}%"))
                .unwrap_or_default()
        ),
        (Phase::Verifying, _) => format!(
            "verifying: {}",
            run.reason.as_deref().unwrap_or("waiting for status checks")
        ),
        (Phase::Exporting, _) => format!(
            "exporting: {}/{} disks exported",
            run.disks.iter().filter(|d| d.image_key.is_some()).count(),
            run.disks.len()
        ),
        (p, _) => format!("{p:?}").to_lowercase(),
    }
}

pub fn show(cli: &Cli, run: &Run) {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(run).unwrap_or_default());
        return;
    }
    let now = chrono::Utc::now();
    let vm = match (
        run.request.get("site").and_then(Value::as_str),
        run.request.get("vm").and_then(Value::as_str),
    ) {
        (Some(s), Some(v)) => format!(" {s}/{v}"),
        _ => String::new(),
    };
    println!(
        "run {}{vm}{}: {} ({:.1} s)",
        run.run_id,
        if run.drill { " [drill]" } else { "" },
        format!("{:?}", run.phase).to_lowercase(),
        run.total_seconds(now)
    );
    if let Some(r) = &run.reason {
        println!("  {r}");
    }
    if let Some(why) = &run.method_reason {
        println!("  method: {why}");
    }
    if let (Some(t), Some(age)) = (run.point_time, run.point_age_seconds) {
        println!(
            "  recovery point {} ({} old at the start: the RPO achieved)",
            pilotlight_protocol::points::time_tag(t),
            humantime::format_duration(Duration::from_secs(age.max(0.0) as u64))
        );
    }
    for d in &run.disks {
        if let Some(snap) = &d.snapshot_id {
            if run.method == Some(pilotlight_dr::model::Method::Snapshot) {
                println!(
                    "  disk {} generation {}: recovery point snapshot {snap}",
                    d.disk, d.generation
                );
                continue;
            }
        }
        match (&d.image_key, d.size) {
            (Some(k), Some(size)) => println!(
                "  disk {} generation {}: exported to {k} ({size} bytes, sha256 {})",
                d.disk,
                d.generation,
                d.sha256.as_deref().unwrap_or("?")
            ),
            _ => println!(
                "  disk {} generation {}: export requested",
                d.disk, d.generation
            ),
        }
    }
    if let Some(i) = &run.import {
        println!(
            "  import task {}: {} {}",
            i.task_id,
            i.status,
            i.status_message.as_deref().unwrap_or("")
        );
    }
    if let Some(img) = &run.image_id {
        if run.snapshot_ids.is_empty() {
            println!("  AMI {img}");
        } else {
            println!("  AMI {img}; snapshots {}", run.snapshot_ids.join(", "));
        }
    }
    for i in &run.instance_ids {
        println!("  instance {i}");
    }
    if let Some(v) = &run.verification {
        println!(
            "  verification: {} (instance {}: {}, instance check {}, system check {}, SSM {})",
            if v.passed { "passed" } else { "FAILED" },
            v.instance_id,
            v.state,
            v.instance_status,
            v.system_status,
            v.ssm_ping
                .as_deref()
                .unwrap_or("not checked: no instance profile")
        );
        if let Some(tail) = &v.console_tail {
            println!("  console output, last lines:");
            for l in tail.lines() {
                println!("    {l}");
            }
        }
    }
    if !run.held.is_empty() {
        println!("  holds recovery point snapshots {}", run.held.join(", "));
    }
    if !run.phases.is_empty() {
        let parts: Vec<String> = run
            .phases
            .iter()
            .map(|p| {
                let secs = p
                    .seconds
                    .unwrap_or_else(|| (now - p.started_at).num_milliseconds() as f64 / 1000.0);
                format!("{} {secs:.1} s", format!("{:?}", p.phase).to_lowercase())
            })
            .collect();
        println!(
            "  time: {}; total {:.1} s",
            parts.join(", "),
            run.total_seconds(now)
        );
    }
    for r in &run.removed {
        println!("  removed {} {}", r.kind, r.id);
    }
}
