//! One look at one VM of a plan run: its DR run, then its post-launch steps and health
//! probe through SSM Run Command on the instance itself.

use super::run::{start_request, PlanEnv, VmRun, VmStage, HEALTH_ATTEMPTS};
use super::{Plan, VmPlan};
use crate::error::DrError;
use crate::model::{Phase, RecoveryPoint};
use crate::runs::load;
use chrono::{DateTime, Utc};
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::ec2::Ec2Api;
use pilotlight_cloud::route53::DnsApi;
use pilotlight_cloud::ssm::{CommandRequest, RunCommandApi};
use pilotlight_cloud::witness::WitnessApi;
use pilotlight_cloud::ObjectStore;

/// One look at one VM.
pub(super) async fn vm_step<
    S: ObjectStore,
    E: Ec2Api,
    B: EbsApi,
    D: DnsApi,
    R: RunCommandApi,
    W: WitnessApi,
>(
    p: &PlanEnv<'_, S, E, B, D, R, W>,
    plan: &Plan,
    vp: &VmPlan,
    vm: &mut VmRun,
    point: DateTime<Utc>,
    drill: bool,
    group: &str,
) -> Result<(), DrError> {
    let env = p.dr;
    match vm.stage {
        VmStage::Waiting => {
            // Recorded first (the caller saves it); the run starts on the next look.
            vm.stage = VmStage::Starting;
            vm.started_at = Some(Utc::now());
        }
        VmStage::Starting => {
            if let Some(run) = started_before(env, group, &vm.vm, vm.started_at).await? {
                vm.run_id = Some(run);
                vm.stage = VmStage::Recovering;
                return Ok(());
            }
            let req =
                match start_request(env, plan, &vm.vm, RecoveryPoint::Point(point), drill, group)
                    .await
                {
                    Ok(r) => r,
                    Err(why) => {
                        vm.stage = VmStage::Failed;
                        vm.reason = Some(why);
                        return Ok(());
                    }
                };
            let run = crate::handler::start(env, req).await?;
            vm.run_id = Some(run.run_id.clone());
            vm.stage = VmStage::Recovering;
            if run.phase == Phase::Failed {
                vm.stage = VmStage::Failed;
                vm.reason = Some(format!(
                    "run {}: {}",
                    run.run_id,
                    run.reason.unwrap_or_default()
                ));
            }
        }
        VmStage::Recovering => {
            let Some(id) = vm.run_id.clone() else {
                vm.stage = VmStage::Waiting;
                return Ok(());
            };
            let mut run = load(env, &id).await?;
            match crate::handler::advance(env, &mut run).await {
                Ok(()) | Err(DrError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
            match run.phase {
                Phase::Done if run.verification.as_ref().is_some_and(|v| v.passed) => {
                    vm.instance_id = run.instance_ids.first().cloned();
                    vm.stage = VmStage::Steps;
                }
                Phase::Done | Phase::Failed | Phase::CleanedUp | Phase::Planned => {
                    vm.stage = VmStage::Failed;
                    vm.reason = Some(format!(
                        "run {id} {:?}: {}",
                        run.phase,
                        run.reason.unwrap_or_else(|| "not verified".into())
                    ));
                }
                _ => {}
            }
        }
        VmStage::Steps => {
            if vm.command.is_none() && vm.next_step >= vp.steps.len() {
                vm.stage = if vp.health.is_some() {
                    VmStage::Health
                } else {
                    VmStage::Ready
                };
                if vm.stage == VmStage::Ready {
                    vm.ready_at = Some(Utc::now());
                }
                return Ok(());
            }
            let Some(instance) = vm.instance_id.clone() else {
                vm.stage = VmStage::Failed;
                vm.reason = Some("verified, but its run names no instance".into());
                return Ok(());
            };
            match vm.command.clone() {
                None => {
                    let s = &vp.steps[vm.next_step];
                    let req = CommandRequest {
                        instance_id: instance,
                        document: s.document.clone(),
                        parameters: s.parameters.clone(),
                        comment: comment(&plan.name, &format!("step {}", vm.next_step + 1)),
                        timeout_seconds: 600,
                    };
                    match p.cmd.send_command(&req).await {
                        Ok(id) => {
                            vm.command =
                                Some((id, format!("step {} ({})", vm.next_step + 1, s.document)))
                        }
                        Err(e) if e.is_transient() => return Err(e.into()),
                        Err(e) => {
                            vm.stage = VmStage::Failed;
                            vm.reason = Some(format!(
                                "step {} ({}) could not be sent: {e}",
                                vm.next_step + 1,
                                s.document
                            ));
                        }
                    }
                }
                Some((cid, what)) => match p.cmd.invocation(&cid, &instance).await? {
                    Some(inv) if inv.succeeded() => {
                        vm.commands.push((what, inv.status, tail(&inv.output)));
                        vm.command = None;
                        vm.next_step += 1;
                    }
                    Some(inv) if inv.failed() => {
                        vm.reason = Some(format!(
                            "{what} ended {}: {}",
                            inv.status,
                            tail(&inv.output)
                        ));
                        vm.commands.push((what, inv.status, tail(&inv.output)));
                        vm.command = None;
                        vm.stage = VmStage::Failed;
                    }
                    _ => {}
                },
            }
        }
        VmStage::Health => {
            let (Some(instance), Some(health)) = (vm.instance_id.clone(), vp.health.clone()) else {
                vm.stage = VmStage::Ready;
                vm.ready_at = Some(Utc::now());
                return Ok(());
            };
            match vm.command.clone() {
                None => {
                    let req = CommandRequest {
                        instance_id: instance,
                        document: "AWS-RunShellScript".into(),
                        parameters: [("commands".to_string(), vec![probe(&health)])].into(),
                        comment: comment(&plan.name, "health"),
                        timeout_seconds: 60,
                    };
                    vm.health_attempts += 1;
                    match p.cmd.send_command(&req).await {
                        Ok(id) => {
                            vm.command = Some((id, format!("health probe {}", vm.health_attempts)))
                        }
                        Err(e) if e.is_transient() => return Err(e.into()),
                        Err(e) => {
                            vm.stage = VmStage::Failed;
                            vm.reason = Some(format!("the health probe could not be sent: {e}"));
                        }
                    }
                }
                Some((cid, what)) => match p.cmd.invocation(&cid, &instance).await? {
                    Some(inv) if inv.succeeded() => {
                        vm.commands.push((what, inv.status, tail(&inv.output)));
                        vm.command = None;
                        vm.stage = VmStage::Ready;
                        vm.ready_at = Some(Utc::now());
                    }
                    Some(inv) if inv.failed() => {
                        vm.commands
                            .push((what, inv.status.clone(), tail(&inv.output)));
                        vm.command = None;
                        if vm.health_attempts >= HEALTH_ATTEMPTS {
                            vm.stage = VmStage::Failed;
                            vm.reason = Some(format!(
                                "unhealthy after {HEALTH_ATTEMPTS} probes ({}): {}",
                                probe(&health),
                                tail(&inv.output)
                            ));
                        }
                    }
                    _ => {}
                },
            }
        }
        VmStage::Ready | VmStage::Done | VmStage::Failed => {}
    }
    Ok(())
}

/// A DR run of `vm` this plan run already started (its request names the plan run as its
/// group): one a crash kept from being recorded. Only runs started since `since` are read.
async fn started_before<S: ObjectStore, E, B>(
    env: &crate::config::DrEnv<S, E, B>,
    group: &str,
    vm: &str,
    since: Option<DateTime<Utc>>,
) -> Result<Option<String>, DrError> {
    let since = since.map(|t| t - chrono::Duration::minutes(1));
    for id in crate::runs::run_ids(env).await? {
        // dr-YYYYMMDDtHHMMSS-...: older runs are not this plan run's.
        let at = id
            .get(3..18)
            .and_then(|t| chrono::NaiveDateTime::parse_from_str(t, "%Y%m%dt%H%M%S").ok())
            .map(|t| t.and_utc());
        if at.zip(since).is_some_and(|(a, s)| a < s) {
            continue;
        }
        let Ok(run) = load(env, &id).await else {
            continue;
        };
        let field = |k: &str| {
            run.request
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        if field("group") == group && field("vm") == vm {
            return Ok(Some(run.run_id));
        }
    }
    Ok(None)
}

/// A probe run on the instance itself (bash and curl, on the images pilotlight recovers).
fn probe(h: &super::Health) -> String {
    match h {
        super::Health::Tcp(port) => format!("timeout 5 bash -c '</dev/tcp/127.0.0.1/{port}'"),
        super::Health::Http(url) => {
            format!(
                "curl -fsS -o /dev/null --max-time 5 '{}'",
                url.replace('\'', "'\\''")
            )
        }
    }
}

fn comment(plan: &str, what: &str) -> String {
    format!("pilotlight plan {plan}: {what}")
        .chars()
        .take(100)
        .collect()
}

fn tail(s: &str) -> String {
    let t: Vec<char> = s.chars().collect();
    t[t.len().saturating_sub(400)..].iter().collect()
}
