//! `pilotlight-dr`: declare a disaster (or run a drill), follow it, clean a drill up.
//! Invokes the DR Lambda (`--function`), or runs the same handler here.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use pilotlight_cli::LogArgs;
use pilotlight_dr::config::DrSettings;
use pilotlight_dr::model::{Group, Phase, Report, Run};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod failback;
mod plan;
mod view;

use view::{show, wait};

#[derive(Debug, Parser)]
#[command(
    name = "pilotlight-dr",
    version,
    about = "One-click DR: replicated disks to a running EC2 instance"
)]
struct Cli {
    /// Invoke this DR Lambda function instead of running the handler here.
    #[arg(long, global = true, env = "PILOTLIGHT_DR_FUNCTION")]
    function: Option<String>,
    /// Print the run record(s) as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    settings: DrSettings,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a DR run (or a drill): export, import, launch. Prints the run id at once.
    Start(Box<StartArgs>),
    /// Advance and show one run, or every unfinished one and each protected VM's newest
    /// recovery point with its age (`STALLED` over the RPO target).
    Status {
        run_id: Option<String>,
        /// Keep polling until the run is done or failed.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        poll: PollArgs,
        /// The recovery point objective: a VM or disk whose newest point is older is
        /// marked STALLED (the stack's RpoTargetSeconds).
        #[arg(long, env = "PILOTLIGHT_RPO_TARGET", default_value = "30m", value_parser = humantime::parse_duration)]
        rpo_target: Duration,
    },
    /// Remove what a drill created: instances, AMI, snapshots, exported objects.
    Cleanup { run_id: String },
    /// Save a VM's recovery settings (disks, launch settings, method), so that
    /// `start --vm NAME` (and several VMs at once) needs only its name.
    Configure(Box<ConfigureArgs>),
    /// Download a run's HTML report (RPO and RTO achieved, a timeline of the phases,
    /// launch settings, verification, resources created and removed, failures), or a
    /// group's (`grp-...`: every VM of a recovery of several).
    Report {
        /// A run id, or a group id.
        run_id: String,
        /// Where to write it [default: RUN_ID.html in the current directory].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Open it in the browser ($BROWSER, else xdg-open).
        #[arg(long)]
        open: bool,
    },
    /// Cancel a plan's automatic failover (its countdown, or before one): nothing runs
    /// until `plan arm`.
    Cancel { plan: String },
    /// Recovery plans: waves of VMs, steps, health checks and DNS, kept in git.
    #[command(subcommand)]
    Plan(plan::PlanCmd),
    /// Bring a real recovery home: return snapshots for the site's sender, then cutover.
    #[command(subcommand)]
    Failback(failback::FailbackCmd),
    /// Every VM recovery point (a snapshot time every disk of the VM has a point for),
    /// from the points' snapshot tags; `--json` for a machine-readable list.
    Points {
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        vm: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
struct PollArgs {
    /// Poll this often with --wait.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    poll_every: Duration,
    /// Give up waiting after this long (the run goes on).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    wait_timeout: Duration,
}

#[derive(Debug, clap::Args)]
struct StartArgs {
    /// The whole request as a JSON file (the Lambda's input); the flags below are ignored.
    #[arg(long)]
    request: Option<PathBuf>,
    /// Run this stored recovery plan instead (`plan put`): its VMs wave by wave, one
    /// point time for all; with --drill, --at and --wait.
    #[arg(long, conflicts_with_all = ["request", "site", "vms", "disks", "generation", "point", "method", "dry_run"])]
    plan: Option<String>,
    #[arg(long, required_unless_present_any = ["request", "plan"])]
    site: Option<String>,
    /// The VM; repeat to recover several at once, each from its saved settings
    /// (`configure`), each independently.
    #[arg(long = "vm", required_unless_present_any = ["request", "plan"])]
    vms: Vec<String>,
    /// A disk of the VM; repeat, boot disk first. Without it, the VM's saved settings
    /// (`configure`) give the disks and launch settings.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Recover the boot disk's generation N (and the other disks at its snapshot time)
    /// instead of the latest.
    #[arg(long, conflicts_with_all = ["at", "point"])]
    generation: Option<u64>,
    /// Recover the newest snapshot time at or before this one (RFC 3339, or
    /// 2026-11-29T10:15Z), every disk at that one time.
    #[arg(long, conflicts_with = "point")]
    at: Option<String>,
    /// Recover exactly this VM recovery point (its time as `pilotlight-dr points` lists
    /// it); fails when there is none at that time.
    #[arg(long)]
    point: Option<String>,
    /// snapshot: an AMI from the point's EBS snapshots (minutes; the guest must boot on
    /// Nitro); import: EC2 VM Import converts the disks (slow); auto: snapshot for a VM
    /// that passed a snapshot-method drill, else import. Default: auto, or the VM's saved
    /// method.
    #[arg(long, value_parser = ["auto", "snapshot", "import"])]
    method: Option<String>,
    #[command(flatten)]
    launch: LaunchArgs,
    /// A drill: instances tagged as such, in the drill subnet, removable by `cleanup`.
    #[arg(long)]
    drill: bool,
    /// Validate and resolve only.
    #[arg(long)]
    dry_run: bool,
    /// Keep polling until the run is done or failed.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    poll: PollArgs,
}

/// Launch settings, as `start` and `configure` take them.
#[derive(Debug, clap::Args)]
struct LaunchArgs {
    #[arg(long, default_value = "t3.medium")]
    instance_type: String,
    #[arg(long)]
    subnet: Option<String>,
    /// Repeat for several.
    #[arg(long = "security-group")]
    security_groups: Vec<String>,
    #[arg(long)]
    private_ip: Option<String>,
    /// KEY=VALUE; repeat for several.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// legacy-bios, uefi or uefi-preferred.
    #[arg(long)]
    boot_mode: Option<String>,
    /// AWS or BYOL.
    #[arg(long)]
    license_type: Option<String>,
    /// An EC2 launch template as the base: lt-0123...[:VERSION]; these flags override it.
    #[arg(long)]
    launch_template: Option<String>,
    /// The guest's architecture for the snapshot method: x86_64 or arm64.
    #[arg(long, value_parser = ["x86_64", "arm64"])]
    architecture: Option<String>,
    /// An IAM instance profile (name or ARN) for the instance; verification then also
    /// waits for its SSM agent to be online.
    #[arg(long)]
    instance_profile: Option<String>,
}

impl LaunchArgs {
    fn to_json(&self) -> anyhow::Result<Value> {
        let mut tags = BTreeMap::new();
        for t in &self.tags {
            let Some((k, v)) = t.split_once('=') else {
                bail!("--tag {t:?}: expected KEY=VALUE");
            };
            tags.insert(k.to_string(), v.to_string());
        }
        Ok(json!({
            "instance_type": self.instance_type,
            "subnet_id": self.subnet,
            "security_group_ids": self.security_groups,
            "private_ip": self.private_ip,
            "tags": tags,
            "boot_mode": self.boot_mode,
            "license_type": self.license_type,
            "launch_template": self.launch_template,
            "architecture": self.architecture,
            "instance_profile": self.instance_profile,
        }))
    }
}

#[derive(Debug, clap::Args)]
struct ConfigureArgs {
    #[arg(long)]
    site: String,
    #[arg(long)]
    vm: String,
    /// A disk of the VM; repeat, boot disk first.
    #[arg(long = "disk", required = true)]
    disks: Vec<String>,
    /// The VM's default method: auto, snapshot or import.
    #[arg(long, default_value = "auto", value_parser = ["auto", "snapshot", "import"])]
    method: String,
    #[command(flatten)]
    launch: LaunchArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    pilotlight_cli::run_main("pilotlight-dr", cli.log.log_format, run(cli))
}

fn start_request(a: &StartArgs) -> anyhow::Result<Value> {
    if let Some(path) = &a.request {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read request file {}", path.display()))?;
        let mut v: Value = serde_json::from_str(&text)
            .with_context(|| format!("request file {} is not JSON", path.display()))?;
        v["action"] = json!("start");
        return Ok(v);
    }
    let recovery_point = match (a.generation, &a.at, &a.point) {
        (Some(g), _, _) => json!({"generation": g}),
        (None, Some(t), _) => json!({"at": parse_time(t)?}),
        (None, None, Some(t)) => json!({"point": parse_time(t)?}),
        (None, None, None) => json!("latest"),
    };
    // Without disks: the VMs' saved settings, one run per VM.
    if a.disks.is_empty() {
        return Ok(json!({
            "action": "recover",
            "site": a.site,
            "vms": a.vms,
            "recovery_point": recovery_point,
            "method": a.method,
            "drill": a.drill,
            "dry_run": a.dry_run,
        }));
    }
    if a.vms.len() != 1 {
        bail!("--disk names the disks of one VM; to recover several VMs at once, save each one's settings (`pilotlight-dr configure`) and give only their --vm");
    }
    Ok(json!({
        "action": "start",
        "site": a.site,
        "vm": a.vms[0],
        "disks": a.disks,
        "recovery_point": recovery_point,
        "method": a.method.as_deref().unwrap_or("auto"),
        "launch": a.launch.to_json()?,
        "drill": a.drill,
        "dry_run": a.dry_run,
    }))
}

/// Runs one request: through the Lambda, or here.
async fn call(cli: &Cli, event: Value) -> anyhow::Result<Value> {
    if let Some(function) = &cli.function {
        let shared = cli.settings.aws().await.sdk;
        let client = aws_sdk_lambda::Client::new(&shared);
        let out = client
            .invoke()
            .function_name(function)
            .payload(aws_sdk_lambda::primitives::Blob::new(serde_json::to_vec(
                &event,
            )?))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}", aws_sdk_lambda::error::DisplayErrorContext(&e)))
            .with_context(|| format!("invoking Lambda function {function}"))?;
        let payload = out.payload.map(|p| p.into_inner()).unwrap_or_default();
        let v: Value = serde_json::from_slice(&payload)
            .with_context(|| format!("Lambda function {function} answered with no JSON"))?;
        if let Some(err) = out.function_error {
            bail!(
                "Lambda function {function} failed ({err}): {}",
                v.get("errorMessage").and_then(Value::as_str).unwrap_or("")
            );
        }
        Ok(v)
    } else {
        let env = cli.settings.env().await?;
        let (dns, cmd, witness) =
            pilotlight_dr::config::plan_clients(&cli.settings.aws().await).await;
        let plans = pilotlight_dr::plans::run::PlanEnv {
            dr: &env,
            dns: &dns,
            cmd: &cmd,
            witness: &witness,
        };
        Ok(pilotlight_dr::plans::handle(&plans, event).await?)
    }
}

/// RFC 3339, or without seconds (`2026-11-29T10:15Z`).
fn parse_time(s: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    let t = chrono::DateTime::parse_from_rfc3339(s)
        .or_else(|_| {
            chrono::DateTime::parse_from_str(&s.replace('Z', "+00:00"), "%Y-%m-%dT%H:%M%:z")
        })
        .with_context(|| format!("--at {s:?}: expected a time like 2026-11-29T10:15:00Z"))?;
    Ok(t.with_timezone(&chrono::Utc))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.cmd {
        Cmd::Start(a) if a.plan.is_some() => {
            let cmd = plan::PlanCmd::Start {
                name: a.plan.clone().unwrap_or_default(),
                drill: a.drill,
                at: a.at.clone(),
                wait: a.wait,
                poll_every: a.poll.poll_every,
                wait_timeout: a.poll.wait_timeout,
            };
            plan::run(&cli, &cmd).await?
        }
        Cmd::Start(a) => {
            let req = start_request(a)?;
            let v = call(&cli, req).await?;
            let runs: Vec<Run> = match serde_json::from_value::<Group>(v.clone()) {
                Ok(g) => {
                    if !cli.json {
                        println!(
                            "group {}: {} VMs, each recovered independently (`pilotlight-dr report {}` for all of them)",
                            g.group,
                            g.runs.len(),
                            g.group
                        );
                    }
                    g.runs
                }
                Err(_) => vec![serde_json::from_value(v).context("unexpected answer to start")?],
            };
            for run in &runs {
                if cli.json && a.wait && !run.phase.is_final() {
                    // One JSON document per run, the finished one; the id goes to stderr
                    // at once, for whoever wants to follow the run elsewhere.
                    eprintln!("run {} started; waiting for it to finish", run.run_id);
                } else {
                    show(&cli, run);
                }
            }
            let mut failed = Vec::new();
            for run in &runs {
                if a.wait && !run.phase.is_final() {
                    if let Err(e) = wait(&cli, &run.run_id, &a.poll).await {
                        failed.push(e.to_string());
                    }
                } else if run.phase == Phase::Failed {
                    failed.push(format!(
                        "DR run {} ({}) failed: {}",
                        run.run_id,
                        run.request.get("vm").and_then(Value::as_str).unwrap_or("?"),
                        run.reason.clone().unwrap_or_default()
                    ));
                }
            }
            if !failed.is_empty() {
                bail!("{}", failed.join("\n"));
            }
        }
        Cmd::Configure(c) => {
            let v = call(
                &cli,
                json!({
                    "action": "configure",
                    "site": c.site,
                    "vm": c.vm,
                    "disks": c.disks,
                    "launch": c.launch.to_json()?,
                    "method": c.method,
                }),
            )
            .await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "saved recovery settings of {}/{}: disks {}; `pilotlight-dr start --site {} --vm {}` uses them",
                    c.site,
                    c.vm,
                    c.disks.join(", "),
                    c.site,
                    c.vm
                );
            }
        }
        Cmd::Status {
            run_id,
            wait: w,
            poll,
            rpo_target,
        } => match (run_id, w) {
            (Some(id), true) => wait(&cli, id, poll).await?,
            _ => {
                let v = call(&cli, json!({"action": "status", "run_id": run_id})).await?;
                let runs: Vec<Run> =
                    serde_json::from_value(v).context("unexpected answer to status")?;
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&runs)?);
                } else if runs.is_empty() {
                    println!("no unfinished DR runs");
                }
                if !cli.json {
                    for r in &runs {
                        show(&cli, r);
                    }
                    if run_id.is_none() {
                        replication(&cli, *rpo_target).await?;
                    }
                }
            }
        },
        Cmd::Points { site, vm } => {
            let ebs = cli.settings.aws().await.ebs();
            let points =
                pilotlight_store::points::list(&ebs, site.as_deref(), vm.as_deref()).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&points)?);
            } else {
                print!(
                    "{}",
                    pilotlight_cli::points::render(&points, chrono::Utc::now())
                );
            }
        }
        Cmd::Report { run_id, out, open } => {
            let v = call(&cli, json!({"action": "report", "run_id": run_id})).await?;
            let report: Report =
                serde_json::from_value(v).context("unexpected answer to report")?;
            let path = out
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("{}.html", report.run_id)));
            std::fs::write(&path, &report.html)
                .with_context(|| format!("writing the report to {}", path.display()))?;
            if cli.json {
                println!(
                    "{}",
                    json!({"run_id": report.run_id, "key": report.key, "stored": report.stored, "path": path})
                );
            } else {
                println!(
                    "report of {} written to {} ({})",
                    report.run_id,
                    path.display(),
                    if report.stored {
                        format!("as kept in the bucket at {}", report.key)
                    } else {
                        "rendered from the run record".to_string()
                    }
                );
            }
            if *open {
                open_in_browser(&path)?;
            }
        }
        Cmd::Failback(f) => failback::run(&cli, f).await?,
        Cmd::Plan(p) => plan::run(&cli, p).await?,
        Cmd::Cancel { plan } => {
            let v = call(&cli, json!({"action": "plan_cancel", "plan": plan})).await?;
            plan::show_automation(&cli, &v);
        }
        Cmd::Cleanup { run_id } => {
            let v = call(&cli, json!({"action": "cleanup", "run_id": run_id})).await?;
            let run: Run = serde_json::from_value(v).context("unexpected answer to cleanup")?;
            show(&cli, &run);
            if run.phase != Phase::CleanedUp {
                bail!(
                    "cleanup of {run_id} is incomplete: {}",
                    run.reason.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// Each protected VM's newest recovery point and its age, each disk's newest point (the
/// receiver's `PointLagSeconds`), STALLED over the target. Points that cannot be read
/// (say, no `ec2:DescribeSnapshots` where the CLI runs) are said after the runs, and the
/// command fails: a status that could not read what it reports on never looks healthy.
async fn replication(cli: &Cli, target: Duration) -> anyhow::Result<()> {
    let ebs = cli.settings.aws().await.ebs();
    match pilotlight_store::points::disk_points(&ebs, None, None).await {
        Ok(mut points) => {
            if let Some(stack) = cli.settings.stack.as_deref().filter(|s| !s.is_empty()) {
                points.retain(|p| p.stack == stack);
            }
            let lags = pilotlight_cli::points::lags(&points, chrono::Utc::now(), target);
            println!(
                "recovery points (RPO target {}):",
                humantime::format_duration(target)
            );
            for line in pilotlight_cli::points::render_lags(&lags, target).lines() {
                println!("  {line}");
            }
        }
        // Said once, as the command's error (the runs are printed already).
        Err(e) => anyhow::bail!("recovery points could not be read: {e}"),
    }
    Ok(())
}

/// Opens `path` with `$BROWSER` or `xdg-open`, without waiting for the browser.
fn open_in_browser(path: &std::path::Path) -> anyhow::Result<()> {
    let opener = std::env::var("BROWSER")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "xdg-open".into());
    std::process::Command::new(&opener)
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "opening {} with {opener} (set BROWSER, or open the file yourself)",
                path.display()
            )
        })?;
    Ok(())
}
