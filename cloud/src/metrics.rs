//! CloudWatch metrics as pilotlight publishes them: one trait ([`MetricsApi`]),
//! implemented for the AWS SDK's client ([`SdkMetrics`], feature `metrics`), in memory
//! ([`MemoryMetrics`]) and as nothing ([`NoMetrics`]).

use crate::error::CloudError;
use crate::fault::{lock, Faults};
use std::future::Future;
use std::sync::Mutex;
use std::time::SystemTime;

/// CloudWatch takes at most 1 000 metrics per PutMetricData request (and 1 MB); a
/// datum here is one metric with one value.
pub const MAX_DATA_PER_CALL: usize = 500;

/// The unit of a datum (CloudWatch's `StandardUnit`, the ones pilotlight uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Seconds,
    Count,
    Bytes,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Seconds => "Seconds",
            Unit::Count => "Count",
            Unit::Bytes => "Bytes",
        }
    }
}

/// One value of one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Datum {
    pub name: String,
    /// (name, value), at most 30 (CloudWatch's limit).
    pub dimensions: Vec<(String, String)>,
    pub value: f64,
    pub unit: Unit,
    pub at: SystemTime,
}

/// Publishing metrics.
pub trait MetricsApi: Send + Sync {
    /// Puts `data` into `namespace`, in as many calls as CloudWatch's limits need.
    fn put(
        &self,
        namespace: &str,
        data: &[Datum],
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
}

/// No metrics (publishing off): every put succeeds and keeps nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMetrics;

impl MetricsApi for NoMetrics {
    async fn put(&self, _: &str, _: &[Datum]) -> Result<(), CloudError> {
        Ok(())
    }
}

/// Metrics in memory (tests), with fault injection on `PutMetricData`.
#[derive(Debug, Default)]
pub struct MemoryMetrics {
    pub data: Mutex<Vec<(String, Datum)>>,
    /// Data per call, as the calls were made.
    pub calls: Mutex<Vec<usize>>,
    pub faults: Faults,
}

impl MemoryMetrics {
    /// The values put for `name` with the dimension `dim` = `value`, in order.
    pub fn values(&self, name: &str, dim: (&str, &str)) -> Vec<f64> {
        lock(&self.data)
            .iter()
            .filter(|(_, d)| {
                d.name == name && d.dimensions.iter().any(|(k, v)| k == dim.0 && v == dim.1)
            })
            .map(|(_, d)| d.value)
            .collect()
    }
}

impl MetricsApi for MemoryMetrics {
    async fn put(&self, namespace: &str, data: &[Datum]) -> Result<(), CloudError> {
        for chunk in data.chunks(MAX_DATA_PER_CALL) {
            self.faults
                .check("CloudWatch", "PutMetricData", namespace)?;
            lock(&self.calls).push(chunk.len());
            lock(&self.data).extend(chunk.iter().map(|d| (namespace.to_string(), d.clone())));
        }
        Ok(())
    }
}

impl<T: MetricsApi> MetricsApi for std::sync::Arc<T> {
    async fn put(&self, namespace: &str, data: &[Datum]) -> Result<(), CloudError> {
        (**self).put(namespace, data).await
    }
}

#[cfg(feature = "metrics")]
pub use sdk::SdkMetrics;

#[cfg(feature = "metrics")]
mod sdk {
    use super::*;
    use crate::error::from_sdk;
    use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit};

    /// CloudWatch through the AWS SDK.
    #[derive(Debug, Clone)]
    pub struct SdkMetrics {
        pub client: aws_sdk_cloudwatch::Client,
    }

    impl MetricsApi for SdkMetrics {
        async fn put(&self, namespace: &str, data: &[Datum]) -> Result<(), CloudError> {
            for chunk in data.chunks(MAX_DATA_PER_CALL) {
                let metric_data = chunk
                    .iter()
                    .map(|d| {
                        MetricDatum::builder()
                            .metric_name(&d.name)
                            .set_dimensions(Some(
                                d.dimensions
                                    .iter()
                                    .map(|(k, v)| Dimension::builder().name(k).value(v).build())
                                    .collect(),
                            ))
                            .value(d.value)
                            .unit(StandardUnit::from(d.unit.as_str()))
                            .timestamp(aws_smithy_types::DateTime::from(d.at))
                            .build()
                    })
                    .collect();
                self.client
                    .put_metric_data()
                    .namespace(namespace)
                    .set_metric_data(Some(metric_data))
                    .send()
                    .await
                    .map_err(|e| from_sdk("CloudWatch", "PutMetricData", namespace, &e))?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Fault;
    use futures::executor::block_on;

    fn datum(i: usize) -> Datum {
        Datum {
            name: "ReplicationLagSeconds".into(),
            dimensions: vec![("Disk".into(), format!("d{i}"))],
            value: i as f64,
            unit: Unit::Seconds,
            at: SystemTime::now(),
        }
    }

    #[test]
    fn large_batches_are_split_to_cloudwatchs_limit_and_faults_fail_the_put() {
        let m = MemoryMetrics::default();
        let data: Vec<Datum> = (0..1200).map(datum).collect();
        block_on(m.put("Pilotlight", &data)).unwrap();
        assert_eq!(*m.calls.lock().unwrap(), [500, 500, 200]);
        assert_eq!(m.values("ReplicationLagSeconds", ("Disk", "d7")), [7.0]);
        m.faults
            .add(Fault::on("PutMetricData").unreachable().times(1));
        assert!(block_on(m.put("Pilotlight", &data[..1]))
            .unwrap_err()
            .is_transient());
    }
}
