//! Running a plan: one point time for every VM, wave by wave.
//!
//! ```text
//! plan_start ─► point: the newest snapshot time every disk of every VM has (or at/before --at)
//! wave N: a DR run per VM (its saved settings, that point) ─► verified ─► steps (SSM) ─► health (SSM probe)
//!         ─► every VM of the wave ready ─► DNS (Route 53 UPSERT) ─► wave N+1
//! a VM that fails stops the plan (unless the plan says it is optional)
//! drill: cleanup removes every run's resources and every record the plan wrote
//! ```
//!
//! The plan run is a record beside the runs (`{runs_prefix}plans/{id}.json`), saved over
//! the version read; any call (`plan status`, the schedule) advances it by one look at
//! each VM. It keeps the plan as it was when it started.

use super::Plan;
use crate::config::DrEnv;
use crate::error::{json_bytes, DrError};
use crate::model::{Etag, Phase, RecoveryPoint, StartRequest};
use crate::runs::{new_run_id, vm_settings};
use chrono::{DateTime, Utc};
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::ec2::Ec2Api;
use pilotlight_cloud::route53::{ARecord, DnsApi};
use pilotlight_cloud::ssm::RunCommandApi;
use pilotlight_cloud::witness::WitnessApi;
use pilotlight_cloud::ObjectStore;
use serde::{Deserialize, Serialize};

pub const PLAN_RUN_VERSION: u32 = 1;
/// Health probes a VM gets before it counts as failed.
pub const HEALTH_ATTEMPTS: u32 = 5;
const MAX_PLAN_RUN: u64 = 4 << 20;

/// The DR environment plus what plans need beyond it.
#[derive(Debug)]
pub struct PlanEnv<'a, S, E, B, D, R, W> {
    pub dr: &'a DrEnv<S, E, B>,
    pub dns: &'a D,
    pub cmd: &'a R,
    /// Guarded automatic failover's witness and notifications.
    pub witness: &'a W,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanPhase {
    Running,
    Done,
    Failed,
    /// A drill whose runs and records were removed.
    CleanedUp,
}

impl PlanPhase {
    pub fn is_final(self) -> bool {
        !matches!(self, PlanPhase::Running)
    }
}

/// Where one VM of a plan run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStage {
    /// Its wave has not started.
    Waiting,
    /// Its DR run is being started: recorded before the start, so a crash between the
    /// start and the record is found (a run of this VM in this plan run) instead of
    /// starting a second one.
    Starting,
    /// Its DR run is under way.
    Recovering,
    /// Running its post-launch steps.
    Steps,
    /// Probing its health check.
    Health,
    /// Verified, steps run, healthy: waiting for the rest of its wave.
    Ready,
    /// Its records are written: done.
    Done,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRun {
    pub vm: String,
    pub optional: bool,
    pub stage: VmStage,
    pub run_id: Option<String>,
    pub instance_id: Option<String>,
    /// The next step to run (index into the plan's steps of this VM).
    #[serde(default)]
    pub next_step: usize,
    /// The SSM command under way: (command id, what it is).
    #[serde(default)]
    pub command: Option<(String, String)>,
    /// Each step and probe as it ended: (what, SSM status, the end of its output).
    #[serde(default)]
    pub commands: Vec<(String, String, String)>,
    #[serde(default)]
    pub health_attempts: u32,
    pub reason: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub ready_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveRun {
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub vms: Vec<VmRun>,
}

/// One record the plan wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsChange {
    pub vm: String,
    pub zone_id: String,
    pub record: ARecord,
    pub written_at: DateTime<Utc>,
    pub removed_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRun {
    pub version: u32,
    pub plan_run_id: String,
    pub plan: Plan,
    pub drill: bool,
    pub phase: PlanPhase,
    /// The one VM recovery point time every VM of the plan comes from.
    pub point_time: DateTime<Utc>,
    pub waves: Vec<WaveRun>,
    #[serde(default)]
    pub dns: Vec<DnsChange>,
    pub reason: Option<String>,
    #[serde(default)]
    pub log: Vec<String>,
    /// Started by guarded automatic failover: the decisions that led to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub automation: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip)]
    pub etag: Etag,
}

impl PlanRun {
    pub(crate) fn note(&mut self, what: impl Into<String>) {
        let what = what.into();
        tracing::info!(plan_run = %self.plan_run_id, "{what}");
        self.log
            .push(format!("{}: {what}", Utc::now().to_rfc3339()));
    }
    fn fail(&mut self, why: String) {
        self.note(format!("failed: {why}"));
        self.phase = PlanPhase::Failed;
        self.reason = Some(why);
    }
    /// Every DR run the plan started.
    pub fn run_ids(&self) -> impl Iterator<Item = &String> {
        self.waves
            .iter()
            .flat_map(|w| &w.vms)
            .filter_map(|v| v.run_id.as_ref())
    }
}

pub(crate) fn key<S, E, B>(env: &DrEnv<S, E, B>, id: &str) -> String {
    format!("{}plans/{id}.json", env.cfg.runs_prefix)
}

pub async fn load_plan_run<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    id: &str,
) -> Result<PlanRun, DrError> {
    if pilotlight_protocol::Name::new(id).is_err() {
        return Err(DrError::NoSuchRun(id.into()));
    }
    let (mut r, etag): (PlanRun, String) =
        crate::runs::get_versioned(&env.store, &key(env, id), MAX_PLAN_RUN)
            .await?
            .ok_or_else(|| DrError::NoSuchRun(id.into()))?;
    r.etag.0 = Some(etag);
    Ok(r)
}

