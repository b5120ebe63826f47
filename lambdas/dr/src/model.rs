//! The DR Lambda's input and its run record (kept in S3 as JSON).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

pub const RUN_VERSION: u32 = 1;
/// Tag put on everything a run launches.
pub const TAG_RUN: &str = "pilotlight:dr-run";
/// Tag put on everything a drill launches (`true`).
pub const TAG_DRILL: &str = "pilotlight:drill";

/// What the Lambda is asked to do (`{"action": "start", ...}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum DrRequest {
    /// Declare a disaster (or start a drill): export, import, launch.
    Start(Box<StartRequest>),
    /// Advance one run (or every unfinished run) and report it.
    Status { run_id: Option<String> },
    /// Remove what a drill made: instances, AMI, snapshots, exported objects.
    Cleanup { run_id: String },
    /// Save a VM's recovery settings (disks, launch settings, method), so a recovery
    /// needs only its name.
    Configure(Box<VmSettings>),
    /// Recover several VMs by name, each from its saved settings and independently: one
    /// run per VM, one group.
    Recover(RecoverRequest),
    /// A run's HTML report: the one written when it ended, or rendered now from its
    /// record (a run still going, or one whose report could not be written).
    Report { run_id: String },
    /// Start failing a real recovery back: return snapshots of its instance on a schedule
    /// for the site's sender (`crate::failback`).
    FailbackStart(FailbackStart),
    /// Advance and show one failback, or every unfinished one.
    FailbackStatus { run_id: Option<String> },
    /// Cut over: stop the instance, take the final return snapshot, wait for the sender's
    /// final round.
    FailbackCutover { run_id: String },
}

/// A start request's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailbackStart {
    pub run_id: String,
    /// Seconds between return snapshots (at least 300).
    #[serde(default)]
    pub every_seconds: Option<u64>,
    /// Return sets to keep (2 to 16).
    #[serde(default)]
    pub keep: Option<usize>,
}

/// A recovery of several VMs as kept beside the runs (`{runs_prefix}groups/{group}.json`):
/// which runs it made, so its report can find them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub group: String,
    pub site: String,
    /// `(vm, run_id)` in the order asked.
    pub runs: Vec<(String, String)>,
    pub created_at: DateTime<Utc>,
}

/// The answer to a report request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub run_id: String,
    /// Where the report is kept (`{runs_prefix}{run_id}.html`).
    pub key: String,
    /// Whether `html` is the stored report (else rendered from the record now).
    pub stored: bool,
    pub html: String,
}

/// A VM's saved recovery settings (`{base}vms/{site}/{vm}.json`, beside the runs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSettings {
    pub site: String,
    pub vm: String,
    /// Boot disk first.
    pub disks: Vec<String>,
    pub launch: LaunchSettings,
    #[serde(default)]
    pub method: Method,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    pub site: String,
    pub vms: Vec<String>,
    #[serde(default)]
    pub recovery_point: RecoveryPoint,
    /// Overrides each VM's saved method.
    #[serde(default)]
    pub method: Option<Method>,
    #[serde(default)]
    pub drill: bool,
    #[serde(default)]
    pub dry_run: bool,
}

/// What a recovery of several VMs started: one run per VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub group: String,
    pub runs: Vec<Run>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub site: String,
    pub vm: String,
    /// The VM's disks, boot disk first.
    pub disks: Vec<String>,
    #[serde(default)]
    pub recovery_point: RecoveryPoint,
    /// How to recover: `auto` (default), `snapshot` or `import`.
    #[serde(default)]
    pub method: Method,
    pub launch: LaunchSettings,
    #[serde(default)]
    pub drill: bool,
    #[serde(default)]
    pub dry_run: bool,
    /// The group of runs this one belongs to (a recovery of several VMs).
    #[serde(default)]
    pub group: Option<String>,
}

/// `"latest"`, `{"at": "2026-11-29T10:15:00Z"}` or `{"generation": N}`. Every disk of a
/// run comes from one snapshot time: a VM's disks are never mixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryPoint {
    /// The newest snapshot time every disk has a committed generation of.
    #[default]
    Latest,
    /// The newest such time at or before this one.
    At(chrono::DateTime<chrono::Utc>),
    /// Generation N of the first (boot) disk, and the other disks at its snapshot time.
    Generation(u64),
    /// Exactly this VM recovery point (its time, as `pilotlight-dr points` lists it).
    Point(chrono::DateTime<chrono::Utc>),
}

