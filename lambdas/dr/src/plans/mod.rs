//! Recovery plans: several VMs recovered in waves, as code the user keeps in git.
//!
//! ```toml
//! name = "shop"
//! site = "site1"
//!
//! [dns]                              # optional: A records for the recovered instances
//! zone_id = "Z0123456789ABC"
//! zone = "example.com"
//! ttl = 60
//! drill_zone_id = "Z0DRILL"          # drills write here, or no DNS at all without it
//! drill_zone = "drill.example.com"
//!
//! [[waves]]
//! vms = ["db-01"]
//! [[waves]]
//! vms = ["app-01", "web-01"]
//!
//! [vms.db-01]                        # optional, per VM
//! optional = false                   # a failure stops the plan (true: it goes on)
//! dns = ["db.example.com"]
//! health = { tcp = 5432 }            # or { http = "http://127.0.0.1:8080/healthz" }
//! steps = [{ document = "AWS-RunShellScript", parameters = { commands = ["systemctl start app"] } }]
//! ```
//!
//! Guarded automatic failover, off unless a plan turns it on ([`automation`]):
//!
//! ```toml
//! [automation]
//! enabled = true
//! site_silent = "30m"     # no generation of any VM of the plan for longer than this
//! hold_down = "10m"       # ... and the witness says down, both continuously this long
//! countdown = "15m"       # then a notification, and this long to cancel
//! witness = { cloudwatch_alarm = "primary-dc-down" }   # or { route53_health_check = "..." }
//! topic = "arn:aws:sns:us-east-1:123456789012:ops"     # the stack's alert topic by default
//! fence = { ssm_document = "Fence-Primary", instance_id = "mi-0123456789abcdef0" }
//! drill = false           # true: rehearse the trigger; the plan then runs as a drill
//! ```
//!
//! A VM's disks and launch settings are its saved settings (`pilotlight-dr configure`).
//! [`parse`] reads a plan and [`Plan::problems`] says everything wrong with it, each with
//! its line: a plan is refused whole, never half run.

pub mod automation;
pub mod entry;
pub mod run;
pub mod store;
mod vm;

pub use entry::handle;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use toml::Spanned;

/// A plan as written (spans kept for the problems' lines).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    name: Spanned<String>,
    site: Spanned<String>,
    #[serde(default)]
    dns: Option<DnsFile>,
    #[serde(default)]
    waves: Vec<Spanned<WaveFile>>,
    #[serde(default)]
    vms: BTreeMap<String, Spanned<VmFile>>,
    #[serde(default)]
    automation: Option<Spanned<AutomationFile>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AutomationFile {
    #[serde(default)]
    enabled: bool,
    site_silent: String,
    hold_down: String,
    countdown: String,
    witness: pilotlight_cloud::witness::Witness,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    fence: Option<Fence>,
    #[serde(default)]
    drill: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsFile {
    zone_id: String,
    zone: Spanned<String>,
    #[serde(default = "default_ttl")]
    ttl: u32,
    #[serde(default)]
    drill_zone_id: Option<String>,
    #[serde(default)]
    drill_zone: Option<Spanned<String>>,
}

fn default_ttl() -> u32 {
    60
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaveFile {
    vms: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmFile {
    #[serde(default)]
    optional: bool,
    #[serde(default)]
    dns: Vec<Spanned<String>>,
    #[serde(default)]
    health: Option<Health>,
    #[serde(default)]
    steps: Vec<Step>,
}

/// A recovery plan, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub site: String,
    pub dns: Option<Dns>,
    /// VM names, wave by wave.
    pub waves: Vec<Vec<String>>,
    pub vms: BTreeMap<String, VmPlan>,
    #[serde(default)]
    pub automation: Option<Automation>,
}

/// Guarded automatic failover of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Automation {
    pub enabled: bool,
    pub site_silent_seconds: u64,
    pub hold_down_seconds: u64,
    pub countdown_seconds: u64,
    pub witness: pilotlight_cloud::witness::Witness,
    pub topic: Option<String>,
    pub fence: Option<Fence>,
    /// Rehearse the trigger: everything as for real, but the plan runs as a drill (and
    /// no fence runs).
    #[serde(default)]
    pub drill: bool,
}

/// What must succeed before an automatic failover runs: an SSM document on a managed
/// instance (e.g. one that shuts the primary's ports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fence {
    pub ssm_document: String,
    pub instance_id: String,
    #[serde(default)]
    pub parameters: BTreeMap<String, Vec<String>>,
}

/// Where the plan's A records go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    pub zone_id: String,
    pub zone: String,
    pub ttl: u32,
    pub drill_zone_id: Option<String>,
    pub drill_zone: Option<String>,
}

