//! `launching`: RunInstances from the run's AMI (claimed, with a client token).

use crate::config::DrEnv;
use crate::model::{ClaimStep, Phase, ResourceKind, Run};
use crate::steps::{claim, run_tags, start_request};
use chrono::Utc;
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::ec2::{Ec2Api, LaunchRequest};
use pilotlight_cloud::ObjectStore;

pub(crate) async fn launching<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
    claimed_here: bool,
) {
    let now = Utc::now();
    if run.instance_ids.is_empty() && !claimed_here {
        claim(run, ClaimStep::Launch, now);
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
            run.record(ResourceKind::Instance, id.clone(), Utc::now());
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
