//! Guarded automatic failover: a plan that starts itself only when the site is really
//! gone, at most once until a person re-arms it.
//!
//! ```text
//! watching ──(site silent AND witness down, continuously for hold-down)──► countdown
//!    ▲  ▲                                   (SNS: the plan, its point, how to cancel)
//!    │  └──(the site sends again, or the witness says up)───────────────┘
//!    │                                                      │ countdown over, no drill of its VMs running
//!    │                                                      ▼
//!  `plan arm` (a person) ◄── ran / cancelled / fence failed ◄── latch (If-None-Match) ─► fence (SSM) ─► plan runs
//! ```
//!
//! Never on one signal: the site's silence is read from the bucket (no generation of any
//! VM of the plan for `site_silent`), the witness is the user's own (a CloudWatch alarm of
//! their monitoring, or a Route 53 health check). Never twice: the latch is a conditional
//! S3 write only one evaluator can make, removed only by `plan arm`. Every evaluation that
//! changes something, and every new reason not to act, is a decision in the log.
//! `now` is a parameter: tests drive the clock.

use super::run::{self, PlanEnv};
use super::store;
use super::Plan;
use crate::config::DrEnv;
use crate::error::{json_bytes, DrError};
use crate::model::{Etag, Run};
use crate::runs::vm_settings;
use chrono::{DateTime, Duration, Utc};
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::ec2::Ec2Api;
use pilotlight_cloud::route53::DnsApi;
use pilotlight_cloud::ssm::{CommandRequest, RunCommandApi};
use pilotlight_cloud::witness::WitnessApi;
use pilotlight_cloud::{ErrorKind, ObjectStore, PutOptions};
use pilotlight_protocol::DiskId;
use serde::{Deserialize, Serialize};

/// Decisions kept per plan (the oldest go first).
pub const MAX_DECISIONS: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoPhase {
    /// Evaluating the signals.
    Watching,
    /// Both signals held for the hold-down: notified, waiting for `countdown_until`.
    Countdown,
    /// Latched; the fence hook runs.
    Fencing,
    /// Latched; the plan ran as a real recovery.
    Ran,
    /// A person cancelled; nothing happens until `plan arm`.
    Cancelled,
    /// The fence hook failed: no recovery; nothing happens until `plan arm`.
    FenceFailed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub at: DateTime<Utc>,
    pub what: String,
}

/// The automation of one plan (`{base}plans/{name}.automation.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutomationState {
    pub version: u32,
    pub plan: String,
    pub phase: AutoPhase,
    /// Since when both signals have held.
    pub both_since: Option<DateTime<Utc>>,
    pub countdown_until: Option<DateTime<Utc>>,
    /// The point the countdown announced.
    pub point_time: Option<DateTime<Utc>>,
    pub fence_command: Option<String>,
    pub plan_run_id: Option<String>,
    /// The last reason not to act (a new one is a new decision).
    pub waiting_because: Option<String>,
    pub decisions: Vec<Decision>,
    #[serde(skip)]
    pub etag: Etag,
}

impl AutomationState {
    fn new(plan: &str) -> Self {
        AutomationState {
            version: 1,
            plan: plan.into(),
            phase: AutoPhase::Watching,
            both_since: None,
            countdown_until: None,
            point_time: None,
            fence_command: None,
            plan_run_id: None,
            waiting_because: None,
            decisions: Vec::new(),
            etag: Etag::default(),
        }
    }
    fn decide(&mut self, at: DateTime<Utc>, what: impl Into<String>) {
        let what = what.into();
        tracing::info!(plan = %self.plan, phase = ?self.phase, "automation: {what}");
        self.decisions.push(Decision { at, what });
        let over = self.decisions.len().saturating_sub(MAX_DECISIONS);
        self.decisions.drain(..over);
    }
    /// A reason not to act, logged only when it is new.
    fn waiting(&mut self, at: DateTime<Utc>, why: String) {
        if self.waiting_because.as_deref() != Some(why.as_str()) {
            self.decide(at, format!("not triggered: {why}"));
            self.waiting_because = Some(why);
        }
    }
}

fn state_key<S, E, B>(env: &DrEnv<S, E, B>, plan: &str) -> String {
    format!("{}plans/{plan}.automation.json", env.cfg.base())
}

