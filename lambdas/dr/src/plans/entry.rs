//! The DR function's entry with plans: plan requests here, everything else to
//! [`crate::handler::handle`]; the schedule advances unfinished plan runs too.

use super::automation;
use super::run::{self, load_plan_run, PlanEnv, PlanRun};
use super::store::{self, PlanRefused};
use crate::error::DrError;
use chrono::{DateTime, Utc};
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::ec2::Ec2Api;
use pilotlight_cloud::route53::DnsApi;
use pilotlight_cloud::ssm::RunCommandApi;
use pilotlight_cloud::witness::WitnessApi;
use pilotlight_cloud::ObjectStore;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
enum PlanRequest {
    /// Check a plan (its text) against itself and the bucket; store nothing.
    #[serde(rename = "plan_check")]
    Check { text: String },
    /// Check and store a plan.
    #[serde(rename = "plan_put")]
    Put { text: String },
    /// A stored plan's text.
    #[serde(rename = "plan_show")]
    Show { name: String },
    /// Run a stored plan (a drill, or a real recovery).
    #[serde(rename = "plan_start")]
    Start {
        plan: String,
        #[serde(default)]
        drill: bool,
        #[serde(default)]
        at: Option<DateTime<Utc>>,
    },
    /// Advance and show one plan run, or every unfinished one.
    #[serde(rename = "plan_status")]
    Status { plan_run_id: Option<String> },
    /// Evaluate the automation of every plan that has it on (as the schedule does).
    #[serde(rename = "plan_evaluate")]
    Evaluate {},
    /// Show a plan's automation: its phase and decisions.
    #[serde(rename = "plan_automation")]
    Automation { plan: String },
    /// A person re-arms a plan's automation (the latch removed).
    #[serde(rename = "plan_arm")]
    Arm { plan: String },
    /// A person cancels a plan's automatic failover (a countdown, or before one).
    #[serde(rename = "plan_cancel")]
    Cancel { plan: String },
    /// Remove what a drill of a plan made, DNS records included.
    #[serde(rename = "plan_cleanup")]
    Cleanup { plan_run_id: String },
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, DrError> {
    serde_json::to_value(v).map_err(|e| DrError::Encode {
        what: "the answer",
        detail: e.to_string(),
    })
}

fn refused(e: PlanRefused) -> Result<Value, DrError> {
    match e {
        PlanRefused::Problems(p) => Ok(serde_json::json!({ "ok": false, "problems": p })),
        PlanRefused::Dr(e) => Err(e),
    }
}

/// The Lambda's entry with plans.
pub async fn handle<
    S: ObjectStore,
    E: Ec2Api,
    B: EbsApi,
    D: DnsApi,
    R: RunCommandApi,
    W: WitnessApi,
>(
    p: &PlanEnv<'_, S, E, B, D, R, W>,
    event: Value,
) -> Result<Value, DrError> {
    let action = event.get("action").and_then(Value::as_str).unwrap_or("");
    // An alarm changing state (EventBridge, "CloudWatch Alarm State Change"): evaluate
    // the automations at once rather than at the next schedule.
    if event.get("detail-type").and_then(Value::as_str) == Some("CloudWatch Alarm State Change") {
        let states = automation::evaluate_all(p, Utc::now()).await?;
        return Ok(
            serde_json::json!({ "evaluated": states.iter().map(|s| s.plan.clone()).collect::<Vec<_>>() }),
        );
    }
    if !action.starts_with("plan_") {
        let mut out = crate::handler::handle(p.dr, event.clone()).await?;
        if out.get("advanced").is_some() {
            // The schedule: plan runs too.
            let plans = status(p, None).await?;
            out["plans"] = plans
                .iter()
                .map(|r| Value::from(r.plan_run_id.clone()))
                .collect();
        }
        return Ok(out);
    }
    let req: PlanRequest = serde_json::from_value(event).map_err(|e| {
        DrError::BadRequest(format!(
            "{e} (plan actions: plan_check, plan_put, plan_show, plan_start, plan_status, plan_cleanup, plan_evaluate, plan_automation, plan_arm, plan_cancel)"
        ))
    })?;
    match req {
        PlanRequest::Check { text } => match store::check(p.dr, &text).await {
            Ok(plan) => Ok(serde_json::json!({ "ok": true, "plan": plan })),
            Err(e) => refused(e),
        },
        PlanRequest::Put { text } => match store::put(p.dr, &text).await {
            Ok(plan) => Ok(serde_json::json!({ "ok": true, "plan": plan })),
            Err(e) => refused(e),
        },
        PlanRequest::Show { name } => Ok(Value::from(store::show(p.dr, &name).await?)),
        PlanRequest::Start { plan, drill, at } => {
            let plan = store::get(p.dr, &plan).await?;
            to_json(&run::start(p, plan, drill, at).await?)
        }
        PlanRequest::Status { plan_run_id } => to_json(&status(p, plan_run_id.as_deref()).await?),
        PlanRequest::Evaluate {} => to_json(&automation::evaluate_all(p, Utc::now()).await?),
        PlanRequest::Automation { plan } => to_json(&automation::load_state(p.dr, &plan).await?),
        PlanRequest::Arm { plan } => {
            store::get(p.dr, &plan).await?;
            to_json(&automation::arm(p.dr, &plan, Utc::now()).await?)
        }
        PlanRequest::Cancel { plan } => {
            store::get(p.dr, &plan).await?;
            to_json(&automation::cancel(p.dr, &plan, Utc::now()).await?)
        }
        PlanRequest::Cleanup { plan_run_id } => to_json(&run::cleanup(p, &plan_run_id).await?),
    }
}

/// Advances one plan run, or every unfinished one (one that cannot be read or advanced
/// now is logged and skipped).
pub async fn status<
    S: ObjectStore,
    E: Ec2Api,
    B: EbsApi,
    D: DnsApi,
    R: RunCommandApi,
    W: WitnessApi,
>(
    p: &PlanEnv<'_, S, E, B, D, R, W>,
    id: Option<&str>,
) -> Result<Vec<PlanRun>, DrError> {
    if let Some(id) = id {
        let mut r = load_plan_run(p.dr, id).await?;
        run::advance(p, &mut r).await?;
        return Ok(vec![r]);
    }
    let prefix = format!("{}plans/", p.dr.cfg.runs_prefix);
    let mut out = Vec::new();
    for k in p.dr.store.list(&prefix, |_| true).await? {
        let Some(id) = k
            .strip_prefix(&prefix)
            .and_then(|k| k.strip_suffix(".json"))
        else {
            continue;
        };
        match load_plan_run(p.dr, id).await {
            Ok(mut r) if !r.phase.is_final() => {
                if let Err(e) = run::advance(p, &mut r).await {
                    tracing::warn!(plan_run = %id, error = %e, "cannot advance the plan run now");
                }
                out.push(r);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(plan_run = %id, error = %e, "unreadable plan run; skipped"),
        }
    }
    Ok(out)
}
