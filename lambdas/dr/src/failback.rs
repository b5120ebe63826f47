//! Failback, the AWS side: return snapshots of a recovered instance, on a schedule, while
//! the site's sender writes them back (`pilotlight-sender failback --run`), then cutover.
//!
//! ```text
//! failback_start RUN ─► returning: CreateSnapshots every `every`, keep the newest `keep`
//!                         │ each completed set ─► b/{run}/return.json per disk (the sender's input)
//! failback_cutover RUN ─► stopping (StopInstances) ─► final snapshot (instance stopped)
//!                         ─► final round (the sender's round.json names the final snapshot,
//!                            verified, for every disk) ─► returned
//! ```
//!
//! The record lives beside the runs (`{runs_prefix}failback/{run}.json`), saved `If-Match`
//! on the version read like a run, and every call advances it by what AWS says now: the
//! Lambda keeps no state, and the schedule or any `failback status` moves it on.
//!
//! CreateSnapshots takes no client token (EC2 API reference): each set is tagged at
//! creation with its own id, recorded before the call, and looked for by that tag before
//! any second call, so a lost answer or a crash never makes a second set silently; if
//! one is made anyway (DescribeSnapshots is eventually consistent), the earliest snapshot
//! per volume is the set's and the others are deleted.

use crate::config::DrEnv;
use crate::error::{json_bytes, DrError};
use crate::model::{Etag, FailbackStart, Method, Phase, Run};
use crate::runs::load;
use crate::steps::register::device_name;
use chrono::{DateTime, Utc};
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::ec2::{Ec2Api, SnapshotsRequest, VolumeSnapshot};
use pilotlight_cloud::{ObjectStore, PutOptions};
use pilotlight_protocol::points::tag;
use pilotlight_protocol::{DiskId, Name, ReturnDoc, ReturnPoint, RoundDoc, FAILBACK_VERSION};
use pilotlight_store::{failback as docs, DocError};
use serde::{Deserialize, Serialize};

pub const FAILBACK_RECORD_VERSION: u32 = 1;
/// Tag on every return snapshot: the run it returns from.
pub const TAG_RETURN: &str = "pilotlight:return";
/// Tag on every return snapshot: its set (one CreateSnapshots call).
pub const TAG_RETURN_SET: &str = "pilotlight:return-set";
/// Default time between return snapshots.
pub const DEFAULT_EVERY_SECONDS: u64 = 3600;
/// Default number of return sets kept (besides any a round still starts from).
pub const DEFAULT_KEEP: usize = 3;
const MAX_FAILBACK_RECORD: u64 = 1 << 20;

/// Where a failback is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailbackPhase {
    /// Return snapshots on a schedule; the sender's rounds follow them.
    Returning,
    /// Cutover asked: the instance is being stopped.
    Stopping,
    /// The instance stopped; the final return snapshot is being taken.
    FinalSnapshot,
    /// The final snapshot is complete; waiting for the sender's final round of every disk.
    FinalRound,
    /// Every disk's final round wrote and verified the final snapshot: the site holds it.
    Returned,
    Failed,
}

impl FailbackPhase {
    pub fn is_final(self) -> bool {
        matches!(self, FailbackPhase::Returned | FailbackPhase::Failed)
    }
}

/// One disk of the recovered instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailbackDisk {
    pub disk: DiskId,
    pub device: String,
    pub volume_id: String,
    /// The recovery point the volume was created from.
    pub point_snapshot: String,
    pub point_generation: u64,
    /// The sender's newest round of this disk, as it last reported.
    #[serde(default)]
    pub round: Option<RoundDoc>,
}

/// One set of return snapshots (one CreateSnapshots call).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnSet {
    pub set_id: String,
    pub requested_at: DateTime<Utc>,
    /// Taken with the instance stopped (cutover).
    #[serde(default)]
    pub r#final: bool,
    /// `requesting` (recorded, call not yet answered), `pending`, `completed`, `error`,
    /// `pruned`.
    pub state: String,
    /// `(volume id, snapshot id)`.
    #[serde(default)]
    pub snapshots: Vec<(String, String)>,
}

