//! The vSphere source: one run protects every disk of a VM from one snapshot.
//!
//! Order (what the field gets wrong, done right): remove pilotlight's orphaned snapshots
//! first; make sure CBT is on; snapshot (quiesced if asked, else or on failure
//! crash-consistent, recorded in the manifest); for each disk ask
//! `QueryChangedDiskAreas` from the changeId saved after the last *committed* generation
//! (`*` the first time; a rejected changeId, e.g. after a CBT reset, falls back to `*`
//! and says so); read those areas through `nbdkit vddk` over NBD; commit the
//! generation; only then save the disk's new changeId (the snapshot's). The snapshot is
//! removed on every exit path: success, error, and a stop signal.

use crate::source::SourceSpec;
use crate::{send_generation, ProgressFactory, SendError, Summary, Target, UploadSettings};
use pilotlight_cloud::ObjectStore;
use pilotlight_protocol::{Consistency, DiskId, Extent};
use pilotlight_vsphere::{ConnectOptions, Disk, MoRef, Session, VsError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Snapshots pilotlight makes are named with this prefix and carry [`SNAPSHOT_NOTE`].
pub const SNAPSHOT_PREFIX: &str = "pilotlight-";
pub const SNAPSHOT_NOTE: &str =
    "created by pilotlight for replication; removed when its run ends (a leftover is removed by the next run)";

/// The default data path: VMware's VDDK through nbdkit's vddk plugin. Placeholders:
/// `{socket}` `{server}` `{user}` `{password_file}` `{thumbprint}` `{libdir}` `{vm}`
/// `{snapshot}` `{file}` `{key}`.
pub const VDDK_COMMAND: &str = "nbdkit --foreground --readonly --exit-with-parent -U {socket} vddk libdir={libdir} server={server} user={user} password=+{password_file} thumbprint={thumbprint} vm=moref={vm} snapshot={snapshot} file={file}";

#[derive(Debug, thiserror::Error)]
pub enum VsphereError {
    #[error("vSphere: {0}")]
    Api(#[from] VsError),
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("changed-block tracking is off on VM {vm}: run with --enable-cbt (it takes effect at the next snapshot; the first run is then a full copy)")]
    CbtOff { vm: String },
    #[error("VM {vm} has no disk that can be protected ({why})")]
    NoDisks { vm: String, why: String },
    #[error("data path for {file}: {why}")]
    DataPath { file: String, why: String },
    #[error("state file {path}: {source}")]
    State {
        path: String,
        source: pilotlight_durable::DurableError,
    },
    #[error("stopped by a signal; the snapshot was removed and nothing was committed past the last generation")]
    Stopped,
    #[error("{0}")]
    Name(String),
}

/// What a run needs; each disk's [`Target`] is built from what vSphere says of it.
#[derive(Debug, Clone)]
pub struct VsphereRun {
    pub connect: ConnectOptions,
    /// VM name or MoRef id.
    pub vm: String,
    /// `site` and `vm` parts of the disks' ids; each disk is `disk-{device key}`.
    pub site: String,
    pub vm_id: String,
    pub enable_cbt: bool,
    pub quiesce: bool,
    /// The data path command (see [`VDDK_COMMAND`]), split on whitespace before the
    /// placeholders are filled in.
    pub nbd_command: String,
    pub vddk_libdir: String,
    pub vddk_thumbprint: String,
    /// How every disk is uploaded.
    pub upload: UploadSettings,
}

/// What happened, for the summary.
#[derive(Debug, Clone, Serialize)]
pub struct VsphereReport {
    pub vm: String,
    pub vm_moref: String,
    pub snapshot: String,
    pub consistency: Consistency,
    pub orphans_removed: Vec<String>,
    pub cbt_enabled_now: bool,
    pub disabled_methods: Vec<String>,
    pub skipped: Vec<String>,
    pub disks: Vec<DiskReport>,
    pub logins: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub disk: String,
    pub file: String,
    pub from_change_id: String,
    pub to_change_id: Option<String>,
    pub full: bool,
    pub reset: bool,
    pub summary: Summary,
}

/// Per VM, the changeId each disk's last committed generation ends at.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChangeIds {
    pub disks: BTreeMap<String, String>,
}

