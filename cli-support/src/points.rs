//! `points`, as both the receiver's and the DR CLI's subcommand: every VM recovery point,
//! found by DescribeSnapshots on the points' tags (so it works from anywhere with
//! `ec2:DescribeSnapshots`, not only on the receiver).

use chrono::{DateTime, Utc};
use pilotlight_cloud::ebs::{EbsApi, SnapshotFilter, SnapshotStatus};
use pilotlight_cloud::CloudError;
use pilotlight_protocol::points::{tag, vm_points, Point, VmPoint};
use pilotlight_protocol::DiskId;
use std::fmt::Write;

/// The VM points of completed point snapshots, newest first per VM, optionally of one
/// site and VM.
pub async fn list<E: EbsApi>(
    ebs: &E,
    site: Option<&str>,
    vm: Option<&str>,
) -> Result<Vec<VmPoint>, CloudError> {
    let mut f = SnapshotFilter::default().tag(tag::POINT, "1");
    if let Some(s) = site {
        f = f.tag(tag::SITE, s);
    }
    if let Some(v) = vm {
        f = f.tag(tag::VM, v);
    }
    let points: Vec<Point> = ebs
        .describe_snapshots(&f)
        .await?
        .into_iter()
        .filter(|s| s.status == SnapshotStatus::Completed)
        .filter_map(|s| Point::from_tags(&s.id, &s.tags))
        .collect();
    Ok(vm_points(&points))
}

/// The completed point of generation `generation` of `disk` (of `stack`, when given),
/// found by its tags.
pub async fn of_generation<E: EbsApi>(
    ebs: &E,
    disk: &DiskId,
    generation: u64,
    stack: Option<&str>,
) -> Result<Option<Point>, CloudError> {
    let mut f = SnapshotFilter::default()
        .tag(tag::POINT, "1")
        .tag(tag::SITE, disk.site.as_str())
        .tag(tag::VM, disk.vm.as_str())
        .tag(tag::DISK, disk.disk.as_str())
        .tag(tag::GENERATION, generation.to_string());
    if let Some(stack) = stack.filter(|s| !s.is_empty()) {
        f = f.tag(tag::STACK, stack);
    }
    Ok(ebs
        .describe_snapshots(&f)
        .await?
        .into_iter()
        .filter(|s| s.status == SnapshotStatus::Completed)
        .filter_map(|s| Point::from_tags(&s.id, &s.tags))
        .find(|p| p.disk == *disk && p.generation == generation))
}

/// One block per VM point: time, age, consistency, then each disk's generation,
/// snapshot and size written (and `held` when a DR run holds it).
pub fn render(points: &[VmPoint], now: DateTime<Utc>) -> String {
    if points.is_empty() {
        return "no recovery points\n".into();
    }
    let mut out = String::new();
    for p in points {
        let age = (now - p.snapshot_time).to_std().unwrap_or_default();
        let age = humantime::format_duration(std::time::Duration::from_secs(age.as_secs()));
        let _ = writeln!(
            out,
            "{}/{} {} ({} ago, {})",
            p.site,
            p.vm,
            pilotlight_protocol::points::time_tag(p.snapshot_time),
            age,
            p.consistency
        );
        for d in &p.disks {
            let written = d.blocks_written.map_or(String::new(), |b| {
                format!(", {:.1} MiB written", (b * 512) as f64 / 1024.0)
            });
            let _ = writeln!(
                out,
                "  {:<16} generation {:<6} {}{}{}",
                d.disk.disk.as_str(),
                d.generation,
                d.snapshot_id,
                written,
                if d.hold { " (held)" } else { "" }
            );
        }
    }
    out
}
