//! Per-disk status for `pilotlight-receiver status` and the metrics: from the local state
//! alone, or with what the engine holds pending.

use crate::state::{DiskPaths, DiskState};
use chrono::Utc;
use pilotlight_protocol::DiskId;
use std::path::PathBuf;

/// Per-disk summary for `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskStatus {
    pub disk: String,
    pub applied: Option<u64>,
    pub snapshot_time: Option<chrono::DateTime<Utc>>,
    pub lag_seconds: Option<i64>,
    pub pending: Vec<u64>,
    pub image: String,
    pub disk_size: u64,
    pub allocated_bytes: u64,
    /// The newest recovery point's snapshot id and generation, and its snapshot time.
    pub newest_point: Option<(String, u64)>,
    pub newest_point_time: Option<chrono::DateTime<Utc>>,
    /// The generation whose point is still to be written.
    pub point_due: Option<u64>,
    /// Points given up (permission, unreadable image, too many failures), and the last reason.
    pub points_failed: u64,
    pub point_error: Option<String>,
}

/// Disks with a state file under `state_dir` (`site/vm/disk.json`).
pub fn known_disks(state_dir: &std::path::Path) -> Vec<DiskId> {
    let mut out = Vec::new();
    let dirs = |p: &std::path::Path| -> Vec<(String, PathBuf)> {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (site, sp) in dirs(state_dir) {
        for (vm, vp) in dirs(&sp) {
            for (file, _) in dirs(&vp) {
                if let Some(disk) = file.strip_suffix(".json") {
                    if let Ok(id) = DiskId::new(&site, &vm, disk) {
                        out.push(id);
                    }
                }
            }
        }
    }
    out.sort();
    out
}

/// Every known disk's status from local state alone (no bucket, no queue).
pub fn local_status(image_dir: &std::path::Path, state_dir: &std::path::Path) -> Vec<DiskStatus> {
    known_disks(state_dir)
        .into_iter()
        .filter_map(|id| {
            let paths = DiskPaths::new(image_dir, state_dir, &id);
            match crate::state::load(&paths, &id) {
                Ok(st) => Some(disk_status(&id, &st, &paths, Vec::new())),
                Err(e) => {
                    tracing::warn!(disk = %id, "{e}");
                    None
                }
            }
        })
        .collect()
}

pub fn disk_status(
    id: &DiskId,
    st: &DiskState,
    paths: &DiskPaths,
    pending: Vec<u64>,
) -> DiskStatus {
    DiskStatus {
        disk: id.to_string(),
        applied: st.applied,
        snapshot_time: st.snapshot_time,
        lag_seconds: st.snapshot_time.map(|t| (Utc::now() - t).num_seconds()),
        pending,
        image: paths.image.display().to_string(),
        disk_size: st.disk_size,
        allocated_bytes: crate::image::allocated_bytes(&paths.image).unwrap_or(0),
        newest_point: st
            .points
            .last()
            .map(|p| (p.snapshot_id.clone(), p.generation)),
        newest_point_time: st.points.last().map(|p| p.snapshot_time),
        point_due: st.point_due.as_ref().map(|p| p.generation),
        points_failed: st.points_failed,
        point_error: st.point_error.clone(),
    }
}
