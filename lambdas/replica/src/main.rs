//! The replica function (snapshots mode): settings from the environment, the SDK clients,
//! then each SQS batch decided message by message; the ones not done are reported as
//! batch item failures (the event source mapping has `ReportBatchItemFailures`), so only
//! they come back. Invoked by its EventBridge schedule instead, it prunes points
//! (retention).

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use pilotlight_cloud::sqs::Queue;
use pilotlight_replica::{handle_body, Outcome, Replica, ReplicaConfig};
use serde_json::Value;

/// Deliveries of a waiting message before it is left to the schedule's sweep (below
/// the queue's MaxReceiveCount, 5 by default).
const WAITS_BEFORE_SWEEP: u32 = 4;

fn var(name: &str) -> Result<String, Error> {
    std::env::var(name).map_err(|_| Error::from(format!("{name} is not set")))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .json()
        .with_target(false)
        .without_time()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let bucket = var("PILOTLIGHT_BUCKET")?;
    let prefix = pilotlight_protocol::Prefix::new(
        &std::env::var("PILOTLIGHT_PREFIX").unwrap_or_else(|_| "pilotlight".into()),
    )?;
    let mut cfg = ReplicaConfig::new(&bucket, prefix, var("PILOTLIGHT_STACK")?);
    cfg.emf = true;
    cfg.kms_key_arn = std::env::var("PILOTLIGHT_POINTS_KMS_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    if let Ok(n) = std::env::var("PILOTLIGHT_PUT_CONCURRENCY") {
        cfg.put_concurrency = n.parse()?;
    }
    let hours = |name: &str, default: i64| -> Result<chrono::Duration, Error> {
        Ok(match std::env::var(name) {
            Ok(v) => chrono::Duration::hours(v.parse::<i64>().map_err(|e| format!("{name}: {e}"))?),
            Err(_) => chrono::Duration::hours(default),
        })
    };
    cfg.tiers = pilotlight_protocol::points::Tiers {
        keep_all: hours("PILOTLIGHT_KEEP_ALL_HOURS", 24)?,
        keep_hourly: hours("PILOTLIGHT_KEEP_HOURLY_DAYS", 7)? * 24,
        keep_daily: hours("PILOTLIGHT_KEEP_DAILY_DAYS", 30)? * 24,
    };
    cfg.lock = pilotlight_cloud::ebs::LockMode::from_setting(
        &std::env::var("PILOTLIGHT_POINT_LOCK").unwrap_or_else(|_| "off".into()),
    )
    .map_err(|e| format!("PILOTLIGHT_POINT_LOCK {e}"))?;
    // The function's region and role come from the Lambda environment; an endpoint only
    // for local runs against the emulator.
    let endpoint = std::env::var("PILOTLIGHT_ENDPOINT_URL")
        .ok()
        .filter(|e| !e.is_empty());
    let aws = pilotlight_cloud::AwsSettings::new(None, endpoint)
        .load()
        .await;
    let r = Replica {
        store: aws.s3(&bucket),
        ebs: aws.ebs(),
        tasks: aws.sqs(var("PILOTLIGHT_TASK_QUEUE_URL")?),
        cfg,
    };
    // Both queues' URLs: a message that must wait is made visible again soon (its queue's
    // own visibility timeout is minutes), found by its event source ARN's queue name.
    let queues: Vec<(String, pilotlight_cloud::sqs::SdkSqs)> = [
        std::env::var("PILOTLIGHT_QUEUE_URL").ok(),
        std::env::var("PILOTLIGHT_TASK_QUEUE_URL").ok(),
    ]
    .into_iter()
    .flatten()
    .map(|url| {
        (
            url.rsplit('/').next().unwrap_or_default().to_string(),
            aws.sqs(&url),
        )
    })
    .collect();
    let (r, queues) = (&r, &queues);
    run(service_fn(move |event: LambdaEvent<Value>| async move {
        // The schedule (EventBridge "Scheduled Event"): sweep, retention, lag metrics.
        if event.payload.get("detail-type").and_then(Value::as_str) == Some("Scheduled Event") {
            let tick = pilotlight_replica::schedule::tick(r, chrono::Utc::now).await?;
            for (disk, step) in &tick.swept {
                tracing::info!(%disk, "sweep: {step:?}");
            }
            for export in &tick.exports {
                tracing::info!("export sweep: {export}");
            }
            let pruned = tick.pruned;
            tracing::info!(
                points = pruned.points,
                deleted = pruned.deleted.len(),
                failed = pruned.failed,
                locked = pruned.locked.len(),
                "pruned"
            );
            // The lag as metrics (the function's stdout is its log).
            for line in &tick.lag_lines {
                println!("{line}");
            }
            return Ok::<_, Error>(serde_json::to_value(pruned)?);
        }
        let batch: SqsEvent = serde_json::from_value(event.payload)?;
        let mut response = SqsBatchResponse::default();
        for m in batch.records {
            let id = m.message_id.clone().unwrap_or_default();
            let outcome = handle_body(r, m.body.as_deref().unwrap_or(""), chrono::Utc::now).await;
            let received: u32 = m
                .attributes
                .get("ApproximateReceiveCount")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            match &outcome {
                Outcome::Delete(why) => tracing::info!(message = %id, "done: {why}"),
                // Waiting is not failing: after a few tries the schedule's sweep (every
                // chain to its newest generation) takes over, so a slow parent never
                // sends a good event to the dead-letter queue.
                Outcome::Retry(why) if received >= WAITS_BEFORE_SWEEP => {
                    tracing::info!(message = %id, "left to the schedule's sweep: {why}");
                }
                Outcome::Retry(why) => {
                    tracing::info!(message = %id, "later: {why}");
                    let name = m
                        .event_source_arn
                        .as_deref()
                        .and_then(|a| a.rsplit(':').next())
                        .unwrap_or_default();
                    if let (Some((_, q)), Some(receipt)) = (
                        queues.iter().find(|(n, _)| n == name),
                        m.receipt_handle.as_deref(),
                    ) {
                        let secs = (15i32 << received.min(4)).min(300);
                        if let Err(e) = q.change_visibility(receipt, secs).await {
                            tracing::warn!(message = %id, "cannot shorten its wait: {e}");
                        }
                    }
                    response.add_failure(id);
                }
                Outcome::Reject(why) => {
                    tracing::error!(message = %id, "refused: {why}");
                    response.add_failure(id);
                }
            }
        }
        Ok::<_, Error>(serde_json::to_value(response)?)
    }))
    .await
}
