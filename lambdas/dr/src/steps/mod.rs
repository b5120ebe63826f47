//! The phase machine: advance a run by what can be done now, one file per phase group
//! ([`export`], [`import`], [`register`], [`launch`], [`verify`]); the claims that make a
//! creating EC2 call happen once however many callers advance the run; the point holds.
//!
//! ```text
//! import method:   exporting ─► importing (%) ─► launching ─► verifying ─► done
//! snapshot method: registering ──────────────► launching ─► verifying ─► done
//!                  any phase ─► failed (reason; what was created)
//! ```

pub(crate) mod export;
pub(crate) mod import;
pub(crate) mod launch;
pub(crate) mod register;
pub(crate) mod verify;

use crate::config::DrEnv;
use crate::error::DrError;
use crate::model::{Claim, ClaimStep, Method, Phase, Run, StartRequest, TAG_DRILL, TAG_RUN};
use crate::runs::{load, save};
use crate::steps::export::exporting;
use crate::steps::import::importing;
use crate::steps::launch::launching;
use crate::steps::register::registering;
use crate::steps::verify::verifying;
use chrono::{DateTime, Utc};
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::ec2::Ec2Api;
use pilotlight_cloud::ObjectStore;
use pilotlight_protocol::points::tag;
use std::time::Duration;

/// How long a step that creates something (ImportImage, RunInstances) belongs to the
/// caller that claimed it. Another caller finding it claimed leaves it alone until then
/// (the claimer is most likely still calling), then makes the call itself with the same
/// client token: a claimer that died costs a delay, never a second import or instance.
/// Well above the Lambda's 60 s timeout.
pub const CLAIM_LEASE: Duration = Duration::from_secs(300);

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
pub(crate) async fn advance_claimed<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
) -> Result<(), DrError> {
    advance_from(env, run, true).await
}

pub(crate) async fn advance_from<S: ObjectStore, E: Ec2Api, B: EbsApi>(
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
pub(crate) fn claim(run: &mut Run, step: ClaimStep, now: DateTime<Utc>) {
    if run.claim.as_ref().is_some_and(|c| c.holds(now)) {
        return;
    }
    run.claim = Some(Claim {
        step,
        until: now + chrono::Duration::from_std(CLAIM_LEASE).unwrap_or_default(),
    });
}

/// Removes this run's hold from the point snapshots it holds (what fails stays listed).
pub(crate) async fn release_holds<S, E, B: EbsApi>(env: &DrEnv<S, E, B>, run: &mut Run) {
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

/// The start request a run was made from; a run whose record lost it fails.
pub(crate) fn start_request(run: &mut Run, now: DateTime<Utc>) -> Option<StartRequest> {
    if run.start.0.is_none() {
        // A run made or read elsewhere (a test's record): parse it once here.
        run.start.0 = Run::parse_start(&run.request);
    }
    match &run.start.0 {
        Some(s) => Some((**s).clone()),
        None => {
            run.fail("run record lost its request", now);
            None
        }
    }
}

pub(crate) fn run_tags(run: &Run, start: &StartRequest) -> Vec<(String, String)> {
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
