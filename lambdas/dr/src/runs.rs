//! The run store: run records (saved `If-Match` on the version read), their reports,
//! run ids, and the small documents kept beside them (ready marks, VM settings).

use crate::config::DrEnv;
use crate::error::{json_bytes, DrError};
use crate::model::{GroupRecord, Run, SnapshotReady, VmSettings};
use chrono::{DateTime, Utc};
use pilotlight_cloud::{CloudError, ErrorKind, ObjectStore, PutOptions};
use pilotlight_protocol::Name;
use serde_json::Value;

/// Run records are small JSON documents; a larger one is not ours.
pub(crate) const MAX_RUN_RECORD: u64 = 4 << 20;

pub(crate) fn new_run_id(now: DateTime<Utc>, request: &Value) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(request.to_string());
    h.update(now.timestamp_nanos_opt().unwrap_or(0).to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    let tag = hex::encode(&h.finalize()[..4]);
    format!("dr-{}-{tag}", now.format("%Y%m%dt%H%M%S"))
}

/// Writes a record over exactly the version `etag` names (`If-Match`), or as a new one
/// (`If-None-Match: *`) without: the new version's ETag (`None`: the store names none;
/// read it back). A caller that lost a race gets [`DrError::Conflict`] naming `id`, and
/// has changed nothing. Every record the DR function keeps (runs, failbacks, plan runs,
/// automation states) is saved through this.
pub(crate) async fn put_versioned<S: ObjectStore>(
    store: &S,
    key: &str,
    body: Vec<u8>,
    etag: Option<&str>,
    id: &str,
) -> Result<Option<String>, DrError> {
    let opts = match etag {
        Some(etag) => PutOptions::json().replacing(etag.to_string()),
        None => PutOptions::json().create_only(),
    };
    match store.put(key, body.into(), opts).await {
        Ok(e) => Ok(e),
        // 412: another version was saved; 404 on If-Match: the record is gone.
        Err(e)
            if e.kind == ErrorKind::PreconditionFailed || (etag.is_some() && e.is_not_found()) =>
        {
            Err(DrError::Conflict(id.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

/// The ids of every run record (the records directly under the runs prefix: failbacks,
/// plan runs and groups live in folders beside them).
pub(crate) async fn run_ids<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
) -> Result<Vec<String>, DrError> {
    let prefix = &env.cfg.runs_prefix;
    Ok(env
        .store
        .list(prefix, |_| true)
        .await?
        .iter()
        .filter_map(|k| k.strip_prefix(prefix.as_str()))
        .filter_map(|k| k.strip_suffix(".json"))
        .filter(|k| !k.contains('/'))
        .map(String::from)
        .collect())
}

/// Reads a record and the version it was read as (`None`: no such object); a record that
/// does not parse is [`DrError::BadRun`] naming its key. The counterpart of
/// [`put_versioned`] for every record the DR function keeps.
pub(crate) async fn get_versioned<S: ObjectStore, T: serde::de::DeserializeOwned>(
    store: &S,
    key: &str,
    cap: u64,
) -> Result<Option<(T, String)>, DrError> {
    let Some(found) = store.get_versioned(key, cap).await? else {
        return Ok(None);
    };
    let record = serde_json::from_slice(&found.body).map_err(|e| DrError::BadRun {
        key: key.to_string(),
        detail: e.to_string(),
    })?;
    Ok(Some((record, found.etag)))
}

/// Saves the run over exactly the version it was read as (see [`put_versioned`]).
pub(crate) async fn save<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    run: &mut Run,
) -> Result<(), DrError> {
    let key = env.cfg.run_key(&run.run_id);
    let body = json_bytes("the run record", run)?;
    match put_versioned(&env.store, &key, body, run.etag.0.as_deref(), &run.run_id).await? {
        Some(etag) => run.etag.0 = Some(etag),
        // A store that names no version: read it back to learn it.
        None => run.etag = load(env, &run.run_id).await?.etag,
    }
    if run.phase.is_final() {
        write_report(env, &run.run_id, crate::report::render(run, Utc::now())).await;
    }
    Ok(())
}

/// Writes a run's report beside its record (after the record: the record is the truth).
/// A report that cannot be written now is no reason to fail the run: `report` renders
/// one from the record and writes it again.
pub(crate) async fn write_report<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    run_id: &str,
    html: String,
) {
    let key = env.cfg.report_key(run_id);
    let opts = PutOptions {
        content_type: Some("text/html; charset=utf-8"),
        ..Default::default()
    };
    if let Err(e) = env.store.put(&key, html.into_bytes().into(), opts).await {
        tracing::warn!(run = %run_id, key, error = %e, "the run's report was not written; `pilotlight-dr report` renders it from the record");
    }
}

/// A report is small; a larger object under its key is not ours.
pub(crate) const MAX_REPORT: u64 = 4 << 20;

/// The report of a recovery of several VMs (`grp-...`): rendered from its runs' records
/// as they are now, and stored beside them once every run has ended.
pub(crate) async fn group_report<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    group: &str,
) -> Result<crate::model::Report, DrError> {
    let key = env.cfg.group_key(group);
    let found = match Name::new(group) {
        Ok(_) => env.store.get_if_exists(&key, MAX_RUN_RECORD).await?,
        Err(_) => None,
    };
    let record: GroupRecord = match found {
        Some(body) => serde_json::from_slice(&body).map_err(|e| DrError::BadRun {
            key: key.clone(),
            detail: e.to_string(),
        })?,
        None => return Err(DrError::NoSuchRun(group.into())),
    };
    let mut runs = Vec::new();
    for (vm, id) in &record.runs {
        match load(env, id).await {
            Ok(run) => runs.push(run),
            // A VM whose run could not be recorded (the bucket failing when it started).
            Err(DrError::NoSuchRun(_)) => {
                let request = serde_json::json!({"site": record.site, "vm": vm, "group": group});
                runs.push(failed_run(
                    request,
                    format!("not started (run {id} was never recorded): start this VM again"),
                ));
            }
            Err(e) => return Err(e),
        }
    }
    let html = crate::report::render_group(group, &runs, Utc::now());
    let report_key = env.cfg.report_key(group);
    if runs.iter().all(|r| r.phase.is_final()) {
        write_report(env, group, html.clone()).await;
    }
    Ok(crate::model::Report {
        run_id: group.into(),
        key: report_key,
        stored: false,
        html,
    })
}

/// The run's report: the stored one when it was written from the record as it is now,
/// else rendered from the record (and, for a run that has ended, stored again). A group
/// id (`grp-...`) gets the group's report.
pub async fn report<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    run_id: &str,
) -> Result<crate::model::Report, DrError> {
    if run_id.starts_with("grp-") {
        return group_report(env, run_id).await;
    }
    if run_id.starts_with("plan-") {
        // A plan run's report, rendered from its record as it is now.
        let r = crate::plans::run::load_plan_run(env, run_id).await?;
        return Ok(crate::model::Report {
            run_id: r.plan_run_id.clone(),
            key: env.cfg.report_key(run_id),
            stored: false,
            html: crate::report::plan::render(&r, Utc::now()),
        });
    }
    let run = load(env, run_id).await?;
    let key = env.cfg.report_key(run_id);
    let stamp = crate::report::stamp(&run);
    match env.store.get_versioned(&key, MAX_REPORT).await {
        Ok(Some(found)) => {
            if let Ok(html) = String::from_utf8(found.body.to_vec()) {
                if html.contains(&stamp) {
                    return Ok(crate::model::Report {
                        run_id: run.run_id,
                        key,
                        stored: true,
                        html,
                    });
                }
            }
        }
        Ok(None) => {}
        // The record is here, so the report can always be rendered from it.
        Err(e) => {
            tracing::warn!(key, error = %e, "the stored report is unreadable; rendering one from the record")
        }
    }
    let html = crate::report::render(&run, Utc::now());
    if run.phase.is_final() {
        write_report(env, &run.run_id, html.clone()).await;
    }
    Ok(crate::model::Report {
        html,
        run_id: run.run_id,
        key,
        stored: false,
    })
}

