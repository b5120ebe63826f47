//! The DR flow: start a run, advance it phase by phase, clean up a drill.
//!
//! A run lives in the bucket as JSON (`{runs_prefix}/{run_id}.json`); every call reads
//! it, does one step, and writes it back, so the Lambda keeps no state between
//! invocations and any invocation (the schedule, `dr status`, a retry) can advance it.
//!
//! ```text
//! start ─► exporting ─► importing (%) ─► launching ─► done
//!             │             │                │
//!             └─────────────┴────────────────┴──► failed (reason; what was created)
//! done|failed (drill) ─► cleanup ─► cleaned_up
//! ```

use crate::model::{
    BootMode, Claim, DrRequest, Group, GroupRecord, ImportProgress, Method, Phase, RecoverRequest,
    RecoveryPoint, Run, RunDisk, SnapshotReady, StartRequest, Verification, VmSettings, TAG_DRILL,
    TAG_RUN,
};
use chrono::{DateTime, Utc};
use pilotlight_cloud::ebs::{EbsApi, NoEbs};
use pilotlight_cloud::ec2::{BlockMapping, Ec2Api, ImportRequest, LaunchRequest, RegisterRequest};
use pilotlight_cloud::{CloudError, ErrorKind, ObjectStore, PutOptions};
use pilotlight_protocol::keys::{disk_prefix, generation_prefix};
use pilotlight_protocol::points::{at_most, tag, time_tag, MAX_DESCRIPTION};
use pilotlight_protocol::{
    DiskId, ExportFormat, ExportRequest, ExportResult, ExportStatus, Manifest, Name, ObjectKey,
    Prefix, EXPORT_VERSION, MAX_EXPORT_DOC_BYTES, MAX_MANIFEST_BYTES,
};
use serde_json::Value;
use std::time::Duration;

/// Run records are small JSON documents; a larger one is not ours.
const MAX_RUN_RECORD: u64 = 4 << 20;

/// How long a step that creates something (ImportImage, RunInstances) belongs to the
/// caller that claimed it. Another caller finding it claimed leaves it alone until then
/// (the claimer is most likely still calling), then makes the call itself with the same
/// client token: a claimer that died costs a delay, never a second import or instance.
/// Well above the Lambda's 60 s timeout.
pub const CLAIM_LEASE: Duration = Duration::from_secs(300);

/// Settings of the DR function (environment variables in the Lambda).
#[derive(Debug, Clone)]
pub struct DrConfig {
    pub bucket: String,
    /// The replication prefix (the receiver's).
    pub prefix: Prefix,
    /// Where run records live; outside the replication prefix, so the receiver's
    /// notification never carries them.
    pub runs_prefix: String,
    /// The service role ImportImage uses (`vmimport`).
    pub vmimport_role: String,
    /// How long the receiver may take to export before the run fails.
    pub export_timeout: Duration,
    /// How long EC2 may take to import before the run fails.
    pub import_timeout: Duration,
    /// Drills launch here instead of the request's subnet and security groups.
    pub drill_subnet_id: Option<String>,
    pub drill_security_group_ids: Vec<String>,
    /// Customer KMS key for imported snapshots; `None`: the account's EBS default key.
    pub kms_key_id: Option<String>,
    /// Only recovery points of this stack (tag `pilotlight:stack`); `None`: any.
    pub stack: Option<String>,
    /// How long a launched instance may take to pass its status checks.
    pub verify_timeout: Duration,
    /// How long RegisterImage may keep failing for now before the run fails.
    pub register_timeout: Duration,
}

impl DrConfig {
    pub fn new(bucket: &str, prefix: Prefix) -> Self {
        Self {
            bucket: bucket.into(),
            prefix,
            runs_prefix: "pilotlight-dr/runs/".into(),
            vmimport_role: "vmimport".into(),
            export_timeout: Duration::from_secs(6 * 3600),
            import_timeout: Duration::from_secs(12 * 3600),
            drill_subnet_id: None,
            drill_security_group_ids: Vec::new(),
            kms_key_id: None,
            stack: None,
            verify_timeout: Duration::from_secs(20 * 60),
            register_timeout: Duration::from_secs(30 * 60),
        }
    }

    fn run_key(&self, run_id: &str) -> String {
        format!("{}{run_id}.json", self.runs_prefix)
    }

    /// The run's HTML report, beside its record.
    pub fn report_key(&self, run_id: &str) -> String {
        format!("{}{run_id}.html", self.runs_prefix)
    }

    /// The run ids of a recovery of several VMs (`groups/` is not a run: `status` lists
    /// only the records directly under the runs prefix).
    pub fn group_key(&self, group: &str) -> String {
        format!("{}groups/{group}.json", self.runs_prefix)
    }

    /// Beside the run records (`pilotlight-dr/` by default).
    fn base(&self) -> &str {
        self.runs_prefix
            .strip_suffix("runs/")
            .unwrap_or(&self.runs_prefix)
    }

    /// Where a VM's snapshot-ready marker lives: beside the run records.
    pub fn ready_key(&self, site: &str, vm: &str) -> String {
        format!("{}ready/{site}/{vm}.json", self.base())
    }

    /// Where a VM's saved recovery settings live.
    pub fn vm_settings_key(&self, site: &str, vm: &str) -> String {
        format!("{}vms/{site}/{vm}.json", self.base())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrError {
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("no DR run {0:?} (runs are listed by `dr status`)")]
    NoSuchRun(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] CloudError),
    #[error("run record {key} is unreadable: {detail}")]
    BadRun { key: String, detail: String },
    #[error(
        "run {0} was changed by another caller since it was read; read it again (`dr status {0}`)"
    )]
    Conflict(String),
    #[error("{what} cannot be written as JSON ({detail}), which is a bug in the DR function; nothing was changed")]
    Encode { what: &'static str, detail: String },
}

/// `v` as JSON bytes for the bucket; a failure is [`DrError::Encode`], never a bad request.
fn json_bytes<T: serde::Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, DrError> {
    serde_json::to_vec_pretty(v).map_err(|e| DrError::Encode {
        what,
        detail: e.to_string(),
    })
}

/// Everything a handler call needs.
#[derive(Debug)]
pub struct DrEnv<S, E, B = NoEbs> {
    pub store: S,
    pub ec2: E,
    /// The recovery points (EC2 DescribeSnapshots and tags on them).
    pub ebs: B,
    pub cfg: DrConfig,
}

