//! Recovery points: what a point's EBS snapshot carries in its tags, how a VM's points are
//! found among its disks' points, and which points the retention tiers keep.
//!
//! A point is one EBS snapshot holding exactly one applied generation of one disk. Its
//! tags are the record (so any tool with `ec2:DescribeSnapshots` finds points, not only
//! the receiver). A **VM point** is a snapshot time for which every disk of the VM has a
//! completed point: the vSphere source takes one VM snapshot for all disks and writes its
//! time into every disk's manifest (extent-list and NBD runs write the `--snapshot-time`
//! they are given), so the time is the VM snapshot's identity; no other field is needed.
//!
//! Nothing here does I/O.

use crate::manifest::Consistency;
use crate::names::{DiskId, Name};
use chrono::{DateTime, Duration, DurationRound, SecondsFormat, Utc};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Tag keys of a point's snapshot.
pub mod tag {
    /// Present (`1`) on every point: what DescribeSnapshots filters on.
    pub const POINT: &str = "pilotlight:point";
    pub const SITE: &str = "pilotlight:site";
    pub const VM: &str = "pilotlight:vm";
    pub const DISK: &str = "pilotlight:disk";
    pub const GENERATION: &str = "pilotlight:generation";
    /// RFC 3339, UTC: the VM snapshot's time.
    pub const SNAPSHOT_TIME: &str = "pilotlight:snapshot-time";
    pub const CONSISTENCY: &str = "pilotlight:consistency";
    pub const CHANGE_ID: &str = "pilotlight:change-id";
    /// The receiver's stack: a point belongs to (and is pruned by) one receiver.
    pub const STACK: &str = "pilotlight:stack";
    /// The parent point's snapshot id, or `none` for a full point.
    pub const PARENT: &str = "pilotlight:parent";
    /// Blocks the point wrote (tagged once it is completed; absent on points recorded
    /// after a restart).
    pub const BLOCKS: &str = "pilotlight:blocks";
    /// Set by a DR run that uses the point: retention never deletes it.
    pub const HOLD: &str = "pilotlight:hold";

    /// The hold of one DR run: `pilotlight:hold:{run id}` (value `1`). A key per run, so
    /// two runs holding one point never release each other's hold.
    pub fn hold(run_id: &str) -> String {
        format!("{HOLD}:{run_id}")
    }
    /// RFC 3339: the point is locked (EBS Snapshot Lock) until then; never deleted before.
    pub const LOCKED_UNTIL: &str = "pilotlight:locked-until";
    pub const NAME: &str = "Name";
}

/// Points are tagged by StartSnapshot, whose tags follow the EBS direct APIs' `Tag` type
/// (EBS API reference, Tag: Value "Maximum length of 255", Key "Maximum length of 127";
/// EC2's own limit, 256, is one more).
const MAX_TAG_VALUE: usize = 255;

/// StartSnapshot API reference, Description: "Maximum length of 255".
pub const MAX_DESCRIPTION: usize = 255;

/// `s` cut to at most `max` characters (never inside a character).
pub fn at_most(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// One point's time as its tag writes it (second precision and below kept, UTC, `Z`).
pub fn time_tag(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// What a point records about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointInfo {
    pub disk: DiskId,
    pub generation: u64,
    pub snapshot_time: DateTime<Utc>,
    pub consistency: String,
    pub change_id: Option<String>,
    pub stack: String,
    pub parent: Option<String>,
}

impl PointInfo {
    /// The tags StartSnapshot gives the point's snapshot.
    pub fn tags(&self) -> Vec<(String, String)> {
        let mut t = vec![
            (tag::POINT, "1".to_string()),
            (tag::SITE, self.disk.site.to_string()),
            (tag::VM, self.disk.vm.to_string()),
            (tag::DISK, self.disk.disk.to_string()),
            (tag::GENERATION, self.generation.to_string()),
            (tag::SNAPSHOT_TIME, time_tag(self.snapshot_time)),
            (tag::CONSISTENCY, self.consistency.clone()),
            (tag::STACK, self.stack.clone()),
            (
                tag::PARENT,
                self.parent.clone().unwrap_or_else(|| "none".into()),
            ),
            (
                tag::NAME,
                format!("pilotlight {} g{}", self.disk, self.generation),
            ),
        ];
        if let Some(c) = &self.change_id {
            t.push((tag::CHANGE_ID, c.chars().take(MAX_TAG_VALUE).collect()));
        }
        t.into_iter()
            .map(|(k, v)| (k.to_string(), v.chars().take(MAX_TAG_VALUE).collect()))
            .collect()
    }
}

/// A point found by its tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Point {
    pub snapshot_id: String,
    #[serde(serialize_with = "display")]
    pub disk: DiskId,
    pub generation: u64,
    pub snapshot_time: DateTime<Utc>,
    pub consistency: String,
    pub stack: String,
    pub parent: Option<String>,
    pub hold: bool,
    /// Locked against deletion until then (EBS Snapshot Lock).
    pub locked_until: Option<DateTime<Utc>>,
    /// 512 KiB blocks written into this point, when known.
    pub blocks_written: Option<u64>,
}