/// A failback, as kept beside the runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failback {
    pub version: u32,
    pub run_id: String,
    pub site: String,
    pub vm: String,
    pub instance_id: String,
    pub phase: FailbackPhase,
    pub every_seconds: u64,
    pub keep: usize,
    pub disks: Vec<FailbackDisk>,
    pub sets: Vec<ReturnSet>,
    #[serde(default)]
    pub reason: Option<String>,
    /// What happened, oldest first (`time: what`).
    #[serde(default)]
    pub log: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When cutover was asked (the instance stops then).
    #[serde(default)]
    pub cutover_at: Option<DateTime<Utc>>,
    /// When every disk's final round had been reported.
    #[serde(default)]
    pub returned_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub etag: Etag,
}

impl Failback {
    fn note(&mut self, what: impl Into<String>) {
        let what = what.into();
        tracing::info!(run = %self.run_id, phase = ?self.phase, "{what}");
        self.log
            .push(format!("{}: {what}", Utc::now().to_rfc3339()));
    }
    fn fail(&mut self, why: String) {
        self.note(format!("failed: {why}"));
        self.phase = FailbackPhase::Failed;
        self.reason = Some(why);
    }
    /// The completed sets, oldest first.
    pub fn completed(&self) -> impl Iterator<Item = &ReturnSet> {
        self.sets.iter().filter(|s| s.state == "completed")
    }
}

fn key<S, E, B>(env: &DrEnv<S, E, B>, run_id: &str) -> String {
    format!("{}failback/{run_id}.json", env.cfg.runs_prefix)
}

pub async fn load_failback<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    run_id: &str,
) -> Result<Option<Failback>, DrError> {
    if Name::new(run_id).is_err() {
        return Err(DrError::NoSuchRun(run_id.into()));
    }
    let found =
        crate::runs::get_versioned(&env.store, &key(env, run_id), MAX_FAILBACK_RECORD).await?;
    let Some((mut fb, etag)): Option<(Failback, String)> = found else {
        return Ok(None);
    };
    fb.etag.0 = Some(etag);
    Ok(Some(fb))
}

async fn save<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    fb: &mut Failback,
) -> Result<(), DrError> {
    fb.updated_at = Utc::now();
    let key = key(env, &fb.run_id);
    let body = json_bytes("the failback record", fb)?;
    match crate::runs::put_versioned(&env.store, &key, body, fb.etag.0.as_deref(), &fb.run_id)
        .await?
    {
        Some(etag) => fb.etag.0 = Some(etag),
        None => {
            fb.etag = load_failback(env, &fb.run_id)
                .await?
                .ok_or_else(|| DrError::NoSuchRun(fb.run_id.clone()))?
                .etag
        }
    }
    Ok(())
}

/// Why a run cannot be failed back from (none: it can).
fn refuse(run: &Run) -> Option<String> {
    if run.drill {
        return Some(
            "a drill's instance is not where the data lives: fail back from a real recovery".into(),
        );
    }
    if run.phase != Phase::Done {
        return Some(format!(
            "the run is {:?}, not done: only a recovery that launched and verified its instance can be failed back",
            run.phase
        ));
    }
    if run.method != Some(Method::Snapshot) {
        return Some("the run used the import method: its volumes are not of the recovery points' lineage (failback reads changed blocks between the point and the return snapshots); recover with the snapshot method".into());
    }
    if run.instance_ids.len() != 1 {
        return Some(format!(
            "the run has {} instances, not one",
            run.instance_ids.len()
        ));
    }
    if run.disks.iter().any(|d| d.snapshot_id.is_none()) {
        return Some("a disk of the run has no recovery-point snapshot".into());
    }
    None
}

