//! `exporting`: wait for the receiver's export results of every disk.

use crate::config::DrEnv;
use crate::error::DrError;
use crate::model::{ClaimStep, Phase, ResourceKind, Run};
use crate::steps::claim;
use chrono::Utc;
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::ec2::Ec2Api;
use pilotlight_cloud::ObjectStore;
use pilotlight_protocol::{DiskId, ExportStatus, Name};
use pilotlight_store::{exports, DocError};

pub(crate) async fn exporting<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
) -> Result<(), DrError> {
    let p = &env.cfg.prefix;
    for i in 0..run.disks.len() {
        if run.disks[i].image_key.is_some() {
            continue;
        }
        let d = run.disks[i].clone();
        let (Ok(disk), Ok(id)) = (DiskId::parse(&d.disk), Name::new(&d.export_id)) else {
            run.fail(
                format!("run record names a bad disk {:?}", d.disk),
                Utc::now(),
            );
            return Ok(());
        };
        let key = exports::result_key(p, &disk, &id);
        let r = match exports::read_result(&env.store, p, &disk, &id).await {
            Ok(r) => r,
            Err(DocError::Missing { .. }) => continue,
            Err(DocError::Read(e)) => return Err(e.into()),
            Err(DocError::Invalid { detail, .. }) => {
                run.fail(
                    format!("the receiver's export result {key} is invalid: {detail}"),
                    Utc::now(),
                );
                return Ok(());
            }
        };
        let expected = exports::image_key(p, &disk, &id);
        let checksum = r.checksum();
        match (r.status, r.image_key) {
            // Only the key this run asked the receiver to write: a result naming another
            // object (anyone's, anywhere in the bucket) is not imported.
            (ExportStatus::Done, Some(image_key)) if image_key != expected => {
                run.fail(
                    format!(
                        "the export result {key} names {image_key}, not the image this run asked for ({expected}); nothing was imported"
                    ),
                    Utc::now(),
                );
                return Ok(());
            }
            (ExportStatus::Done, Some(image_key)) if r.generation == Some(d.generation) => {
                run.record(ResourceKind::S3Object, image_key.clone(), Utc::now());
                let disk = &mut run.disks[i];
                disk.image_key = Some(image_key);
                disk.size = r.size;
                disk.sha256 = checksum;
            }
            (ExportStatus::Done, _) => {
                run.fail(
                    format!(
                        "the receiver exported {} at generation {:?}, not the requested {}",
                        d.disk, r.generation, d.generation
                    ),
                    Utc::now(),
                );
                return Ok(());
            }
            (ExportStatus::Failed, _) => {
                run.fail(
                    format!(
                        "export of {} failed: {}",
                        d.disk,
                        r.reason.unwrap_or_else(|| "no reason given".into())
                    ),
                    Utc::now(),
                );
                return Ok(());
            }
        }
    }
    let now = Utc::now();
    if run.disks.iter().any(|d| d.image_key.is_none()) {
        let waited = (now - run.phase_started()).to_std().unwrap_or_default();
        if waited > env.cfg.export_timeout {
            let missing: Vec<String> = run
                .disks
                .iter()
                .filter(|d| d.image_key.is_none())
                .map(|d| format!("{} (generation {})", d.disk, d.generation))
                .collect();
            run.fail(
                format!(
                    "export timeout: the receiver did not export {} within {}: it may not have applied that generation yet, or not be running (check `pilotlight-receiver status` and its logs)",
                    missing.join(", "),
                    humantime::format_duration(env.cfg.export_timeout)
                ),
                now,
            );
        }
        return Ok(());
    }
    // Every disk is exported: on to the import, claimed (saved before the call).
    run.reason = None;
    run.enter(Phase::Importing, now);
    claim(run, ClaimStep::Import, now);
    Ok(())
}
