//! `importing`: start EC2 image import (claimed), follow its task, tag what it made.

use crate::config::DrEnv;
use crate::model::{
    BootMode, ClaimStep, ImportProgress, Phase, ResourceKind, Run, TAG_DRILL, TAG_RUN,
};
use crate::steps::{claim, run_tags, start_request};
use chrono::Utc;
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::ec2::{Ec2Api, ImportRequest};
use pilotlight_cloud::ObjectStore;

/// Starts the run's import (the claimed step of `Importing` without a task).
pub(crate) async fn start_import<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
) {
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
            run.record(ResourceKind::ImportImageTask, task_id.clone(), now);
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

pub(crate) async fn importing<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
    claimed_here: bool,
) {
    let Some(task_id) = run.import.as_ref().map(|i| i.task_id.clone()) else {
        if claimed_here {
            start_import(env, run).await;
            run.claim = None;
        } else {
            claim(run, ClaimStep::Import, Utc::now());
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
            run.record(ResourceKind::Image, image.clone(), now);
            for s in &t.snapshot_ids {
                run.record(ResourceKind::Snapshot, s.clone(), now);
            }
            run.image_id = Some(image);
            run.snapshot_ids = t.snapshot_ids;
            run.reason = None;
            // On to the launch, claimed (saved before the call).
            run.enter(Phase::Launching, now);
            claim(run, ClaimStep::Launch, now);
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

pub(crate) fn check_import_timeout<S, E, B>(env: &DrEnv<S, E, B>, run: &mut Run) {
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
