//! Recovery plans end to end against the emulator: three VMs protected by the real sender
//! and receiver (points on), their settings saved, a plan of two waves stored with
//! `pilotlight-dr plan put`, run as a drill: wave 2 starts only after wave 1 verified
//! and ran its steps (SSM Run Command, the emulator's), A records written into the drill
//! zone (Route 53, the emulator's) and removed by `plan cleanup` with every run's
//! resources; one report with the waves. A malformed plan is refused with its line.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use pilotlight_cloud::route53::DnsApi;
use pilotlight_tests::cli::{disk_args, dr, receiver, run_ok, s, send_ok};
use pilotlight_tests::disk::{create_sparse, scribble, MIB};
use pilotlight_tests::stack::{emulator, LocalStack};

const SIZE: u64 = 16 * MIB;

fn dr_json(stack: &LocalStack, args: &[&str]) -> serde_json::Value {
    let out = run_ok(&mut dr(
        stack,
        "ok",
        &[&["--stack", "e2e", "--json"], args].concat(),
    ));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn time(v: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_drill_runs_its_waves_in_order_writes_and_removes_dns() {
    let stack = LocalStack::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let aws = emulator(&stack.endpoint).await;
    let t = (chrono::Utc::now() - chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    for (n, vm) in ["db-01", "app-01", "web-01"].iter().enumerate() {
        let disk = tmp.path().join(format!("{vm}.raw"));
        let f = create_sparse(&disk, SIZE);
        scribble(&f, SIZE, 8, 40 + n as u64);
        drop(f);
        let id = format!("site1/{vm}/disk0");
        let state = tmp.path().join(format!("{vm}-state"));
        let mut args = disk_args(&id, &state, &disk).to_vec();
        args.extend(["--source", "full", "--snapshot-time", &t]);
        send_ok(&stack, &args);
        run_ok(&mut dr(
            &stack,
            "ok",
            &[
                "configure",
                "--site",
                "site1",
                "--vm",
                vm,
                "--disk",
                "disk0",
                "--instance-type",
                "t3.micro",
                "--method",
                "snapshot",
            ],
        ));
    }
    run_ok(&mut receiver(
        &stack,
        "sync",
        &tmp.path().join("rx"),
        &["--stack", "e2e"],
    ));

    // The zones, on the emulator's Route 53.
    let r53 = aws.route53();
    let zone = |name: &'static str| {
        let c = r53.client.clone();
        async move {
            let out = c
                .create_hosted_zone()
                .name(name)
                .caller_reference(format!("pilotlight-e2e-{name}"))
                .send()
                .await
                .unwrap();
            out.hosted_zone()
                .unwrap()
                .id()
                .trim_start_matches("/hostedzone/")
                .to_string()
        }
    };
    let real = zone("example.com").await;
    let drill = zone("drill.example.com").await;

    // A malformed plan: refused with the line and the reason, nothing stored.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "name = \"shop\"\nsite = \"site1\"\n[[waves]]\nvms = [\"db-01\"]\n[[waves]]\nvms = [\"db-01\"]\n").unwrap();
    let out = dr(&stack, "ok", &["plan", "put", s(&bad)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:line 6: VM db-01 is in wave 1 and again in wave 2"),
        "{err}"
    );

    let plan = tmp.path().join("shop.toml");
    std::fs::write(
        &plan,
        format!(
            r#"name = "shop"
site = "site1"

[dns]
zone_id = "{real}"
zone = "example.com"
ttl = 30
drill_zone_id = "{drill}"
drill_zone = "drill.example.com"

[[waves]]
vms = ["db-01"]

[[waves]]
vms = ["app-01", "web-01"]

[vms.db-01]
dns = ["db.example.com"]
steps = [{{ document = "AWS-RunShellScript", parameters = {{ commands = ["systemctl start postgresql"] }} }}]

[vms.app-01]
dns = ["app.example.com"]
"#
        ),
    )
    .unwrap();
    run_ok(&mut dr(&stack, "ok", &["plan", "check", s(&plan)]));
    run_ok(&mut dr(&stack, "ok", &["plan", "put", s(&plan)]));
    let shown = run_ok(&mut dr(&stack, "ok", &["plan", "show", "shop"]));
    assert_eq!(
        String::from_utf8_lossy(&shown.stdout),
        std::fs::read_to_string(&plan).unwrap()
    );

    let r = dr_json(
        &stack,
        &[
            "start",
            "--plan",
            "shop",
            "--drill",
            "--wait",
            "--poll-every",
            "200ms",
        ],
    );
    assert_eq!(r["phase"], "done", "{r:#}");
    let w1_end = time(&r["waves"][0]["ended_at"]);
    let w2_start = time(&r["waves"][1]["started_at"]);
    assert!(
        w2_start >= w1_end,
        "wave 2 started {w2_start} before wave 1 ended {w1_end}"
    );
    for v in r["waves"][1]["vms"].as_array().unwrap() {
        assert!(time(&v["started_at"]) >= w1_end, "{v:#}");
    }
    let db = &r["waves"][0]["vms"][0];
    assert_eq!(
        db["commands"][0][0], "step 1 (AWS-RunShellScript)",
        "{db:#}"
    );
    assert_eq!(db["commands"][0][1], "Success");
    // Records only in the drill zone; each VM from the one point time.
    assert!(r53
        .a_record(&drill, "db.drill.example.com")
        .await
        .unwrap()
        .is_some());
    assert!(r53
        .a_record(&drill, "app.drill.example.com")
        .await
        .unwrap()
        .is_some());
    assert!(r53
        .a_record(&real, "db.example.com")
        .await
        .unwrap()
        .is_none());
    let id = r["plan_run_id"].as_str().unwrap().to_string();
    for run_id in r["waves"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["vms"].as_array().unwrap())
        .map(|v| v["run_id"].as_str().unwrap())
    {
        let run = dr_json(&stack, &["status", run_id]);
        let run = if run.is_array() { run[0].clone() } else { run };
        assert_eq!(run["point_time"], r["point_time"], "{run:#}");
    }
    // One report with the waves.
    let html = tmp.path().join("plan.html");
    run_ok(&mut dr(&stack, "ok", &["report", &id, "--out", s(&html)]));
    let html = std::fs::read_to_string(&html).unwrap();
    assert!(
        html.contains("wave 2") && html.contains("app.drill.example.com"),
        "{html}"
    );

    // Cleanup: runs and records.
    let c = dr_json(&stack, &["plan", "cleanup", &id]);
    assert_eq!(c["phase"], "cleaned_up", "{c:#}");
    assert!(r53
        .a_record(&drill, "db.drill.example.com")
        .await
        .unwrap()
        .is_none());
    assert!(r53
        .a_record(&drill, "app.drill.example.com")
        .await
        .unwrap()
        .is_none());
}
