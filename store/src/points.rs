//! Recovery points, read from their EBS snapshots' tags by DescribeSnapshots (so they are
//! found from anywhere with `ec2:DescribeSnapshots`, not only on the receiver): the
//! receiver (exports from a point), the DR function (a run's point snapshots) and both
//! CLIs' `points` ask here.

use pilotlight_cloud::ebs::{EbsApi, SnapshotFilter, SnapshotStatus};
use pilotlight_cloud::CloudError;
use pilotlight_protocol::points::{tag, vm_points, Point, VmPoint};
use pilotlight_protocol::DiskId;

/// The VM points of completed point snapshots, newest first per VM, optionally of one
/// site and VM.
pub async fn list<E: EbsApi>(
    ebs: &E,
    site: Option<&str>,
    vm: Option<&str>,
) -> Result<Vec<VmPoint>, CloudError> {
    Ok(vm_points(&disk_points(ebs, site, vm).await?))
}

/// Every completed point snapshot, optionally of one site and VM.
pub async fn disk_points<E: EbsApi>(
    ebs: &E,
    site: Option<&str>,
    vm: Option<&str>,
) -> Result<Vec<Point>, CloudError> {
    let mut f = SnapshotFilter::default().tag(tag::POINT, "1");
    if let Some(s) = site {
        f = f.tag(tag::SITE, s);
    }
    if let Some(v) = vm {
        f = f.tag(tag::VM, v);
    }
    completed(ebs, &f).await
}

/// The completed point snapshots `f` matches, read from their tags.
async fn completed<E: EbsApi>(ebs: &E, f: &SnapshotFilter) -> Result<Vec<Point>, CloudError> {
    Ok(ebs
        .describe_snapshots(f)
        .await?
        .into_iter()
        .filter(|s| s.status == SnapshotStatus::Completed)
        .filter_map(|s| Point::from_tags(&s.id, &s.tags))
        .collect())
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
    Ok(completed(ebs, &f)
        .await?
        .into_iter()
        .find(|p| p.disk == *disk && p.generation == generation))
}
