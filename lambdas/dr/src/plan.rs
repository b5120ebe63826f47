//! Planning a start: the request validated without I/O, each disk's generation of one
//! snapshot time resolved from the bucket, the method chosen and the point's snapshots
//! found.

use crate::config::{DrConfig, DrEnv};
use crate::model::{BootMode, Method, RecoveryPoint, StartRequest};
use crate::runs::read_ready;
use chrono::{DateTime, Utc};
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::{CloudError, ObjectStore};
use pilotlight_protocol::keys::{disk_prefix, generation_prefix};
use pilotlight_protocol::points::{common_step, time_tag, Common};
use pilotlight_protocol::{DiskId, Name};
use pilotlight_store::{manifests, DocError};

/// Why a start cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The bucket or EC2 failed: a transient failure records nothing (the caller tries
    /// again), any other fails the run with this reason.
    #[error(transparent)]
    Cloud(#[from] CloudError),
    /// The request cannot be served as asked (unknown disk, no common snapshot time, no
    /// point snapshot for the snapshot method): the run is recorded as failed with this
    /// reason.
    #[error("{0}")]
    Unservable(String),
}

/// Each disk's generation, all of one snapshot time, and that time.
pub(crate) type Resolved = (Vec<(DiskId, u64)>, DateTime<Utc>);

/// The method a run uses, why, and (when every disk has one) each disk's point snapshot.
pub(crate) type Chosen = (Method, String, Option<Vec<String>>);

/// Chooses the method: the one asked for, or for `auto` the snapshot method when the VM
/// is snapshot-ready and its point has every disk's snapshot. The outer error is AWS
/// failing for now, the inner one a run that cannot go on.
pub(crate) async fn choose_method<S: ObjectStore, E, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    req: &StartRequest,
    disks: &[(DiskId, u64)],
    time: DateTime<Utc>,
) -> Result<Chosen, PlanError> {
    let points = match find_points(env, disks, time).await {
        Ok(p) => Ok(p),
        Err(PlanError::Unservable(why)) => Err(why),
        Err(e) => return Err(e),
    };
    // Only `auto` asks whether the VM is snapshot-ready.
    let ready = match req.method {
        Method::Auto => read_ready(env, &req.site, &req.vm).await?,
        Method::Snapshot | Method::Import => None,
    };
    let vm = format!("{}/{}", req.site, req.vm);
    let chosen: Result<Chosen, String> = match (req.method, points) {
        (Method::Snapshot, Ok(p)) => Ok((Method::Snapshot, "snapshot: as asked".into(), Some(p))),
        (Method::Snapshot, Err(e)) => Err(format!(
            "the snapshot method needs a recovery point snapshot of every disk: {e}; use --method import"
        )),
        (Method::Import, p) => Ok((Method::Import, "import: as asked".into(), p.ok())),
        (Method::Auto, Ok(p)) => match ready {
            Some(r) => Ok((
                Method::Snapshot,
                format!(
                    "auto chose snapshot: {vm} passed verification with the snapshot method in run {} at {}",
                    r.run_id,
                    time_tag(r.passed_at)
                ),
                Some(p),
            )),
            None => Ok((
                Method::Import,
                format!(
                    "auto chose import: {vm} has no snapshot-method run that passed verification (a drill with --method snapshot proves it boots natively)"
                ),
                Some(p),
            )),
        },
        (Method::Auto, Err(e)) => Ok((
            Method::Import,
            format!("auto chose import: {e}"),
            None,
        )),
    };
    chosen.map_err(PlanError::Unservable)
}