const STATE_VERSION: u32 = 1;

fn state_path(state_dir: &Path, site: &str, vm_id: &str) -> PathBuf {
    state_dir
        .join(site)
        .join(vm_id)
        .join("vsphere-change-ids.json")
}

pub fn load_change_ids(
    state_dir: &Path,
    site: &str,
    vm_id: &str,
) -> Result<ChangeIds, VsphereError> {
    let p = state_path(state_dir, site, vm_id);
    pilotlight_durable::load(&p, STATE_VERSION)
        .map(Option::unwrap_or_default)
        .map_err(|source| VsphereError::State {
            path: p.display().to_string(),
            source,
        })
}

fn save_change_ids(
    state_dir: &Path,
    site: &str,
    vm_id: &str,
    ids: &ChangeIds,
) -> Result<(), VsphereError> {
    let p = state_path(state_dir, site, vm_id);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).map_err(|e| VsphereError::State {
            path: p.display().to_string(),
            source: pilotlight_durable::DurableError::Io {
                path: p.display().to_string(),
                source: e,
            },
        })?;
    }
    pilotlight_durable::save(&p, STATE_VERSION, ids).map_err(|source| VsphereError::State {
        path: p.display().to_string(),
        source,
    })
}

/// One run: every protectable disk of the VM from one snapshot. `stop` resolving (a
/// signal) abandons the run; the snapshot is removed either way.
pub async fn protect_vm<S: ObjectStore>(
    run: &VsphereRun,
    store: &S,
    progress: &dyn ProgressFactory,
    stop: impl Future<Output = ()>,
) -> Result<VsphereReport, VsphereError> {
    DiskId::parse(&format!("{}/{}/disk-0", run.site, run.vm_id))
        .map_err(|e| VsphereError::Name(format!("--site/--vm-id: {e}")))?;
    let session = Session::connect(run.connect.clone()).await?;
    let result = protect_in_session(run, &session, store, progress, stop).await;
    session.logout().await;
    result
}