pub(crate) async fn save<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    r: &mut PlanRun,
) -> Result<(), DrError> {
    r.updated_at = Utc::now();
    let key = key(env, &r.plan_run_id);
    let body = json_bytes("the plan run", r)?;
    match crate::runs::put_versioned(&env.store, &key, body, r.etag.0.as_deref(), &r.plan_run_id)
        .await?
    {
        Some(etag) => r.etag.0 = Some(etag),
        None => r.etag = load_plan_run(env, &r.plan_run_id).await?.etag,
    }
    if r.phase.is_final() {
        let html = crate::report::plan::render(r, Utc::now());
        crate::runs::write_report(env, &r.plan_run_id, html).await;
    }
    Ok(())
}

/// A VM's start request from its saved settings, at `point`.
pub(super) async fn start_request<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    plan: &Plan,
    vm: &str,
    point: RecoveryPoint,
    drill: bool,
    group: &str,
) -> Result<serde_json::Value, String> {
    match vm_settings(env, &plan.site, vm).await {
        Ok(Some(s)) => Ok(serde_json::json!({
            "action": "start",
            "site": plan.site,
            "vm": vm,
            "disks": s.disks,
            "recovery_point": point,
            "method": s.method,
            "launch": s.launch,
            "drill": drill,
            "group": group,
        })),
        Ok(None) => Err(format!(
            "no saved recovery settings for {}/{vm}: save them (`pilotlight-dr configure --site {} --vm {vm} --disk ...`)",
            plan.site, plan.site
        )),
        Err(e) => Err(format!("cannot read the saved settings of {vm}: {e}")),
    }
}

/// The newest snapshot time every disk of every VM of the plan has (at or before `at`).
pub(crate) async fn common_point<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    plan: &Plan,
    at: Option<DateTime<Utc>>,
) -> Result<DateTime<Utc>, String> {
    let mut committed = Vec::new();
    for vm in plan.all_vms() {
        let mut v = start_request(env, plan, vm, RecoveryPoint::Latest, true, "-").await?;
        if let Some(o) = v.as_object_mut() {
            o.remove("action");
        }
        let req: StartRequest = serde_json::from_value(v).map_err(|e| format!("{vm}: {e}"))?;
        let p = &env.cfg.prefix;
        let vm_prefix = format!("{}{}/{}/", p.key_start(), req.site, req.vm);
        let keys = env
            .store
            .list(&vm_prefix, |_| true)
            .await
            .map_err(|e| e.to_string())?;
        committed.extend(crate::plan::plan(env, &req, &vm_prefix, &keys)?);
    }
    let point = at.map_or(RecoveryPoint::Latest, RecoveryPoint::At);
    crate::plan::one_time(env, committed, point)
        .await
        .map(|(_, t)| t)
        .map_err(|e| format!("no point every VM of the plan has: {e}"))
}

/// Starts a plan: its common point, the record, the first wave.
pub async fn start<
    S: ObjectStore,
    E: Ec2Api,
    B: EbsApi,
    D: DnsApi,
    R: RunCommandApi,
    W: WitnessApi,
