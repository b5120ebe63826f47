//! The DR function's commands: `start` (validate and plan, record the run, hold its
//! point, request exports or register at once), `status` (advance and report one run or
//! every unfinished one), `cleanup` (remove what a drill made), `configure` (save a VM's
//! settings), `recover` (several VMs from their settings), and the Lambda's entry
//! [`handle`], which also serves the EventBridge schedule.
//!
//! A run lives in the bucket as JSON (`{runs_prefix}/{run_id}.json`); every call reads
//! it, does one step, and writes it back, so the Lambda keeps no state between
//! invocations and any invocation (the schedule, `dr status`, a retry) can advance it
//! ([`crate::steps`]).
//!
//! ```text
//! start ─► (phases: crate::steps) ─► done | failed
//! done|failed (drill) ─► cleanup ─► cleaned_up
//! ```

pub use crate::config::{DrConfig, DrEnv};
pub use crate::error::DrError;
pub use crate::plan::validate;
pub use crate::runs::{report, vm_settings};
pub use crate::steps::{advance, CLAIM_LEASE};

use crate::error::json_bytes;
use crate::model::{
    ClaimStep, DrRequest, Group, GroupRecord, Method, Phase, RecoverRequest, RecoveryPoint,
    ResourceKind, Run, RunDisk, StartRequest, VmSettings,
};
use crate::plan::{choose_method, resolve, PlanError};
use crate::runs::{failed_run, load, new_run_id, save};
use crate::steps::{advance_claimed, claim, release_holds};
use chrono::Utc;
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::ec2::Ec2Api;
use pilotlight_cloud::{ObjectStore, PutOptions};
use pilotlight_protocol::points::tag;
use pilotlight_protocol::{DiskId, ExportFormat, ExportRequest, Name, EXPORT_VERSION};
use pilotlight_store::exports::{self, WriteError};
use serde_json::Value;