/// Starts a failback of a real, finished recovery (or returns the one already started).
pub async fn start<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    req: FailbackStart,
) -> Result<Failback, DrError> {
    let every = req.every_seconds.unwrap_or(DEFAULT_EVERY_SECONDS);
    let keep = req.keep.unwrap_or(DEFAULT_KEEP);
    if every < 300 {
        return Err(DrError::BadRequest(format!(
            "every_seconds {every}: at least 300 (a return snapshot every 5 minutes or less often)"
        )));
    }
    if !(2..=16).contains(&keep) {
        return Err(DrError::BadRequest(format!(
            "keep {keep}: 2 to 16 return sets"
        )));
    }
    if let Some(mut fb) = load_failback(env, &req.run_id).await? {
        advance(env, &mut fb).await?;
        return Ok(fb);
    }
    let run = load(env, &req.run_id).await?;
    if let Some(why) = refuse(&run) {
        return Err(DrError::Refused(format!(
            "cannot fail back from run {}: {why}",
            run.run_id
        )));
    }
    let instance = run.instance_ids[0].clone();
    let attached = env.ec2.instance_volumes(&instance).await?.ok_or_else(|| {
        DrError::Refused(format!(
            "instance {instance} of run {} is not found",
            run.run_id
        ))
    })?;
    if attached.state == "terminated" || attached.state == "shutting-down" {
        return Err(DrError::Refused(format!(
            "instance {instance} is {}: nothing to fail back from",
            attached.state
        )));
    }
    let mut disks = Vec::new();
    for (i, d) in run.disks.iter().enumerate() {
        let id = DiskId::parse(&d.disk).map_err(|e| DrError::BadRun {
            key: run.run_id.clone(),
            detail: e.to_string(),
        })?;
        let device = device_name(i);
        let volume = attached
            .volumes
            .iter()
            .find(|(dev, _)| *dev == device)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                DrError::Refused(format!(
                    "instance {instance} has no volume on {device} (disk {}): was it detached?",
                    d.disk
                ))
            })?;
        disks.push(FailbackDisk {
            disk: id,
            device,
            volume_id: volume,
            point_snapshot: d.snapshot_id.clone().unwrap_or_default(),
            point_generation: d.generation,
            round: None,
        });
    }
    let Some(request) = run.start.0.as_deref() else {
        return Err(DrError::Refused(format!(
            "run {}: its start request is unreadable",
            run.run_id
        )));
    };
    let now = Utc::now();
    let mut fb = Failback {
        version: FAILBACK_RECORD_VERSION,
        run_id: run.run_id.clone(),
        site: request.site.clone(),
        vm: request.vm.clone(),
        instance_id: instance,
        phase: FailbackPhase::Returning,
        every_seconds: every,
        keep,
        disks,
        sets: Vec::new(),
        reason: None,
        log: Vec::new(),
        created_at: now,
        updated_at: now,
        cutover_at: None,
        returned_at: None,
        etag: Etag::default(),
    };
    fb.note(format!(
        "failback started: a return snapshot every {every} s, the newest {keep} kept"
    ));
    save(env, &mut fb).await?;
    advance(env, &mut fb).await?;
    Ok(fb)
}

/// Asks for cutover: stop the instance, take the final return snapshot, wait for the
/// sender's final round.
pub async fn cutover<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run_id: &str,
) -> Result<Failback, DrError> {
    let mut fb = load_failback(env, run_id)
        .await?
        .ok_or_else(|| DrError::Refused(format!("run {run_id} has no failback: start one first (`pilotlight-dr failback start {run_id}`)")))?;
    if fb.phase == FailbackPhase::Returning {
        fb.phase = FailbackPhase::Stopping;
        fb.cutover_at = Some(Utc::now());
        fb.note(format!("cutover: stopping instance {}", fb.instance_id));
        save(env, &mut fb).await?;
    }
    advance(env, &mut fb).await?;
    Ok(fb)
}

/// Every unfinished failback (the schedule), or one.
pub async fn status<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    run_id: Option<&str>,
) -> Result<Vec<Failback>, DrError> {
    if let Some(id) = run_id {
        let mut fb = load_failback(env, id)
            .await?
            .ok_or_else(|| DrError::Refused(format!("run {id} has no failback")))?;
        advance(env, &mut fb).await?;
        return Ok(vec![fb]);
    }
    let prefix = format!("{}failback/", env.cfg.runs_prefix);
    let mut out = Vec::new();
    for k in env.store.list(&prefix, |_| true).await? {
        let Some(id) = k
            .strip_prefix(&prefix)
            .and_then(|k| k.strip_suffix(".json"))
        else {
            continue;
        };
        match load_failback(env, id).await {
            Ok(Some(mut fb)) if !fb.phase.is_final() => {
                if let Err(e) = advance(env, &mut fb).await {
                    tracing::warn!(run = %id, error = %e, "cannot advance the failback now");
                }
                out.push(fb);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(run = %id, error = %e, "unreadable failback record; skipped"),
        }
    }
    Ok(out)
}

/// Moves a failback on by what AWS and the sender say now; saves what changed.
pub async fn advance<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    fb: &mut Failback,
) -> Result<(), DrError> {
    let before = fb.clone();
    let result = step(env, fb).await;
    if *fb != before {
        save(env, fb).await?;
        if fb.phase.is_final() {
            // After the record (the record is the truth); a report that cannot be
            // written now is rendered again by `failback report`.
            let html = crate::report::failback::render(fb, Utc::now());
            let key = report_key(env, &fb.run_id);
            let opts = PutOptions {
                content_type: Some("text/html; charset=utf-8"),
                ..Default::default()
            };
            if let Err(e) = env.store.put(&key, html.into_bytes().into(), opts).await {
                tracing::warn!(key, error = %e, "the failback report was not written");
            }
        }
    }
    result
}