async fn protect_in_session<S: ObjectStore>(
    run: &VsphereRun,
    session: &Session,
    store: &S,
    progress: &dyn ProgressFactory,
    stop: impl Future<Output = ()>,
) -> Result<VsphereReport, VsphereError> {
    let vm = session.find_vm(&run.vm).await?;
    let mut info = session.vm_info(&vm).await?;
    if !info.disabled_methods.is_empty() {
        tracing::warn!(
            vm = %info.name, methods = ?info.disabled_methods,
            "vCenter has methods disabled on this VM (a backup tool called PrepareForAccess without EndAccess, so vMotion/relocation is blocked); re-enable them with the MOB's EnableMethods or `govc object.method -enable=true`"
        );
    }

    // Leftovers of runs that died between snapshot and cleanup.
    let mut orphans_removed = Vec::new();
    for s in info
        .snapshots
        .iter()
        .filter(|s| s.name.starts_with(SNAPSHOT_PREFIX) && s.description.contains("pilotlight"))
    {
        tracing::warn!(snapshot = %s.name, "removing a snapshot a previous pilotlight run left behind");
        session.remove_snapshot(&s.snapshot).await?;
        orphans_removed.push(s.name.clone());
    }

    let mut cbt_enabled_now = false;
    if !info.cbt_enabled {
        if !run.enable_cbt {
            return Err(VsphereError::CbtOff { vm: info.name });
        }
        tracing::info!(vm = %info.name, "enabling changed-block tracking");
        session.enable_cbt(&vm).await?;
        cbt_enabled_now = true;
        info = session.vm_info(&vm).await?;
    }
    let mut skipped = Vec::new();
    for d in info.disks.iter().filter(|d| d.skip.is_some()) {
        let why = format!(
            "{} ({}): {}",
            d.label,
            d.file_name,
            d.skip.as_deref().unwrap_or("")
        );
        tracing::warn!("skipping disk {why}");
        skipped.push(why);
    }
    if info.disks.iter().all(|d| d.skip.is_some()) {
        return Err(VsphereError::NoDisks {
            vm: info.name,
            why: if skipped.is_empty() {
                "no virtual disks".into()
            } else {
                skipped.join("; ")
            },
        });
    }

    // One snapshot for all disks.
    let name = format!(
        "{SNAPSHOT_PREFIX}{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    );
    let (snapshot, consistency) = if run.quiesce {
        match session
            .create_snapshot(&vm, &name, SNAPSHOT_NOTE, true)
            .await
        {
            Ok(s) => (s, Consistency::Application),
            Err(e) => {
                tracing::warn!("quiesced snapshot failed ({e}); taking a crash-consistent one");
                (
                    session
                        .create_snapshot(&vm, &name, SNAPSHOT_NOTE, false)
                        .await?,
                    Consistency::Crash,
                )
            }
        }
    } else {
        (
            session
                .create_snapshot(&vm, &name, SNAPSHOT_NOTE, false)
                .await?,
            Consistency::Crash,
        )
    };
    tracing::info!(vm = %info.name, %snapshot, ?consistency, "snapshot taken");

    let work = copy_disks(run, session, store, progress, &vm, &snapshot, consistency);
    let outcome = tokio::select! {
        r = work => r,
        _ = keepalive(session) => unreachable_keepalive(),
        _ = stop => Err(VsphereError::Stopped),
    };
    // Every exit path: the snapshot goes.
    let removed = session.remove_snapshot(&snapshot).await;
    let disks = outcome?;
    removed?;
    Ok(VsphereReport {
        vm: info.name,
        vm_moref: vm.value.clone(),
        snapshot: name,
        consistency,
        orphans_removed,
        cbt_enabled_now,
        disabled_methods: info.disabled_methods,
        skipped,
        disks,
        logins: session.logins(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn copy_disks<S: ObjectStore>(
    run: &VsphereRun,
    session: &Session,
    store: &S,
    progress: &dyn ProgressFactory,
    vm: &MoRef,
    snapshot: &MoRef,
    consistency: Consistency,
) -> Result<Vec<DiskReport>, VsphereError> {
    let snap_time = chrono::Utc::now();
    let disks: Vec<Disk> = session
        .snapshot_disks(snapshot)
        .await?
        .into_iter()
        .filter(|d| d.skip.is_none())
        .collect();
    let state_dir = &run.upload.state_dir;
    let mut ids = load_change_ids(state_dir, &run.site, &run.vm_id)?;
    // VDDK reads the password from a file (`password=+FILE`): a private temp file.
    let password_file = tempfile::NamedTempFile::new()
        .and_then(|f| std::fs::write(f.path(), &run.connect.password).map(|()| f))
        .map_err(|e| VsphereError::DataPath {
            file: "password file".into(),
            why: e.to_string(),
        })?;
    let mut out = Vec::new();
    for disk in disks {
        let disk_name = format!("disk-{}", disk.key);
        let id = DiskId::parse(&format!("{}/{}/{disk_name}", run.site, run.vm_id))
            .map_err(|e| VsphereError::Name(e.to_string()))?;
        // --rebase: a new base, so every allocated area (changeId "*").
        let from = match ids.disks.get(&disk_name) {
            Some(id) if !run.upload.rebase => id.clone(),
            _ => "*".into(),
        };
        let mut reset = false;
        let areas = match session.changed_areas(vm, snapshot, &disk, &from).await {
            Ok(a) => a,
            Err(e) if from != "*" && e.fault().is_some() => {
                tracing::warn!(
                    disk = %id, change_id = %from,
                    "vSphere rejected the saved changeId ({e}): CBT was reset; sending the whole disk"
                );
                reset = true;
                session.changed_areas(vm, snapshot, &disk, "*").await?
            }
            Err(e) => return Err(e.into()),
        };
        let full = from == "*" || reset;
        let changed: Vec<Extent> = areas.iter().map(|(o, l)| Extent::new(*o, *l)).collect();
        let server = DataPath::start(run, vm, snapshot, &disk, password_file.path()).await?;
        let target = Target {
            disk: id.clone(),
            source: SourceSpec::NbdChanged {
                uri: server.uri.clone(),
                changed,
                full,
            },
            change_id: disk.change_id.clone(),
            snapshot_time: Some(snap_time),
            consistency,
        };
        let summary = send_generation(&run.upload, &target, store, progress).await?;
        drop(server);
        // Committed: only now does the next run start from this snapshot's changeId.
        if !run.upload.dry_run {
            match &disk.change_id {
                Some(c) => {
                    ids.disks.insert(disk_name.clone(), c.clone());
                }
                None => {
                    ids.disks.remove(&disk_name);
                }
            }
            save_change_ids(state_dir, &run.site, &run.vm_id, &ids)?;
        }
        out.push(DiskReport {
            disk: id.to_string(),
            file: disk.file_name.clone(),
            from_change_id: from,
            to_change_id: disk.change_id.clone(),
            full,
            reset,
            summary,
        });
    }
    Ok(out)
}

/// Copies can outlast vCenter's idle session timeout (30 min by default): touch the
/// session every 5 minutes. (An expired session is also renewed on the next call.)
async fn keepalive(session: &Session) {
    loop {
        tokio::time::sleep(Duration::from_secs(300)).await;
        if let Err(e) = session.keepalive().await {
            tracing::warn!("vSphere keepalive failed: {e}");
        }
    }
}

fn unreachable_keepalive() -> Result<Vec<DiskReport>, VsphereError> {
    Err(VsphereError::Name("internal: keepalive ended".into()))
}

/// The NBD server for one disk of the snapshot, stopped when dropped.
struct DataPath {
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
    uri: String,
}

impl DataPath {
    async fn start(
        run: &VsphereRun,
        vm: &MoRef,
        snapshot: &MoRef,
        disk: &Disk,
        password_file: &Path,
    ) -> Result<Self, VsphereError> {
        let err = |why: String| VsphereError::DataPath {
            file: disk.file_name.clone(),
            why,
        };
        let dir = tempfile::tempdir().map_err(|e| err(e.to_string()))?;
        let socket = dir.path().join("nbd.sock");
        let server = url_host(&run.connect.url);
        let fill = |t: &str| {
            t.replace("{socket}", &socket.display().to_string())
                .replace("{server}", &server)
                .replace("{user}", &run.connect.user)
                .replace("{password_file}", &password_file.display().to_string())
                .replace("{thumbprint}", &run.vddk_thumbprint)
                .replace("{libdir}", &run.vddk_libdir)
                .replace("{vm}", &vm.value)
                .replace("{snapshot}", &snapshot.value)
                .replace("{file}", &disk.file_name)
                .replace("{key}", &disk.key.to_string())
        };
        let argv: Vec<String> = run.nbd_command.split_whitespace().map(fill).collect();
        let (cmd, args) = argv
            .split_first()
            .ok_or_else(|| err("empty --nbd-command".into()))?;
        let mut child = tokio::process::Command::new(cmd)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| err(format!("cannot start {cmd}: {e} (nbdkit with the vddk plugin and VMware's VDDK are needed; see the README)")))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(err(format!(
                    "{cmd} exited ({status}) before serving the disk"
                )));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(err(format!(
                    "{cmd} did not listen on {} within 60 s",
                    socket.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            _child: child,
            uri: format!("nbd+unix:///?socket={}", socket.display()),
            _dir: dir,
        })
    }
}

/// `host` of `https://host[:port]/sdk`.
fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = hostport.rsplit_once('@').map_or(hostport, |(_, h)| h);
    hostport.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_sdk_urls() {
        assert_eq!(url_host("https://vc.example.com/sdk"), "vc.example.com");
        assert_eq!(
            url_host("http://user:pw@127.0.0.1:8989/sdk"),
            "127.0.0.1:8989"
        );
    }

    #[test]
    fn change_ids_round_trip_durably() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            load_change_ids(dir.path(), "s", "v").unwrap(),
            ChangeIds::default()
        );
        let mut ids = ChangeIds::default();
        ids.disks.insert("disk-2000".into(), "52 de ad/7".into());
        save_change_ids(dir.path(), "s", "v", &ids).unwrap();
        assert_eq!(load_change_ids(dir.path(), "s", "v").unwrap(), ids);
    }
}