>(
    p: &PlanEnv<'_, S, E, B, D, R, W>,
    plan: Plan,
    drill: bool,
    at: Option<DateTime<Utc>>,
) -> Result<PlanRun, DrError> {
    let env = p.dr;
    let point_time = common_point(env, &plan, at)
        .await
        .map_err(DrError::Refused)?;
    let now = Utc::now();
    let id = format!(
        "plan-{}-{}",
        plan.name,
        new_run_id(now, &serde_json::json!({"plan": plan.name, "drill": drill}))
            .trim_start_matches("dr-")
    );
    let waves = plan
        .waves
        .iter()
        .map(|w| WaveRun {
            started_at: None,
            ended_at: None,
            vms: w
                .iter()
                .map(|vm| VmRun {
                    vm: vm.clone(),
                    optional: plan.vm(vm).optional,
                    stage: VmStage::Waiting,
                    run_id: None,
                    instance_id: None,
                    next_step: 0,
                    command: None,
                    commands: Vec::new(),
                    health_attempts: 0,
                    reason: None,
                    started_at: None,
                    ready_at: None,
                })
                .collect(),
        })
        .collect();
    let mut r = PlanRun {
        version: PLAN_RUN_VERSION,
        plan_run_id: id,
        plan,
        drill,
        phase: PlanPhase::Running,
        point_time,
        waves,
        dns: Vec::new(),
        reason: None,
        log: Vec::new(),
        automation: Vec::new(),
        created_at: now,
        updated_at: now,
        etag: Etag::default(),
    };
    r.note(format!(
        "plan {} started{}: every VM from the point at {}",
        r.plan.name,
        if drill { " as a drill" } else { "" },
        point_time.to_rfc3339()
    ));
    save(env, &mut r).await?;
    advance(p, &mut r).await?;
    Ok(r)
}

/// Moves a plan run on by one look at each VM of its current wave; saves what changed.
pub async fn advance<
    S: ObjectStore,
    E: Ec2Api,
    B: EbsApi,
    D: DnsApi,
    R: RunCommandApi,
    W: WitnessApi,
>(
    p: &PlanEnv<'_, S, E, B, D, R, W>,
    r: &mut PlanRun,
) -> Result<(), DrError> {
    let before = r.clone();
    let result = step(p, r).await;
    if *r != before {
        save(p.dr, r).await?;
    }
    result
}

async fn step<S: ObjectStore, E: Ec2Api, B: EbsApi, D: DnsApi, R: RunCommandApi, W: WitnessApi>(
    p: &PlanEnv<'_, S, E, B, D, R, W>,
    r: &mut PlanRun,
) -> Result<(), DrError> {
    if r.phase != PlanPhase::Running {
        return Ok(());
    }
    let Some(w) = r.waves.iter().position(|w| w.ended_at.is_none()) else {
        r.phase = PlanPhase::Done;
        r.note("every wave is done");
        return Ok(());
    };
    if r.waves[w].started_at.is_none() {
        r.waves[w].started_at = Some(Utc::now());
        r.note(format!(
            "wave {} started: {}",
            w + 1,
            r.plan.waves[w].join(", ")
        ));
    }
    for i in 0..r.waves[w].vms.len() {
        let plan = r.plan.vm(&r.waves[w].vms[i].vm);
        let (point, drill, id) = (r.point_time, r.drill, r.plan_run_id.clone());
        let mut vm = r.waves[w].vms[i].clone();
        super::vm::vm_step(p, &r.plan, &plan, &mut vm, point, drill, &id).await?;
        if vm.stage != r.waves[w].vms[i].stage {
            let what = match (&vm.stage, &vm.reason) {
                (VmStage::Failed, Some(why)) => format!("{}: failed: {why}", vm.vm),
                (s, _) => format!("{}: {s:?}", vm.vm),
            };
            r.note(what);
        }
        r.waves[w].vms[i] = vm;
    }
    let vms = &r.waves[w].vms;
    if let Some(bad) = vms
        .iter()
        .find(|v| v.stage == VmStage::Failed && !v.optional)
    {
        let why = format!(
            "wave {}: {} failed: {}; the plan stops here (later waves not started)",
            w + 1,
            bad.vm,
            bad.reason.clone().unwrap_or_default()
        );
        r.fail(why);
        return Ok(());
    }
    let settled = vms
        .iter()
        .all(|v| matches!(v.stage, VmStage::Ready | VmStage::Done | VmStage::Failed));
    if settled {
        write_dns(p, r, w).await?;
        r.waves[w].ended_at = Some(Utc::now());
        r.note(format!("wave {} done", w + 1));
        if r.waves.iter().all(|w| w.ended_at.is_some()) {
            r.phase = PlanPhase::Done;
            r.note("every wave is done");
        }
    }
    Ok(())
}