/// What the plan says of one VM beyond its saved settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPlan {
    /// A failure of this VM does not stop the plan.
    pub optional: bool,
    /// A records to point at the instance's private address once its wave verified.
    pub dns: Vec<String>,
    pub health: Option<Health>,
    pub steps: Vec<Step>,
}

/// A check beyond EC2's status checks, run on the instance itself (SSM Run Command).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Health {
    /// A TCP port that accepts a connection.
    Tcp(u16),
    /// An HTTP URL that answers 2xx.
    Http(String),
}

/// A post-launch step: an SSM document run on the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub document: String,
    #[serde(default)]
    pub parameters: BTreeMap<String, Vec<String>>,
}

/// One thing wrong with a plan, where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanProblem {
    /// 1-based; `None` when the problem is the whole file.
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for PlanProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// A plan file is small; a larger one is not a plan.
pub const MAX_PLAN_BYTES: usize = 256 * 1024;

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn name_ok(s: &str) -> bool {
    pilotlight_protocol::Name::new(s).is_ok()
}

/// A DNS name inside `zone` (the zone itself counts), case-insensitive, without the
/// final dot.
fn in_zone(name: &str, zone: &str) -> bool {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    let z = zone.trim_end_matches('.').to_ascii_lowercase();
    !z.is_empty() && (n == z || n.ends_with(&format!(".{z}")))
}