fn display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl Point {
    /// Reads a point from its snapshot's tags; `None` when they are not a point's (a
    /// snapshot someone else tagged, or tags edited by hand).
    pub fn from_tags(snapshot_id: &str, tags: &BTreeMap<String, String>) -> Option<Point> {
        let get = |k: &str| tags.get(k).map(String::as_str);
        if get(tag::POINT) != Some("1") {
            return None;
        }
        let disk = DiskId::new(get(tag::SITE)?, get(tag::VM)?, get(tag::DISK)?).ok()?;
        Some(Point {
            snapshot_id: snapshot_id.to_string(),
            disk,
            generation: get(tag::GENERATION)?.parse().ok()?,
            snapshot_time: DateTime::parse_from_rfc3339(get(tag::SNAPSHOT_TIME)?)
                .ok()?
                .with_timezone(&Utc),
            consistency: get(tag::CONSISTENCY)
                .unwrap_or(Consistency::Crash.as_str())
                .to_string(),
            stack: get(tag::STACK).unwrap_or_default().to_string(),
            parent: get(tag::PARENT).filter(|p| *p != "none").map(String::from),
            hold: tags
                .keys()
                .any(|k| k == tag::HOLD || k.starts_with(&format!("{}:", tag::HOLD))),
            blocks_written: get(tag::BLOCKS).and_then(|b| b.parse().ok()),
            locked_until: get(tag::LOCKED_UNTIL)
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc)),
        })
    }
}

/// A VM recovery point: one snapshot time every disk of the VM has a point for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmPoint {
    pub site: String,
    pub vm: String,
    pub snapshot_time: DateTime<Utc>,
    /// `application` only when every disk's point is.
    pub consistency: String,
    /// One point per disk, by disk name.
    pub disks: Vec<Point>,
}

/// One step of the rule that makes a VM recovery time, shared by `points` (over point
/// snapshots, [`vm_points`]) and the DR function (over manifests, read lazily): given each
/// disk's newest snapshot time at or before the current target, either every disk has
/// that one time ([`Common::Agreed`]: it is the VM's newest time at or before the
/// target), or no disk has a time newer than the oldest of them, which is the next
/// target ([`Common::Lower`]). `None` for no disks.
pub fn common_step(newest_per_disk: &[DateTime<Utc>]) -> Option<Common> {
    let oldest = newest_per_disk.iter().min().copied()?;
    Some(if newest_per_disk.iter().all(|t| *t == oldest) {
        Common::Agreed(oldest)
    } else {
        Common::Lower(oldest)
    })
}

/// What [`common_step`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Common {
    Agreed(DateTime<Utc>),
    Lower(DateTime<Utc>),
}

/// Every time each of the disks has, newest first, by [`common_step`]: `times` are each
/// disk's snapshot times.
fn common_times(times: &[&BTreeSet<DateTime<Utc>>]) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let mut target: Option<DateTime<Utc>> = None;
    loop {
        let newest: Option<Vec<DateTime<Utc>>> = times
            .iter()
            .map(|ts| match target {
                None => ts.iter().next_back().copied(),
                Some(t) => ts.range(..=t).next_back().copied(),
            })
            .collect();
        match newest.as_deref().and_then(common_step) {
            Some(Common::Agreed(t)) => {
                out.push(t);
                match t.checked_sub_signed(Duration::nanoseconds(1)) {
                    Some(before) => target = Some(before),
                    None => return out,
                }
            }
            Some(Common::Lower(t)) => target = Some(t),
            None => return out,
        }
    }
}