/// How a run turns the point into an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// `snapshot` for a VM whose last snapshot-method run passed verification (and whose
    /// point has snapshots), else `import`. The run records which and why.
    #[default]
    Auto,
    /// RegisterImage from the point's EBS snapshots, then RunInstances: minutes. Needs a
    /// guest that boots natively on Nitro (NVMe and ENA drivers, fstab by UUID).
    Snapshot,
    /// Export the disks to S3 and let EC2 VM Import convert them: slow, converts drivers.
    Import,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Auto => "auto",
            Method::Snapshot => "snapshot",
            Method::Import => "import",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchSettings {
    pub instance_type: String,
    pub subnet_id: Option<String>,
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    pub private_ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub boot_mode: Option<BootMode>,
    pub license_type: Option<LicenseType>,
    /// An EC2 launch template as the base (`lt-0123...` or `lt-0123...:VERSION`); the
    /// settings above override it.
    #[serde(default)]
    pub launch_template: Option<String>,
    /// The guest's architecture for the snapshot method: `x86_64` (default) or `arm64`.
    #[serde(default)]
    pub architecture: Option<String>,
    /// An IAM instance profile (name or ARN) for the instance; with one, verification
    /// also waits for the SSM agent to be online.
    #[serde(default)]
    pub instance_profile: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootMode {
    LegacyBios,
    Uefi,
    UefiPreferred,
}

impl BootMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BootMode::LegacyBios => "legacy-bios",
            BootMode::Uefi => "uefi",
            BootMode::UefiPreferred => "uefi-preferred",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LicenseType {
    Aws,
    Byol,
}

impl LicenseType {
    pub fn as_str(self) -> &'static str {
        match self {
            LicenseType::Aws => "AWS",
            LicenseType::Byol => "BYOL",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// A dry run: validated and resolved, nothing requested or created.
    Planned,
    Exporting,
    Importing,
    /// Snapshot method: registering an AMI from the point's snapshots.
    Registering,
    Launching,
    /// Waiting for the instance's status checks.
    Verifying,
    Done,
    Failed,
    /// A drill whose resources were removed.
    CleanedUp,
}

impl Phase {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Planned | Phase::Done | Phase::Failed | Phase::CleanedUp
        )
    }
}

/// One disk of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunDisk {
    /// `site/vm/disk`.
    pub disk: String,
    pub generation: u64,
    pub export_id: String,
    /// Set when the receiver reported the export done.
    pub image_key: Option<String>,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    /// The disk's recovery point snapshot at the run's time, when there is one.
    #[serde(default)]
    pub snapshot_id: Option<String>,
}

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub passed: bool,
    pub instance_id: String,
    pub state: String,
    pub instance_status: String,
    pub system_status: String,
    pub checked_at: DateTime<Utc>,
    /// The console output's last lines, on failure.
    pub console_tail: Option<String>,
    /// SSM's ping status, for an instance with an instance profile (else `None`: not
    /// checked).
    #[serde(default)]
    pub ssm_ping: Option<String>,
}

/// Beside the run records: `{site}/{vm}.json` under the ready prefix, written when a
/// snapshot-method run of the VM passes verification, removed when one fails. `auto`
/// chooses the snapshot method only for a VM that has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReady {
    pub site: String,
    pub vm: String,
    pub run_id: String,
    pub passed_at: DateTime<Utc>,
    pub point_time: Option<DateTime<Utc>>,
}

/// What kind of resource a run created (as the run record names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceKind {
    /// An object in the bucket: an export request, an exported image.
    S3Object,
    ImportImageTask,
    Image,
    Snapshot,
    Instance,
}

impl ResourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::S3Object => "s3-object",
            ResourceKind::ImportImageTask => "import-image-task",
            ResourceKind::Image => "image",
            ResourceKind::Snapshot => "snapshot",
            ResourceKind::Instance => "instance",
        }
    }
}

