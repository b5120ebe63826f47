//! Against real AWS: skipped unless asked for, never in CI. Both cost money while they run.
//!
//! **A deploy-and-drill run in your account** (`drill_on_real_aws`): deploy the stack as
//! infra/README.md "Deploy to AWS" says (build and upload the artifacts, create the stack,
//! point a sender at it and replicate a bootable VM's disks at least twice, so the newest
//! point of each disk is an incremental one, parented on the one before), then
//!
//! ```sh
//! PILOTLIGHT_REAL_AWS_DRILL="<DrFunctionName> <site> <vm> <disk>[,<disk>...] <instance type>" \
//!   AWS_PROFILE=... AWS_REGION=... cargo test -p pilotlight-dr --test real_aws -- --nocapture
//! ```
//!
//! It starts two drills of the newest point through the deployed DR function
//! (`pilotlight-dr --function ... start --drill --wait`), one per method (set
//! `PILOTLIGHT_REAL_AWS_METHODS` to run fewer): `snapshot` registers an AMI from the
//! point's snapshots and launches it (the VM must boot natively on Nitro); `import` has
//! the receiver export, EC2 import (encrypted), and launches; each instance must pass its
//! status checks, each run end `done` with one instance; their RTO breakdowns are printed
//! side by side. Then it cleans each drill up (instances, AMI, snapshots, exported
//! objects, all tagged by the run; the point's hold released) and checks it ends
//! `cleaned_up`. What it exercises that the emulator cannot:
//! incremental recovery points as EBS makes them (StartSnapshot with a parent; the test
//! first checks the newest point of each disk has one), ImportImage, the IAM policies as
//! AWS evaluates them (403s for missing keys, tag-scoped
//! deletes, PassRole), KMS grants, and the schedule advancing the run alongside `--wait`
//! (two advancers on one run record).
//!
//! **An image import alone** (`import_image_on_real_aws`):
//!
//! ```sh
//! PILOTLIGHT_REAL_AWS_IMPORT=s3://my-bucket/dr/site1/vm1/disk0/x/<id>/image.raw \
//!   AWS_PROFILE=... AWS_REGION=... cargo test -p pilotlight-dr --test real_aws -- --nocapture
//! ```
//!
//! Needs the `vmimport` service role (infra/ creates it) and an exported image of a
//! bootable disk. Imports it through the SDK's `ImportImage`, follows
//! `DescribeImportImageTasks` to the end (printing progress), then deregisters the AMI
//! and deletes its snapshots.
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

#[test]
fn drill_on_real_aws() {
    let Ok(spec) = std::env::var("PILOTLIGHT_REAL_AWS_DRILL") else {
        eprintln!(
            "skipped: set PILOTLIGHT_REAL_AWS_DRILL=\"FUNCTION SITE VM DISKS INSTANCE_TYPE\""
        );
        return;
    };
    let parts: Vec<&str> = spec.split_whitespace().collect();
    let [function, site, vm, disks, instance_type] = parts.as_slice() else {
        panic!(
            "PILOTLIGHT_REAL_AWS_DRILL must be FUNCTION SITE VM DISKS INSTANCE_TYPE, got {spec:?}"
        );
    };
    let dr = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pilotlight-dr"))
            .args(["--function", function, "--json"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pilotlight-dr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // One document per run (`start --wait`: the finished run); the last one.
        serde_json::Deserializer::from_slice(&out.stdout)
            .into_iter::<serde_json::Value>()
            .last()
            .unwrap()
            .unwrap()
    };
    // The newest point of each disk must be an incremental one (a parent), so the drill
    // exercises what the first real run of points would: StartSnapshot with a parent and
    // nothing else of encryption (issue 28). Replicate at least twice before running.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use pilotlight_cloud::ebs::{EbsApi, SnapshotFilter};
        use pilotlight_protocol::points::{tag, Point};
        let ebs = AwsSettings::default().load().await.ebs();
        for d in disks.split(',') {
            let filter = SnapshotFilter::default()
                .tag(tag::POINT, "1")
                .tag(tag::SITE, *site)
                .tag(tag::VM, *vm)
                .tag(tag::DISK, d);
            let newest = ebs
                .describe_snapshots(&filter)
                .await
                .unwrap()
                .iter()
                .filter_map(|s| Point::from_tags(&s.id, &s.tags))
                .max_by_key(|p| p.generation)
                .unwrap_or_else(|| panic!("{site}/{vm}/{d} has no recovery point"));
            assert!(
                newest.parent.is_some(),
                "{site}/{vm}/{d}: the newest point {} is a full one; replicate once more so it is incremental",
                newest.snapshot_id
            );
            eprintln!("{site}/{vm}/{d}: newest point {} (parent {:?})", newest.snapshot_id, newest.parent);
        }
    });
    let methods =
        std::env::var("PILOTLIGHT_REAL_AWS_METHODS").unwrap_or_else(|_| "snapshot import".into());
    let mut rto = vec![];
    for method in methods.split_whitespace() {
        let mut start = vec!["start", "--site", site, "--vm", vm, "--method", method];
        for d in disks.split(',') {
            start.extend(["--disk", d]);
        }
        start.extend([
            "--instance-type",
            instance_type,
            "--drill",
            "--wait",
            "--wait-timeout",
            "3h",
        ]);
        let run = dr(&start);
        eprintln!("{run:#}");
        assert_eq!(run["phase"], "done", "{method}: {run:#}");
        assert_eq!(run["method"], method);
        assert_eq!(run["verification"]["passed"], true, "{run:#}");
        assert_eq!(
            run["instance_ids"].as_array().map(Vec::len),
            Some(1),
            "{run:#}"
        );
        rto.push((method.to_string(), run["phases"].clone()));
        let run_id = run["run_id"].as_str().unwrap();
        let cleaned = dr(&["cleanup", run_id]);
        assert_eq!(cleaned["phase"], "cleaned_up", "{cleaned:#}");
    }
    for (method, phases) in rto {
        let parts: Vec<String> = phases
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                format!(
                    "{} {:.0} s",
                    p["phase"].as_str().unwrap(),
                    p["seconds"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        eprintln!("RTO {method}: {}", parts.join(", "));
    }
}