/// Groups points into VM points, newest first per VM. A VM's disks are every disk that
/// has any point; a time counts only when each of them has a point at exactly that time,
/// so a disk whose newest generation has not arrived yet holds the VM at its previous
/// complete time. Where one disk has two points at one time (a rebased generation), the
/// newest generation counts.
pub fn vm_points(points: &[Point]) -> Vec<VmPoint> {
    type VmKey = (String, String);
    let mut by_vm: BTreeMap<VmKey, BTreeMap<Name, BTreeMap<DateTime<Utc>, &Point>>> =
        BTreeMap::new();
    for p in points {
        let times = by_vm
            .entry((p.disk.site.to_string(), p.disk.vm.to_string()))
            .or_default()
            .entry(p.disk.disk.clone())
            .or_default();
        let slot = times.entry(p.snapshot_time).or_insert(p);
        if p.generation > slot.generation {
            *slot = p;
        }
    }
    let mut out = Vec::new();
    for ((site, vm), disks) in by_vm {
        let sets: Vec<BTreeSet<DateTime<Utc>>> = disks
            .values()
            .map(|times| times.keys().copied().collect())
            .collect();
        let refs: Vec<&BTreeSet<DateTime<Utc>>> = sets.iter().collect();
        for t in common_times(&refs) {
            let ps: Vec<Point> = disks.values().map(|times| times[&t].clone()).collect();
            let app = Consistency::Application.as_str();
            let consistency = if ps.iter().all(|p| p.consistency == app) {
                app
            } else {
                Consistency::Crash.as_str()
            };
            out.push(VmPoint {
                site: site.clone(),
                vm: vm.clone(),
                snapshot_time: t,
                consistency: consistency.into(),
                disks: ps,
            });
        }
    }
    out
}

/// How long points are kept, by age (of their snapshot time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiers {
    /// Every point younger than this is kept.
    pub keep_all: Duration,
    /// Then the first point of each hour, up to this age.
    pub keep_hourly: Duration,
    /// Then the first point of each day (UTC), up to this age. Older points go.
    pub keep_daily: Duration,
}

impl Default for Tiers {
    fn default() -> Self {
        Tiers {
            keep_all: Duration::hours(24),
            keep_hourly: Duration::days(7),
            keep_daily: Duration::days(30),
        }
    }
}

/// Which points to keep at `now`: `(id, snapshot time, held)` in, ids to keep out. Always
/// the newest point and every held one; every point younger than `keep_all`; the first
/// point of each clock hour younger than `keep_hourly`; the first point of each UTC day
/// younger than `keep_daily`. "First" keeps the choice stable as points arrive and age: a
/// point kept as its hour's is also its day's candidate, so nothing is deleted and then
/// missed. The same times on every disk of a VM give the same choice on every disk.
pub fn retained<'a>(
    points: impl IntoIterator<Item = (&'a str, DateTime<Utc>, bool)>,
    now: DateTime<Utc>,
    tiers: &Tiers,
) -> BTreeSet<&'a str> {
    let mut ps: Vec<_> = points.into_iter().collect();
    ps.sort_by_key(|(id, t, _)| (*t, *id));
    let mut keep = BTreeSet::new();
    if let Some((id, _, _)) = ps.last() {
        keep.insert(*id);
    }
    let bucket = |t: DateTime<Utc>, d: Duration| t.duration_trunc(d).unwrap_or(t);
    let mut first_of_hour: BTreeSet<DateTime<Utc>> = BTreeSet::new();
    let mut first_of_day: BTreeSet<DateTime<Utc>> = BTreeSet::new();
    for (id, t, held) in &ps {
        let age = now - *t;
        let new_hour = first_of_hour.insert(bucket(*t, Duration::hours(1)));
        let new_day = first_of_day.insert(bucket(*t, Duration::days(1)));
        if *held
            || age < tiers.keep_all
            || (new_hour && age < tiers.keep_hourly)
            || (new_day && age < tiers.keep_daily)
        {
            keep.insert(*id);
        }
    }
    keep
}

/// A daily point to lock (EBS Snapshot Lock) and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyLock {
    pub snapshot_id: String,
    /// Whole days (LockSnapshot's `LockDuration`: 1 to 36 500).
    pub days: u32,
    /// When the lock ends (tagged `pilotlight:locked-until`).
    pub until: DateTime<Utc>,
}

