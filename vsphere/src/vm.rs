//! What pilotlight reads and does in vSphere: a VM's disks and snapshot tree, its
//! snapshots, and the changed areas of a disk.

use super::*;

/// A virtual disk of a VM (or of a snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub key: i32,
    pub label: String,
    pub file_name: String,
    pub capacity: u64,
    pub disk_mode: String,
    /// The CBT change id of this disk's current state (from a snapshot: at the snapshot).
    pub change_id: Option<String>,
    /// Why it cannot be replicated, if it cannot (independent, physical RDM).
    pub skip: Option<String>,
}

/// A snapshot in the VM's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub snapshot: MoRef,
    pub name: String,
    pub description: String,
}

/// The VM's state that matters here.
#[derive(Debug, Clone)]
pub struct VmInfo {
    pub name: String,
    pub cbt_enabled: bool,
    pub disks: Vec<Disk>,
    /// Methods vCenter disabled on the VM (e.g. `RelocateVM_Task` left by a backup that
    /// never called EndAccess).
    pub disabled_methods: Vec<String>,
    pub snapshots: Vec<SnapshotInfo>,
}

/// The disks in a `config.hardware.device` value.
pub fn parse_disks(devices: &Node) -> Vec<Disk> {
    let mut out = Vec::new();
    for d in &devices.children {
        if d.xsi_type() != Some("VirtualDisk") {
            continue;
        }
        let Some(backing) = d.child("backing") else {
            continue;
        };
        let key: i32 = d.text_at("key").and_then(|k| k.parse().ok()).unwrap_or(-1);
        let capacity = d
            .text_at("capacityInBytes")
            .and_then(|c| c.parse().ok())
            .or_else(|| {
                d.text_at("capacityInKB")
                    .and_then(|c| c.parse::<u64>().ok())
                    .map(|k| k * 1024)
            })
            .unwrap_or(0);
        let disk_mode = backing
            .text_at("diskMode")
            .unwrap_or("persistent")
            .to_string();
        let rdm = backing.xsi_type() == Some("VirtualDiskRawDiskMappingVer1BackingInfo");
        let skip = if disk_mode.starts_with("independent") {
            Some(format!(
                "disk mode {disk_mode}: independent disks are not in snapshots; change it to dependent to protect this disk"
            ))
        } else if rdm && backing.text_at("compatibilityMode") == Some("physicalMode") {
            Some("physical-mode RDM: it cannot be snapshotted; protect the LUN another way, or switch it to virtual mode".into())
        } else {
            None
        };
        out.push(Disk {
            key,
            label: d.text_at("deviceInfo/label").unwrap_or("").to_string(),
            file_name: backing.text_at("fileName").unwrap_or("").to_string(),
            capacity,
            disk_mode,
            change_id: backing.text_at("changeId").map(str::to_string),
            skip,
        });
    }
    out
}

pub(crate) fn parse_snapshots(list: &Node, out: &mut Vec<SnapshotInfo>) {
    for t in &list.children {
        if let Some(s) = t.child("snapshot").and_then(MoRef::from_node) {
            out.push(SnapshotInfo {
                snapshot: s,
                name: t.text_at("name").unwrap_or("").into(),
                description: t.text_at("description").unwrap_or("").into(),
            });
        }
        for c in t.children("childSnapshotList") {
            let wrapper = Node {
                children: vec![c.clone()],
                ..Default::default()
            };
            parse_snapshots(&wrapper, out);
        }
    }
}

impl Session {
    pub async fn vm_info(&self, vm: &MoRef) -> Result<VmInfo, VsError> {
        let p = self
            .properties(
                vm,
                &[
                    "name",
                    "config.changeTrackingEnabled",
                    "config.hardware.device",
                    "disabledMethod",
                    "snapshot",
                ],
            )
            .await?;
        let mut snapshots = Vec::new();
        if let Some(s) = p.get("snapshot") {
            let roots = Node {
                children: s.children("rootSnapshotList").cloned().collect(),
                ..Default::default()
            };
            parse_snapshots(&roots, &mut snapshots);
        }
        Ok(VmInfo {
            name: p
                .get("name")
                .map(|n| n.text.trim().to_string())
                .unwrap_or_default(),
            cbt_enabled: p
                .get("config.changeTrackingEnabled")
                .is_some_and(|n| n.text.trim() == "true"),
            disks: p
                .get("config.hardware.device")
                .map(parse_disks)
                .unwrap_or_default(),
            disabled_methods: p
                .get("disabledMethod")
                .map(|n| {
                    n.children
                        .iter()
                        .map(|c| c.text.trim().to_string())
                        .collect()
                })
                .unwrap_or_default(),
            snapshots,
        })
    }

