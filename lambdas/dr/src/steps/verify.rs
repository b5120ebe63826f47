//! `verifying`: status checks (and the SSM agent), the console tail on failure, and the
//! VM's snapshot-ready mark.

use crate::config::DrEnv;
use crate::error::{json_bytes, DrError};
use crate::model::{Method, Phase, Run, SnapshotReady, Verification};
use chrono::Utc;
use pilotlight_cloud::ec2::Ec2Api;
use pilotlight_cloud::{CloudError, ObjectStore, PutOptions};
use pilotlight_protocol::DiskId;

/// Console lines kept from a failed instance.
pub(crate) const CONSOLE_TAIL_LINES: usize = 30;

/// Waits for the instance's status checks; records pass or fail, and for the snapshot
/// method marks the VM snapshot-ready (or clears the mark).
pub(crate) async fn verifying<S: ObjectStore, E: Ec2Api, B>(
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

pub(crate) enum SsmCheck {
    /// No instance profile: no SSM agent to expect.
    NotManaged,
    /// An instance profile, but SSM does not list the instance yet.
    NotYet,
    Ping(String),
}

pub(crate) async fn ssm_check<S, E: Ec2Api, B>(
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
pub(crate) async fn mark_ready<S: ObjectStore, E, B>(
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
