//! The receiver's CloudWatch metrics: per disk how far behind it is and what it applied,
//! per receiver a heartbeat and the largest lag (what the stack's RPO alarm watches).
//!
//! Publishing never holds replication up: a put runs as its own task, at most one at a
//! time; a failed put is logged and its data kept for the next one, up to a bound, then
//! the oldest is dropped (CloudWatch down for long loses metrics, never replication).

use crate::status::DiskStatus;
use pilotlight_cloud::metrics::{Datum, MetricsApi, Unit};
use pilotlight_cloud::CloudError;
use pilotlight_protocol::DiskId;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Metric names: the templates' alarms and dashboard name only these (a test checks).
pub mod name {
    pub const REPLICATION_LAG: &str = "ReplicationLagSeconds";
    pub const PENDING_GENERATIONS: &str = "PendingGenerations";
    pub const BYTES_APPLIED: &str = "BytesApplied";
    pub const APPLY_SECONDS: &str = "ApplySeconds";
    pub const POINT_LAG: &str = "PointLagSeconds";
    pub const POINT_FAILURES: &str = "PointFailures";
    /// Per receiver: 1 each interval while it runs.
    pub const HEARTBEAT: &str = "Heartbeat";
    /// Per receiver: the largest `ReplicationLagSeconds` of its disks.
    pub const MAX_REPLICATION_LAG: &str = "MaxReplicationLagSeconds";
    /// Every name above.
    pub const ALL: [&str; 8] = [
        REPLICATION_LAG,
        PENDING_GENERATIONS,
        BYTES_APPLIED,
        APPLY_SECONDS,
        POINT_LAG,
        POINT_FAILURES,
        HEARTBEAT,
        MAX_REPLICATION_LAG,
    ];
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub namespace: String,
    /// The `Stack` dimension of every metric.
    pub stack: String,
    pub interval: Duration,
    /// Batches kept while CloudWatch fails; beyond, the oldest is dropped.
    pub max_backlog: usize,
}

impl MetricsConfig {
    pub fn new(stack: &str) -> Self {
        Self {
            namespace: "Pilotlight".into(),
            stack: stack.into(),
            interval: Duration::from_secs(60),
            max_backlog: 10,
        }
    }
}

/// What a disk applied since the last publication.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ApplyTotals {
    pub bytes: u64,
    pub seconds: f64,
}

/// The data of one publication.
pub fn metric_data(
    stack: &str,
    status: &[DiskStatus],
    applied: &BTreeMap<String, ApplyTotals>,
    now: SystemTime,
) -> Vec<Datum> {
    let mut out = Vec::new();
    let at = now;
    let now_utc: chrono::DateTime<chrono::Utc> = now.into();
    let mut max_lag: Option<f64> = None;
    for d in status {
        let Ok(id) = DiskId::parse(&d.disk) else {
            continue;
        };
        let dims = vec![
            ("Stack".to_string(), stack.to_string()),
            ("Site".to_string(), id.site.to_string()),
            ("VM".to_string(), id.vm.to_string()),
            ("Disk".to_string(), id.disk.to_string()),
        ];
        let mut put = |name: &str, value: f64, unit: Unit| {
            out.push(Datum {
                name: name.into(),
                dimensions: dims.clone(),
                value,
                unit,
                at,
            })
        };
        if let Some(t) = d.snapshot_time {
            let lag = (now_utc - t).num_milliseconds().max(0) as f64 / 1000.0;
            max_lag = Some(max_lag.map_or(lag, |m: f64| m.max(lag)));
            put(name::REPLICATION_LAG, lag, Unit::Seconds);
        }
        put(
            name::PENDING_GENERATIONS,
            d.pending.len() as f64,
            Unit::Count,
        );
        let a = applied.get(&d.disk).copied().unwrap_or_default();
        put(name::BYTES_APPLIED, a.bytes as f64, Unit::Bytes);
        put(name::APPLY_SECONDS, a.seconds, Unit::Seconds);
        if let Some(t) = d.newest_point_time {
            let lag = (now_utc - t).num_milliseconds().max(0) as f64 / 1000.0;
            put(name::POINT_LAG, lag, Unit::Seconds);
        }
        if d.newest_point.is_some() || d.points_failed > 0 {
            put(name::POINT_FAILURES, d.points_failed as f64, Unit::Count);
        }
    }
    let receiver = vec![("Stack".to_string(), stack.to_string())];
    out.push(Datum {
        name: name::HEARTBEAT.into(),
        dimensions: receiver.clone(),
        value: 1.0,
        unit: Unit::Count,
        at,
    });
    if let Some(m) = max_lag {
        out.push(Datum {
            name: name::MAX_REPLICATION_LAG.into(),
            dimensions: receiver,
            value: m,
            unit: Unit::Seconds,
            at,
        });
    }
    out
}