/// The Lambda's entry: a DR request, or the EventBridge schedule (which advances every
/// unfinished run).
pub async fn handle<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    event: Value,
) -> Result<Value, DrError> {
    if is_scheduled(&event) {
        let runs = status(env, None).await?;
        let failbacks = crate::failback::status(env, None).await?;
        return Ok(serde_json::json!({
            "advanced": runs.iter().map(|r| &r.run_id).collect::<Vec<_>>(),
            "failbacks": failbacks.iter().map(|f| &f.run_id).collect::<Vec<_>>(),
        }));
    }
    let is_start = event.get("action").and_then(Value::as_str) == Some("start");
    match serde_json::from_value::<DrRequest>(event.clone()) {
        // A start is recorded even when it is invalid: the run says why it failed.
        Ok(DrRequest::Start(_)) => to_json(&start(env, event).await?),
        Err(_) if is_start => to_json(&start(env, event).await?),
        Err(e) => Err(DrError::BadRequest(format!(
            "{e} (expected {{\"action\": \"start\" | \"status\" | \"cleanup\" | \"configure\" | \"recover\" | \"report\" | \"failback_start\" | \"failback_status\" | \"failback_cutover\", ...}})"
        ))),
        Ok(DrRequest::Status { run_id }) => to_json(&status(env, run_id.as_deref()).await?),
        Ok(DrRequest::Cleanup { run_id }) => to_json(&cleanup(env, &run_id).await?),
        Ok(DrRequest::Configure(settings)) => to_json(&configure(env, *settings).await?),
        Ok(DrRequest::Recover(req)) => to_json(&recover(env, req).await?),
        Ok(DrRequest::Report { run_id }) => to_json(&report(env, &run_id).await?),
        Ok(DrRequest::FailbackStart(req)) => to_json(&crate::failback::start(env, req).await?),
        Ok(DrRequest::FailbackStatus { run_id }) => {
            to_json(&crate::failback::status(env, run_id.as_deref()).await?)
        }
        Ok(DrRequest::FailbackCutover { run_id }) => {
            to_json(&crate::failback::cutover(env, &run_id).await?)
        }
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, DrError> {
    serde_json::to_value(v).map_err(|e| DrError::Encode {
        what: "the answer",
        detail: e.to_string(),
    })
}

/// An EventBridge scheduled event (`aws_lambda_events`' type).
fn is_scheduled(event: &Value) -> bool {
    event.get("detail-type").is_some()
        && serde_json::from_value::<aws_lambda_events::event::eventbridge::EventBridgeEvent>(
            event.clone(),
        )
        .is_ok_and(|e| e.source == "aws.events" || e.detail_type == "Scheduled Event")
}

/// Starts a run: validates, resolves each disk's generation, asks the receiver for the
/// exports, records the run. Returns at once; [`advance`] does the rest. An invalid
/// request still gets a run record, `failed` with the reason.
pub async fn start<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    request: Value,
) -> Result<Run, DrError> {
    let now = Utc::now();
    let mut run = Run::new(new_run_id(now, &request), request.clone(), now);
    let plan = match serde_json::from_value::<DrRequest>(request) {
        Ok(DrRequest::Start(req)) => match validate(&env.cfg, &req) {
            Ok(()) => match resolve(env, &req).await {
                Ok((disks, time)) => Ok((disks, time, req)),
                // The bucket failed for now: no run is recorded as failed for that; the
                // caller (the CLI, or whoever invoked) tries again.
                Err(PlanError::Cloud(e)) if e.is_transient() => return Err(DrError::Store(e)),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e),
        },
        Ok(_) => Err("not a start request".into()),
        Err(e) => Err(format!("the request is not valid: {e}")),
    };
    let chosen = match plan {
        Ok((disks, time, req)) => match choose_method(env, &req, &disks, time).await {
            Ok(c) => Ok((disks, time, c)),
            Err(PlanError::Unservable(why)) => Err(why),
            Err(PlanError::Cloud(e)) => return Err(DrError::Store(e)),
        },
        Err(why) => Err(why),
    };
    let (disks, time, (method, why, snapshots)) = match chosen {
        Ok(c) => c,
        Err(why) => {
            run.fail(why, Utc::now());
            if !run.dry_run {
                save(env, &mut run).await?;
            }
            return Ok(run);
        }
    };
    run.method = Some(method);
    run.method_reason = Some(why);
    run.point_time = Some(time);
    run.point_age_seconds = Some((now - time).num_milliseconds() as f64 / 1000.0);
    for (i, (disk, generation)) in disks.iter().enumerate() {
        run.disks.push(RunDisk {
            disk: disk.to_string(),
            generation: *generation,
            export_id: format!("{}.d{i}", run.run_id),
            image_key: None,
            size: None,
            sha256: None,
            snapshot_id: snapshots.as_ref().map(|s| s[i].clone()),
        });
    }
    if run.dry_run {
        run.reason = Some("dry run: validated and resolved; nothing requested".into());
        run.enter(Phase::Planned, Utc::now());
        return Ok(run);
    }
    // Record the run before asking for anything, so whatever follows is tracked.
    run.enter(
        if method == Method::Snapshot {
            Phase::Registering
        } else {
            Phase::Exporting
        },
        Utc::now(),
    );
    save(env, &mut run).await?;
    // Hold the point's snapshots so retention keeps them while the run needs them.
    if let Some(ids) = &snapshots {
        let hold = [(tag::hold(&run.run_id), "1".to_string())];
        let mut failed = None;
        for id in ids {
            match env.ebs.create_tags(id, &hold).await {
                Ok(()) => run.held.push(id.clone()),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            if method == Method::Snapshot {
                run.fail(
                    format!(
                        "cannot hold the recovery point's snapshots (tag {}): {e}",
                        tag::hold(&run.run_id)
                    ),
                    Utc::now(),
                );
                release_holds(env, &mut run).await;
                save(env, &mut run).await?;
                return Ok(run);
            }
            // The import reads the receiver's image: the point is not needed.
            tracing::warn!(run = %run.run_id, error = %e, "cannot hold the recovery point; importing without it");
        }
        save(env, &mut run).await?;
    }
    if method == Method::Snapshot {
        claim(&mut run, ClaimStep::Register, Utc::now());
        save(env, &mut run).await?;
        tracing::info!(run = %run.run_id, disks = run.disks.len(), drill = run.drill, method = "snapshot", "DR run started");
        // Register at once (this caller holds the claim just saved).
        advance_claimed(env, &mut run).await?;
        return Ok(run);
    }
    for (d, (disk, generation)) in run.disks.clone().iter().zip(&disks) {
        let id = Name::new(&d.export_id).map_err(|e| DrError::BadRequest(e.to_string()))?;
        let req = ExportRequest {
            version: EXPORT_VERSION,
            id: id.clone(),
            generation: *generation,
            format: ExportFormat::Raw,
            run_id: Some(run.run_id.clone()),
            requested_at: Utc::now(),
        };
        let key = match exports::write_request(&env.store, &env.cfg.prefix, disk, &req).await {
            Ok(key) => key,
            Err(WriteError::Encode { what, detail }) => {
                return Err(DrError::Encode { what, detail })
            }
            Err(WriteError::Put(e)) => {
                run.fail(
                    format!("cannot request the export of {disk}: {e}"),
                    Utc::now(),
                );
                save(env, &mut run).await?;
                return Ok(run);
            }
        };
        run.record(ResourceKind::S3Object, key, Utc::now());
    }
    run.updated_at = Utc::now();
    save(env, &mut run).await?;
    tracing::info!(run = %run.run_id, disks = run.disks.len(), drill = run.drill, method = "import", "DR run started");
    Ok(run)
}

/// Saves a VM's recovery settings after checking them as a start would.
pub async fn configure<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    settings: VmSettings,
) -> Result<VmSettings, DrError> {
    let as_start = StartRequest {
        site: settings.site.clone(),
        vm: settings.vm.clone(),
        disks: settings.disks.clone(),
        recovery_point: RecoveryPoint::Latest,
        method: settings.method,
        launch: settings.launch.clone(),
        drill: false,
        dry_run: true,
        group: None,
    };
    validate(&env.cfg, &as_start).map_err(DrError::BadRequest)?;
    let key = env.cfg.vm_settings_key(&settings.site, &settings.vm);
    let body = json_bytes("the VM settings", &settings)?;
    env.store.put(&key, body.into(), PutOptions::json()).await?;
    tracing::info!(site = %settings.site, vm = %settings.vm, %key, "VM recovery settings saved");
    Ok(settings)
}

/// At most this many VMs in one recovery.
pub const MAX_GROUP_VMS: usize = 50;

/// Recovers several VMs, each from its saved settings and each independently: a VM that
/// cannot start (no settings, no point) is a failed run of its own; the others go on.
pub async fn recover<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    req: RecoverRequest,
) -> Result<Group, DrError> {
    if req.vms.is_empty() || req.vms.len() > MAX_GROUP_VMS {
        return Err(DrError::BadRequest(format!(
            "vms: 1 to {MAX_GROUP_VMS} VMs, {} given",
            req.vms.len()
        )));
    }
    for (i, vm) in req.vms.iter().enumerate() {
        if req.vms[..i].contains(vm) {
            return Err(DrError::BadRequest(format!("vms: {vm:?} is listed twice")));
        }
    }
    let now = Utc::now();
    let group = format!(
        "grp-{}",
        new_run_id(now, &serde_json::to_value(&req).unwrap_or_default()).trim_start_matches("dr-")
    );
    let mut runs = Vec::new();
    // The request of a VM that has no settings to start from.
    let bare = |vm: &str| {
        serde_json::json!({"action": "start", "site": req.site, "vm": vm,
            "drill": req.drill, "dry_run": req.dry_run, "group": group})
    };
    for vm in &req.vms {
        let request = match vm_settings(env, &req.site, vm).await {
            Ok(Some(s)) => serde_json::json!({
                "action": "start",
                "site": req.site,
                "vm": vm,
                "disks": s.disks,
                "recovery_point": req.recovery_point,
                "method": req.method.unwrap_or(s.method),
                "launch": s.launch,
                "drill": req.drill,
                "dry_run": req.dry_run,
                "group": group,
            }),
            Ok(None) => {
                let why = format!(
                    "no saved recovery settings for {}/{vm}: save them first (`pilotlight-dr configure --site {} --vm {vm} --disk ...`)",
                    req.site, req.site
                );
                let mut run = failed_run(bare(vm), why);
                if !run.dry_run {
                    save(env, &mut run).await?;
                }
                runs.push(run);
                continue;
            }
            Err(e) => {
                let why = format!("cannot read the VM's saved settings: {e}");
                runs.push(failed_run(bare(vm), why));
                continue;
            }
        };
        match start(env, request.clone()).await {
            Ok(run) => runs.push(run),
            // This VM could not start now (the bucket failing): said, the others go on.
            Err(e) => {
                let why = format!("not started: {e}; start this VM again");
                runs.push(failed_run(request, why));
            }
        }
    }
    tracing::info!(%group, vms = runs.len(), failed = runs.iter().filter(|r| r.phase == Phase::Failed).count(), "recovery of several VMs started");
    if !req.dry_run {
        // What `report GROUP` reads; the runs are recorded already, so a group record that
        // cannot be written costs only the group's report (each run keeps its own).
        let record = GroupRecord {
            group: group.clone(),
            site: req.site.clone(),
            runs: req
                .vms
                .iter()
                .cloned()
                .zip(runs.iter().map(|r| r.run_id.clone()))
                .collect(),
            created_at: now,
        };
        let key = env.cfg.group_key(&group);
        let written = match json_bytes("the group record", &record) {
            Ok(body) => env
                .store
                .put(&key, body.into(), PutOptions::json().create_only())
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = written {
            tracing::warn!(%group, key, error = %e, "the group record was not written: `pilotlight-dr report` works per run");
        }
    }
    Ok(Group { group, runs })
}

/// Advances and returns one run, or every run not finished yet (newest first).
pub async fn status<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run_id: Option<&str>,
) -> Result<Vec<Run>, DrError> {
    let ids: Vec<String> = match run_id {
        Some(id) => vec![id.to_string()],
        None => crate::runs::run_ids(env).await?,
    };
    let mut out = Vec::new();
    for id in ids {
        if let Some(one) = run_id {
            let mut run = load(env, one).await?;
            advance(env, &mut run).await?;
            out.push(run);
            continue;
        }
        // Every unfinished run: one that cannot be read or advanced now is reported
        // and skipped, never a reason to leave the others waiting.
        let mut run = match load(env, &id).await {
            Ok(run) => run,
            Err(e) => {
                tracing::warn!(run = %id, error = %e, "cannot read the run record; skipped");
                continue;
            }
        };
        if run.phase.is_final() {
            continue;
        }
        if let Err(e) = advance(env, &mut run).await {
            tracing::warn!(run = %id, error = %e, "cannot advance the run now; the next call tries again");
            run.reason = Some(format!("not advanced this time: {e}"));
        }
        out.push(run);
    }
    out.sort_by_key(|r| std::cmp::Reverse(r.created_at));
    Ok(out)
}