/// A wave's A records, once every VM of it is ready: each name at the instance's private
/// address (a drill's in the drill zone, or none without one).
async fn write_dns<
    S: ObjectStore,
    E: Ec2Api,
    B: EbsApi,
    D: DnsApi,
    R: RunCommandApi,
    W: WitnessApi,
>(
    p: &PlanEnv<'_, S, E, B, D, R, W>,
    r: &mut PlanRun,
    w: usize,
) -> Result<(), DrError> {
    let Some(dns) = r.plan.dns.clone() else {
        for v in r.waves[w]
            .vms
            .iter_mut()
            .filter(|v| v.stage == VmStage::Ready)
        {
            v.stage = VmStage::Done;
        }
        return Ok(());
    };
    for i in 0..r.waves[w].vms.len() {
        if r.waves[w].vms[i].stage != VmStage::Ready {
            continue;
        }
        let vm = r.waves[w].vms[i].clone();
        let names = r.plan.vm(&vm.vm).dns;
        let address = match &vm.instance_id {
            Some(id) => p.dr.ec2.instance_address(id).await?,
            None => None,
        };
        for name in names {
            let (zone_id, name) = if r.drill {
                match (&dns.drill_zone_id, r.plan.drill_name(&name)) {
                    (Some(z), Some(n)) => (z.clone(), n),
                    _ => {
                        r.note(format!("{}: no drill zone: {name} left alone", vm.vm));
                        continue;
                    }
                }
            } else {
                (dns.zone_id.clone(), name)
            };
            let Some(addr) = address.clone() else {
                r.note(format!(
                    "{}: no private address yet for {name}; next time",
                    vm.vm
                ));
                return Ok(());
            };
            let record = ARecord {
                name: name.clone(),
                ttl: dns.ttl,
                addresses: vec![addr],
            };
            if r.dns
                .iter()
                .any(|c| c.record == record && c.zone_id == zone_id && c.removed_at.is_none())
            {
                continue;
            }
            p.dns.upsert_a(&zone_id, &record).await?;
            r.dns.push(DnsChange {
                vm: vm.vm.clone(),
                zone_id,
                record: record.clone(),
                written_at: Utc::now(),
                removed_at: None,
            });
            r.note(format!(
                "{}: {} A {}",
                vm.vm,
                record.name,
                record.addresses.join(",")
            ));
        }
        r.waves[w].vms[i].stage = VmStage::Done;
    }
    Ok(())
}

/// Removes what a drill of a plan made: every run's resources and every record written.
pub async fn cleanup<
    S: ObjectStore,
    E: Ec2Api,
    B: EbsApi,
    D: DnsApi,
    R: RunCommandApi,
    W: WitnessApi,
>(
    p: &PlanEnv<'_, S, E, B, D, R, W>,
    id: &str,
) -> Result<PlanRun, DrError> {
    let mut r = load_plan_run(p.dr, id).await?;
    if !r.drill {
        return Err(DrError::Refused(format!(
            "{id} is a real recovery, not a drill: cleanup removes only what drills made"
        )));
    }
    let mut failed = Vec::new();
    for run_id in r.run_ids().cloned().collect::<Vec<_>>() {
        match crate::handler::cleanup(p.dr, &run_id).await {
            Ok(run) if run.phase == Phase::CleanedUp => {}
            Ok(run) => failed.push(format!("{run_id}: {}", run.reason.unwrap_or_default())),
            Err(e) => failed.push(format!("{run_id}: {e}")),
        }
    }
    for i in 0..r.dns.len() {
        if r.dns[i].removed_at.is_some() {
            continue;
        }
        let c = r.dns[i].clone();
        match p.dns.delete_a(&c.zone_id, &c.record).await {
            Ok(()) => {
                r.dns[i].removed_at = Some(Utc::now());
                r.note(format!(
                    "removed {} A {}",
                    c.record.name,
                    c.record.addresses.join(",")
                ));
            }
            Err(e) => failed.push(format!("{}: {e}", c.record.name)),
        }
    }
    if failed.is_empty() {
        r.phase = PlanPhase::CleanedUp;
        r.note("cleaned up: every run's resources and every record removed");
    } else {
        r.reason = Some(format!("cleanup incomplete: {}", failed.join("; ")));
        r.note(r.reason.clone().unwrap_or_default());
    }
    save(p.dr, &mut r).await?;
    Ok(r)
}
