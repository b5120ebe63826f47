//! `points`, as both the receiver's and the DR CLI's subcommand: every VM recovery point
//! (read by `pilotlight_store::points`), its age against the RPO target, rendered.

use chrono::{DateTime, Utc};
use pilotlight_protocol::points::{vm_points, Point, VmPoint};
use std::fmt::Write;
use std::time::Duration;

/// Whether a lag is over the recovery point objective: DRS's `STALLED`. The receiver's
/// `status` and the DR CLI's use this one rule.
pub fn stalled(lag_seconds: i64, target: Duration) -> bool {
    lag_seconds > i64::try_from(target.as_secs()).unwrap_or(i64::MAX)
}

/// A disk's newest recovery point and its age: the figure the receiver publishes as
/// `PointLagSeconds`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiskLag {
    pub disk: String,
    pub generation: u64,
    pub snapshot_id: String,
    pub newest: DateTime<Utc>,
    pub lag_seconds: i64,
    pub stalled: bool,
}

/// A VM's newest recovery point (a time every disk has), its age (the RPO a recovery
/// now achieves) and each disk's newest point.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VmLag {
    pub site: String,
    pub vm: String,
    pub newest_point: Option<DateTime<Utc>>,
    pub rpo_seconds: Option<i64>,
    /// The VM's newest point is older than the target (or there is none).
    pub stalled: bool,
    pub disks: Vec<DiskLag>,
}

/// Per VM, from its disks' points: the newest VM point and each disk's newest point, aged
/// at `now` against `target`.
pub fn lags(points: &[Point], now: DateTime<Utc>, target: Duration) -> Vec<VmLag> {
    let age = |t: DateTime<Utc>| (now - t).num_seconds().max(0);
    let vms = vm_points(points);
    let mut by_vm: std::collections::BTreeMap<(String, String), Vec<DiskLag>> =
        std::collections::BTreeMap::new();
    let mut newest: std::collections::BTreeMap<String, &Point> = std::collections::BTreeMap::new();
    for p in points {
        let slot = newest.entry(p.disk.to_string()).or_insert(p);
        if (p.snapshot_time, p.generation) > (slot.snapshot_time, slot.generation) {
            *slot = p;
        }
    }
    for (disk, p) in newest {
        let lag = age(p.snapshot_time);
        by_vm
            .entry((p.disk.site.to_string(), p.disk.vm.to_string()))
            .or_default()
            .push(DiskLag {
                disk,
                generation: p.generation,
                snapshot_id: p.snapshot_id.clone(),
                newest: p.snapshot_time,
                lag_seconds: lag,
                stalled: stalled(lag, target),
            });
    }
    by_vm
        .into_iter()
        .map(|((site, vm), disks)| {
            let newest_point = vms
                .iter()
                .filter(|v| v.site == site && v.vm == vm)
                .map(|v| v.snapshot_time)
                .max();
            let rpo_seconds = newest_point.map(age);
            VmLag {
                stalled: rpo_seconds.is_none_or(|r| stalled(r, target)),
                site,
                vm,
                newest_point,
                rpo_seconds,
                disks,
            }
        })
        .collect()
}

/// One line per VM (its newest point, its age, `STALLED` over the target), then one per
/// disk.
pub fn render_lags(vms: &[VmLag], target: Duration) -> String {
    let age = |s: i64| humantime::format_duration(Duration::from_secs(s.max(0) as u64));
    if vms.is_empty() {
        return "no recovery points yet\n".into();
    }
    let mut out = String::new();
    for v in vms {
        let flag = if v.stalled {
            format!(
                " STALLED (over the RPO target {})",
                humantime::format_duration(target)
            )
        } else {
            String::new()
        };
        let _ = match (v.newest_point, v.rpo_seconds) {
            (Some(t), Some(r)) => writeln!(
                out,
                "{}/{}{flag}: newest recovery point {} ({} old: the RPO a recovery now achieves)",
                v.site,
                v.vm,
                pilotlight_protocol::points::time_tag(t),
                age(r)
            ),
            _ => writeln!(
                out,
                "{}/{}{flag}: no time every disk has a point for yet",
                v.site, v.vm
            ),
        };
        for d in &v.disks {
            let _ = writeln!(
                out,
                "  {:<16} newest point generation {} at {} (lag {}){}",
                d.disk.rsplit('/').next().unwrap_or(&d.disk),
                d.generation,
                pilotlight_protocol::points::time_tag(d.newest),
                age(d.lag_seconds),
                if d.stalled { " STALLED" } else { "" }
            );
        }
    }
    out
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use chrono::TimeZone;
    use pilotlight_protocol::DiskId;

    fn point(disk: &str, generation: u64, minutes_ago: i64, now: DateTime<Utc>) -> Point {
        Point {
            snapshot_id: format!("snap-{disk}-{generation}"),
            disk: DiskId::parse(disk).unwrap(),
            generation,
            snapshot_time: now - chrono::Duration::minutes(minutes_ago),
            consistency: "crash".into(),
            stack: "s".into(),
            parent: None,
            hold: false,
            locked_until: None,
            blocks_written: None,
        }
    }

    #[test]
    fn a_vm_is_as_old_as_its_newest_time_every_disk_has_and_stalls_past_the_target() {
        let now = Utc.with_ymd_and_hms(2026, 11, 29, 12, 0, 0).unwrap();
        let target = Duration::from_secs(30 * 60);
        let points = [
            // disk0 is fresh; disk1 stopped 40 minutes ago: the VM can only be
            // recovered to 40 minutes ago.
            point("s1/vm1/disk0", 1, 40, now),
            point("s1/vm1/disk0", 2, 5, now),
            point("s1/vm1/disk1", 1, 40, now),
            // A VM within its target.
            point("s1/vm2/disk0", 7, 10, now),
        ];
        let lags = lags(&points, now, target);
        assert_eq!(lags.len(), 2);
        let vm1 = &lags[0];
        assert_eq!(vm1.rpo_seconds, Some(40 * 60));
        assert!(vm1.stalled);
        let flags: Vec<(u64, i64, bool)> = vm1
            .disks
            .iter()
            .map(|d| (d.generation, d.lag_seconds, d.stalled))
            .collect();
        assert_eq!(flags, [(2, 5 * 60, false), (1, 40 * 60, true)]);
        assert!(!lags[1].stalled);
        let text = render_lags(&lags, target);
        assert_eq!(text.matches("STALLED").count(), 2, "{text}");
        assert!(
            text.contains("s1/vm1 STALLED (over the RPO target 30m)"),
            "{text}"
        );
        assert!(text.contains("40m old"), "{text}");
        // Exactly at the target is not over it.
        assert!(!stalled(1800, target) && stalled(1801, target));
        assert_eq!(render_lags(&[], target), "no recovery points yet\n");
    }
}