fn latch_key<S, E, B>(env: &DrEnv<S, E, B>, plan: &str) -> String {
    format!("{}plans/{plan}.latch", env.cfg.base())
}

pub async fn load_state<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    plan: &str,
) -> Result<AutomationState, DrError> {
    let found: Option<(AutomationState, String)> =
        crate::runs::get_versioned(&env.store, &state_key(env, plan), 4 << 20).await?;
    Ok(match found {
        None => AutomationState::new(plan),
        Some((mut s, etag)) => {
            s.etag.0 = Some(etag);
            s
        }
    })
}

async fn save_state<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    s: &mut AutomationState,
) -> Result<(), DrError> {
    let body = json_bytes("the automation state", s)?;
    let key = state_key(env, &s.plan);
    let id = format!("automation of {}", s.plan);
    match crate::runs::put_versioned(&env.store, &key, body, s.etag.0.as_deref(), &id).await? {
        Some(etag) => s.etag.0 = Some(etag),
        None => s.etag = load_state(env, &s.plan).await?.etag,
    }
    Ok(())
}

/// The newest snapshot time of any generation of any disk of the plan's VMs.
async fn newest_generation<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    plan: &Plan,
) -> Result<Option<DateTime<Utc>>, DrError> {
    let mut newest = None;
    for vm in plan.all_vms() {
        let Some(settings) = vm_settings(env, &plan.site, vm).await? else {
            continue;
        };
        for d in &settings.disks {
            let Ok(disk) = DiskId::new(&plan.site, vm, d) else {
                continue;
            };
            let gens =
                pilotlight_store::manifests::list(&env.store, &env.cfg.prefix, &disk).await?;
            if let Some(&g) = gens.iter().max() {
                if let Some(t) = crate::plan::snapshot_time(env, &disk, g).await? {
                    newest = newest.max(Some(t));
                }
            }
        }
    }
    Ok(newest)
}

/// A drill of a VM of the plan not cleaned up yet: its instances may still run (and hold
/// the addresses the real recovery will ask for).
async fn drill_running<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    plan: &Plan,
) -> Result<Option<String>, DrError> {
    for id in crate::runs::run_ids(env).await? {
        let Ok(run): Result<Run, _> = crate::runs::load(env, &id).await else {
            continue;
        };
        let vm = run.request.get("vm").and_then(|v| v.as_str()).unwrap_or("");
        let site = run
            .request
            .get("site")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if run.drill
            && run.phase != crate::model::Phase::CleanedUp
            && site == plan.site
            && plan.all_vms().any(|v| v == vm)
        {
            return Ok(Some(format!(
                "{vm} (run {id}) is not cleaned up (`pilotlight-dr cleanup {id}`)"
            )));
        }
    }
    Ok(None)
}

/// One evaluation of one plan's automation at `now`; saves what changed.
pub async fn evaluate<
    S: ObjectStore,
    E: Ec2Api,
    B: EbsApi,
    D: DnsApi,
    R: RunCommandApi,
    W: WitnessApi,
>(
    p: &PlanEnv<'_, S, E, B, D, R, W>,
    plan: &Plan,
    now: DateTime<Utc>,
) -> Result<AutomationState, DrError> {
    let env = p.dr;
    let mut s = load_state(env, &plan.name).await?;
    let Some(a) = plan.automation.clone().filter(|a| a.enabled) else {
        return Ok(s);
    };
    let before = s.clone();
    let result = step(p, plan, &a, &mut s, now).await;
    if s != before {
        save_state(env, &mut s).await?;
    }
    result.map(|()| s)
}