/// Each disk's recovery point snapshot of exactly that generation and snapshot time.
pub(crate) async fn find_points<S, E, B: EbsApi>(
    env: &DrEnv<S, E, B>,
    disks: &[(DiskId, u64)],
    time: DateTime<Utc>,
) -> Result<Vec<String>, PlanError> {
    let mut out = Vec::new();
    for (disk, g) in disks {
        let found =
            pilotlight_store::points::of_generation(&env.ebs, disk, *g, env.cfg.stack.as_deref())
                .await;
        let point = match found {
            Ok(p) => p.filter(|p| p.snapshot_time == time),
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => {
                return Err(PlanError::Unservable(format!(
                    "recovery points cannot be read ({e})"
                )))
            }
        };
        match point {
            Some(p) => out.push(p.snapshot_id),
            None => {
                return Err(PlanError::Unservable(format!(
                    "no recovery point snapshot of {disk} generation {g} (at {}): recovery points off, not written yet, or deleted",
                    time_tag(time)
                )))
            }
        }
    }
    Ok(out)
}

pub(crate) fn valid_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|h| (8..=17).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Checks a start request without I/O. Each error says which field and why.
pub fn validate(cfg: &DrConfig, req: &StartRequest) -> Result<(), String> {
    let name = |what: &str, s: &str| {
        Name::new(s)
            .map(|_| ())
            .map_err(|e| format!("{what} {s:?}: {e}"))
    };
    name("site", &req.site)?;
    name("vm", &req.vm)?;
    if req.disks.is_empty() {
        return Err("disks: at least one disk is needed (the boot disk first)".into());
    }
    if req.disks.len() > 21 {
        return Err(format!(
            "disks: {} given; ImportImage takes at most 21",
            req.disks.len()
        ));
    }
    for (i, d) in req.disks.iter().enumerate() {
        name("disk", d)?;
        if req.disks[..i].contains(d) {
            return Err(format!("disks: {d:?} is listed twice"));
        }
    }
    if req.recovery_point == RecoveryPoint::Generation(0) {
        return Err("recovery_point: generations start at 1".into());
    }
    let l = &req.launch;
    let it = &l.instance_type;
    let ok_type = it.split_once('.').is_some_and(|(family, size)| {
        !family.is_empty()
            && !size.is_empty()
            && family
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase())
            && family
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && size
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    });
    if !ok_type {
        return Err(format!(
            "launch.instance_type {it:?} is not an EC2 instance type (like \"t3.medium\")"
        ));
    }
    // ImportImage API reference, BootMode: "The uefi-preferred boot mode isn't supported
    // for importing images."
    if req.method == Method::Import && l.boot_mode == Some(BootMode::UefiPreferred) {
        return Err("launch.boot_mode uefi-preferred: EC2 image import does not support it; use uefi or legacy-bios with --method import (or the snapshot method)".into());
    }
    if let Some(s) = &l.subnet_id {
        if !valid_id(s, "subnet-") {
            return Err(format!(
                "launch.subnet_id {s:?} is not a subnet id (subnet-0123abcd...)"
            ));
        }
    }
    if l.security_group_ids.len() > 16 {
        return Err("launch.security_group_ids: at most 16".into());
    }
    for g in &l.security_group_ids {
        if !valid_id(g, "sg-") {
            return Err(format!(
                "launch.security_group_ids: {g:?} is not a security group id (sg-0123abcd...)"
            ));
        }
    }
    let subnet = if req.drill {
        cfg.drill_subnet_id.as_ref().or(l.subnet_id.as_ref())
    } else {
        l.subnet_id.as_ref()
    };
    if l.private_ip.is_some() && subnet.is_none() {
        return Err(
            "launch.private_ip needs launch.subnet_id (the address must be in that subnet)".into(),
        );
    }
    if l.tags.len() > 40 {
        return Err(format!(
            "launch.tags: {} given; at most 40 (pilotlight adds its own)",
            l.tags.len()
        ));
    }
    for (k, v) in &l.tags {
        let lower = k.to_ascii_lowercase();
        if k.is_empty() || k.chars().count() > 128 {
            return Err(format!(
                "launch.tags: key {k:?} must be 1 to 128 characters"
            ));
        }
        if lower.starts_with("aws:") || lower.starts_with("pilotlight:") {
            return Err(format!(
                "launch.tags: key {k:?} uses a reserved prefix (aws:, pilotlight:)"
            ));
        }
        if v.chars().count() > 256 {
            return Err(format!(
                "launch.tags: the value of {k:?} is longer than 256 characters"
            ));
        }
    }
    Ok(())
}