pub(crate) async fn load<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    run_id: &str,
) -> Result<Run, DrError> {
    if Name::new(run_id).is_err() {
        return Err(DrError::NoSuchRun(run_id.into()));
    }
    let (mut run, etag): (Run, String) =
        get_versioned(&env.store, &env.cfg.run_key(run_id), MAX_RUN_RECORD)
            .await?
            .ok_or_else(|| DrError::NoSuchRun(run_id.into()))?;
    run.etag.0 = Some(etag);
    Ok(run.with_start())
}

pub(crate) async fn read_ready<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    site: &str,
    vm: &str,
) -> Result<Option<SnapshotReady>, CloudError> {
    let key = env.cfg.ready_key(site, vm);
    Ok(env
        .store
        .get_if_exists(&key, 64 << 10)
        .await?
        .and_then(|b| serde_json::from_slice::<SnapshotReady>(&b).ok())
        .filter(|r| r.site == site && r.vm == vm))
}

/// A VM's saved settings (`None`: never configured).
pub async fn vm_settings<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    site: &str,
    vm: &str,
) -> Result<Option<VmSettings>, DrError> {
    if Name::new(site).is_err() || Name::new(vm).is_err() {
        return Ok(None);
    }
    let key = env.cfg.vm_settings_key(site, vm);
    match env.store.get_if_exists(&key, 1 << 20).await? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| DrError::BadRun {
                key,
                detail: e.to_string(),
            }),
    }
}

/// The run of a VM of a group that could not start, saying why.
pub(crate) fn failed_run(request: Value, why: String) -> Run {
    let mut run = Run::new(new_run_id(Utc::now(), &request), request, Utc::now());
    run.fail(why, Utc::now());
    run
}