/// The Lambda's entry: a DR request, or the EventBridge schedule (which advances every
/// unfinished run).
pub async fn handle<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    event: Value,
) -> Result<Value, DrError> {
    if is_scheduled(&event) {
        let runs = status(env, None).await?;
        return Ok(
            serde_json::json!({ "advanced": runs.iter().map(|r| &r.run_id).collect::<Vec<_>>() }),
        );
    }
    let is_start = event.get("action").and_then(Value::as_str) == Some("start");
    match serde_json::from_value::<DrRequest>(event.clone()) {
        // A start is recorded even when it is invalid: the run says why it failed.
        Ok(DrRequest::Start(_)) => to_json(&start(env, event).await?),
        Err(_) if is_start => to_json(&start(env, event).await?),
        Err(e) => Err(DrError::BadRequest(format!(
            "{e} (expected {{\"action\": \"start\" | \"status\" | \"cleanup\" | \"configure\" | \"recover\" | \"report\", ...}})"
        ))),
        Ok(DrRequest::Status { run_id }) => to_json(&status(env, run_id.as_deref()).await?),
        Ok(DrRequest::Cleanup { run_id }) => to_json(&cleanup(env, &run_id).await?),
        Ok(DrRequest::Configure(settings)) => to_json(&configure(env, *settings).await?),
        Ok(DrRequest::Recover(req)) => to_json(&recover(env, req).await?),
        Ok(DrRequest::Report { run_id }) => to_json(&report(env, &run_id).await?),
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

fn new_run_id(now: DateTime<Utc>, request: &Value) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(request.to_string());
    h.update(now.timestamp_nanos_opt().unwrap_or(0).to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    let tag = hex::encode(&h.finalize()[..4]);
    format!("dr-{}-{tag}", now.format("%Y%m%dt%H%M%S"))
}

/// Saves the run over exactly the version it was read as (`If-Match`), or as a new
/// record (`If-None-Match: *`): a caller that lost a race gets [`DrError::Conflict`] and
/// has changed nothing.
async fn save<S: ObjectStore, E, B>(env: &DrEnv<S, E, B>, run: &mut Run) -> Result<(), DrError> {
    let key = env.cfg.run_key(&run.run_id);
    let body = json_bytes("the run record", run)?;
    let opts = match &run.etag.0 {
        Some(etag) => PutOptions::json().replacing(etag.clone()),
        None => PutOptions::json().create_only(),
    };
    match env.store.put(&key, body.into(), opts).await {
        Ok(Some(etag)) => run.etag.0 = Some(etag),
        Ok(None) => {
            // A store that names no version: read it back to learn it.
            run.etag = load(env, &run.run_id).await?.etag;
        }
        // 412: another version was saved; 404 on If-Match: the record is gone.
        Err(e)
            if e.kind == ErrorKind::PreconditionFailed
                || (run.etag.0.is_some() && e.is_not_found()) =>
        {
            return Err(DrError::Conflict(run.run_id.clone()))
        }
        Err(e) => return Err(e.into()),
    }
    if run.phase.is_final() {
        write_report(env, &run.run_id, crate::report::render(run, Utc::now())).await;
    }
    Ok(())
}

/// Writes a run's report beside its record (after the record: the record is the truth).
/// A report that cannot be written now is no reason to fail the run: `report` renders
/// one from the record and writes it again.
async fn write_report<S: ObjectStore, E, B>(env: &DrEnv<S, E, B>, run_id: &str, html: String) {
    let key = env.cfg.report_key(run_id);
    let opts = PutOptions {
        content_type: Some("text/html; charset=utf-8"),
        ..Default::default()
    };
    if let Err(e) = env.store.put(&key, html.into_bytes().into(), opts).await {
        tracing::warn!(run = %run_id, key, error = %e, "the run's report was not written; `pilotlight-dr report` renders it from the record");
    }
}

/// A report is small; a larger object under its key is not ours.
const MAX_REPORT: u64 = 4 << 20;

/// The report of a recovery of several VMs (`grp-...`): rendered from its runs' records
/// as they are now, and stored beside them once every run has ended.
async fn group_report<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    group: &str,
) -> Result<crate::model::Report, DrError> {
    let key = env.cfg.group_key(group);
    let found = match Name::new(group) {
        Ok(_) => env.store.get_if_exists(&key, MAX_RUN_RECORD).await?,
        Err(_) => None,
    };
    let record: GroupRecord = match found {
        Some(body) => serde_json::from_slice(&body).map_err(|e| DrError::BadRun {
            key: key.clone(),
            detail: e.to_string(),
        })?,
        None => return Err(DrError::NoSuchRun(group.into())),
    };
    let mut runs = Vec::new();
    for (vm, id) in &record.runs {
        match load(env, id).await {
            Ok(run) => runs.push(run),
            // A VM whose run could not be recorded (the bucket failing when it started).
            Err(DrError::NoSuchRun(_)) => {
                let request = serde_json::json!({"site": record.site, "vm": vm, "group": group});
                runs.push(failed_run(
                    request,
                    format!("not started (run {id} was never recorded): start this VM again"),
                ));
            }
            Err(e) => return Err(e),
        }
    }
    let html = crate::report::render_group(group, &runs, Utc::now());
    let report_key = env.cfg.report_key(group);
    if runs.iter().all(|r| r.phase.is_final()) {
        write_report(env, group, html.clone()).await;
    }
    Ok(crate::model::Report {
        run_id: group.into(),
        key: report_key,
        stored: false,
        html,
    })
}

/// The run's report: the stored one when it was written from the record as it is now,
/// else rendered from the record (and, for a run that has ended, stored again). A group
/// id (`grp-...`) gets the group's report.
pub async fn report<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    run_id: &str,
) -> Result<crate::model::Report, DrError> {
    if run_id.starts_with("grp-") {
        return group_report(env, run_id).await;
    }
    let run = load(env, run_id).await?;
    let key = env.cfg.report_key(run_id);
    let stamp = crate::report::stamp(&run);
    match env.store.get_versioned(&key, MAX_REPORT).await {
        Ok(Some(found)) => {
            if let Ok(html) = String::from_utf8(found.body.to_vec()) {
                if html.contains(&stamp) {
                    return Ok(crate::model::Report {
                        run_id: run.run_id,
                        key,
                        stored: true,
                        html,
                    });
                }
            }
        }
        Ok(None) => {}
        // The record is here, so the report can always be rendered from it.
        Err(e) => {
            tracing::warn!(key, error = %e, "the stored report is unreadable; rendering one from the record")
        }
    }
    let html = crate::report::render(&run, Utc::now());
    if run.phase.is_final() {
        write_report(env, &run.run_id, html.clone()).await;
    }
    Ok(crate::model::Report {
        html,
        run_id: run.run_id,
        key,
        stored: false,
    })
}

async fn load<S: ObjectStore, E, B>(env: &DrEnv<S, E, B>, run_id: &str) -> Result<Run, DrError> {
    if Name::new(run_id).is_err() {
        return Err(DrError::NoSuchRun(run_id.into()));
    }
    let key = env.cfg.run_key(run_id);
    let found = env
        .store
        .get_versioned(&key, MAX_RUN_RECORD)
        .await?
        .ok_or_else(|| DrError::NoSuchRun(run_id.into()))?;
    let mut run: Run = serde_json::from_slice(&found.body).map_err(|e| DrError::BadRun {
        key,
        detail: e.to_string(),
    })?;
    run.etag.0 = Some(found.etag);
    Ok(run)
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
                Ok(plan) => plan.map(|(d, t)| (d, t, req)),
                // The bucket failed for now: no run is recorded as failed for that; the
                // caller (the CLI, or whoever invoked) tries again.
                Err(e) if e.is_transient() => return Err(DrError::Store(e)),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e),
        },
        Ok(_) => Err("not a start request".into()),
        Err(e) => Err(format!("the request is not valid: {e}")),
    };
    let chosen = match plan {
        Ok((disks, time, req)) => choose_method(env, &req, &disks, time)
            .await?
            .map(|c| (disks, time, c)),
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
        claim(&mut run, "register", Utc::now());
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
        let key = ObjectKey::ExportRequest {
            disk: disk.clone(),
            id,
        }
        .to_key(&env.cfg.prefix);
        let body = json_bytes("the export request", &req)?;
        if let Err(e) = env.store.put(&key, body.into(), PutOptions::json()).await {
            run.fail(
                format!("cannot request the export of {disk}: {e}"),
                Utc::now(),
            );
            save(env, &mut run).await?;
            return Ok(run);
        }
        run.record("s3-object", key, Utc::now());
    }
    run.updated_at = Utc::now();
    save(env, &mut run).await?;
    tracing::info!(run = %run.run_id, disks = run.disks.len(), drill = run.drill, method = "import", "DR run started");
    Ok(run)
}

