//! Per-disk lag as CloudWatch metrics from the function's log: one line in the embedded
//! metric format ("CloudWatch Logs extracts the metrics embedded in structured log
//! events", CloudWatch User Guide, Embedded metric format specification) per completed
//! point and per disk on the function's schedule, with the receiver's metric names and
//! dimensions, so the stack's dashboard and
//! searches read both modes alike. No PutMetricData call, no extra permission.

use chrono::{DateTime, Utc};
use pilotlight_protocol::replica::ChainHead;
use pilotlight_protocol::DiskId;
use serde_json::{json, Value};

/// One embedded-metric line at `now`: the dimensions (name, value) and the metrics (name,
/// unit, value), each a member of the root as the specification requires.
fn line(now: DateTime<Utc>, dims: &[(&str, &str)], metrics: &[(&str, &str, Value)]) -> String {
    let mut doc = serde_json::Map::new();
    doc.insert(
        "_aws".into(),
        json!({
            "Timestamp": now.timestamp_millis(),
            "CloudWatchMetrics": [{
                "Namespace": "Pilotlight",
                "Dimensions": [dims.iter().map(|(n, _)| *n).collect::<Vec<_>>()],
                "Metrics": metrics.iter().map(|(n, u, _)| json!({"Name": n, "Unit": u})).collect::<Vec<_>>()
            }]
        }),
    );
    for (n, v) in dims {
        doc.insert((*n).into(), json!(v));
    }
    for (n, _, v) in metrics {
        doc.insert((*n).into(), v.clone());
    }
    Value::Object(doc).to_string()
}

fn disk_dims<'a>(stack: &'a str, disk: &'a DiskId) -> [(&'static str, &'a str); 4] {
    [
        ("Stack", stack),
        ("Site", disk.site.as_str()),
        ("VM", disk.vm.as_str()),
        ("Disk", disk.disk.as_str()),
    ]
}

fn seconds(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds().max(0) as f64 / 1000.0
}

/// The log line for a point of `disk` taken at `snapshot_time`, completed at `now`.
pub fn point_line(
    stack: &str,
    disk: &DiskId,
    snapshot_time: DateTime<Utc>,
    now: DateTime<Utc>,
    blocks: u64,
) -> String {
    let lag = seconds(snapshot_time, now);
    line(
        now,
        &disk_dims(stack, disk),
        &[
            ("ReplicationLagSeconds", "Seconds", json!(lag)),
            ("PointLagSeconds", "Seconds", json!(lag)),
            ("PointBlocks", "Count", json!(blocks)),
        ],
    )
}

/// The schedule's lines: each disk's replication lag (`now` minus its newest point's
/// snapshot time, so a site that stopped sending, or a chain that stopped, shows a lag that
/// grows), then the stack's largest lag and a heartbeat (dimension Stack: what the RPO
/// alarm watches, missing data breaching, as the receiver publishes in image mode). A disk
/// without a point yet has no lag (as in image mode before the first apply).
pub fn lag_lines(stack: &str, heads: &[ChainHead], now: DateTime<Utc>) -> Vec<String> {
    let mut out = Vec::new();
    let mut max: Option<f64> = None;
    for h in heads {
        let Some(p) = &h.point else { continue };
        let lag = seconds(p.snapshot_time, now);
        max = Some(max.map_or(lag, |m| m.max(lag)));
        out.push(line(
            now,
            &disk_dims(stack, &h.disk),
            &[("ReplicationLagSeconds", "Seconds", json!(lag))],
        ));
    }
    let mut metrics = vec![("Heartbeat", "Count", json!(1))];
    if let Some(m) = max {
        metrics.push(("MaxReplicationLagSeconds", "Seconds", json!(m)));
    }
    out.push(line(now, &[("Stack", stack)], &metrics));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pilotlight_protocol::replica::HeadPoint;

    /// Every dimension and metric a directive names is a root member of the line ("The
    /// root node MUST contain all Target Members defined by references in the
    /// MetricDirective object", Embedded metric format specification).
    fn check_directive(v: &serde_json::Value) {
        let m = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(m["Namespace"], "Pilotlight");
        for d in m["Dimensions"][0].as_array().unwrap() {
            assert!(v[d.as_str().unwrap()].is_string(), "{d}");
        }
        for n in m["Metrics"].as_array().unwrap() {
            assert!(v[n["Name"].as_str().unwrap()].is_number(), "{n}");
        }
    }

    #[test]
    fn the_schedule_publishes_each_disks_lag_and_the_stacks_largest() {
        let t = DateTime::parse_from_rfc3339("2026-12-05T01:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let head = |d: &str, point_minutes_ago: Option<i64>| {
            let mut h = ChainHead::new(DiskId::parse(d).unwrap(), t);
            h.point = point_minutes_ago.map(|m| HeadPoint {
                generation: 3,
                snapshot_id: "snap-1".into(),
                snapshot_time: t - chrono::Duration::minutes(m),
                disk_size: 1 << 30,
            });
            h
        };
        let heads = [
            head("s/v/a", Some(5)),
            head("s/v/b", Some(90)),
            head("s/v/c", None),
        ];
        let lines = lag_lines("st", &heads, t);
        let docs: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        docs.iter().for_each(check_directive);
        // Two disks with points, then the stack's line.
        assert_eq!(docs.len(), 3);
        assert_eq!(
            (
                docs[0]["Disk"].as_str(),
                docs[0]["ReplicationLagSeconds"].as_f64()
            ),
            (Some("a"), Some(300.0))
        );
        assert_eq!(
            (
                docs[1]["Disk"].as_str(),
                docs[1]["ReplicationLagSeconds"].as_f64()
            ),
            (Some("b"), Some(5400.0))
        );
        assert_eq!(docs[2]["MaxReplicationLagSeconds"], 5400.0);
        assert_eq!(docs[2]["Heartbeat"], 1);
        assert_eq!(
            docs[2]["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            json!([["Stack"]])
        );
        // No point anywhere yet: a heartbeat, no largest lag (the RPO alarm's missing
        // data breaches, as in image mode before the first apply).
        let only = lag_lines("st", &heads[2..], t);
        let v: serde_json::Value = serde_json::from_str(&only[0]).unwrap();
        assert_eq!(only.len(), 1);
        check_directive(&v);
        assert!(v.get("MaxReplicationLagSeconds").is_none());
    }

    #[test]
    fn a_point_line_is_an_embedded_metric_document() {
        let t = DateTime::parse_from_rfc3339("2026-12-05T01:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let line = point_line(
            "st",
            &DiskId::parse("s/v/d").unwrap(),
            t,
            t + chrono::Duration::seconds(42),
            7,
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let m = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(m["Namespace"], "Pilotlight");
        // Every dimension and metric named in the directive is a root member.
        for d in m["Dimensions"][0].as_array().unwrap() {
            assert!(v.get(d.as_str().unwrap()).is_some(), "{d}");
        }
        for n in m["Metrics"].as_array().unwrap() {
            assert!(v[n["Name"].as_str().unwrap()].is_number(), "{n}");
        }
        assert_eq!(v["ReplicationLagSeconds"], 42.0);
        assert_eq!(v["_aws"]["Timestamp"], 1_796_432_442_000i64);
    }
}