type Put = tokio::task::JoinHandle<(Vec<Datum>, Result<(), CloudError>)>;

impl<M> std::fmt::Debug for Publisher<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("cfg", &self.cfg)
            .field("backlog", &self.backlog.len())
            .field("in_flight", &self.in_flight.is_some())
            .finish()
    }
}

/// Publishes every `interval`, one put in flight at most, failures kept for later.
pub struct Publisher<M> {
    api: Arc<M>,
    pub cfg: MetricsConfig,
    backlog: VecDeque<Vec<Datum>>,
    in_flight: Option<Put>,
    last: Option<Instant>,
    /// Puts that failed, and batches dropped for the bound (for logs and tests).
    pub failures: u64,
    pub dropped: u64,
    pub published: u64,
}

impl<M: MetricsApi + 'static> Publisher<M> {
    pub fn new(api: Arc<M>, cfg: MetricsConfig) -> Self {
        Self {
            api,
            cfg,
            backlog: VecDeque::new(),
            in_flight: None,
            last: None,
            failures: 0,
            dropped: 0,
            published: 0,
        }
    }

    /// Whether a publication is due (then build it with [`metric_data`] and `queue` it).
    pub fn due(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= self.cfg.interval)
    }

    /// Queues a batch (dropping the oldest beyond the bound) and starts a put if none runs.
    pub async fn queue(&mut self, batch: Vec<Datum>) {
        self.last = Some(Instant::now());
        self.backlog.push_back(batch);
        while self.backlog.len() > self.cfg.max_backlog.max(1) {
            self.backlog.pop_front();
            self.dropped += 1;
            tracing::warn!(
                dropped = self.dropped,
                "CloudWatch unreachable for long: the oldest unpublished metrics were dropped"
            );
        }
        self.pump().await;
    }

    /// Collects a finished put and starts the next. Never waits for a put in flight.
    pub async fn pump(&mut self) {
        if self.in_flight.as_ref().is_some_and(|h| h.is_finished()) {
            self.collect().await;
        }
        if self.in_flight.is_none() {
            if let Some(batch) = self.backlog.pop_front() {
                let (api, ns) = (self.api.clone(), self.cfg.namespace.clone());
                self.in_flight = Some(tokio::spawn(async move {
                    let r = api.put(&ns, &batch).await;
                    (batch, r)
                }));
            }
        }
    }

    /// Waits for the put in flight (a clean stop, tests).
    pub async fn flush(&mut self) {
        self.collect().await;
    }

    /// Waits for the put in flight, if any, and counts it; a failed batch goes back to
    /// the front of the backlog.
    async fn collect(&mut self) {
        let Some(h) = self.in_flight.take() else {
            return;
        };
        match h.await {
            Ok((_, Ok(()))) => self.published += 1,
            Ok((batch, Err(e))) => {
                self.failures += 1;
                tracing::warn!(error = %e, "metrics not published; kept for the next try (replication goes on)");
                self.backlog.push_front(batch);
            }
            Err(e) => tracing::warn!(error = %e, "metrics task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pilotlight_cloud::metrics::MemoryMetrics;
    use pilotlight_cloud::Fault;

    fn status(disk: &str, lag_s: i64, pending: Vec<u64>) -> DiskStatus {
        let t = chrono::Utc::now() - chrono::Duration::seconds(lag_s);
        DiskStatus {
            disk: disk.into(),
            applied: Some(3),
            snapshot_time: Some(t),
            lag_seconds: Some(lag_s),
            pending,
            image: String::new(),
            disk_size: 0,
            allocated_bytes: 0,
            newest_point: Some(("snap-1".into(), 3)),
            newest_point_time: Some(t),
            point_due: None,
            points_failed: 2,
            point_error: None,
        }
    }

    #[test]
    fn a_publication_has_each_disks_figures_and_the_receivers_heartbeat_and_max_lag() {
        let st = [
            status("s1/db/disk0", 100, vec![4, 5]),
            status("s1/db/disk1", 700, vec![]),
        ];
        let mut applied = BTreeMap::new();
        applied.insert(
            "s1/db/disk0".to_string(),
            ApplyTotals {
                bytes: 4096,
                seconds: 1.5,
            },
        );
        let data = metric_data("pl", &st, &applied, SystemTime::now());
        let get = |n: &str, disk: Option<&str>| -> Vec<f64> {
            data.iter()
                .filter(|d| d.name == n)
                .filter(|d| {
                    disk.is_none_or(|x| d.dimensions.iter().any(|(k, v)| k == "Disk" && v == x))
                })
                .map(|d| d.value)
                .collect()
        };
        let lag0 = get(name::REPLICATION_LAG, Some("disk0"))[0];
        assert!((99.0..105.0).contains(&lag0), "{lag0}");
        assert_eq!(get(name::PENDING_GENERATIONS, Some("disk0")), [2.0]);
        assert_eq!(get(name::BYTES_APPLIED, Some("disk0")), [4096.0]);
        assert_eq!(get(name::APPLY_SECONDS, Some("disk0")), [1.5]);
        assert_eq!(get(name::BYTES_APPLIED, Some("disk1")), [0.0]);
        assert_eq!(get(name::POINT_FAILURES, Some("disk1")), [2.0]);
        assert_eq!(get(name::HEARTBEAT, None), [1.0]);
        let max = get(name::MAX_REPLICATION_LAG, None)[0];
        assert!((699.0..705.0).contains(&max), "{max}");
        // Every datum names the stack, every disk datum its site, VM and disk.
        assert!(data
            .iter()
            .all(|d| d.dimensions.contains(&("Stack".into(), "pl".into()))));
        let names: std::collections::BTreeSet<&str> =
            data.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, name::ALL.into_iter().collect());
    }

    #[tokio::test]
    async fn a_cloudwatch_outage_keeps_metrics_for_later_within_a_bound() {
        let m = Arc::new(MemoryMetrics::default());
        let mut cfg = MetricsConfig::new("pl");
        cfg.max_backlog = 3;
        let mut p = Publisher::new(m.clone(), cfg);
        m.faults
            .add(Fault::on("PutMetricData").unreachable().times(5));
        let batch = |v: f64| {
            vec![Datum {
                name: name::HEARTBEAT.into(),
                dimensions: vec![],
                value: v,
                unit: Unit::Count,
                at: SystemTime::now(),
            }]
        };
        for i in 0..6 {
            p.queue(batch(i as f64)).await;
            p.flush().await;
        }
        assert_eq!(p.failures, 5);
        assert!(p.dropped >= 2, "bounded: {}", p.dropped);
        // CloudWatch back: what was kept goes out, oldest first, the dropped never.
        for _ in 0..5 {
            p.pump().await;
            p.flush().await;
        }
        let got: Vec<f64> = m
            .data
            .lock()
            .unwrap()
            .iter()
            .map(|(_, d)| d.value)
            .collect();
        assert!(!got.is_empty());
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
        assert_eq!(got.last(), Some(&5.0));
        assert!(!got.contains(&0.0), "the oldest was dropped: {got:?}");
    }
}
