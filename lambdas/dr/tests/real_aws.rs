//! EC2 image import against real AWS: skipped unless asked for, never in CI.
//!
//! ```sh
//! PILOTLIGHT_REAL_AWS_IMPORT=s3://my-bucket/dr/site1/vm1/disk0/x/<id>/image.raw \
//!   AWS_PROFILE=... AWS_REGION=... cargo test -p pilotlight-dr --test real_aws -- --nocapture
//! ```
//!
//! Needs the `vmimport` service role (infra/ creates it) and an exported image of a
//! bootable disk. Imports it through the SDK's `ImportImage`, follows
//! `DescribeImportImageTasks` to the end (printing progress), then deregisters the AMI
//! and deletes its snapshots. Costs money while it runs.
#![allow(clippy::unwrap_used)]

use pilotlight_cloud::ec2::{Ec2Api, ImportRequest};
use pilotlight_cloud::AwsSettings;
use std::time::Duration;

#[tokio::test]
async fn import_image_on_real_aws() {
    let Ok(url) = std::env::var("PILOTLIGHT_REAL_AWS_IMPORT") else {
        eprintln!(
            "skipped: set PILOTLIGHT_REAL_AWS_IMPORT=s3://bucket/key to run against real AWS"
        );
        return;
    };
    let (bucket, key) = url
        .strip_prefix("s3://")
        .and_then(|r| r.split_once('/'))
        .expect("PILOTLIGHT_REAL_AWS_IMPORT must be s3://bucket/key");
    let ec2 = AwsSettings::default().load().await.ec2();
    let task = ec2
        .import_image(&ImportRequest {
            disks: vec![(bucket.into(), key.into())],
            role_name: std::env::var("PILOTLIGHT_DR_VMIMPORT_ROLE").unwrap_or("vmimport".into()),
            boot_mode: None,
            license_type: None,
            description: "pilotlight real-AWS import test".into(),
            tags: vec![("pilotlight:test".into(), "true".into())],
            encrypted: true,
            kms_key_id: std::env::var("PILOTLIGHT_DR_KMS_KEY").ok(),
            client_token: format!("pilotlight-real-aws-{}", std::process::id()),
        })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3 * 3600);
    let done = loop {
        let t = ec2.describe_import_image_task(&task).await.unwrap();
        eprintln!(
            "{task}: {} {:?} {:?}%",
            t.status, t.status_message, t.progress
        );
        if t.status == "completed" || t.status == "deleted" {
            break t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "import still running after 3 h"
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
    };
    assert_eq!(done.status, "completed", "{:?}", done.status_message);
    let image = done.image_id.clone().unwrap();
    ec2.deregister_image(&image).await.unwrap();
    for s in &done.snapshot_ids {
        ec2.delete_snapshot(s).await.unwrap();
    }
}