fn dns_name_ok(name: &str) -> bool {
    let n = name.trim_end_matches('.');
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Reads a plan: everything wrong with it, each with its line, or the plan.
pub fn parse(text: &str) -> Result<Plan, Vec<PlanProblem>> {
    if text.len() > MAX_PLAN_BYTES {
        return Err(vec![PlanProblem {
            line: None,
            message: format!(
                "the plan is {} bytes, more than {MAX_PLAN_BYTES}",
                text.len()
            ),
        }]);
    }
    let file: PlanFile = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            return Err(vec![PlanProblem {
                line: e.span().map(|s| line_of(text, s.start)),
                message: e.message().to_string(),
            }])
        }
    };
    let mut problems = Vec::new();
    let mut bad = |at: Option<usize>, message: String| {
        problems.push(PlanProblem {
            line: at.map(|a| line_of(text, a)),
            message,
        })
    };
    if !name_ok(file.name.get_ref()) {
        bad(
            Some(file.name.span().start),
            format!(
                "plan name {:?}: letters, digits, '.', '_' and '-', 1 to 128",
                file.name.get_ref()
            ),
        );
    }
    if !name_ok(file.site.get_ref()) {
        bad(
            Some(file.site.span().start),
            format!("site {:?} is not a site name", file.site.get_ref()),
        );
    }
    if file.waves.is_empty() {
        bad(
            None,
            "the plan has no waves ([[waves]] with vms = [...])".into(),
        );
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut waves = Vec::new();
    for (i, w) in file.waves.iter().enumerate() {
        if w.get_ref().vms.is_empty() {
            bad(Some(w.span().start), format!("wave {} is empty", i + 1));
        }
        let mut names = Vec::new();
        for vm in &w.get_ref().vms {
            let name = vm.get_ref();
            if !name_ok(name) {
                bad(Some(vm.span().start), format!("{name:?} is not a VM name"));
            } else if let Some(first) = seen.get(name) {
                bad(
                    Some(vm.span().start),
                    format!(
                        "VM {name} is in wave {first} and again in wave {}: a VM is recovered once",
                        i + 1
                    ),
                );
            } else {
                seen.insert(name.clone(), i + 1);
            }
            names.push(name.clone());
        }
        waves.push(names);
    }
    for (name, v) in &file.vms {
        if !seen.contains_key(name) {
            bad(
                Some(v.span().start),
                format!("[vms.{name}] names a VM that is in no wave"),
            );
        }
    }
    let dns = file.dns.as_ref().map(|d| Dns {
        zone_id: d.zone_id.clone(),
        zone: d.zone.get_ref().trim_end_matches('.').to_ascii_lowercase(),
        ttl: d.ttl,
        drill_zone_id: d.drill_zone_id.clone(),
        drill_zone: d
            .drill_zone
            .as_ref()
            .map(|z| z.get_ref().trim_end_matches('.').to_ascii_lowercase()),
    });
    if let Some(d) = &file.dns {
        if !dns_name_ok(d.zone.get_ref()) {
            bad(
                Some(d.zone.span().start),
                format!("zone {:?} is not a DNS name", d.zone.get_ref()),
            );
        }
        if !(1..=172_800).contains(&d.ttl) {
            bad(
                Some(d.zone.span().start),
                format!("ttl {}: 1 to 172800 seconds", d.ttl),
            );
        }
        if d.drill_zone_id.is_some() != d.drill_zone.is_some() {
            bad(
                Some(d.zone.span().start),
                "drill_zone_id and drill_zone go together".into(),
            );
        }
    }
    let mut vms = BTreeMap::new();
    for (name, spanned) in &file.vms {
        let at_vm = Some(spanned.span().start);
        let v = spanned.get_ref();
        for n in &v.dns {
            let at = n.span().start;
            match &dns {
                None => bad(Some(at), format!("{} needs a [dns] zone", n.get_ref())),
                Some(_) if !dns_name_ok(n.get_ref()) => {
                    bad(Some(at), format!("{:?} is not a DNS name", n.get_ref()))
                }
                Some(d) if !in_zone(n.get_ref(), &d.zone) => bad(
                    Some(at),
                    format!(
                        "{} is outside the zone {}: the plan writes only into its zone",
                        n.get_ref(),
                        d.zone
                    ),
                ),
                Some(_) => {}
            }
        }
        match &v.health {
            Some(Health::Tcp(0)) => bad(at_vm, format!("VM {name}: health tcp port 0")),
            Some(Health::Http(u)) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                bad(
                    at_vm,
                    format!("VM {name}: health http {u:?} is not an http:// or https:// URL"),
                )
            }
            _ => {}
        }
        for s in &v.steps {
            if s.document.is_empty() || s.document.len() > 128 {
                bad(
                    at_vm,
                    format!("VM {name}: a step's document name must be 1 to 128 characters"),
                );
            }
        }
        vms.insert(
            name.clone(),
            VmPlan {
                optional: v.optional,
                dns: v
                    .dns
                    .iter()
                    .map(|n| n.get_ref().trim_end_matches('.').to_ascii_lowercase())
                    .collect(),
                health: v.health.clone(),
                steps: v.steps.clone(),
            },
        );
    }
    let mut automation = None;
    if let Some(a) = &file.automation {
        let at = Some(a.span().start);
        let f = a.get_ref();
        let mut secs = |what: &str, v: &str, min: u64| match humantime::parse_duration(v) {
            Ok(d) if d.as_secs() >= min => d.as_secs(),
            Ok(_) => {
                bad(
                    at,
                    format!("automation {what} {v:?}: at least {min} seconds"),
                );
                0
            }
            Err(e) => {
                bad(at, format!("automation {what} {v:?}: {e} (like \"30m\")"));
                0
            }
        };
        let site_silent = secs("site_silent", &f.site_silent, 60);
        let hold_down = secs("hold_down", &f.hold_down, 60);
        let countdown = secs("countdown", &f.countdown, 60);
        if let Some(t) = &f.topic {
            if !t.starts_with("arn:") || !t.contains(":sns:") {
                bad(
                    at,
                    format!("automation topic {t:?} is not an SNS topic ARN"),
                );
            }
        }
        automation = Some(Automation {
            enabled: f.enabled,
            site_silent_seconds: site_silent,
            hold_down_seconds: hold_down,
            countdown_seconds: countdown,
            witness: f.witness.clone(),
            topic: f.topic.clone(),
            fence: f.fence.clone(),
            drill: f.drill,
        });
    }
    if !problems.is_empty() {
        problems.sort_by_key(|p| p.line);
        return Err(problems);
    }
    Ok(Plan {
        name: file.name.into_inner(),
        site: file.site.into_inner(),
        dns,
        waves,
        vms,
        automation,
    })
}

impl Plan {
    /// Every VM of the plan, wave by wave.
    pub fn all_vms(&self) -> impl Iterator<Item = &String> {
        self.waves.iter().flatten()
    }
    /// What the plan says of `vm` (defaults when it has no `[vms.NAME]`).
    pub fn vm(&self, vm: &str) -> VmPlan {
        self.vms.get(vm).cloned().unwrap_or_default()
    }
    /// The A records' name for a drill: the name moved from the zone into the drill zone
    /// (`db.example.com` → `db.drill.example.com`); `None` without a drill zone (drills
    /// then write no DNS).
    pub fn drill_name(&self, name: &str) -> Option<String> {
        let d = self.dns.as_ref()?;
        let dz = d.drill_zone.as_ref()?;
        let stem = name
            .strip_suffix(&d.zone)
            .unwrap_or(name)
            .trim_end_matches('.');
        Some(if stem.is_empty() {
            dz.clone()
        } else {
            format!("{stem}.{dz}")
        })
    }
}

#[cfg(test)]
mod tests;