/// Where a finished failback's report is kept.
pub fn report_key<S, E, B>(env: &DrEnv<S, E, B>, run_id: &str) -> String {
    format!("{}failback/{run_id}.html", env.cfg.runs_prefix)
}

async fn step<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    fb: &mut Failback,
) -> Result<(), DrError> {
    if fb.phase.is_final() {
        return Ok(());
    }
    let mut changed = settle(env, fb).await?;
    read_rounds(env, fb).await?;
    changed |= choose_prune(fb);
    if changed {
        publish(env, fb).await?;
    }
    prune(env, fb).await;
    match fb.phase {
        FailbackPhase::Returning => {
            let due = fb.sets.last().is_none_or(|s| {
                (Utc::now() - s.requested_at).num_seconds() >= fb.every_seconds as i64
                    && !matches!(s.state.as_str(), "requesting" | "pending")
            });
            if due {
                take_set(env, fb, false).await?;
            }
        }
        FailbackPhase::Stopping => match env.ec2.instance_volumes(&fb.instance_id).await? {
            Some(v) if v.state == "stopped" => {
                fb.phase = FailbackPhase::FinalSnapshot;
                fb.note("instance stopped: taking the final return snapshot");
                take_set(env, fb, true).await?;
            }
            Some(v) if v.state == "running" || v.state == "pending" => {
                env.ec2
                    .stop_instances(std::slice::from_ref(&fb.instance_id))
                    .await?;
            }
            Some(v) if v.state == "stopping" => {}
            Some(v) => fb.fail(format!(
                "instance {} is {}, cannot stop it for cutover",
                fb.instance_id, v.state
            )),
            None => fb.fail(format!("instance {} is gone", fb.instance_id)),
        },
        FailbackPhase::FinalSnapshot => {
            match fb.sets.iter().rev().find(|s| s.r#final).map(|s| s.state.clone()) {
                Some(s) if s == "completed" => {
                    fb.phase = FailbackPhase::FinalRound;
                    fb.note("final return snapshot complete: run the sender's final round (`pilotlight-sender failback --run`)");
                }
                Some(s) if s == "error" => fb.fail("the final return snapshot ended in error; start the instance, and cut over again".into()),
                Some(_) => {}
                None => take_set(env, fb, true).await?,
            }
        }
        FailbackPhase::FinalRound => {
            let Some(last) = fb
                .sets
                .iter()
                .rev()
                .find(|s| s.r#final && s.state == "completed")
                .cloned()
            else {
                return Ok(());
            };
            let done = fb.disks.iter().all(|d| {
                let want = last
                    .snapshots
                    .iter()
                    .find(|(v, _)| *v == d.volume_id)
                    .map(|(_, s)| s);
                d.round
                    .as_ref()
                    .is_some_and(|r| Some(&r.snapshot_id) == want && r.verified && !r.drill)
            });
            if done {
                fb.phase = FailbackPhase::Returned;
                fb.returned_at = Some(Utc::now());
                fb.note("every disk's final round wrote and verified the final snapshot: the site holds the instance's disks; resume protection (`pilotlight-sender resume`)");
            }
        }
        FailbackPhase::Returned | FailbackPhase::Failed => {}
    }
    Ok(())
}

/// Brings each set's state up to date from DescribeSnapshots; true when any changed.
async fn settle<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    fb: &mut Failback,
) -> Result<bool, DrError> {
    let mut changed = false;
    for i in 0..fb.sets.len() {
        let set = fb.sets[i].clone();
        if !matches!(set.state.as_str(), "requesting" | "pending") {
            continue;
        }
        let found = env
            .ec2
            .snapshots_tagged(TAG_RETURN_SET, &set.set_id)
            .await?;
        let (mine, extra) = one_per_volume(found);
        for s in extra {
            // A second call made a second snapshot of a volume: not part of the set.
            if let Err(e) = env.ec2.delete_snapshot(&s.snapshot_id).await {
                tracing::warn!(snapshot = %s.snapshot_id, error = %e, "cannot delete a duplicate return snapshot");
            }
        }
        if set.state == "requesting" && mine.is_empty() {
            // Recorded, but the call was never answered: make it now (the schedule's
            // next call finds it by its tag if this one's answer is lost too).
            make_set(env, fb, i).await?;
            changed = true;
            continue;
        }
        let state = if mine.iter().any(|s| s.state == "error") {
            "error"
        } else if mine.len() == fb.disks.len() && mine.iter().all(|s| s.state == "completed") {
            "completed"
        } else {
            "pending"
        };
        let snaps: Vec<(String, String)> = mine
            .iter()
            .map(|s| (s.volume_id.clone(), s.snapshot_id.clone()))
            .collect();
        if state != set.state || snaps != set.snapshots {
            fb.sets[i].state = state.into();
            fb.sets[i].snapshots = snaps;
            if state != set.state {
                fb.note(format!("return set {} is {state}", set.set_id));
            }
            changed = true;
        }
    }
    Ok(changed)
}

