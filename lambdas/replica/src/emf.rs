//! Per-disk lag as CloudWatch metrics from the function's log: one line in the embedded
//! metric format ("CloudWatch Logs extracts the metrics embedded in structured log
//! events", CloudWatch User Guide, Embedded metric format specification) per completed
//! point, with the receiver's metric names and dimensions, so the stack's dashboard and
//! searches read both modes alike. No PutMetricData call, no extra permission.

use chrono::{DateTime, Utc};
use pilotlight_protocol::DiskId;
use serde_json::json;

/// The log line for a point of `disk` taken at `snapshot_time`, completed at `now`.
pub fn point_line(
    stack: &str,
    disk: &DiskId,
    snapshot_time: DateTime<Utc>,
    now: DateTime<Utc>,
    blocks: u64,
) -> String {
    let lag = (now - snapshot_time).num_milliseconds().max(0) as f64 / 1000.0;
    json!({
        "_aws": {
            "Timestamp": now.timestamp_millis(),
            "CloudWatchMetrics": [{
                "Namespace": "Pilotlight",
                "Dimensions": [["Stack", "Site", "VM", "Disk"]],
                "Metrics": [
                    {"Name": "ReplicationLagSeconds", "Unit": "Seconds"},
                    {"Name": "PointLagSeconds", "Unit": "Seconds"},
                    {"Name": "PointBlocks", "Unit": "Count"}
                ]
            }]
        },
        "Stack": stack,
        "Site": disk.site.as_str(),
        "VM": disk.vm.as_str(),
        "Disk": disk.disk.as_str(),
        "ReplicationLagSeconds": lag,
        "PointLagSeconds": lag,
        "PointBlocks": blocks,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