async fn step<S: ObjectStore, E: Ec2Api, B: EbsApi, D: DnsApi, R: RunCommandApi, W: WitnessApi>(
    p: &PlanEnv<'_, S, E, B, D, R, W>,
    plan: &Plan,
    a: &super::Automation,
    s: &mut AutomationState,
    now: DateTime<Utc>,
) -> Result<(), DrError> {
    let env = p.dr;
    match s.phase {
        AutoPhase::Ran | AutoPhase::Cancelled | AutoPhase::FenceFailed => return Ok(()),
        AutoPhase::Fencing => return fencing(p, plan, a, s, now).await,
        AutoPhase::Watching | AutoPhase::Countdown => {}
    }
    // The two signals, now.
    let newest = newest_generation(env, plan).await?;
    let silent_for = newest.map(|t| (now - t).num_seconds());
    let silent = silent_for.is_some_and(|x| x >= a.site_silent_seconds as i64);
    let down = match p.witness.primary_down(&a.witness).await {
        Ok(d) => d,
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(e) => {
            s.waiting(now, format!("the witness cannot be read: {e}"));
            return Ok(());
        }
    };
    let why_not = match (silent, down, newest) {
        (_, _, None) => Some("the plan's VMs have no generation at all".to_string()),
        (false, _, Some(t)) => Some(format!(
            "the site sent a generation at {} (silent for {}s of {}s)",
            t.to_rfc3339(),
            silent_for.unwrap_or(0).max(0),
            a.site_silent_seconds
        )),
        (true, Some(true), _) => None,
        (true, Some(false), _) => {
            Some("the site is silent, but the witness says the primary is up".to_string())
        }
        (true, None, _) => Some(
            "the site is silent, but the witness has no data (never counted as down)".to_string(),
        ),
    };
    if let Some(why) = why_not {
        if s.phase == AutoPhase::Countdown {
            s.phase = AutoPhase::Watching;
            s.countdown_until = None;
            s.decide(now, format!("countdown stopped: {why}"));
            notify(
                p,
                a,
                &format!("pilotlight: automatic failover of {} stopped", plan.name),
                &format!(
                    "The countdown of plan {} stopped: {why}. Nothing was recovered.",
                    plan.name
                ),
            )
            .await;
        } else if s.both_since.is_some() {
            s.decide(now, format!("hold-down reset: {why}"));
        }
        s.both_since = None;
        s.waiting(now, why);
        return Ok(());
    }
    let since = *s.both_since.get_or_insert(now);
    if s.phase == AutoPhase::Watching {
        let held = (now - since).num_seconds();
        if held < a.hold_down_seconds as i64 {
            s.waiting(
                now,
                format!(
                    "site silent and witness down since {}: hold-down until {}",
                    since.to_rfc3339(),
                    (since + Duration::seconds(a.hold_down_seconds as i64)).to_rfc3339()
                ),
            );
            return Ok(());
        }
        let point = match run::common_point(env, plan, None).await {
            Ok(t) => t,
            Err(why) => {
                s.waiting(now, format!("triggered, but {why}"));
                return Ok(());
            }
        };
        s.phase = AutoPhase::Countdown;
        s.point_time = Some(point);
        s.countdown_until = Some(now + Duration::seconds(a.countdown_seconds as i64));
        s.waiting_because = None;
        s.decide(now, format!("triggered: site silent and witness down for {held}s; countdown until {}, then plan {} runs as a real recovery from the point at {}", s.countdown_until.map(|t| t.to_rfc3339()).unwrap_or_default(), plan.name, point.to_rfc3339()));
        notify(p, a,
            &format!("pilotlight: automatic failover of {} in {}s", plan.name, a.countdown_seconds),
            &format!(
                "Plan {} will run as {} at {} from the recovery point at {}: the site has sent nothing since {} and the witness says the primary is down.\n\nTo stop it: pilotlight-dr cancel {}\n",
                plan.name,
                if a.drill { "a DRILL (automation drill = true)" } else { "a REAL recovery" },
                s.countdown_until.map(|t| t.to_rfc3339()).unwrap_or_default(),
                point.to_rfc3339(),
                newest.map(|t| t.to_rfc3339()).unwrap_or_default(),
                plan.name
            ),
        )
        .await;
        return Ok(());
    }
    // Countdown: over yet?
    if s.countdown_until.is_some_and(|u| now < u) {
        return Ok(());
    }
    if let Some(what) = drill_running(env, plan).await? {
        s.waiting(
            now,
            format!("countdown over, but a drill of {what}: never both at once"),
        );
        return Ok(());
    }
    // The latch: only one evaluator, only once until re-armed.
    let latch = serde_json::json!({"plan": plan.name, "at": now, "point": s.point_time});
    match env
        .store
        .put(
            &latch_key(env, &plan.name),
            json_bytes("the latch", &latch)?.into(),
            PutOptions::json().create_only(),
        )
        .await
    {
        Ok(_) => {}
        Err(e) if e.kind == ErrorKind::PreconditionFailed => {
            s.phase = AutoPhase::Ran;
            s.decide(now, "latched already (another evaluator, or an earlier run): not run again; `pilotlight-dr plan arm` re-arms");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    s.decide(now, "latched");
    match a.fence.as_ref().filter(|_| !a.drill) {
        Some(f) => {
            let req = CommandRequest {
                instance_id: f.instance_id.clone(),
                document: f.ssm_document.clone(),
                parameters: f.parameters.clone(),
                comment: format!("pilotlight fence before plan {}", plan.name)
                    .chars()
                    .take(100)
                    .collect(),
                timeout_seconds: 600,
            };
            match p.cmd.send_command(&req).await {
                Ok(id) => {
                    s.fence_command = Some(id);
                    s.phase = AutoPhase::Fencing;
                    s.decide(
                        now,
                        format!("fence {} on {} sent", f.ssm_document, f.instance_id),
                    );
                }
                Err(e) => {
                    s.phase = AutoPhase::FenceFailed;
                    s.decide(now, format!("the fence could not be sent ({e}): no recovery; `pilotlight-dr plan arm` after fixing it"));
                    notify(
                        p,
                        a,
                        &format!("pilotlight: automatic failover of {} NOT run", plan.name),
                        &format!("The fence hook failed: {e}. Nothing was recovered."),
                    )
                    .await;
                }
            }
            Ok(())
        }
        None => run_plan(p, plan, a, s, now).await,
    }
}

async fn fencing<
    S: ObjectStore,
    E: Ec2Api,
    B: EbsApi,
    D: DnsApi,
    R: RunCommandApi,
    W: WitnessApi,
>(
    p: &PlanEnv<'_, S, E, B, D, R, W>,
    plan: &Plan,
    a: &super::Automation,
    s: &mut AutomationState,
    now: DateTime<Utc>,
) -> Result<(), DrError> {
    let (Some(f), Some(cid)) = (a.fence.clone(), s.fence_command.clone()) else {
        return run_plan(p, plan, a, s, now).await;
    };
    match p.cmd.invocation(&cid, &f.instance_id).await? {
        Some(inv) if inv.succeeded() => {
            s.decide(now, "fence succeeded");
            run_plan(p, plan, a, s, now).await
        }
        Some(inv) if inv.failed() => {
            s.phase = AutoPhase::FenceFailed;
            s.decide(
                now,
                format!(
                    "fence ended {}: no recovery; `pilotlight-dr plan arm` after fixing it ({})",
                    inv.status,
                    inv.output.chars().take(300).collect::<String>()
                ),
            );
            notify(
                p,
                a,
                &format!("pilotlight: automatic failover of {} NOT run", plan.name),
                &format!(
                    "The fence hook ended {}. Nothing was recovered.",
                    inv.status
                ),
            )
            .await;
            Ok(())
        }
        _ => Ok(()),
    }
}

async fn run_plan<
    S: ObjectStore,
    E: Ec2Api,
    B: EbsApi,
    D: DnsApi,
    R: RunCommandApi,
    W: WitnessApi,
>(
    p: &PlanEnv<'_, S, E, B, D, R, W>,
    plan: &Plan,
    a: &super::Automation,
    s: &mut AutomationState,
    now: DateTime<Utc>,
) -> Result<(), DrError> {
    let at = s.point_time;
    let kind = if a.drill {
        "a drill (automation drill = true)"
    } else {
        "a real recovery"
    };
    match run::start(p, plan.clone(), a.drill, at).await {
        Ok(mut r) => {
            // The run says why it started: the decisions since the watch began.
            r.automation = s
                .decisions
                .iter()
                .rev()
                .take(20)
                .rev()
                .map(|d| format!("{}: {}", d.at.to_rfc3339(), d.what))
                .collect();
            if let Err(e) = run::save(p.dr, &mut r).await {
                tracing::warn!(plan_run = %r.plan_run_id, error = %e, "the run's automation decisions were not recorded");
            }
            s.phase = AutoPhase::Ran;
            s.plan_run_id = Some(r.plan_run_id.clone());
            s.decide(
                now,
                format!("plan {} started as {kind}: {}", plan.name, r.plan_run_id),
            );
            notify(p, a, &format!("pilotlight: plan {} is running", plan.name), &format!("Automatic failover started plan {} ({}). Follow it: pilotlight-dr plan status {}", plan.name, r.plan_run_id, r.plan_run_id)).await;
        }
        Err(e) if matches!(e, DrError::Refused(_) | DrError::BadRequest(_)) => {
            s.phase = AutoPhase::FenceFailed;
            s.decide(
                now,
                format!("the plan could not start: {e}; `pilotlight-dr plan arm` after fixing it"),
            );
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

async fn notify<S: ObjectStore, E, B, D, R, W: WitnessApi>(
    p: &PlanEnv<'_, S, E, B, D, R, W>,
    a: &super::Automation,
    subject: &str,
    message: &str,
) {
    let Some(topic) = a.topic.clone().or_else(|| p.dr.cfg.alert_topic.clone()) else {
        tracing::warn!("automation: no topic to notify ({subject})");
        return;
    };
    if let Err(e) = p.witness.notify(&topic, subject, message).await {
        tracing::warn!(topic, error = %e, "automation: the notification was not sent ({subject})");
    }
}

/// Every stored plan with automation on, evaluated at `now` (the schedule, and alarm
/// state changes). One that cannot be evaluated now is logged and skipped.
pub async fn evaluate_all<
    S: ObjectStore,
    E: Ec2Api,
    B: EbsApi,
    D: DnsApi,
    R: RunCommandApi,
    W: WitnessApi,
>(
    p: &PlanEnv<'_, S, E, B, D, R, W>,
    now: DateTime<Utc>,
) -> Result<Vec<AutomationState>, DrError> {
    let prefix = format!("{}plans/", p.dr.cfg.base());
    let mut out = Vec::new();
    for k in p.dr.store.list(&prefix, |k| k.ends_with(".toml")).await? {
        let Some(name) = k
            .strip_prefix(&prefix)
            .and_then(|k| k.strip_suffix(".toml"))
        else {
            continue;
        };
        let plan = match store::get(p.dr, name).await {
            Ok(plan) => plan,
            Err(e) => {
                tracing::warn!(plan = %name, error = %e, "automation: the plan cannot be read; skipped");
                continue;
            }
        };
        if !plan.automation.as_ref().is_some_and(|a| a.enabled) {
            continue;
        }
        match evaluate(p, &plan, now).await {
            Ok(s) => out.push(s),
            Err(e) => tracing::warn!(plan = %name, error = %e, "automation: not evaluated now"),
        }
    }
    Ok(out)
}

/// A person's cancel: nothing happens until `arm`.
pub async fn cancel<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    plan: &str,
    now: DateTime<Utc>,
) -> Result<AutomationState, DrError> {
    let mut s = load_state(env, plan).await?;
    if s.phase == AutoPhase::Ran {
        return Err(DrError::Refused(format!(
            "plan {plan} ran already ({}): cancel does not undo a recovery",
            s.plan_run_id.clone().unwrap_or_default()
        )));
    }
    s.phase = AutoPhase::Cancelled;
    s.countdown_until = None;
    s.both_since = None;
    s.decide(
        now,
        "cancelled by a person; `pilotlight-dr plan arm` re-arms",
    );
    save_state(env, &mut s).await?;
    Ok(s)
}

/// A person's re-arm: the latch removed, watching again from nothing.
pub async fn arm<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    plan: &str,
    now: DateTime<Utc>,
) -> Result<AutomationState, DrError> {
    let mut s = load_state(env, plan).await?;
    env.store.delete(&latch_key(env, plan)).await?;
    s.phase = AutoPhase::Watching;
    s.both_since = None;
    s.countdown_until = None;
    s.point_time = None;
    s.fence_command = None;
    s.waiting_because = None;
    s.decide(now, "armed by a person");
    save_state(env, &mut s).await?;
    Ok(s)
}