/// The earliest snapshot of each volume, and the others.
fn one_per_volume(mut found: Vec<VolumeSnapshot>) -> (Vec<VolumeSnapshot>, Vec<VolumeSnapshot>) {
    found.sort_by(|a, b| {
        (&a.volume_id, a.start_time, &a.snapshot_id).cmp(&(
            &b.volume_id,
            b.start_time,
            &b.snapshot_id,
        ))
    });
    let mut mine: Vec<VolumeSnapshot> = Vec::new();
    let mut extra = Vec::new();
    for s in found {
        if mine.last().is_some_and(|m| m.volume_id == s.volume_id) {
            extra.push(s);
        } else {
            mine.push(s);
        }
    }
    (mine, extra)
}

/// Records a new set, then makes it (CreateSnapshots), so a crash in between is found
/// by the set's tag instead of making a second one.
async fn take_set<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    fb: &mut Failback,
    r#final: bool,
) -> Result<(), DrError> {
    let set_id = format!("{}.r{}", fb.run_id, fb.sets.len() + 1);
    fb.sets.push(ReturnSet {
        set_id,
        requested_at: Utc::now(),
        r#final,
        state: "requesting".into(),
        snapshots: Vec::new(),
    });
    save(env, fb).await?;
    make_set(env, fb, fb.sets.len() - 1).await
}