/// Each disk and the generation to recover, checked against what is in the bucket; the
/// outer error is the bucket failing, the inner one a request that cannot be served.
pub(crate) async fn resolve<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    req: &StartRequest,
) -> Result<Resolved, PlanError> {
    let p = &env.cfg.prefix;
    let vm_prefix = format!("{}{}/{}/", p.key_start(), req.site, req.vm);
    let vm_keys = env.store.list(&vm_prefix, |_| true).await?;
    let committed = plan(env, req, &vm_prefix, &vm_keys).map_err(PlanError::Unservable)?;
    one_time(env, committed, req.recovery_point).await
}

/// Manifests read per disk at most while looking for a common snapshot time.
pub(crate) const MAX_MANIFEST_READS: usize = 1000;

/// One generation per disk, all of one snapshot time: the newest such time (at or before
/// `--at`; or the time of the boot disk's generation N). Reads manifests newest first,
/// only as far back as needed. A disk without a generation at that time is named.
pub(crate) async fn one_time<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    committed: Vec<(DiskId, Vec<u64>)>,
    point: RecoveryPoint,
) -> Result<Resolved, PlanError> {
    // Per disk: committed generations newest first, the cursor, their times read so far.
    struct Cursor {
        disk: DiskId,
        gens: Vec<u64>,
        at: usize,
        times: std::collections::BTreeMap<u64, Option<DateTime<Utc>>>,
    }
    let mut cs: Vec<Cursor> = committed
        .into_iter()
        .map(|(disk, mut gens)| {
            gens.sort_unstable_by(|a, b| b.cmp(a));
            Cursor {
                disk,
                gens,
                at: 0,
                times: Default::default(),
            }
        })
        .collect();
    let mut target: Option<DateTime<Utc>> = match point {
        RecoveryPoint::Latest => None,
        RecoveryPoint::At(t) | RecoveryPoint::Point(t) => Some(t),
        RecoveryPoint::Generation(g) => {
            let Some(first) = cs.first() else {
                return Err(PlanError::Unservable("no disks".into()));
            };
            match snapshot_time(env, &first.disk, g).await? {
                Some(t) => Some(t),
                None => {
                    return Err(PlanError::Unservable(format!(
                        "generation {g} of {} has no readable manifest",
                        first.disk
                    )))
                }
            }
        }
    };
    loop {
        // Each disk: its newest generation at or before the target.
        let mut found = Vec::with_capacity(cs.len());
        for c in cs.iter_mut() {
            loop {
                let Some(&g) = c.gens.get(c.at) else {
                    let when =
                        target.map_or("at all".into(), |t| format!("at or before {}", time_tag(t)));
                    return Err(PlanError::Unservable(format!(
                        "no committed generation of {} {when}: every disk of a run must come from one snapshot time (`pilotlight-dr points` and the receiver's status list what there is)",
                        c.disk
                    )));
                };
                if c.at >= MAX_MANIFEST_READS {
                    return Err(PlanError::Unservable(format!(
                        "{}: no generation at the VM's snapshot time within its newest {MAX_MANIFEST_READS}; name one with --at or --generation",
                        c.disk
                    )));
                }
                let t = match c.times.get(&g) {
                    Some(t) => *t,
                    None => {
                        let t = snapshot_time(env, &c.disk, g).await?;
                        c.times.insert(g, t);
                        t
                    }
                };
                match t {
                    Some(t) if target.is_none_or(|x| t <= x) => {
                        found.push((g, t));
                        break;
                    }
                    // Newer than the target, or a manifest that cannot be read: older.
                    _ => c.at += 1,
                }
            }
        }
        // Generation N names the time: every other disk must have exactly that one.
        if let (RecoveryPoint::Generation(_), Some(want)) = (point, target) {
            if let Some((c, (_, t))) = cs.iter().zip(&found).find(|(_, (_, t))| *t != want) {
                return Err(PlanError::Unservable(format!(
                    "{} has no generation at {} (the boot disk's generation's snapshot time; its newest before is {}): every disk of a run must come from one snapshot time",
                    c.disk,
                    time_tag(want),
                    time_tag(*t)
                )));
            }
        }
        // A point names the time exactly: name each disk that lacks it.
        if let RecoveryPoint::Point(want) = point {
            let lacking: Vec<String> = cs
                .iter()
                .zip(&found)
                .filter(|(_, (_, t))| *t != want)
                .map(|(c, (g, t))| {
                    format!(
                        "{} (its newest before is generation {g} at {})",
                        c.disk,
                        time_tag(*t)
                    )
                })
                .collect();
            if !lacking.is_empty() {
                return Err(PlanError::Unservable(format!(
                    "no VM recovery point at {}: {} lacking it: {} (`pilotlight-dr points` lists the points every disk has)",
                    time_tag(want),
                    if lacking.len() == 1 { "a disk is" } else { "disks are" },
                    lacking.join(", ")
                )));
            }
        }
        // The rule `points` uses too: all agree, or the oldest is the next target.
        let times: Vec<DateTime<Utc>> = found.iter().map(|(_, t)| *t).collect();
        match common_step(&times) {
            Some(Common::Agreed(t)) => {
                let disks = cs
                    .iter()
                    .zip(found)
                    .map(|(c, (g, _))| (c.disk.clone(), g))
                    .collect();
                return Ok((disks, t));
            }
            Some(Common::Lower(t)) => target = Some(t),
            None => return Err(PlanError::Unservable("no disks".into())),
        }
    }
}