    /// Turns changed-block tracking on (takes effect at the next snapshot).
    pub async fn enable_cbt(&self, vm: &MoRef) -> Result<(), VsError> {
        self.run_task(
            "ReconfigVM_Task",
            vm,
            "<spec><changeTrackingEnabled>true</changeTrackingEnabled></spec>",
            Duration::from_secs(600),
        )
        .await
        .map(|_| ())
    }

    pub async fn create_snapshot(
        &self,
        vm: &MoRef,
        name: &str,
        description: &str,
        quiesce: bool,
    ) -> Result<MoRef, VsError> {
        let args = format!(
            "<name>{}</name><description>{}</description><memory>false</memory><quiesce>{quiesce}</quiesce>",
            esc(name),
            esc(description)
        );
        let r = self
            .run_task("CreateSnapshot_Task", vm, &args, Duration::from_secs(3600))
            .await?;
        r.as_ref()
            .and_then(MoRef::from_node)
            .ok_or_else(|| shape("CreateSnapshot_Task", "no snapshot in the task result"))
    }

    pub async fn remove_snapshot(&self, snapshot: &MoRef) -> Result<(), VsError> {
        self.run_task(
            "RemoveSnapshot_Task",
            snapshot,
            "<removeChildren>false</removeChildren><consolidate>true</consolidate>",
            Duration::from_secs(3600),
        )
        .await
        .map(|_| ())
    }

    /// The disks as the snapshot holds them (their change ids are the snapshot's).
    pub async fn snapshot_disks(&self, snapshot: &MoRef) -> Result<Vec<Disk>, VsError> {
        let p = self
            .properties(snapshot, &["config.hardware.device"])
            .await?;
        Ok(p.get("config.hardware.device")
            .map(parse_disks)
            .unwrap_or_default())
    }

    /// `QueryChangedDiskAreas` from `change_id` (`*`: every allocated area) up to the
    /// snapshot, paged by `startOffset` until the disk is covered. Sorted byte ranges.
    pub async fn changed_areas(
        &self,
        vm: &MoRef,
        snapshot: &MoRef,
        disk: &Disk,
        change_id: &str,
    ) -> Result<Vec<(u64, u64)>, VsError> {
        let mut out = Vec::new();
        let mut start = 0u64;
        while start < disk.capacity {
            let args = format!(
                "{}<deviceKey>{}</deviceKey><startOffset>{start}</startOffset><changeId>{}</changeId>",
                snapshot.xml("snapshot"),
                disk.key,
                esc(change_id)
            );
            let r = self.call("QueryChangedDiskAreas", vm, &args).await?;
            let rv = r
                .child("returnval")
                .ok_or_else(|| shape("QueryChangedDiskAreas", "no returnval"))?;
            let num = |n: &Node, p: &str| -> Result<u64, VsError> {
                n.text_at(p)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| shape("QueryChangedDiskAreas", &format!("no {p}")))
            };
            let page_start = num(rv, "startOffset")?;
            let page_len = num(rv, "length")?;
            if page_start != start {
                return Err(shape(
                    "QueryChangedDiskAreas",
                    &format!("page starts at {page_start}, asked for {start}"),
                ));
            }
            for a in rv.children("changedArea") {
                let (s, l) = (num(a, "start")?, num(a, "length")?);
                if s < page_start || s.saturating_add(l) > disk.capacity {
                    return Err(shape(
                        "QueryChangedDiskAreas",
                        &format!("area {s}+{l} outside its page"),
                    ));
                }
                out.push((s, l));
            }
            if page_len == 0 {
                break; // nothing more is known past here
            }
            start = page_start + page_len;
        }
        out.sort_unstable();
        Ok(out)
    }
}
