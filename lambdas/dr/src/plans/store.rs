//! Plans in the bucket (`{base}plans/{name}.toml`, as written: `plan show` prints what is
//! in git), and the checks that need the bucket.

use super::{parse, Plan, PlanProblem, MAX_PLAN_BYTES};
use crate::config::DrEnv;
use crate::error::DrError;
use crate::runs::vm_settings;
use pilotlight_cloud::{ObjectStore, PutOptions};
use pilotlight_protocol::Name;

/// Why a plan was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PlanRefused {
    /// The plan itself is wrong: each problem with its line.
    #[error("the plan has {} problem(s): {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Problems(Vec<PlanProblem>),
    /// The bucket could not be read or written.
    #[error(transparent)]
    Dr(#[from] DrError),
}

pub(crate) fn plan_key<S, E, B>(env: &DrEnv<S, E, B>, name: &str) -> String {
    format!("{}plans/{name}.toml", env.cfg.base())
}

/// Everything wrong with a plan: its own problems (with lines), then what the bucket
/// says (a VM without saved settings). Touches nothing.
pub async fn check<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    text: &str,
) -> Result<Plan, PlanRefused> {
    let plan = parse(text).map_err(PlanRefused::Problems)?;
    let mut problems = Vec::new();
    for vm in plan.all_vms() {
        if vm_settings(env, &plan.site, vm).await?.is_none() {
            let line = text
                .lines()
                .position(|l| l.contains(&format!("\"{vm}\"")))
                .map(|i| i + 1);
            problems.push(PlanProblem {
                line,
                message: format!(
                    "unknown VM {}/{vm}: no saved recovery settings (`pilotlight-dr configure --site {} --vm {vm} --disk ...`)",
                    plan.site, plan.site
                ),
            });
        }
    }
    if problems.is_empty() {
        Ok(plan)
    } else {
        Err(PlanRefused::Problems(problems))
    }
}

/// Stores a plan after checking it; a plan with problems is refused, nothing written.
pub async fn put<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    text: &str,
) -> Result<Plan, PlanRefused> {
    let plan = check(env, text).await?;
    let opts = PutOptions {
        content_type: Some("application/toml"),
        ..Default::default()
    };
    env.store
        .put(
            &plan_key(env, &plan.name),
            text.as_bytes().to_vec().into(),
            opts,
        )
        .await
        .map_err(DrError::from)?;
    Ok(plan)
}

/// A stored plan's text.
pub async fn show<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    name: &str,
) -> Result<String, DrError> {
    if Name::new(name).is_err() {
        return Err(DrError::BadRequest(format!("{name:?} is not a plan name")));
    }
    let body = env
        .store
        .get_if_exists(&plan_key(env, name), MAX_PLAN_BYTES as u64)
        .await?
        .ok_or_else(|| {
            DrError::Refused(format!(
                "no plan {name}: store it with `pilotlight-dr plan put FILE`"
            ))
        })?;
    String::from_utf8(body.to_vec()).map_err(|_| DrError::BadRun {
        key: plan_key(env, name),
        detail: "not UTF-8 text".into(),
    })
}

/// A stored plan, parsed (a stored plan that no longer parses says why).
pub async fn get<S: ObjectStore, E, B>(env: &DrEnv<S, E, B>, name: &str) -> Result<Plan, DrError> {
    let text = show(env, name).await?;
    parse(&text).map_err(|p| DrError::BadRun {
        key: plan_key(env, name),
        detail: p
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    })
}