/// The method a run uses, why, and (when every disk has one) each disk's point snapshot.
type Chosen = (Method, String, Option<Vec<String>>);

/// Chooses the method: the one asked for, or for `auto` the snapshot method when the VM
/// is snapshot-ready and its point has every disk's snapshot. The outer error is AWS
/// failing for now, the inner one a run that cannot go on.
async fn choose_method<S: ObjectStore, E, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    req: &StartRequest,
    disks: &[(DiskId, u64)],
    time: DateTime<Utc>,
) -> Result<Result<Chosen, String>, CloudError> {
    let points = find_points(env, disks, time).await?;
    // Only `auto` asks whether the VM is snapshot-ready.
    let ready = match req.method {
        Method::Auto => read_ready(env, &req.site, &req.vm).await?,
        Method::Snapshot | Method::Import => None,
    };
    let vm = format!("{}/{}", req.site, req.vm);
    Ok(match (req.method, points) {
        (Method::Snapshot, Ok(p)) => Ok((Method::Snapshot, "snapshot: as asked".into(), Some(p))),
        (Method::Snapshot, Err(e)) => Err(format!(
            "the snapshot method needs a recovery point snapshot of every disk: {e}; use --method import"
        )),
        (Method::Import, p) => Ok((Method::Import, "import: as asked".into(), p.ok())),
        (Method::Auto, Ok(p)) => match ready {
            Some(r) => Ok((
                Method::Snapshot,
                format!(
                    "auto chose snapshot: {vm} passed verification with the snapshot method in run {} at {}",
                    r.run_id,
                    time_tag(r.passed_at)
                ),
                Some(p),
            )),
            None => Ok((
                Method::Import,
                format!(
                    "auto chose import: {vm} has no snapshot-method run that passed verification (a drill with --method snapshot proves it boots natively)"
                ),
                Some(p),
            )),
        },
        (Method::Auto, Err(e)) => Ok((
            Method::Import,
            format!("auto chose import: {e}"),
            None,
        )),
    })
}

/// Each disk's recovery point snapshot of exactly that generation and snapshot time.
async fn find_points<S, E, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    disks: &[(DiskId, u64)],
    time: DateTime<Utc>,
) -> Result<Result<Vec<String>, String>, CloudError> {
    let mut out = Vec::new();
    for (disk, g) in disks {
        let found =
            pilotlight_cli::points::of_generation(&env.ebs, disk, *g, env.cfg.stack.as_deref())
                .await;
        let point = match found {
            Ok(p) => p.filter(|p| p.snapshot_time == time),
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => return Ok(Err(format!("recovery points cannot be read ({e})"))),
        };
        match point {
            Some(p) => out.push(p.snapshot_id),
            None => {
                return Ok(Err(format!(
                    "no recovery point snapshot of {disk} generation {g} (at {}): recovery points off, not written yet, or deleted",
                    time_tag(time)
                )))
            }
        }
    }
    Ok(Ok(out))
}

async fn read_ready<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    site: &str,
    vm: &str,
) -> Result<Option<SnapshotReady>, CloudError> {
    let key = env.cfg.ready_key(site, vm);
    Ok(env
        .store
        .get_if_exists(&key, 64 << 10)
        .await?
        .and_then(|b| serde_json::from_slice::<SnapshotReady>(&b).ok())
        .filter(|r| r.site == site && r.vm == vm))
}

/// Removes this run's hold from the point snapshots it holds (what fails stays listed).
async fn release_holds<S, E, B: EbsApi>(env: &DrEnv<S, E, B>, run: &mut Run) {
    let keys = [tag::hold(&run.run_id)];
    let mut kept = Vec::new();
    for id in std::mem::take(&mut run.held) {
        if let Err(e) = env.ebs.delete_tags(&id, &keys).await {
            tracing::warn!(run = %run.run_id, snapshot = %id, error = %e, "cannot release the hold; the next call tries again");
            kept.push(id);
        }
    }
    run.held = kept;
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

/// A VM's saved settings (`None`: never configured).
pub async fn vm_settings<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    site: &str,
    vm: &str,
) -> Result<Option<VmSettings>, DrError> {
    if Name::new(site).is_err() || Name::new(vm).is_err() {
        return Ok(None);
    }
    let key = env.cfg.vm_settings_key(site, vm);
    match env.store.get_if_exists(&key, 1 << 20).await? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| DrError::BadRun {
                key,
                detail: e.to_string(),
            }),
    }
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

/// The run of a VM of a group that could not start, saying why.
fn failed_run(request: Value, why: String) -> Run {
    let mut run = Run::new(new_run_id(Utc::now(), &request), request, Utc::now());
    run.fail(why, Utc::now());
    run
}

fn valid_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|h| (8..=17).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Checks a start request without I/O. Each error says which field and why.
pub fn validate(cfg: &DrConfig, req: &StartRequest) -> Result<(), String> {
    let name = |what: &str, s: &str| {
        Name::new(s)
            .map(|_| ())
            .map_err(|e| format!("{what} {s:?}: {e}"))
    };
    name("site", &req.site)?;
    name("vm", &req.vm)?;
    if req.disks.is_empty() {
        return Err("disks: at least one disk is needed (the boot disk first)".into());
    }
    if req.disks.len() > 21 {
        return Err(format!(
            "disks: {} given; ImportImage takes at most 21",
            req.disks.len()
        ));
    }
    for (i, d) in req.disks.iter().enumerate() {
        name("disk", d)?;
        if req.disks[..i].contains(d) {
            return Err(format!("disks: {d:?} is listed twice"));
        }
    }
    if req.recovery_point == RecoveryPoint::Generation(0) {
        return Err("recovery_point: generations start at 1".into());
    }
    let l = &req.launch;
    let it = &l.instance_type;
    let ok_type = it.split_once('.').is_some_and(|(family, size)| {
        !family.is_empty()
            && !size.is_empty()
            && family
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase())
            && family
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && size
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    });
    if !ok_type {
        return Err(format!(
            "launch.instance_type {it:?} is not an EC2 instance type (like \"t3.medium\")"
        ));
    }
    // ImportImage API reference, BootMode: "The uefi-preferred boot mode isn't supported
    // for importing images."
    if req.method == Method::Import && l.boot_mode == Some(BootMode::UefiPreferred) {
        return Err("launch.boot_mode uefi-preferred: EC2 image import does not support it; use uefi or legacy-bios with --method import (or the snapshot method)".into());
    }
    if let Some(s) = &l.subnet_id {
        if !valid_id(s, "subnet-") {
            return Err(format!(
                "launch.subnet_id {s:?} is not a subnet id (subnet-0123abcd...)"
            ));
        }
    }
    if l.security_group_ids.len() > 16 {
        return Err("launch.security_group_ids: at most 16".into());
    }
    for g in &l.security_group_ids {
        if !valid_id(g, "sg-") {
            return Err(format!(
                "launch.security_group_ids: {g:?} is not a security group id (sg-0123abcd...)"
            ));
        }
    }
    let subnet = if req.drill {
        cfg.drill_subnet_id.as_ref().or(l.subnet_id.as_ref())
    } else {
        l.subnet_id.as_ref()
    };
    if l.private_ip.is_some() && subnet.is_none() {
        return Err(
            "launch.private_ip needs launch.subnet_id (the address must be in that subnet)".into(),
        );
    }
    if l.tags.len() > 40 {
        return Err(format!(
            "launch.tags: {} given; at most 40 (pilotlight adds its own)",
            l.tags.len()
        ));
    }
    for (k, v) in &l.tags {
        let lower = k.to_ascii_lowercase();
        if k.is_empty() || k.chars().count() > 128 {
            return Err(format!(
                "launch.tags: key {k:?} must be 1 to 128 characters"
            ));
        }
        if lower.starts_with("aws:") || lower.starts_with("pilotlight:") {
            return Err(format!(
                "launch.tags: key {k:?} uses a reserved prefix (aws:, pilotlight:)"
            ));
        }
        if v.chars().count() > 256 {
            return Err(format!(
                "launch.tags: the value of {k:?} is longer than 256 characters"
            ));
        }
    }
    Ok(())
}

