//! The receiver's CloudWatch metrics end to end against the emulator: the real sender
//! and receiver, PutMetricData through the SDK, read back with GetMetricData.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use aws_sdk_cloudwatch::types::{Dimension, Metric, MetricDataQuery, MetricStat};
use pilotlight_protocol::DiskId;
use pilotlight_tests::cli::{applied, disk_args, running_receiver_with, send_ok};
use pilotlight_tests::disk::{create_sparse, scribble, MIB};
use pilotlight_tests::poll_until;
use pilotlight_tests::stack::LocalStack;
use std::path::Path;
use std::time::Duration;

const SIZE: u64 = 16 * MIB;
const WAIT: Duration = Duration::from_secs(60);

/// Sends a full generation of `site1/vm1/{name}`; returns the disk's bytes.
fn send_disk(stack: &LocalStack, dir: &Path, name: &str) -> Vec<u8> {
    let disk = dir.join(format!("{name}.raw"));
    let f = create_sparse(&disk, SIZE);
    scribble(&f, SIZE, 10, name.len() as u64 + 3);
    drop(f);
    let state = dir.join(format!("{name}-state"));
    let id = format!("site1/vm1/{name}");
    let mut args = disk_args(&id, &state, &disk).to_vec();
    args.extend(["--source", "full"]);
    send_ok(stack, &args);
    std::fs::read(&disk).unwrap()
}

/// The newest values of `metric` for `disk` over the last ten minutes, oldest first.
async fn values(cw: &aws_sdk_cloudwatch::Client, metric: &str, disk: &str) -> Vec<f64> {
    let dims = [
        ("Stack", "metrics-e2e"),
        ("Site", "site1"),
        ("VM", "vm1"),
        ("Disk", disk),
    ];
    let now = std::time::SystemTime::now();
    let out = cw
        .get_metric_data()
        .metric_data_queries(
            MetricDataQuery::builder()
                .id("m")
                .metric_stat(
                    MetricStat::builder()
                        .metric(
                            Metric::builder()
                                .namespace("Pilotlight")
                                .metric_name(metric)
                                .set_dimensions(Some(
                                    dims.iter()
                                        .map(|(k, v)| {
                                            Dimension::builder().name(*k).value(*v).build()
                                        })
                                        .collect(),
                                ))
                                .build(),
                        )
                        .period(1)
                        .stat("Maximum")
                        .build(),
                )
                .build(),
        )
        .start_time((now - Duration::from_secs(600)).into())
        .end_time((now + Duration::from_secs(60)).into())
        .send()
        .await
        .unwrap();
    let r = &out.metric_data_results()[0];
    // Newest first in CloudWatch's answer; oldest first here.
    let mut pts: Vec<(i64, f64)> = r
        .timestamps()
        .iter()
        .map(|t| t.secs())
        .zip(r.values().iter().copied())
        .collect();
    pts.sort_by_key(|p| p.0);
    pts.into_iter().map(|p| p.1).collect()
}

/// After replication the receiver publishes each disk's lag; with the sender stopped the
/// lag grows; CloudWatch unreachable (its endpoint closed) changes nothing for
/// replication: images still equal their sources, a warning is logged, no crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_publishes_lag_per_disk_and_cloudwatch_failing_stops_nothing() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let rx = tmp.path().join("rx");
    let want0 = send_disk(&stack, tmp.path(), "disk0");
    let want1 = send_disk(&stack, tmp.path(), "disk1");
    // Metrics every second, short polls: the test waits seconds, not minutes.
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--queue-url",
            stack.queue_url.as_str(),
            "--reconcile-every",
            "1s",
            "--stack",
            "metrics-e2e",
            "--metrics-every",
            "1s",
            "--wait-seconds",
            "1",
            "--points=false",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let first_args = args(&[]);
    let first_args: Vec<&str> = first_args.iter().map(String::as_str).collect();
    let _receiver =
        running_receiver_with(&stack, &rx, &first_args, &tmp.path().join("receiver.log"));
    let d0 = DiskId::parse("site1/vm1/disk0").unwrap();
    let d1 = DiskId::parse("site1/vm1/disk1").unwrap();
    poll_until("both disks applied", WAIT, || async {
        (applied(&rx, &d0) == Some(1) && applied(&rx, &d1) == Some(1)).then_some(())
    })
    .await;
    let cw = aws_sdk_cloudwatch::Client::new(
        &pilotlight_tests::stack::emulator(&stack.endpoint).await.sdk,
    );
    // Each disk's lag, and it grows while nothing new arrives.
    for disk in ["disk0", "disk1"] {
        let first = poll_until("lag published", WAIT, || async {
            values(&cw, "ReplicationLagSeconds", disk)
                .await
                .first()
                .copied()
        })
        .await;
        let later = poll_until("lag grows", WAIT, || async {
            values(&cw, "ReplicationLagSeconds", disk)
                .await
                .last()
                .copied()
                .filter(|v| *v >= first + 2.0)
        })
        .await;
        assert!(later > first, "{disk}: {first} then {later}");
    }
    let pending = values(&cw, "PendingGenerations", "disk0").await;
    assert!(pending.iter().all(|v| *v == 0.0), "{pending:?}");
    drop(_receiver);
    // `status` marks a disk whose lag is over the RPO target STALLED, as DRS users know it.
    let status = |target: &str| {
        let out = pilotlight_tests::cli::run_ok(&mut pilotlight_tests::cli::receiver(
            &stack,
            "status",
            &rx,
            &["--local", "--rpo-target", target],
        ));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let stalled = status("1s");
    assert_eq!(stalled.matches("STALLED").count(), 2, "{stalled}");
    let fine = status("30m");
    assert!(!fine.contains("STALLED"), "{fine}");

    // CloudWatch unreachable: a second receiver (fresh state) replicates both disks all
    // the same, logs a warning and keeps running.
    let rx2 = tmp.path().join("rx2");
    let log = tmp.path().join("receiver2.log");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut second_args = args(&["--metrics-endpoint-url"]);
    second_args.push(closed_url);
    let second_args: Vec<&str> = second_args.iter().map(String::as_str).collect();
    let mut second = running_receiver_with(&stack, &rx2, &second_args, &log);
    poll_until("both disks applied without CloudWatch", WAIT, || async {
        (applied(&rx2, &d0) == Some(1) && applied(&rx2, &d1) == Some(1)).then_some(())
    })
    .await;
    let logged = poll_until("a warning about metrics", WAIT, || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("metrics not published").then_some(text)
    })
    .await;
    assert!(logged.contains("WARN"), "{logged}");
    assert!(second.0.try_wait().unwrap().is_none(), "still running");
    for (id, want) in [(&d0, &want0), (&d1, &want1)] {
        let got = std::fs::read(pilotlight_tests::cli::image_path(&rx2, id)).unwrap();
        assert!(got == *want, "{id}: image equals its source");
    }
}
