//! `registering`: RegisterImage from the recovery point's snapshots (snapshot method).

use crate::config::DrEnv;
use crate::model::{ClaimStep, Phase, ResourceKind, Run};
use crate::steps::{claim, run_tags, start_request};
use chrono::Utc;
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::ec2::{BlockMapping, Ec2Api, RegisterRequest};
use pilotlight_cloud::ObjectStore;
use pilotlight_protocol::points::{at_most, time_tag, MAX_DESCRIPTION};

/// The AMI's device for disk `i`: the boot disk on `/dev/xvda`, the others from
/// `/dev/sdf` on (EC2's recommended names for EBS volumes).
pub(crate) fn device_name(i: usize) -> String {
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
pub(crate) async fn registering<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
    claimed_here: bool,
) {
    let now = Utc::now();
    if run.image_id.is_some() {
        run.enter(Phase::Launching, now);
        claim(run, ClaimStep::Launch, now);
        return;
    }
    if !claimed_here {
        claim(run, ClaimStep::Register, now);
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
            run.record(ResourceKind::Image, id.clone(), Utc::now());
            run.image_id = Some(id);
            run.reason = None;
            let now = Utc::now();
            run.enter(Phase::Launching, now);
            claim(run, ClaimStep::Launch, now);
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