/// Each disk and the generation to recover, checked against what is in the bucket; the
/// outer error is the bucket failing, the inner one a request that cannot be served.
async fn resolve<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    req: &StartRequest,
) -> Result<Result<(Vec<(DiskId, u64)>, DateTime<Utc>), String>, CloudError> {
    let p = &env.cfg.prefix;
    let vm_prefix = format!("{}{}/{}/", p.key_start(), req.site, req.vm);
    let vm_keys = env.store.list(&vm_prefix, |_| true).await?;
    match plan(env, req, &vm_prefix, &vm_keys) {
        Ok(committed) => one_time(env, committed, req.recovery_point).await,
        Err(e) => Ok(Err(e)),
    }
}

/// Manifests read per disk at most while looking for a common snapshot time.
const MAX_MANIFEST_READS: usize = 1000;

/// One generation per disk, all of one snapshot time: the newest such time (at or before
/// `--at`; or the time of the boot disk's generation N). Reads manifests newest first,
/// only as far back as needed. A disk without a generation at that time is named.
async fn one_time<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    committed: Vec<(DiskId, Vec<u64>)>,
    point: RecoveryPoint,
) -> Result<Result<(Vec<(DiskId, u64)>, DateTime<Utc>), String>, CloudError> {
    // Per disk: committed generations newest first, the cursor, their times read so far.
    struct Cursor {
        disk: DiskId,
        gens: Vec<u64>,
        at: usize,
        times: std::collections::BTreeMap<u64, Option<DateTime<Utc>>>,
    }
    let mut cs: Vec<Cursor> = committed
        .into_iter()
        .map(|(disk, mut gens)| {
            gens.sort_unstable_by(|a, b| b.cmp(a));
            Cursor {
                disk,
                gens,
                at: 0,
                times: Default::default(),
            }
        })
        .collect();
    let mut target: Option<DateTime<Utc>> = match point {
        RecoveryPoint::Latest => None,
        RecoveryPoint::At(t) | RecoveryPoint::Point(t) => Some(t),
        RecoveryPoint::Generation(g) => {
            let Some(first) = cs.first() else {
                return Ok(Err("no disks".into()));
            };
            match snapshot_time(env, &first.disk, g).await? {
                Some(t) => Some(t),
                None => {
                    return Ok(Err(format!(
                        "generation {g} of {} has no readable manifest",
                        first.disk
                    )))
                }
            }
        }
    };
    loop {
        // Each disk: its newest generation at or before the target.
        let mut found = Vec::with_capacity(cs.len());
        for c in cs.iter_mut() {
            loop {
                let Some(&g) = c.gens.get(c.at) else {
                    let when =
                        target.map_or("at all".into(), |t| format!("at or before {}", time_tag(t)));
                    return Ok(Err(format!(
                        "no committed generation of {} {when}: every disk of a run must come from one snapshot time (`pilotlight-dr points` and the receiver's status list what there is)",
                        c.disk
                    )));
                };
                if c.at >= MAX_MANIFEST_READS {
                    return Ok(Err(format!(
                        "{}: no generation at the VM's snapshot time within its newest {MAX_MANIFEST_READS}; name one with --at or --generation",
                        c.disk
                    )));
                }
                let t = match c.times.get(&g) {
                    Some(t) => *t,
                    None => {
                        let t = snapshot_time(env, &c.disk, g).await?;
                        c.times.insert(g, t);
                        t
                    }
                };
                match t {
                    Some(t) if target.is_none_or(|x| t <= x) => {
                        found.push((g, t));
                        break;
                    }
                    // Newer than the target, or a manifest that cannot be read: older.
                    _ => c.at += 1,
                }
            }
        }
        // Generation N names the time: every other disk must have exactly that one.
        if let (RecoveryPoint::Generation(_), Some(want)) = (point, target) {
            if let Some((c, (_, t))) = cs.iter().zip(&found).find(|(_, (_, t))| *t != want) {
                return Ok(Err(format!(
                    "{} has no generation at {} (the boot disk's generation's snapshot time; its newest before is {}): every disk of a run must come from one snapshot time",
                    c.disk,
                    time_tag(want),
                    time_tag(*t)
                )));
            }
        }
        // A point names the time exactly: name each disk that lacks it.
        if let RecoveryPoint::Point(want) = point {
            let lacking: Vec<String> = cs
                .iter()
                .zip(&found)
                .filter(|(_, (_, t))| *t != want)
                .map(|(c, (g, t))| {
                    format!(
                        "{} (its newest before is generation {g} at {})",
                        c.disk,
                        time_tag(*t)
                    )
                })
                .collect();
            if !lacking.is_empty() {
                return Ok(Err(format!(
                    "no VM recovery point at {}: {} lacking it: {} (`pilotlight-dr points` lists the points every disk has)",
                    time_tag(want),
                    if lacking.len() == 1 { "a disk is" } else { "disks are" },
                    lacking.join(", ")
                )));
            }
        }
        let oldest = found.iter().map(|(_, t)| *t).min();
        if let (Some(t), true) = (oldest, found.iter().all(|(_, t)| Some(*t) == oldest)) {
            let disks = cs
                .iter()
                .zip(found)
                .map(|(c, (g, _))| (c.disk.clone(), g))
                .collect();
            return Ok(Ok((disks, t)));
        }
        target = oldest;
    }
}

/// The snapshot time a generation's manifest records (`None`: missing or invalid).
async fn snapshot_time<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    disk: &DiskId,
    generation: u64,
) -> Result<Option<DateTime<Utc>>, CloudError> {
    let key = ObjectKey::Manifest {
        disk: disk.clone(),
        generation,
    };
    let bytes = env
        .store
        .get_if_exists(&key.to_key(&env.cfg.prefix), MAX_MANIFEST_BYTES as u64)
        .await?;
    Ok(bytes
        .and_then(|b| Manifest::from_json(&b).ok())
        .filter(|m| m.check_key(&key).is_ok())
        .map(|m| m.snapshot_time))
}