/// The snapshot time a generation's manifest records (`None`: missing or invalid).
pub(crate) async fn snapshot_time<S: ObjectStore, E, B>(
    env: &DrEnv<S, E, B>,
    disk: &DiskId,
    generation: u64,
) -> Result<Option<DateTime<Utc>>, CloudError> {
    match manifests::read(&env.store, &env.cfg.prefix, disk, generation).await {
        Ok(m) => Ok(Some(m.snapshot_time)),
        Err(DocError::Read(e)) => Err(e),
        // Missing or not a manifest of this generation: as if it were older.
        Err(DocError::Missing { .. } | DocError::Invalid { .. }) => Ok(None),
    }
}

/// Each disk with its committed generations, checked against what is in the bucket.
pub(crate) fn plan<S, E, B>(
    env: &DrEnv<S, E, B>,
    req: &StartRequest,
    vm_prefix: &str,
    vm_keys: &[String],
) -> Result<Vec<(DiskId, Vec<u64>)>, String> {
    let p = &env.cfg.prefix;
    let b = &env.cfg.bucket;
    if vm_keys.is_empty() {
        return Err(format!(
            "unknown VM {}/{}: nothing is replicated under s3://{b}/{vm_prefix} (check the site and VM names; `pilotlight-receiver status` lists the disks)",
            req.site, req.vm
        ));
    }
    let mut out = Vec::new();
    for d in &req.disks {
        let disk = DiskId::new(&req.site, &req.vm, d).map_err(|e| e.to_string())?;
        let gp = generation_prefix(p, &disk);
        let keys: Vec<&String> = vm_keys.iter().filter(|k| k.starts_with(&gp)).collect();
        if keys.is_empty()
            && !vm_keys
                .iter()
                .any(|k| k.starts_with(&disk_prefix(p, &disk)))
        {
            return Err(format!(
                "unknown disk {disk}: nothing is replicated under s3://{b}/{gp}"
            ));
        }
        let committed = manifests::generations_in(p, &disk, keys.iter().copied());
        let Some(&latest) = committed.last() else {
            return Err(format!(
                "nothing committed yet for {disk}: its first generation is still uploading (no manifest under s3://{b}/{gp}); wait for the sender's first run to finish"
            ));
        };
        if let RecoveryPoint::Generation(g) = req.recovery_point {
            if out.is_empty() && !committed.contains(&g) {
                return Err(format!(
                    "generation {g} is not available for {disk}: committed generations are {} to {latest}",
                    committed[0]
                ));
            }
        }
        out.push((disk, committed));
    }
    Ok(out)
}