/// Removes what a drill made: its instances, AMI, snapshots and exported objects.
/// Refused for a run that is not a drill or has not finished.
pub async fn cleanup<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run_id: &str,
) -> Result<Run, DrError> {
    let mut run = load(env, run_id).await?;
    if !run.drill {
        return Err(DrError::Refused(format!(
            "run {run_id} is not a drill: cleanup only removes drills (a real recovery's instances are yours to keep)"
        )));
    }
    match run.phase {
        Phase::Done | Phase::Failed => {}
        Phase::CleanedUp => return Ok(run),
        p => {
            return Err(DrError::Refused(format!(
            "run {run_id} is still {p:?}; wait until it is done or failed (`dr status {run_id}`)"
        )))
        }
    }
    let now = Utc::now();
    let mut problems = Vec::new();
    let created = run.created.clone();
    let of = |kind: ResourceKind| -> Vec<String> {
        created
            .iter()
            .filter(|c| c.kind == kind)
            .map(|c| c.id.clone())
            .collect()
    };
    let mut removed = Vec::new();
    let instances = of(ResourceKind::Instance);
    match env.ec2.terminate_instances(&instances).await {
        Ok(()) => removed.extend(
            instances
                .iter()
                .map(|i| (ResourceKind::Instance, i.clone())),
        ),
        Err(e) => problems.push(e.to_string()),
    }
    for image in of(ResourceKind::Image) {
        match env.ec2.deregister_image(&image).await {
            Ok(()) => removed.push((ResourceKind::Image, image)),
            Err(e) => problems.push(e.to_string()),
        }
    }
    for snap in of(ResourceKind::Snapshot) {
        match env.ec2.delete_snapshot(&snap).await {
            Ok(()) => removed.push((ResourceKind::Snapshot, snap)),
            Err(e) => problems.push(e.to_string()),
        }
    }
    // The exported images, and the requests and results beside them.
    for d in &run.disks {
        let (Ok(disk), Ok(id)) = (DiskId::parse(&d.disk), Name::new(&d.export_id)) else {
            continue;
        };
        let p = &env.cfg.prefix;
        for key in [
            exports::image_key(p, &disk, &id),
            exports::result_key(p, &disk, &id),
            exports::request_key(p, &disk, &id),
        ] {
            if env.store.head(&key).await?.is_none() {
                continue;
            }
            match env.store.delete(&key).await {
                Ok(()) => removed.push((ResourceKind::S3Object, key)),
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    release_holds(env, &mut run).await;
    if !run.held.is_empty() {
        problems.push(format!(
            "the hold on {} could not be released",
            run.held.join(", ")
        ));
    }
    for (kind, id) in removed {
        run.removed
            .push(crate::model::Created { kind, id, at: now });
    }
    if problems.is_empty() {
        run.reason = Some(format!(
            "drill cleaned up: {} resources removed",
            run.removed.len()
        ));
        run.enter(Phase::CleanedUp, Utc::now());
    } else {
        run.reason = Some(format!(
            "cleanup incomplete (run it again): {}",
            problems.join("; ")
        ));
    }
    run.updated_at = Utc::now();
    save(env, &mut run).await?;
    Ok(run)
}