/// Each disk with its committed generations, checked against what is in the bucket.
fn plan<S, E, B>(
    env: &DrEnv<S, E, B>,
    req: &StartRequest,
    vm_prefix: &str,
    vm_keys: &[String],
) -> Result<Vec<(DiskId, Vec<u64>)>, String> {
    let p = &env.cfg.prefix;
    let b = &env.cfg.bucket;
    if vm_keys.is_empty() {
        return Err(format!(
            "unknown VM {}/{}: nothing is replicated under s3://{b}/{vm_prefix} (check the site and VM names; `pilotlight-receiver status` lists the disks)",
            req.site, req.vm
        ));
    }
    let mut out = Vec::new();
    for d in &req.disks {
        let disk = DiskId::new(&req.site, &req.vm, d).map_err(|e| e.to_string())?;
        let gp = generation_prefix(p, &disk);
        let keys: Vec<&String> = vm_keys.iter().filter(|k| k.starts_with(&gp)).collect();
        if keys.is_empty()
            && !vm_keys
                .iter()
                .any(|k| k.starts_with(&disk_prefix(p, &disk)))
        {
            return Err(format!(
                "unknown disk {disk}: nothing is replicated under s3://{b}/{gp}"
            ));
        }
        let mut committed: Vec<u64> = keys
            .iter()
            .filter_map(|k| match ObjectKey::parse(p, k) {
                Ok(ObjectKey::Manifest { generation, .. }) => Some(generation),
                _ => None,
            })
            .collect();
        committed.sort_unstable();
        let Some(&latest) = committed.last() else {
            return Err(format!(
                "nothing committed yet for {disk}: its first generation is still uploading (no manifest under s3://{b}/{gp}); wait for the sender's first run to finish"
            ));
        };
        if let RecoveryPoint::Generation(g) = req.recovery_point {
            if out.is_empty() && !committed.contains(&g) {
                return Err(format!(
                    "generation {g} is not available for {disk}: committed generations are {} to {latest}",
                    committed[0]
                ));
            }
        }
        out.push((disk, committed));
    }
    Ok(out)
}

/// Advances one run by what can be done now, saving after each step.
///
/// Any number of callers may advance one run at once (the schedule, `dr status`, a retry).
/// Every save is made `If-Match` on the version read; a caller that loses a save reloads
/// the run and stops, having created nothing. A step that creates something in EC2 is
/// claimed first: the claim ([`Claim`], until [`CLAIM_LEASE`]) is saved, and only the
/// caller whose save succeeded makes the call, in the same invocation. The call carries a
/// client token from the run and step, so when a claimer dies after the call and before
/// saving its outcome, the caller that takes the expired claim gets from EC2 what the
/// first call made.
pub async fn advance<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
) -> Result<(), DrError> {
    advance_from(env, run, false).await
}

/// [`advance`] by the caller whose save of the run's current claim just succeeded.
async fn advance_claimed<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
) -> Result<(), DrError> {
    advance_from(env, run, true).await
}