/// Makes the recorded set `i` unless its snapshots exist already.
async fn make_set<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    fb: &mut Failback,
    i: usize,
) -> Result<(), DrError> {
    let set_id = fb.sets[i].set_id.clone();
    let r#final = fb.sets[i].r#final;
    let existing = env.ec2.snapshots_tagged(TAG_RETURN_SET, &set_id).await?;
    let made = if existing.is_empty() {
        let mut tags = vec![
            (TAG_RETURN.to_string(), fb.run_id.clone()),
            (TAG_RETURN_SET.to_string(), set_id.clone()),
            (tag::SITE.to_string(), fb.site.clone()),
            (tag::VM.to_string(), fb.vm.clone()),
            (
                tag::NAME.to_string(),
                format!("pilotlight return {} {set_id}", fb.vm),
            ),
        ];
        // The sender's policy reads only its own stack's and site's snapshots.
        if let Some(stack) = &env.cfg.stack {
            tags.push((tag::STACK.to_string(), stack.clone()));
        }
        let req = SnapshotsRequest {
            instance_id: fb.instance_id.clone(),
            description: format!(
                "pilotlight failback of {} ({set_id}{})",
                fb.vm,
                if r#final { ", final" } else { "" }
            ),
            tags,
        };
        env.ec2.create_snapshots(&req).await?
    } else {
        existing
    };
    let (mine, _) = one_per_volume(made);
    fb.sets[i].state = "pending".into();
    fb.sets[i].snapshots = mine
        .iter()
        .map(|s| (s.volume_id.clone(), s.snapshot_id.clone()))
        .collect();
    fb.note(format!(
        "return set {set_id}{} requested: {}",
        if r#final { " (final)" } else { "" },
        mine.iter()
            .map(|s| s.snapshot_id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(())
}

/// Marks `pruning` the completed sets beyond the newest `keep`, except a set a disk's
/// newest round ended on (the next round starts from it) and a final one; true when it
/// marked any. Their snapshots are deleted only after the documents stop offering them.
fn choose_prune(fb: &mut Failback) -> bool {
    let completed: Vec<usize> = (0..fb.sets.len())
        .filter(|&i| fb.sets[i].state == "completed")
        .collect();
    if completed.len() <= fb.keep {
        return false;
    }
    let in_use: Vec<String> = fb
        .disks
        .iter()
        .filter_map(|d| d.round.as_ref().map(|r| r.snapshot_id.clone()))
        .collect();
    let mut any = false;
    for &i in &completed[..completed.len() - fb.keep] {
        let set = &fb.sets[i];
        if set.r#final || set.snapshots.iter().any(|(_, s)| in_use.contains(s)) {
            continue;
        }
        fb.sets[i].state = "pruning".into();
        any = true;
    }
    any
}

/// Deletes the snapshots of `pruning` sets; a set whose every snapshot is gone is
/// `pruned` (a failed delete is tried again on the next call).
async fn prune<S: ObjectStore, E: Ec2Api, B: EbsApi>(env: &DrEnv<S, E, B>, fb: &mut Failback) {
    for i in 0..fb.sets.len() {
        if fb.sets[i].state != "pruning" {
            continue;
        }
        let mut ok = true;
        for (_, s) in &fb.sets[i].snapshots {
            if let Err(e) = env.ec2.delete_snapshot(s).await {
                if !e.is_not_found() {
                    tracing::warn!(snapshot = %s, error = %e, "cannot prune a return snapshot; next time");
                    ok = false;
                }
            }
        }
        if ok {
            let id = fb.sets[i].set_id.clone();
            fb.sets[i].state = "pruned".into();
            fb.note(format!("return set {id} pruned"));
        }
    }
}

/// Writes each disk's `return.json`: the completed sets, oldest first.
async fn publish<S: ObjectStore, E: Ec2Api, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    fb: &Failback,
) -> Result<(), DrError> {
    let run = Name::new(&fb.run_id).map_err(|e| DrError::BadRequest(e.to_string()))?;
    for d in &fb.disks {
        let returns = fb
            .completed()
            .filter_map(|s| {
                let (_, snap) = s.snapshots.iter().find(|(v, _)| *v == d.volume_id)?;
                Some(ReturnPoint {
                    set_id: s.set_id.clone(),
                    snapshot_id: snap.clone(),
                    taken_at: s.requested_at,
                    r#final: s.r#final,
                })
            })
            .collect();
        let doc = ReturnDoc {
            version: FAILBACK_VERSION,
            run_id: run.clone(),
            disk: d.disk.clone(),
            point_snapshot: d.point_snapshot.clone(),
            point_generation: d.point_generation,
            instance_id: fb.instance_id.clone(),
            volume_id: d.volume_id.clone(),
            returns,
            updated_at: Utc::now(),
        };
        docs::write_return(&env.store, &env.cfg.prefix, &doc)
            .await
            .map_err(|e| match e {
                pilotlight_store::exports::WriteError::Put(c) => DrError::Store(c),
                pilotlight_store::exports::WriteError::Encode { what, detail } => {
                    DrError::Encode { what, detail }
                }
            })?;
    }
    Ok(())
}

/// Reads each disk's `round.json` (the sender's newest round); a missing one is no round
/// yet, an invalid one is logged and ignored (it is the sender's word, untrusted here).
async fn read_rounds<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    fb: &mut Failback,
) -> Result<(), DrError> {
    let run = Name::new(&fb.run_id).map_err(|e| DrError::BadRequest(e.to_string()))?;
    for i in 0..fb.disks.len() {
        let disk = fb.disks[i].disk.clone();
        match docs::read_round(&env.store, &env.cfg.prefix, &disk, &run).await {
            Ok(r) => {
                if fb.disks[i].round.as_ref() != Some(&r) {
                    fb.note(format!(
                        "{disk}: the sender's round brought {} to {}{} ({} blocks written{})",
                        r.target,
                        r.snapshot_id,
                        if r.r#final { ", final" } else { "" },
                        r.blocks_written,
                        if r.verified {
                            ", verified"
                        } else {
                            ", NOT verified"
                        }
                    ));
                    fb.disks[i].round = Some(r);
                }
            }
            Err(DocError::Missing { .. }) => {}
            Err(DocError::Invalid { key, detail }) => {
                tracing::warn!(key, detail, "a failback round document is invalid; ignored");
            }
            Err(DocError::Read(e)) => return Err(e.into()),
        }
    }
    Ok(())
}