impl std::fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something the run created in AWS (what a cleanup removes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    pub kind: ResourceKind,
    pub id: String,
    pub at: DateTime<Utc>,
}

/// Time spent in one phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseTime {
    pub phase: Phase,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportProgress {
    pub task_id: String,
    pub status: String,
    pub status_message: Option<String>,
    pub progress_percent: Option<u32>,
}

/// A DR run, as kept in `s3://{bucket}/{runs_prefix}/{run_id}.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub version: u32,
    pub run_id: String,
    /// The input as given (kept even when it was invalid).
    pub request: serde_json::Value,
    pub drill: bool,
    pub dry_run: bool,
    pub phase: Phase,
    /// Why the run failed, or what the last step found.
    pub reason: Option<String>,
    pub disks: Vec<RunDisk>,
    pub import: Option<ImportProgress>,
    pub image_id: Option<String>,
    pub snapshot_ids: Vec<String>,
    pub instance_ids: Vec<String>,
    /// Every resource the run created, in order.
    pub created: Vec<Created>,
    /// Every resource a cleanup removed.
    pub removed: Vec<Created>,
    pub phases: Vec<PhaseTime>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The group of runs (several VMs recovered together).
    #[serde(default)]
    pub group: Option<String>,
    /// The method chosen (never `auto`) and why.
    #[serde(default)]
    pub method: Option<Method>,
    #[serde(default)]
    pub method_reason: Option<String>,
    /// The VM recovery point's snapshot time, and its age when the run started (the
    /// recovery point objective achieved).
    #[serde(default)]
    pub point_time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub point_age_seconds: Option<f64>,
    /// Point snapshots this run holds (tag `pilotlight:hold:{run_id}`) so retention keeps
    /// them.
    #[serde(default)]
    pub held: Vec<String>,
    #[serde(default)]
    pub verification: Option<Verification>,
    /// A creating EC2 call (`import`, `launch`) some caller is making: saved before the
    /// call, cleared when its outcome is saved (see `handler::advance`).
    #[serde(default)]
    pub claim: Option<Claim>,
    /// The start request, parsed once from `request` (none: a start that never
    /// validated). Not part of the record: `request` is.
    #[serde(skip)]
    pub start: ParsedStart,
    /// The ETag of the stored version this was read from (or last saved as): the next
    /// save is made `If-Match` on it, so of two callers holding one version only one
    /// saves. Not part of the record.
    #[serde(skip)]
    pub etag: Etag,
}

/// The creating EC2 call a claim is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClaimStep {
    /// ImportImage.
    Import,
    /// RegisterImage (the snapshot method).
    Register,
    /// RunInstances.
    Launch,
}

/// A step claimed by one caller until `until`: others leave it alone until then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub step: ClaimStep,
    pub until: DateTime<Utc>,
}

impl Claim {
    /// Whether another caller must still leave the step alone at `now`.
    pub fn holds(&self, now: DateTime<Utc>) -> bool {
        now < self.until
    }
}

/// A run's start request as parsed from its `request` (none: it never validated). Not
/// part of the record, and equal whenever the requests are: it is made from them.
#[derive(Debug, Clone, Default)]
pub struct ParsedStart(pub Option<Box<StartRequest>>);

impl PartialEq for ParsedStart {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The stored version a [`Run`] was read as. Not part of the record: two runs that say
/// the same are equal whichever version each was read from.
#[derive(Debug, Clone, Default)]
pub struct Etag(pub Option<String>);

impl PartialEq for Etag {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Run {
    pub fn new(run_id: String, request: serde_json::Value, now: DateTime<Utc>) -> Self {
        let flag = |k: &str| request.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        let group = request
            .get("group")
            .and_then(|g| g.as_str())
            .map(String::from);
        Self {
            version: RUN_VERSION,
            drill: flag("drill"),
            dry_run: flag("dry_run"),
            run_id,
            request,
            phase: Phase::Exporting,
            reason: None,
            disks: Vec::new(),
            import: None,
            image_id: None,
            snapshot_ids: Vec::new(),
            instance_ids: Vec::new(),
            created: Vec::new(),
            removed: Vec::new(),
            phases: Vec::new(),
            created_at: now,
            updated_at: now,
            group,
            method: None,
            method_reason: None,
            point_time: None,
            point_age_seconds: None,
            held: Vec::new(),
            verification: None,
            claim: None,
            start: ParsedStart(None),
            etag: Etag(None),
        }
        .with_start()
    }