async fn advance_from<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
    mut claimed_here: bool,
) -> Result<(), DrError> {
    // At most: claim the import (or registration), make it; claim the launch, launch;
    // verify.
    for _ in 0..8 {
        let before = run.clone();
        match run.phase {
            Phase::Exporting => exporting(env, run).await?,
            Phase::Importing => importing(env, run, claimed_here).await,
            Phase::Registering => registering(env, run, claimed_here).await,
            Phase::Launching => launching(env, run, claimed_here).await,
            Phase::Verifying => verifying(env, run).await?,
            _ => {}
        }
        // A real recovery that failed gives its point back to retention (a drill's stays
        // held until its cleanup); an import needs its point only until it is exported.
        let exported = run.method == Some(Method::Import)
            && !matches!(run.phase, Phase::Exporting | Phase::Failed | Phase::Planned);
        if !run.held.is_empty() && ((run.phase == Phase::Failed && !run.drill) || exported) {
            release_holds(env, run).await;
        }
        if *run == before {
            break;
        }
        run.updated_at = Utc::now();
        match save(env, run).await {
            Ok(()) => {}
            Err(DrError::Conflict(_)) => {
                tracing::info!(run = %run.run_id, "another caller advanced the run; reloading");
                *run = load(env, &run.run_id).await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        // A claim this save made is this caller's to act on at once; anything else
        // (progress of a running import) waits for the next call.
        claimed_here = run.claim.is_some() && run.claim != before.claim;
        if !claimed_here && run.phase == before.phase {
            break;
        }
    }
    Ok(())
}

/// Claims `step` for this caller, unless another caller's claim still holds (then the
/// run is left as it is). The caller returns after claiming: `advance` saves the claim,
/// and makes the call only if that save wins.
fn claim(run: &mut Run, step: &str, now: DateTime<Utc>) {
    if run.claim.as_ref().is_some_and(|c| c.holds(now)) {
        return;
    }
    run.claim = Some(Claim {
        step: step.into(),
        until: now + chrono::Duration::from_std(CLAIM_LEASE).unwrap_or_default(),
    });
}

async fn exporting<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
) -> Result<(), DrError> {
    let p = &env.cfg.prefix;
    for i in 0..run.disks.len() {
        if run.disks[i].image_key.is_some() {
            continue;
        }
        let d = run.disks[i].clone();
        let (Ok(disk), Ok(id)) = (DiskId::parse(&d.disk), Name::new(&d.export_id)) else {
            run.fail(
                format!("run record names a bad disk {:?}", d.disk),
                Utc::now(),
            );
            return Ok(());
        };
        let key = ObjectKey::ExportResult {
            disk,
            id: id.clone(),
        }
        .to_key(p);
        let Some(body) = env
            .store
            .get_if_exists(&key, MAX_EXPORT_DOC_BYTES as u64)
            .await?
        else {
            continue;
        };
        let r = match ExportResult::from_json(&body, &id) {
            Ok(r) => r,
            Err(e) => {
                run.fail(
                    format!("the receiver's export result {key} is invalid: {e}"),
                    Utc::now(),
                );
                return Ok(());
            }
        };
        let expected = ObjectKey::ExportImage {
            disk: DiskId::parse(&d.disk).expect("parsed above"),
            id: id.clone(),
        }
        .to_key(p);
        match (r.status, r.image_key) {
            // Only the key this run asked the receiver to write: a result naming another
            // object (anyone's, anywhere in the bucket) is not imported.
            (ExportStatus::Done, Some(image_key)) if image_key != expected => {
                run.fail(
                    format!(
                        "the export result {key} names {image_key}, not the image this run asked for ({expected}); nothing was imported"
                    ),
                    Utc::now(),
                );
                return Ok(());
            }
            (ExportStatus::Done, Some(image_key)) if r.generation == Some(d.generation) => {
                run.record("s3-object", image_key.clone(), Utc::now());
                let disk = &mut run.disks[i];
                disk.image_key = Some(image_key);
                disk.size = r.size;
                disk.sha256 = r.sha256.map(|s| s.to_string());
            }
            (ExportStatus::Done, _) => {
                run.fail(
                    format!(
                        "the receiver exported {} at generation {:?}, not the requested {}",
                        d.disk, r.generation, d.generation
                    ),
                    Utc::now(),
                );
                return Ok(());
            }
            (ExportStatus::Failed, _) => {
                run.fail(
                    format!(
                        "export of {} failed: {}",
                        d.disk,
                        r.reason.unwrap_or_else(|| "no reason given".into())
                    ),
                    Utc::now(),
                );
                return Ok(());
            }
        }
    }
    let now = Utc::now();
    if run.disks.iter().any(|d| d.image_key.is_none()) {
        let waited = (now - run.phase_started()).to_std().unwrap_or_default();
        if waited > env.cfg.export_timeout {
            let missing: Vec<String> = run
                .disks
                .iter()
                .filter(|d| d.image_key.is_none())
                .map(|d| format!("{} (generation {})", d.disk, d.generation))
                .collect();
            run.fail(
                format!(
                    "export timeout: the receiver did not export {} within {}: it may not have applied that generation yet, or not be running (check `pilotlight-receiver status` and its logs)",
                    missing.join(", "),
                    humantime::format_duration(env.cfg.export_timeout)
                ),
                now,
            );
        }
        return Ok(());
    }
    // Every disk is exported: on to the import, claimed (saved before the call).
    run.reason = None;
    run.enter(Phase::Importing, now);
    claim(run, "import", now);
    Ok(())
}

/// Starts the run's import (the claimed step of `Importing` without a task).
async fn start_import<S: ObjectStore, E: Ec2Api, B: EbsApi>(env: &DrEnv<S, E, B>, run: &mut Run) {
    let now = Utc::now();
    let (vm, first) = (
        run.disks[0]
            .disk
            .rsplit_once('/')
            .map_or("", |(v, _)| v)
            .to_string(),
        run.disks[0].disk.clone(),
    );
    let Some(start) = start_request(run, now) else {
        return;
    };
    let req = ImportRequest {
        disks: run
            .disks
            .iter()
            .map(|d| {
                (
                    env.cfg.bucket.clone(),
                    d.image_key.clone().unwrap_or_default(),
                )
            })
            .collect(),
        role_name: env.cfg.vmimport_role.clone(),
        // `auto` may choose an import for a uefi-preferred VM: ImportImage refuses that
        // mode, so it is left to VM Import to detect (what uefi-preferred leaves open).
        boot_mode: start
            .launch
            .boot_mode
            .filter(|b| *b != BootMode::UefiPreferred)
            .map(|b| b.as_str().to_string()),
        license_type: start.launch.license_type.map(|l| l.as_str().to_string()),
        description: format!("pilotlight {} {vm} from {first}", run.run_id),
        tags: run_tags(run, &start),
        // Always encrypted: with the stack's key, else the account's EBS default key.
        encrypted: true,
        kms_key_id: env.cfg.kms_key_id.clone(),
        // One import per run, however often this step runs.
        client_token: format!("{}-import", run.run_id),
    };
    match env.ec2.import_image(&req).await {
        Ok(task_id) => {
            run.record("import-image-task", task_id.clone(), now);
            run.import = Some(ImportProgress {
                task_id,
                status: "active".into(),
                status_message: Some("pending".into()),
                progress_percent: Some(0),
            });
        }
        Err(e) if e.is_transient() => {
            run.reason = Some(format!("EC2 image import could not start yet: {e}"));
            check_import_timeout(env, run);
        }
        Err(e) => run.fail(format!("EC2 image import could not start: {e}"), now),
    }
}

/// The start request a run was made from; a run whose record lost it fails.
fn start_request(run: &mut Run, now: DateTime<Utc>) -> Option<StartRequest> {
    match serde_json::from_value(run.request.clone()) {
        Ok(DrRequest::Start(s)) => Some(*s),
        _ => {
            run.fail("run record lost its request", now);
            None
        }
    }
}

fn run_tags(run: &Run, start: &StartRequest) -> Vec<(String, String)> {
    let mut tags: Vec<(String, String)> = start
        .launch
        .tags
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    tags.push((TAG_RUN.into(), run.run_id.clone()));
    if run.drill {
        tags.push((TAG_DRILL.into(), "true".into()));
    }
    tags
}

async fn importing<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
    claimed_here: bool,
) {
    let Some(task_id) = run.import.as_ref().map(|i| i.task_id.clone()) else {
        if claimed_here {
            start_import(env, run).await;
            run.claim = None;
        } else {
            claim(run, "import", Utc::now());
        }
        return;
    };
    let t = match env.ec2.describe_import_image_task(&task_id).await {
        Ok(t) => t,
        Err(e) => {
            // Transient: the next call tries again, until the import timeout.
            run.reason = Some(format!("could not read import task {task_id}: {e}"));
            check_import_timeout(env, run);
            return;
        }
    };
    let now = Utc::now();
    run.import = Some(ImportProgress {
        task_id: task_id.clone(),
        status: t.status.clone(),
        status_message: t.status_message.clone(),
        progress_percent: t.progress,
    });
    match t.status.as_str() {
        "completed" => {
            let Some(image) = t.image_id else {
                run.fail(
                    format!("import task {task_id} completed without an AMI id"),
                    now,
                );
                return;
            };
            // ImportImage tags only its task: tag what it made, so cleanup (whose
            // permission is conditioned on this tag) may remove it, and nothing else.
            let mut ids = vec![image.clone()];
            ids.extend(t.snapshot_ids.iter().cloned());
            let mut tags = vec![(TAG_RUN.to_string(), run.run_id.clone())];
            if run.drill {
                tags.push((TAG_DRILL.into(), "true".into()));
            }
            if let Err(e) = env.ec2.create_tags(&ids, &tags).await {
                // Retried by the next call; the import stays complete.
                run.reason = Some(format!("could not tag the imported AMI {image}: {e}"));
                return;
            }
            run.record("image", image.clone(), now);
            for s in &t.snapshot_ids {
                run.record("snapshot", s.clone(), now);
            }
            run.image_id = Some(image);
            run.snapshot_ids = t.snapshot_ids;
            run.reason = None;
            // On to the launch, claimed (saved before the call).
            run.enter(Phase::Launching, now);
            claim(run, "launch", now);
        }
        "deleted" | "deleting" => run.fail(
            format!(
                "EC2 image import task {task_id} failed: {}",
                t.status_message
                    .unwrap_or_else(|| "no status message".into())
            ),
            now,
        ),
        _ => {
            run.reason = None;
            check_import_timeout(env, run);
        }
    }
}

fn check_import_timeout<S, E, B>(env: &DrEnv<S, E, B>, run: &mut Run) {
    let now = Utc::now();
    let waited = (now - run.phase_started()).to_std().unwrap_or_default();
    if waited > env.cfg.import_timeout {
        run.fail(
            format!(
                "import timeout: EC2 did not finish importing within {}",
                humantime::format_duration(env.cfg.import_timeout)
            ),
            now,
        );
    }
}

