//! The replica function (snapshots mode): settings from the environment, the SDK clients,
//! then each SQS batch decided message by message; the ones not done are reported as
//! batch item failures (the event source mapping has `ReportBatchItemFailures`), so only
//! they come back. Invoked by its EventBridge schedule instead, it prunes points
//! (retention).

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use pilotlight_replica::{handle_body, Outcome, Replica, ReplicaConfig};
use serde_json::Value;

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
    let r = &r;
    run(service_fn(move |event: LambdaEvent<Value>| async move {
        // The schedule (EventBridge "Scheduled Event"): retention.
        if event.payload.get("detail-type").and_then(Value::as_str) == Some("Scheduled Event") {
            let pruned =
                pilotlight_replica::prune::prune(r, &r.cfg.tiers, chrono::Utc::now()).await?;
            tracing::info!(
                points = pruned.points,
                deleted = pruned.deleted.len(),
                failed = pruned.failed,
                "pruned"
            );
            return Ok::<_, Error>(serde_json::to_value(pruned)?);
        }
        let batch: SqsEvent = serde_json::from_value(event.payload)?;
        let mut response = SqsBatchResponse::default();
        for m in batch.records {
            let id = m.message_id.clone().unwrap_or_default();
            let outcome = handle_body(r, m.body.as_deref().unwrap_or(""), chrono::Utc::now).await;
            match &outcome {
                Outcome::Delete(why) => tracing::info!(message = %id, "done: {why}"),
                Outcome::Retry(why) => tracing::info!(message = %id, "later: {why}"),
                Outcome::Reject(why) => tracing::error!(message = %id, "refused: {why}"),
            }
            if !outcome.is_delete() {
                response.add_failure(id);
            }
        }
        Ok::<_, Error>(serde_json::to_value(response)?)
    }))
    .await
}
