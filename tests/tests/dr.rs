//! One-click DR end to end against the emulator: the real sender, receiver and
//! `pilotlight-dr` binaries; S3, SQS and EC2 (RunInstances, images, snapshots, tags)
//! through the SDK; only the EC2 image import is simulated (the emulator lacks it).
#![allow(clippy::unwrap_used)]

use aws_sdk_ec2::types::Filter;
use pilotlight_protocol::{DiskId, ExportResult, ExportStatus, Name, ObjectKey, Prefix};
use pilotlight_tests::cli::{applied, dr, receiver, running_receiver, send_generation};
use pilotlight_tests::disk::MIB;
use pilotlight_tests::poll_until;
use pilotlight_tests::stack::LocalStack;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::Duration;

const SIZE: u64 = 64 * MIB;
const WAIT: Duration = Duration::from_secs(90);

fn disk_id() -> DiskId {
    DiskId::parse("site1/vm1/disk0").unwrap()
}

/// Replicates generation `k` of the test disk; returns the source's SHA-256.
fn replicate(stack: &LocalStack, dir: &Path, k: u64) -> [u8; 32] {
    send_generation(stack, dir, SIZE, 60, 77 + k, k)
}

fn dr_json(stack: &LocalStack, simulate: &str, args: &[&str]) -> Value {
    let out = dr(stack, simulate, &[&["--json"], args].concat())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pilotlight-dr {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn instance_state(ec2: &aws_sdk_ec2::Client, id: &str) -> String {
    let out = ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap();
    let i = &out.reservations()[0].instances()[0];
    i.state()
        .and_then(|s| s.name())
        .map(|n| n.as_str().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_recovers_the_replicated_disk_and_cleanup_removes_only_its_resources() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let ec2 = stack.ec2().await;
    // The network the recovered VM goes into.
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.20.0.0/16")
        .send()
        .await
        .unwrap();
    let vpc_id = vpc.vpc().unwrap().vpc_id().unwrap().to_string();
    let subnet = ec2
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block("10.20.1.0/24")
        .availability_zone("us-east-1a")
        .send()
        .await
        .unwrap();
    let subnet_id = subnet.subnet().unwrap().subnet_id().unwrap().to_string();
    let sg = ec2
        .create_security_group()
        .group_name("dr")
        .description("dr")
        .vpc_id(&vpc_id)
        .send()
        .await
        .unwrap();
    let sg_id = sg.group_id().unwrap().to_string();
    // An instance the drill did not make: cleanup must leave it alone.
    let bystander = ec2
        .run_instances()
        .image_id("ami-12c6146b")
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    let bystander = bystander.instances()[0].instance_id().unwrap().to_string();

    replicate(&stack, tmp.path(), 1);
    let want = replicate(&stack, tmp.path(), 2);
    let rx = tmp.path().join("rx");
    let _receiver = running_receiver(
        &stack,
        &rx,
        &stack.queue_url,
        "2s",
        &tmp.path().join("receiver.log"),
    );
    poll_until("generation 2 applied", WAIT, || async {
        (applied(&rx, &disk_id()) == Some(2)).then_some(())
    })
    .await;

    let start = dr_json(
        &stack,
        "ok",
        &[
            "start",
            "--site",
            "site1",
            "--vm",
            "vm1",
            "--disk",
            "disk0",
            "--drill",
            "--instance-type",
            "m5.large",
            "--subnet",
            &subnet_id,
            "--security-group",
            &sg_id,
            "--private-ip",
            "10.20.1.50",
            "--tag",
            "Name=vm1-drill",
            "--tag",
            "owner=ops",
            "--boot-mode",
            "uefi",
            "--license-type",
            "BYOL",
        ],
    );
    assert_eq!(start["phase"], "exporting", "{start}");
    let run_id = start["run_id"].as_str().unwrap().to_string();
    assert_eq!(start["disks"][0]["generation"], 2);

    // `status --wait` polls until done.
    let out = dr(
        &stack,
        "ok",
        &[
            "status",
            &run_id,
            "--wait",
            "--poll-every",
            "200ms",
            "--wait-timeout",
            "90s",
        ],
    )
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let progress = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "{text}\n{progress}\n{}",
        std::fs::read_to_string(tmp.path().join("receiver.log")).unwrap()
    );
    assert!(
        progress.contains("importing: active converting 28%"),
        "{progress}"
    );
    assert!(
        text.contains(": done") && text.contains("time: exporting"),
        "{text}"
    );
    let run = &dr_json(&stack, "ok", &["status", &run_id])[0];
    assert_eq!(run["phase"], "done");

    // The export is the source at generation 2, byte for byte.
    let image_key = run["disks"][0]["image_key"].as_str().unwrap();
    let exported = stack.get(image_key).await;
    assert_eq!(exported.len() as u64, SIZE);
    assert_eq!(
        <[u8; 32]>::from(Sha256::digest(&exported)),
        want,
        "exported image differs from the source"
    );
    assert_eq!(run["disks"][0]["sha256"], hex::encode(want));

    // The instance, as asked.
    let instance_id = run["instance_ids"][0].as_str().unwrap().to_string();
    let out = ec2
        .describe_instances()
        .instance_ids(&instance_id)
        .send()
        .await
        .unwrap();
    let i = &out.reservations()[0].instances()[0];
    assert_eq!(i.image_id(), run["image_id"].as_str());
    assert_eq!(i.instance_type().unwrap().as_str(), "m5.large");
    assert_eq!(i.subnet_id(), Some(subnet_id.as_str()));
    assert_eq!(i.private_ip_address(), Some("10.20.1.50"));
    assert!(i
        .security_groups()
        .iter()
        .any(|g| g.group_id() == Some(sg_id.as_str())));
    let tags: Vec<(String, String)> = i
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().into(), t.value().unwrap().into()))
        .collect();
    for (k, v) in [
        ("Name", "vm1-drill"),
        ("owner", "ops"),
        ("pilotlight:drill", "true"),
        ("pilotlight:dr-run", run_id.as_str()),
    ] {
        assert!(tags.contains(&(k.into(), v.into())), "{k}={v} in {tags:?}");
    }
    let image_id = run["image_id"].as_str().unwrap().to_string();
    let snapshot_id = run["snapshot_ids"][0].as_str().unwrap().to_string();

    // Cleanup: exactly the drill's instance, AMI, snapshot and exported objects.
    let cleaned = dr_json(&stack, "ok", &["cleanup", &run_id]);
    assert_eq!(cleaned["phase"], "cleaned_up", "{cleaned}");
    assert_eq!(instance_state(&ec2, &instance_id).await, "terminated");
    assert_eq!(instance_state(&ec2, &bystander).await, "running");
    let images = ec2.describe_images().image_ids(&image_id).send().await;
    assert!(
        images.map(|o| o.images().is_empty()).unwrap_or(true),
        "AMI deregistered"
    );
    let snaps = ec2
        .describe_snapshots()
        .filters(
            Filter::builder()
                .name("snapshot-id")
                .values(&snapshot_id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(snaps.snapshots().is_empty(), "snapshot deleted");
    let exports = stack
        .keys(&format!("{}/site1/vm1/disk0/x/", stack.prefix))
        .await;
    assert!(exports.is_empty(), "exports removed: {exports:?}");
    assert_eq!(
        stack.manifests(&format!("{}/", stack.prefix)).await.len(),
        2,
        "replication untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_dr_starts_and_export_requests_fail_clearly() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    replicate(&stack, tmp.path(), 1);
    replicate(&stack, tmp.path(), 2);
    let fail = |args: &[&str]| {
        let out = dr(&stack, "ok", args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(
            err.lines()
                .filter(|l| l.contains("pilotlight-dr: error:"))
                .count(),
            1,
            "{err}"
        );
        err
    };
    let base = ["start", "--site", "site1", "--vm", "vm1"];
    let err = fail(&[&base[..], &["--disk", "nope"]].concat());
    assert!(err.contains("unknown disk site1/vm1/nope"), "{err}");
    let err = fail(&[
        "start", "--site", "site1", "--vm", "ghost", "--disk", "disk0",
    ]);
    assert!(err.contains("unknown VM site1/ghost"), "{err}");
    let err = fail(&[&base[..], &["--disk", "disk0", "--generation", "9"]].concat());
    assert!(err.contains("generation 9 is not available"), "{err}");
    let err = fail(&[&base[..], &["--disk", "disk0", "--instance-type", "big"]].concat());
    assert!(err.contains("instance_type"), "{err}");

    // A failed import: the run fails with EC2's StatusMessage, on record.
    let rx = tmp.path().join("rx");
    let start = dr_json(
        &stack,
        "ClientError: Unsupported kernel version",
        &[&base[..], &["--disk", "disk0", "--drill"]].concat(),
    );
    let run_id = start["run_id"].as_str().unwrap();
    let sync = receiver(&stack, "sync", &rx, &[]).output().unwrap();
    assert!(
        sync.status.success(),
        "{}",
        String::from_utf8_lossy(&sync.stderr)
    );
    let out = dr(
        &stack,
        "ClientError: Unsupported kernel version",
        &[
            "status",
            run_id,
            "--wait",
            "--poll-every",
            "100ms",
            "--wait-timeout",
            "60s",
        ],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Unsupported kernel version"),
        "{err}"
    );

    // Export requests the receiver refuses, each answered with a reason.
    let p = Prefix::new(&stack.prefix).unwrap();
    let put_req = |id: &str, body: Vec<u8>| {
        let key = ObjectKey::ExportRequest {
            disk: disk_id(),
            id: Name::new(id).unwrap(),
        }
        .to_key(&p);
        let s3 = &stack;
        async move { s3.put(&key, body).await }
    };
    let req = |id: &str, g: u64| {
        serde_json::to_vec(&serde_json::json!({"version": 1, "id": id, "generation": g, "format": "raw", "run_id": null, "requested_at": "2026-11-23T00:00:00Z"})).unwrap()
    };
    put_req("old", req("old", 1)).await;
    put_req("future", req("future", 9)).await;
    put_req("garbage", b"{not json".to_vec()).await;
    put_req("mismatch", req("other-id", 2)).await;
    // Without recovery points an older generation is gone (with them it is exported from
    // its point: tests/tests/points.rs).
    let sync = receiver(&stack, "sync", &rx, &["--points=false"])
        .output()
        .unwrap();
    assert!(
        sync.status.success(),
        "{}",
        String::from_utf8_lossy(&sync.stderr)
    );
    for (id, why) in [
        ("old", "no longer available"),
        ("future", "generation 9 is not available"),
        ("garbage", "not valid JSON"),
        ("mismatch", "names id"),
    ] {
        let name = Name::new(id).unwrap();
        let key = ObjectKey::ExportResult {
            disk: disk_id(),
            id: name.clone(),
        }
        .to_key(&p);
        let r = ExportResult::from_json(&stack.get(&key).await, &name).unwrap();
        assert_eq!(r.status, ExportStatus::Failed, "{id}");
        assert!(
            r.reason.as_deref().unwrap_or("").contains(why),
            "{id}: {:?}",
            r.reason
        );
        let image = ObjectKey::ExportImage {
            disk: disk_id(),
            id: name,
        }
        .to_key(&p);
        assert!(
            stack.keys(&image).await.is_empty(),
            "{id}: no image exported"
        );
    }
    assert_eq!(
        applied(&rx, &disk_id()),
        Some(2),
        "replication state unchanged"
    );
}

/// The built Lambda binary (the `bootstrap` of the deployment zip), served by
/// cargo-lambda's local Lambda runtime emulator (`cargo lambda watch --only-lambda-apis`:
/// the emulator does not build or start the function; the test starts the binary
/// pointed at it) and driven with `cargo lambda invoke` and the JSON fixtures: start, the
/// EventBridge schedule, status, cleanup, the run's report, and a bad request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lambda_binary_runs_the_flow_under_cargo_lambda() {
    let root = pilotlight_tests::repo_root();
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    replicate(&stack, tmp.path(), 1);

    let emulator = pilotlight_tests::lambda::LambdaEmulator::start(tmp.path()).await;
    let mut env = stack.env();
    env.push(("PILOTLIGHT_DR_SIMULATE_IMPORT".into(), "ok".into()));
    let mut function = emulator.function("pilotlight-dr-lambda", &env, tmp.path());
    let invoke = |data: &str| emulator.invoke(data);
    let fixture = |name: &str| {
        root.join("lambdas/dr/tests/fixtures")
            .join(name)
            .display()
            .to_string()
    };
    // Poll until the emulator and the function are up.
    let (ok, started) = invoke(&fixture("start.json"));
    assert!(ok, "{started} (function: {:?})", function.0.try_wait());
    let run: Value =
        serde_json::from_str(started.trim()).unwrap_or_else(|e| panic!("{e}: {started}"));
    assert_eq!(run["phase"], "exporting", "{run}");
    let run_id = run["run_id"].as_str().unwrap().to_string();

    let rx = tmp.path().join("rx");
    let sync = receiver(&stack, "sync", &rx, &[]).output().unwrap();
    assert!(
        sync.status.success(),
        "{}",
        String::from_utf8_lossy(&sync.stderr)
    );
    let (ok, out) = invoke(&fixture("scheduled.json"));
    assert!(
        ok && out.contains(&run_id),
        "the schedule advances the run: {out}"
    );
    let status = format!(r#"{{"action": "status", "run_id": "{run_id}"}}"#);
    let done: Value = poll_until("the run is done", WAIT, || {
        let (ok, out) = invoke(&status);
        let v: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
        async move { (ok && v[0]["phase"] == "done").then(|| v[0].clone()) }
    })
    .await;
    assert_eq!(done["instance_ids"].as_array().unwrap().len(), 1);
    let (ok, out) = invoke(&format!(r#"{{"action": "cleanup", "run_id": "{run_id}"}}"#));
    assert!(ok && out.contains("cleaned_up"), "{out}");
    // The report the function wrote when the drill ended, rewritten by the cleanup.
    let (ok, out) = invoke(&format!(r#"{{"action": "report", "run_id": "{run_id}"}}"#));
    let report: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
    assert!(ok && report["stored"] == true, "{out}");
    let html = report["html"].as_str().unwrap();
    assert!(
        html.contains("Removed by cleanup") && html.contains("cleaned up"),
        "{html}"
    );
    let (ok, out) = invoke(r#"{"action": "explode"}"#);
    assert!(!ok && out.contains("invalid request"), "{out}");
}

/// Two advancers (the schedule and a `dr status`) on one run at once, through the SDK
/// against the emulator: every save is conditional on the version read, and each EC2
/// create step is claimed before its call, so one import task, one instance (launched
/// with the run's client token) and one consistent run record come out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_advancers_racing_against_the_emulator_make_one_import_one_instance_one_record() {
    use pilotlight_dr::handler::{advance, start, DrConfig, DrEnv};
    use pilotlight_dr::model::{Phase, Run};
    use pilotlight_dr::sim::SimulatedImport;
    use pilotlight_protocol::{ExportRequest, EXPORT_VERSION};

    let stack = LocalStack::start().await;
    let aws = pilotlight_tests::stack::emulator(&stack.endpoint).await;
    let store = aws.s3(stack.bucket.clone());
    let prefix = Prefix::new(&stack.prefix).unwrap();
    let env = DrEnv {
        store: store.clone(),
        ec2: SimulatedImport {
            inner: aws.ec2(),
            store: store.clone(),
            prefix: "pilotlight-dr/simulated-imports/".into(),
            fail: None,
        },
        ebs: pilotlight_cloud::ebs::NoEbs,
        cfg: DrConfig::new(&stack.bucket, prefix.clone()),
    };
    // A committed generation (start resolves it by its manifest).
    let manifest = ObjectKey::Manifest {
        disk: disk_id(),
        generation: 1,
    }
    .to_key(&prefix);
    let m =
        pilotlight_protocol::Manifest::new(disk_id(), 1, None, 1 << 20, chrono::Utc::now(), "test");
    stack.put(&manifest, m.to_json()).await;
    let request: Value =
        serde_json::from_str(include_str!("../../lambdas/dr/tests/fixtures/start.json")).unwrap();
    let mut a: Run = start(&env, request).await.unwrap();
    assert_eq!(a.phase, Phase::Exporting, "{:?}", a.reason);
    // The receiver's answer: the image and the result naming it.
    let id = Name::new(&a.disks[0].export_id).unwrap();
    let req_key = ObjectKey::ExportRequest {
        disk: disk_id(),
        id: id.clone(),
    }
    .to_key(&prefix);
    ExportRequest::from_json(&stack.get(&req_key).await, &id).unwrap();
    let image_key = ObjectKey::ExportImage {
        disk: disk_id(),
        id: id.clone(),
    }
    .to_key(&prefix);
    stack.put(&image_key, vec![7u8; 4096]).await;
    let result = serde_json::json!({
        "version": EXPORT_VERSION, "id": id.as_str(), "status": "done",
        "generation": 1, "image_key": image_key, "size": 4096,
        "sha256": hex::encode([1u8; 32]), "reason": null, "seconds": 0.1,
        "finished_at": chrono::Utc::now(),
    });
    let result_key = ObjectKey::ExportResult {
        disk: disk_id(),
        id,
    }
    .to_key(&prefix);
    stack
        .put(&result_key, serde_json::to_vec(&result).unwrap())
        .await;

    let mut b = a.clone();
    for _ in 0..30 {
        let (ra, rb) = tokio::join!(advance(&env, &mut a), advance(&env, &mut b));
        ra.unwrap();
        rb.unwrap();
        if a.phase.is_final() && b.phase.is_final() {
            break;
        }
        if a.updated_at > b.updated_at {
            b = a.clone();
        } else {
            a = b.clone();
        }
    }
    assert_eq!(a.phase, Phase::Done, "{:?}", a.reason);
    let run_key = format!("pilotlight-dr/runs/{}.json", a.run_id);
    let stored: Run = serde_json::from_slice(&stack.get(&run_key).await).unwrap();
    assert_eq!(stored.phase, Phase::Done);
    assert_eq!(stored.instance_ids.len(), 1, "{stored:?}");
    assert!(stored.claim.is_none());
    // In EC2: one instance of this run, launched with the run's token.
    let ec2 = stack.ec2().await;
    let out = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:pilotlight:dr-run")
                .values(&a.run_id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let instances: Vec<_> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .collect();
    assert_eq!(instances.len(), 1, "one instance: {instances:?}");
    assert_eq!(
        instances[0].client_token(),
        Some(format!("{}-launch", a.run_id).as_str())
    );
    assert_eq!(
        instances[0].instance_id(),
        Some(stored.instance_ids[0].as_str())
    );
    let tasks = stack.keys("pilotlight-dr/simulated-imports/").await;
    assert_eq!(tasks.len(), 1, "one import task: {tasks:?}");
    // The AMI and snapshot the import made carry the run's tag (cleanup needs it).
    let images = ec2
        .describe_images()
        .image_ids(stored.image_id.clone().unwrap())
        .send()
        .await
        .unwrap();
    let tags: Vec<(String, String)> = images.images()[0]
        .tags()
        .iter()
        .map(|t| (t.key().unwrap_or("").into(), t.value().unwrap_or("").into()))
        .collect();
    assert!(
        tags.contains(&("pilotlight:dr-run".into(), a.run_id.clone())),
        "{tags:?}"
    );
}