async fn launching<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
    claimed_here: bool,
) {
    let now = Utc::now();
    if run.instance_ids.is_empty() && !claimed_here {
        claim(run, "launch", now);
        return;
    }
    let Some(start) = start_request(run, now) else {
        return;
    };
    let Some(image_id) = run.image_id.clone() else {
        run.fail("run record lost its AMI id", now);
        return;
    };
    if !run.instance_ids.is_empty() {
        run.enter(Phase::Verifying, now);
        return;
    }
    let (subnet_id, security_group_ids) = if run.drill && env.cfg.drill_subnet_id.is_some() {
        (
            env.cfg.drill_subnet_id.clone(),
            env.cfg.drill_security_group_ids.clone(),
        )
    } else {
        (
            start.launch.subnet_id.clone(),
            start.launch.security_group_ids.clone(),
        )
    };
    let mut tags = run_tags(run, &start);
    if !tags.iter().any(|(k, _)| k == "Name") {
        tags.push((
            "Name".into(),
            format!("{} (pilotlight {})", start.vm, run.run_id),
        ));
    }
    let req = LaunchRequest {
        image_id,
        instance_type: start.launch.instance_type.clone(),
        subnet_id,
        security_group_ids,
        private_ip: start.launch.private_ip.map(|ip| ip.to_string()),
        tags,
        // One launch per run, however often this step runs (a timeout after the call,
        // two advancers): EC2 returns the first launch for the same token.
        client_token: format!("{}-launch", run.run_id),
        launch_template: start.launch.launch_template.as_deref().map(launch_template),
        imds_v2: true,
        instance_profile: start.launch.instance_profile.clone(),
    };
    let result = env.ec2.run_instance(&req).await;
    run.claim = None;
    match result {
        Ok(id) => {
            run.record("instance", id.clone(), Utc::now());
            run.instance_ids.push(id);
            run.reason = None;
            run.enter(Phase::Verifying, Utc::now());
            tracing::info!(run = %run.run_id, instance = ?run.instance_ids, "instance launched; verifying");
        }
        // Throttled, unreachable, EC2 failing: the claim is released and the next call
        // launches (same token: if this one did launch, EC2 answers with it).
        Err(e) if e.is_transient() => {
            run.reason = Some(format!(
                "launching the instance failed for now, retried: {e}"
            ));
        }
        Err(e) => run.fail(
            format!(
                "launching the instance failed (the AMI {} is kept): {e}",
                req.image_id
            ),
            Utc::now(),
        ),
    }
}

/// `lt-0123...[:VERSION]` as EC2's (id, version); without a version, the template's
/// default version.
pub fn launch_template(s: &str) -> (String, String) {
    match s.split_once(':') {
        Some((id, v)) => (id.to_string(), v.to_string()),
        None => (s.to_string(), "$Default".to_string()),
    }
}

/// The AMI's device for disk `i`: the boot disk on `/dev/xvda`, the others from
/// `/dev/sdf` on (EC2's recommended names for EBS volumes).
fn device_name(i: usize) -> String {
    if i == 0 {
        "/dev/xvda".into()
    } else {
        format!("/dev/sd{}", (b'f' + (i as u8 - 1)) as char)
    }
}

/// Registers the run's AMI from its point's snapshots (the claimed step of
/// `Registering`). The AMI's name is the run's: EC2 takes no client token for
/// RegisterImage but refuses a second AMI of one name, so a repeated call finds the
/// first one instead of making another.
async fn registering<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
    claimed_here: bool,
) {
    let now = Utc::now();
    if run.image_id.is_some() {
        run.enter(Phase::Launching, now);
        claim(run, "launch", now);
        return;
    }
    if !claimed_here {
        claim(run, "register", now);
        return;
    }
    let Some(start) = start_request(run, now) else {
        return;
    };
    let mut mappings = Vec::new();
    for (i, d) in run.disks.iter().enumerate() {
        let Some(snap) = d.snapshot_id.clone() else {
            run.fail(
                format!("{} has no recovery point snapshot on record", d.disk),
                now,
            );
            return;
        };
        mappings.push(BlockMapping {
            device_name: device_name(i),
            snapshot_id: snap,
            volume_type: "gp3".into(),
            delete_on_termination: run.drill,
        });
    }
    let time = run
        .point_time
        .map(|t| t.format("%Y%m%dT%H%M%SZ").to_string());
    // RegisterImage API reference: Name "3-128 alphanumeric characters ..."; Description
    // up to 255. Long site and VM names give way; the run id (unique) stays whole.
    let tail = format!(" {} {}", time.as_deref().unwrap_or("latest"), run.run_id);
    let who = at_most(
        &format!("pilotlight {}-{}", start.site, start.vm),
        128usize.saturating_sub(tail.chars().count()),
    );
    let req = RegisterRequest {
        name: format!("{who}{tail}"),
        description: at_most(
            &format!(
                "pilotlight {}/{} recovery point {} (run {})",
                start.site,
                start.vm,
                run.point_time.map(time_tag).unwrap_or_default(),
                run.run_id
            ),
            MAX_DESCRIPTION,
        ),
        root_device_name: device_name(0),
        mappings,
        architecture: start
            .launch
            .architecture
            .clone()
            .unwrap_or_else(|| "x86_64".into()),
        boot_mode: start.launch.boot_mode.map(|b| b.as_str().to_string()),
        ena_support: true,
        imds_v2: true,
        tags: run_tags(run, &start),
    };
    let result = match env.ec2.register_image(&req).await {
        Err(e) if e.code.as_deref() == Some("InvalidAMIName.Duplicate") => {
            match env.ec2.find_image(&req.name).await {
                Ok(Some(id)) => Ok(id),
                Ok(None) => Err(e),
                Err(f) => Err(f),
            }
        }
        r => r,
    };
    run.claim = None;
    match result {
        Ok(id) => {
            run.record("image", id.clone(), Utc::now());
            run.image_id = Some(id);
            run.reason = None;
            let now = Utc::now();
            run.enter(Phase::Launching, now);
            claim(run, "launch", now);
        }
        Err(e) if e.is_transient() => {
            run.reason = Some(format!("registering the AMI failed for now, retried: {e}"));
            let waited = (Utc::now() - run.phase_started())
                .to_std()
                .unwrap_or_default();
            if waited > env.cfg.register_timeout {
                run.fail(
                    format!(
                        "RegisterImage kept failing for {}: {e}",
                        humantime::format_duration(env.cfg.register_timeout)
                    ),
                    Utc::now(),
                );
            }
        }
        Err(e) => run.fail(
            format!("RegisterImage refused the AMI of the recovery point's snapshots: {e}"),
            Utc::now(),
        ),
    }
}

/// Console lines kept from a failed instance.
const CONSOLE_TAIL_LINES: usize = 30;