/// Which points to lock at `now`: each UTC day's first point (the one the daily tier of
/// [`retained`] keeps) that carries no lock yet, until it would leave the daily tier
/// (`keep_daily` after its snapshot time), in whole days, at least one. A day's first
/// point older than `keep_daily` is not locked (it is about to go).
pub fn daily_locks(points: &[Point], now: DateTime<Utc>, keep_daily: Duration) -> Vec<DailyLock> {
    let mut first_of_day: BTreeMap<chrono::NaiveDate, &Point> = BTreeMap::new();
    for p in points {
        let slot = first_of_day
            .entry(p.snapshot_time.date_naive())
            .or_insert(p);
        if (p.snapshot_time, &p.snapshot_id) < (slot.snapshot_time, &slot.snapshot_id) {
            *slot = p;
        }
    }
    first_of_day
        .values()
        .filter(|p| p.locked_until.is_none())
        .filter_map(|p| {
            let left = keep_daily - (now - p.snapshot_time);
            if left <= Duration::zero() {
                return None;
            }
            let days = (left.num_seconds() as u64)
                .div_ceil(86_400)
                .clamp(1, 36_500) as u32;
            Some(DailyLock {
                snapshot_id: p.snapshot_id.clone(),
                days,
                until: now + Duration::days(days as i64),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(vm: &str, disk: &str, g: u64, minute: i64) -> Point {
        Point {
            snapshot_id: format!("snap-{vm}-{disk}-{g}"),
            disk: DiskId::new("s1", vm, disk).unwrap(),
            generation: g,
            snapshot_time: t0() + Duration::minutes(minute),
            consistency: "crash".into(),
            stack: "st".into(),
            parent: None,
            hold: false,
            locked_until: None,
            blocks_written: None,
        }
    }

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-29T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn tags_round_trip() {
        let info = PointInfo {
            disk: DiskId::new("s1", "db-01", "disk0").unwrap(),
            generation: 7,
            snapshot_time: t0(),
            consistency: "application".into(),
            change_id: Some("52 1b/42".into()),
            stack: "pl".into(),
            parent: Some("snap-1".into()),
        };
        let tags: BTreeMap<_, _> = info.tags().into_iter().collect();
        assert_eq!(tags[tag::SNAPSHOT_TIME], "2026-11-29T10:00:00Z");
        let p = Point::from_tags("snap-2", &tags).unwrap();
        assert_eq!(p.generation, 7);
        assert_eq!(p.snapshot_time, t0());
        assert_eq!(p.parent.as_deref(), Some("snap-1"));
        assert!(!p.hold);
        // A run's hold: its own key, so runs never release each other's.
        let mut held = tags.clone();
        held.insert(tag::hold("dr-1"), "1".into());
        assert_eq!(tag::hold("dr-1"), "pilotlight:hold:dr-1");
        assert!(Point::from_tags("snap-1", &held).unwrap().hold);
        let mut other = tags.clone();
        other.insert("pilotlight:holdings".into(), "1".into());
        assert!(!Point::from_tags("snap-1", &other).unwrap().hold);
        let mut bad = tags.clone();
        bad.insert(tag::VM.into(), "..".into());
        assert!(Point::from_tags("x", &bad).is_none());
        let mut bad = tags.clone();
        bad.insert(tag::GENERATION.into(), "-1".into());
        assert!(Point::from_tags("x", &bad).is_none());
        bad.remove(tag::POINT);
        assert!(Point::from_tags("x", &bad).is_none());
    }

    #[test]
    fn a_vm_point_needs_every_disk_at_that_time() {
        // disk0 at 10:00 and 10:15, disk1 only at 10:00 (10:15 still uploading).
        let ps = vec![
            point("db-01", "disk0", 1, 0),
            point("db-01", "disk0", 2, 15),
            point("db-01", "disk1", 1, 0),
            point("web", "disk0", 4, 15),
        ];
        let v = vm_points(&ps);
        let db: Vec<_> = v.iter().filter(|p| p.vm == "db-01").collect();
        assert_eq!(db.len(), 1);
        assert_eq!(db[0].snapshot_time, t0());
        assert_eq!(db[0].disks.len(), 2);
        assert!(db[0].disks.iter().all(|p| p.generation == 1));
        assert_eq!(v.iter().filter(|p| p.vm == "web").count(), 1);
    }

    #[test]
    fn tiers_keep_first_of_hour_and_day_newest_and_holds() {
        let tiers = Tiers {
            keep_all: Duration::hours(1),
            keep_hourly: Duration::hours(3),
            keep_daily: Duration::days(2),
        };
        // Every 20 minutes for 3 days; now = the last point.
        let ids: Vec<String> = (0..216).map(|i| format!("p{i:03}")).collect();
        let pts: Vec<(&str, DateTime<Utc>, bool)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), t0() + Duration::minutes(20 * i as i64), i == 5))
            .collect();
        let now = pts.last().unwrap().1;
        let keep = retained(pts.iter().copied(), now, &tiers);
        for (id, t, held) in &pts {
            let age = now - *t;
            let first_hour = t.time().format("%M").to_string() == "00";
            let first_day = first_hour && t.time().format("%H").to_string() == "00";
            let want = *held
                || age < tiers.keep_all
                || (first_hour && age < tiers.keep_hourly)
                || (first_day && age < tiers.keep_daily)
                || *id == "p215";
            assert_eq!(keep.contains(id), want, "{id} at {t}");
        }
        // Idempotent: pruning what is kept keeps it all.
        let kept: Vec<_> = pts.iter().filter(|p| keep.contains(p.0)).copied().collect();
        assert_eq!(
            retained(kept.iter().copied(), now, &tiers).len(),
            kept.len()
        );
    }

    proptest::proptest! {
        /// The step rule, applied until it runs out, finds exactly the times every disk
        /// has (the model: the sets' intersection), newest first.
        #[test]
        fn common_times_are_the_intersection(
            sets in proptest::collection::vec(proptest::collection::btree_set(0i64..40, 0..12), 1..5)
        ) {
            let sets: Vec<BTreeSet<DateTime<Utc>>> = sets
                .iter()
                .map(|s| s.iter().map(|m| t0() + Duration::minutes(*m)).collect())
                .collect();
            let mut model: Vec<DateTime<Utc>> = sets[0]
                .iter()
                .filter(|t| sets.iter().all(|s| s.contains(t)))
                .copied()
                .collect();
            model.reverse();
            let refs: Vec<&BTreeSet<DateTime<Utc>>> = sets.iter().collect();
            proptest::prop_assert_eq!(common_times(&refs), model);
        }
    }

    #[test]
    fn the_step_agrees_or_lowers_to_the_oldest() {
        let t = |m| t0() + Duration::minutes(m);
        assert_eq!(common_step(&[]), None);
        assert_eq!(common_step(&[t(5), t(5)]), Some(Common::Agreed(t(5))));
        assert_eq!(common_step(&[t(5), t(3), t(9)]), Some(Common::Lower(t(3))));
    }

    #[test]
    fn each_days_first_unlocked_point_is_locked_until_it_leaves_the_daily_tier() {
        // Minutes from t0 (10:00): day 0 has points at 10:10 and 11:10, day 1 at 10:05
        // (locked already), day 2 at 10:30.
        let mut ps = vec![
            point("vm", "d", 1, 70),
            point("vm", "d", 2, 10),
            point("vm", "d", 3, 24 * 60 + 5),
            point("vm", "d", 4, 48 * 60 + 30),
        ];
        ps[2].locked_until = Some(t0() + Duration::days(40));
        let now = t0() + Duration::days(2) + Duration::hours(1);
        let locks = daily_locks(&ps, now, Duration::days(30));
        let ids: Vec<&str> = locks.iter().map(|l| l.snapshot_id.as_str()).collect();
        assert_eq!(ids, ["snap-vm-d-2", "snap-vm-d-4"]);
        // Day 0's first point leaves the daily tier 30 days after its 10:10, 27 days
        // 23 h 10 min from now: 28 whole days. Day 2's, 29 days 23.5 h from now: 30 days.
        assert_eq!((locks[0].days, locks[1].days), (28, 30));
        assert_eq!(locks[0].until, now + Duration::days(28));
        // Past the daily tier: nothing to lock; a young tier still locks one day.
        assert!(daily_locks(&ps, t0() + Duration::days(90), Duration::days(30)).is_empty());
        let short = daily_locks(&ps[3..], now, Duration::hours(2));
        assert_eq!(short[0].days, 1);
    }
}