    /// `start` parsed from `request` (after reading a record, whose `start` is not stored).
    pub fn with_start(mut self) -> Self {
        self.start = ParsedStart(Self::parse_start(&self.request));
        self
    }

    /// The start request in a run's `request`, if it is a valid one.
    pub fn parse_start(request: &serde_json::Value) -> Option<Box<StartRequest>> {
        match serde_json::from_value::<DrRequest>(request.clone()) {
            Ok(DrRequest::Start(s)) => Some(s),
            _ => None,
        }
    }

    /// Moves to `phase`, closing the current phase's timer.
    pub fn enter(&mut self, phase: Phase, now: DateTime<Utc>) {
        if let Some(last) = self.phases.last_mut() {
            if last.ended_at.is_none() {
                last.ended_at = Some(now);
                last.seconds = Some((now - last.started_at).num_milliseconds() as f64 / 1000.0);
            }
        }
        self.phase = phase;
        if !phase.is_final() {
            self.phases.push(PhaseTime {
                phase,
                started_at: now,
                ended_at: None,
                seconds: None,
            });
        }
        self.updated_at = now;
    }

    pub fn fail(&mut self, reason: impl Into<String>, now: DateTime<Utc>) {
        self.reason = Some(reason.into());
        self.claim = None;
        self.enter(Phase::Failed, now);
    }

    pub fn record(&mut self, kind: ResourceKind, id: impl Into<String>, now: DateTime<Utc>) {
        self.created.push(Created {
            kind,
            id: id.into(),
            at: now,
        });
    }

    /// When the current phase began.
    pub fn phase_started(&self) -> DateTime<Utc> {
        self.phases.last().map_or(self.created_at, |p| p.started_at)
    }

    /// Seconds from the start to the end of the last phase (the recovery time: a later
    /// cleanup does not count), or to now while a phase runs.
    pub fn recovery_seconds(&self, now: DateTime<Utc>) -> f64 {
        let end = match self.phases.last() {
            Some(p) => p.ended_at.unwrap_or(now),
            None if self.phase.is_final() => self.updated_at,
            None => now,
        };
        (end - self.created_at).num_milliseconds() as f64 / 1000.0
    }

    /// Seconds from the start to now (or to the end).
    pub fn total_seconds(&self, now: DateTime<Utc>) -> f64 {
        let end = if self.phase.is_final() {
            self.updated_at
        } else {
            now
        };
        (end - self.created_at).num_milliseconds() as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_the_documented_json() {
        let r: DrRequest =
            serde_json::from_str(include_str!("../tests/fixtures/start.json")).unwrap();
        let DrRequest::Start(s) = r else {
            panic!("not a start")
        };
        assert_eq!(s.disks, ["disk0"]);
        assert_eq!(s.recovery_point, RecoveryPoint::Latest);
        assert_eq!(s.launch.boot_mode, Some(BootMode::Uefi));
        let r: DrRequest = serde_json::from_str(r#"{"action":"status","run_id":null}"#).unwrap();
        assert!(matches!(r, DrRequest::Status { run_id: None }));
        let g: RecoveryPoint = serde_json::from_str(r#"{"generation": 4}"#).unwrap();
        assert_eq!(g, RecoveryPoint::Generation(4));
        assert!(serde_json::from_str::<DrRequest>(r#"{"action":"explode"}"#).is_err());
    }

    #[test]
    fn phases_are_timed() {
        let t0 = Utc::now();
        let mut run = Run::new("r".into(), serde_json::json!({"drill": true}), t0);
        assert!(run.drill);
        run.enter(Phase::Exporting, t0);
        run.enter(Phase::Importing, t0 + chrono::Duration::seconds(3));
        run.enter(Phase::Done, t0 + chrono::Duration::seconds(10));
        assert_eq!(run.phases.len(), 2);
        assert_eq!(run.phases[0].seconds, Some(3.0));
        assert_eq!(run.phases[1].seconds, Some(7.0));
        assert_eq!(run.total_seconds(t0), 10.0);
    }
}