/// Waits for the instance's status checks; records pass or fail, and for the snapshot
/// method marks the VM snapshot-ready (or clears the mark).
async fn verifying<S: ObjectStore, E: Ec2Api, B>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
) -> Result<(), DrError> {
    let now = Utc::now();
    let Some(id) = run.instance_ids.first().cloned() else {
        run.fail("run record lost its instance id", now);
        return Ok(());
    };
    let waited = (now - run.phase_started()).to_std().unwrap_or_default();
    let health = match env.ec2.instance_health(&id).await {
        Ok(h) => h,
        Err(e) if e.is_transient() && waited <= env.cfg.verify_timeout => {
            run.reason = Some(format!("status checks of {id} unreadable for now: {e}"));
            return Ok(());
        }
        Err(e) => {
            run.fail(
                format!("verification of {id} failed: its status checks cannot be read: {e}"),
                now,
            );
            return mark_ready(env, run, false).await;
        }
    };
    let mut passed = health.as_ref().is_some_and(|h| h.passed());
    let mut failed = health.as_ref().is_some_and(|h| h.failed());
    // With an instance profile the instance may run the SSM agent: it must come online.
    let mut ssm_ping = None;
    let mut ssm_problem = None;
    if passed {
        match ssm_check(env, &id).await {
            Ok(SsmCheck::NotManaged) => {}
            Ok(SsmCheck::Ping(p)) if p == "Online" => ssm_ping = Some(p),
            Ok(SsmCheck::Ping(p)) => {
                passed = false;
                failed = p != "Registering";
                ssm_problem = Some(format!("SSM agent {p}"));
                ssm_ping = Some(p);
            }
            Ok(SsmCheck::NotYet) => {
                passed = false;
                ssm_problem = Some("SSM agent not registered".into());
            }
            Err(e) if e.is_transient() => {
                passed = false;
                ssm_problem = Some(format!("SSM unreadable for now: {e}"));
            }
            Err(e) => {
                passed = false;
                failed = true;
                ssm_problem = Some(format!("SSM ping unreadable: {e}"));
            }
        }
    }
    if !passed && !failed && waited <= env.cfg.verify_timeout {
        if let Some(why) = &ssm_problem {
            run.reason = Some(format!(
                "status checks of {id} passed; waiting for the SSM agent ({why})"
            ));
            return Ok(());
        }
        run.reason = Some(match &health {
            Some(h) => format!(
                "waiting for status checks of {id}: {}, instance {}, system {}",
                h.state, h.instance_status, h.system_status
            ),
            None => format!("waiting for status checks of {id}"),
        });
        return Ok(());
    }
    let h = health.unwrap_or(pilotlight_cloud::ec2::InstanceHealth {
        state: "unknown".into(),
        instance_status: "insufficient-data".into(),
        system_status: "insufficient-data".into(),
    });
    let mut v = Verification {
        passed,
        instance_id: id.clone(),
        state: h.state.clone(),
        instance_status: h.instance_status.clone(),
        system_status: h.system_status.clone(),
        checked_at: now,
        console_tail: None,
        ssm_ping,
    };
    if passed {
        run.verification = Some(v);
        run.reason = None;
        run.enter(Phase::Done, Utc::now());
        tracing::info!(run = %run.run_id, instance = %id, "DR run done: status checks passed");
        return mark_ready(env, run, true).await;
    }
    v.console_tail = match env.ec2.console_output(&id).await {
        Ok(Some(out)) => {
            let lines: Vec<&str> = out.lines().collect();
            Some(lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n"))
        }
        Ok(None) => None,
        Err(e) => Some(format!("(console output unreadable: {e})")),
    };
    run.verification = Some(v);
    run.fail(
        format!(
            "verification failed: instance {id} is {}, instance check {}, system check {}{}{} (console output's last lines in the run record; the instance is kept)",
            h.state,
            h.instance_status,
            h.system_status,
            ssm_problem.map(|p| format!(", {p}")).unwrap_or_default(),
            if failed { "" } else { " when the verify timeout ran out" }
        ),
        Utc::now(),
    );
    mark_ready(env, run, false).await
}

enum SsmCheck {
    /// No instance profile: no SSM agent to expect.
    NotManaged,
    /// An instance profile, but SSM does not list the instance yet.
    NotYet,
    Ping(String),
}

async fn ssm_check<S, E: Ec2Api, B>(
    env: &DrEnv<S, E, B>,
    id: &str,
) -> Result<SsmCheck, CloudError> {
    if env.ec2.instance_profile(id).await?.is_none() {
        return Ok(SsmCheck::NotManaged);
    }
    Ok(match env.ec2.ssm_ping(id).await? {
        Some(p) => SsmCheck::Ping(p),
        None => SsmCheck::NotYet,
    })
}

/// Marks the VM snapshot-ready after a snapshot-method run passed, or clears the mark
/// after one failed. Import runs change nothing.
async fn mark_ready<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    run: &Run,
    passed: bool,
) -> Result<(), DrError> {
    if run.method != Some(Method::Snapshot) {
        return Ok(());
    }
    let Some(first) = run.disks.first().and_then(|d| DiskId::parse(&d.disk).ok()) else {
        return Ok(());
    };
    let (site, vm) = (first.site.to_string(), first.vm.to_string());
    let key = env.cfg.ready_key(&site, &vm);
    if passed {
        let mark = SnapshotReady {
            site,
            vm,
            run_id: run.run_id.clone(),
            passed_at: Utc::now(),
            point_time: run.point_time,
        };
        let body = json_bytes("the snapshot-ready mark", &mark)?;
        env.store.put(&key, body.into(), PutOptions::json()).await?;
    } else if env.store.head(&key).await?.is_some() {
        env.store.delete(&key).await?;
    }
    Ok(())
}

/// Advances and returns one run, or every run not finished yet (newest first).
pub async fn status<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run_id: Option<&str>,
) -> Result<Vec<Run>, DrError> {
    let ids: Vec<String> = match run_id {
        Some(id) => vec![id.to_string()],
        None => env
            .store
            .list(&env.cfg.runs_prefix, |_| true)
            .await?
            .iter()
            .filter_map(|k| k.strip_prefix(&env.cfg.runs_prefix))
            .filter_map(|k| k.strip_suffix(".json"))
            .filter(|k| !k.contains('/'))
            .map(String::from)
            .collect(),
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
    let of = |kind: &str| -> Vec<String> {
        created
            .iter()
            .filter(|c| c.kind == kind)
            .map(|c| c.id.clone())
            .collect()
    };
    let mut removed = Vec::new();
    let instances = of("instance");
    match env.ec2.terminate_instances(&instances).await {
        Ok(()) => removed.extend(instances.iter().map(|i| ("instance", i.clone()))),
        Err(e) => problems.push(e.to_string()),
    }
    for image in of("image") {
        match env.ec2.deregister_image(&image).await {
            Ok(()) => removed.push(("image", image)),
            Err(e) => problems.push(e.to_string()),
        }
    }
    for snap in of("snapshot") {
        match env.ec2.delete_snapshot(&snap).await {
            Ok(()) => removed.push(("snapshot", snap)),
            Err(e) => problems.push(e.to_string()),
        }
    }
    // The exported images, and the requests and results beside them.
    for d in &run.disks {
        let (Ok(disk), Ok(id)) = (DiskId::parse(&d.disk), Name::new(&d.export_id)) else {
            continue;
        };
        for key in [
            ObjectKey::ExportImage {
                disk: disk.clone(),
                id: id.clone(),
            },
            ObjectKey::ExportResult {
                disk: disk.clone(),
                id: id.clone(),
            },
            ObjectKey::ExportRequest { disk, id },
        ] {
            let key = key.to_key(&env.cfg.prefix);
            if env.store.head(&key).await?.is_none() {
                continue;
            }
            match env.store.delete(&key).await {
                Ok(()) => removed.push(("s3-object", key)),
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
        run.removed.push(crate::model::Created {
            kind: kind.into(),
            id,
            at: now,
        });
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
