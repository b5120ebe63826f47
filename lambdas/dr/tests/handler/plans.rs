//! Recovery plans in memory: waves in order from one point time, steps and health probes
//! through SSM Run Command, DNS after each wave, failures that stop the plan (or not, for
//! optional VMs), cleanup of a drill, DNS included.

use super::*;
use pilotlight_cloud::ec2::Ec2Api;
use pilotlight_cloud::route53::MemoryRoute53;
use pilotlight_cloud::ssm::MemorySsm;
use pilotlight_cloud::witness::MemoryWitness;
use pilotlight_dr::plans::run::{PlanEnv, PlanPhase, PlanRun, VmStage};

/// Points of `vm` (one disk) at the given minutes after 10:00.
pub(crate) async fn points_of(store: &MemoryStore, ebs: &MemoryEbs, vm: &str, minutes: &[i64]) {
    let disk = DiskId::new("site1", vm, "disk0").unwrap();
    write_points(store, ebs, &disk, minutes).await;
    let settings = json!({"site": "site1", "vm": vm, "disks": ["disk0"], "method": "snapshot",
        "launch": {"instance_type": "t3.medium", "subnet_id": null, "private_ip": null,
                   "boot_mode": "uefi", "license_type": null}});
    store.insert(
        &format!("pilotlight-dr/vms/site1/{vm}.json"),
        serde_json::to_vec(&settings).unwrap(),
    );
}

pub(crate) const PLAN: &str = r#"name = "shop"
site = "site1"

[dns]
zone_id = "ZREAL"
zone = "example.com"
ttl = 30
drill_zone_id = "ZDRILL"
drill_zone = "drill.example.com"

[[waves]]
vms = ["db-01"]

[[waves]]
vms = ["app-01", "web-01"]

[vms.db-01]
dns = ["db.example.com"]
health = { tcp = 5432 }
steps = [{ document = "AWS-RunShellScript", parameters = { commands = ["systemctl start postgresql"] } }]

[vms.app-01]
steps = [{ document = "Start-App" }]
dns = ["app.example.com"]

[vms.web-01]
optional = true
steps = [{ document = "Start-Web" }]
dns = ["www.example.com"]
"#;

pub(crate) type P<'a> = PlanEnv<
    'a,
    &'a MemoryStore,
    SimulatedImport<MemoryEc2, &'a MemoryStore>,
    Arc<MemoryEbs>,
    MemoryRoute53,
    MemorySsm,
    MemoryWitness,
>;

pub(crate) struct World {
    pub(crate) store: MemoryStore,
    pub(crate) ebs: Arc<MemoryEbs>,
    pub(crate) dns: MemoryRoute53,
    pub(crate) ssm: MemorySsm,
    pub(crate) witness: MemoryWitness,
}

pub(crate) async fn world() -> World {
    let store = MemoryStore::default();
    let ebs = Arc::new(MemoryEbs::new());
    // app-01 has no point at 10:60: the plan's common point is 10:45.
    points_of(&store, &ebs, "db-01", &[15, 30, 45, 60]).await;
    points_of(&store, &ebs, "app-01", &[15, 30, 45]).await;
    points_of(&store, &ebs, "web-01", &[15, 30, 45, 60]).await;
    World {
        store,
        ebs,
        dns: MemoryRoute53::default()
            .with_zone("ZREAL", "example.com")
            .with_zone("ZDRILL", "drill.example.com"),
        ssm: MemorySsm::default(),
        witness: MemoryWitness::default(),
    }
}

async fn call(p: &P<'_>, v: Value) -> Value {
    pilotlight_dr::plans::handle(p, v).await.unwrap()
}

/// Advances until the plan run ends, checking after each look that no VM of a later
/// wave started before every VM of the earlier waves settled.
async fn until_final(p: &P<'_>, id: &str) -> PlanRun {
    for _ in 0..60 {
        let v = call(p, json!({"action": "plan_status", "plan_run_id": id})).await;
        let r: PlanRun = serde_json::from_value(v[0].clone()).unwrap();
        for (w, wave) in r.waves.iter().enumerate().skip(1) {
            if wave.vms.iter().any(|v| v.run_id.is_some()) {
                assert!(
                    r.waves[..w].iter().all(|e| e.ended_at.is_some()),
                    "wave {} started before wave {w} ended: {r:#?}",
                    w + 1
                );
            }
        }
        if r.phase.is_final() {
            return r;
        }
    }
    panic!("the plan run did not end");
}

#[tokio::test]
async fn a_drill_of_a_plan_runs_its_waves_in_order_writes_drill_dns_and_cleans_up() {
    let w = world().await;
    let env = snapshot_env(&w.store, &w.ebs);
    let p = PlanEnv {
        dr: &env,
        dns: &w.dns,
        cmd: &w.ssm,
        witness: &w.witness,
    };
    let put = call(&p, json!({"action": "plan_put", "text": PLAN})).await;
    assert_eq!(put["ok"], true, "{put}");
    assert_eq!(
        call(&p, json!({"action": "plan_show", "name": "shop"})).await,
        json!(PLAN)
    );

    let v = call(
        &p,
        json!({"action": "plan_start", "plan": "shop", "drill": true}),
    )
    .await;
    let r: PlanRun = serde_json::from_value(v).unwrap();
    assert_eq!(r.point_time, at(45), "the newest point every VM has");
    assert!(
        r.waves[1].vms.iter().all(|v| v.run_id.is_none()),
        "wave 2 waits"
    );
    let r = until_final(&p, &r.plan_run_id).await;
    assert_eq!(r.phase, PlanPhase::Done, "{:#?}", r.log);
    // Wave 2 started after wave 1 ended.
    assert!(r.waves[1].started_at >= r.waves[0].ended_at);
    // Every VM from the one point time, as a drill.
    for id in r.run_ids() {
        let run = pilotlight_dr::handler::status(&env, Some(id))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(run.point_time, Some(at(45)), "{id}");
        assert!(run.drill);
    }
    // Steps, then the health probe, on db-01's instance.
    let sent = w.ssm.snapshot().sent;
    let db = r.waves[0].vms[0].instance_id.clone().unwrap();
    let on_db: Vec<&str> = sent
        .iter()
        .filter(|(_, c)| c.instance_id == db)
        .map(|(_, c)| c.parameters["commands"][0].as_str())
        .collect();
    assert_eq!(
        on_db,
        [
            "systemctl start postgresql",
            "timeout 5 bash -c '</dev/tcp/127.0.0.1/5432'"
        ]
    );
    assert!(r.waves[0].vms[0]
        .commands
        .iter()
        .all(|(_, st, _)| st == "Success"));
    // DNS: only in the drill zone, at each instance's private address.
    let dns = w.dns.snapshot();
    assert!(
        dns.zones["ZREAL"].1.is_empty(),
        "a drill never touches the real zone"
    );
    let drill = &dns.zones["ZDRILL"].1;
    let names: Vec<&String> = drill.keys().collect();
    assert_eq!(
        names,
        [
            "app.drill.example.com.",
            "db.drill.example.com.",
            "www.drill.example.com."
        ]
    );
    let addr = env.ec2.inner.instance_address(&db).await.unwrap().unwrap();
    assert_eq!(drill["db.drill.example.com."].addresses, vec![addr]);
    assert_eq!(drill["db.drill.example.com."].ttl, 30);
    // One report, with the waves.
    let html = String::from_utf8(
        w.store
            .object(&format!("pilotlight-dr/runs/{}.html", r.plan_run_id))
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(
        html.contains("wave 2")
            && html.contains("db.drill.example.com")
            && html.contains("Done: every wave"),
        "{html}"
    );

    // Cleanup: every run's resources and every record.
    let v = call(
        &p,
        json!({"action": "plan_cleanup", "plan_run_id": r.plan_run_id}),
    )
    .await;
    let r: PlanRun = serde_json::from_value(v).unwrap();
    assert_eq!(r.phase, PlanPhase::CleanedUp, "{:?}", r.reason);
    assert!(w.dns.snapshot().zones["ZDRILL"].1.is_empty());
    for id in r.run_ids() {
        let run = pilotlight_dr::handler::status(&env, Some(id))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(run.phase, Phase::CleanedUp, "{id}");
    }
}

#[tokio::test]
async fn a_failing_vm_stops_the_plan_an_optional_one_does_not_and_real_dns_is_written() {
    let w = world().await;
    let env = snapshot_env(&w.store, &w.ebs);
    let p = PlanEnv {
        dr: &env,
        dns: &w.dns,
        cmd: &w.ssm,
        witness: &w.witness,
    };
    call(&p, json!({"action": "plan_put", "text": PLAN})).await;
    // The optional web-01's step fails: the plan still ends done; its records are not
    // written.
    w.ssm
        .state
        .lock()
        .unwrap()
        .fail
        .insert("Start-Web".into(), "web: exit 1".into());
    let v = call(&p, json!({"action": "plan_start", "plan": "shop"})).await;
    let r: PlanRun = serde_json::from_value(v).unwrap();
    let r = until_final(&p, &r.plan_run_id).await;
    assert_eq!(r.phase, PlanPhase::Done, "{:#?}", r.log);
    let web = &r.waves[1].vms[1];
    assert_eq!(web.stage, VmStage::Failed);
    assert!(
        web.reason.as_deref().unwrap().contains("web: exit 1"),
        "{web:?}"
    );
    let real = &w.dns.snapshot().zones["ZREAL"].1;
    assert!(real.contains_key("db.example.com.") && real.contains_key("app.example.com."));
    assert!(!real.contains_key("www.example.com."));
    // A real recovery is not a drill's to clean up.
    let e = pilotlight_dr::plans::handle(
        &p,
        json!({"action": "plan_cleanup", "plan_run_id": r.plan_run_id}),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("not a drill"), "{e}");

    // A required VM's failing step stops the plan: wave 2 never starts.
    let text = PLAN
        .replace(
            "vms = [\"app-01\", \"web-01\"]",
            "vms = [\"app-01\"]\n\n[[waves]]\nvms = [\"web-01\"]",
        )
        .replace("name = \"shop\"", "name = \"shop2\"");
    let put = call(&p, json!({"action": "plan_put", "text": text})).await;
    assert_eq!(put["ok"], true, "{put}");
    w.ssm
        .state
        .lock()
        .unwrap()
        .fail
        .insert("Start-App".into(), "app: exit 3".into());
    let v = call(
        &p,
        json!({"action": "plan_start", "plan": "shop2", "drill": true}),
    )
    .await;
    let r: PlanRun = serde_json::from_value(v).unwrap();
    let r = until_final(&p, &r.plan_run_id).await;
    assert_eq!(r.phase, PlanPhase::Failed);
    let why = r.reason.clone().unwrap();
    assert!(
        why.contains("wave 2") && why.contains("app-01") && why.contains("app: exit 3"),
        "{why}"
    );
    assert!(r.waves[2].vms[0].run_id.is_none(), "wave 3 never started");
    assert!(r.waves[2].started_at.is_none());
}

#[tokio::test]
async fn plans_with_unknown_vms_are_refused_and_nothing_is_stored() {
    let w = world().await;
    let env = snapshot_env(&w.store, &w.ebs);
    let p = PlanEnv {
        dr: &env,
        dns: &w.dns,
        cmd: &w.ssm,
        witness: &w.witness,
    };
    let text = PLAN.replace("vms = [\"db-01\"]", "vms = [\"db-01\", \"mail-01\"]");
    for action in ["plan_check", "plan_put"] {
        let v = call(&p, json!({"action": action, "text": text})).await;
        assert_eq!(v["ok"], false);
        assert_eq!(v["problems"][0]["line"], 12, "{v}");
        assert!(
            v["problems"][0]["message"]
                .as_str()
                .unwrap()
                .contains("unknown VM site1/mail-01"),
            "{v}"
        );
    }
    assert!(
        w.store.keys().iter().all(|k| !k.contains("plans/")),
        "nothing stored"
    );
    let e = pilotlight_dr::plans::handle(&p, json!({"action": "plan_start", "plan": "nope"}))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no plan nope"), "{e}");
    let e = pilotlight_dr::plans::handle(
        &p,
        json!({"action": "plan_start", "plan": "shop", "dril": true}),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, DrError::BadRequest(_)), "{e}");
    // A plan whose VMs share no point is refused before anything starts.
    points_of(&w.store, &w.ebs, "solo-01", &[1]).await;
    let solo = "name = \"solo\"\nsite = \"site1\"\n[[waves]]\nvms = [\"solo-01\", \"db-01\"]\n";
    call(&p, json!({"action": "plan_put", "text": solo})).await;
    let e = pilotlight_dr::plans::handle(&p, json!({"action": "plan_start", "plan": "solo"}))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("no point every VM of the plan has"),
        "{e}"
    );
}

/// A crash between starting a VM's run and recording it: the next look finds the run
/// (its group is the plan run) instead of starting a second instance of the VM.
#[tokio::test]
async fn a_run_started_but_not_recorded_is_found_not_started_twice() {
    let w = world().await;
    let env = snapshot_env(&w.store, &w.ebs);
    let p = PlanEnv {
        dr: &env,
        dns: &w.dns,
        cmd: &w.ssm,
        witness: &w.witness,
    };
    call(&p, json!({"action": "plan_put", "text": PLAN})).await;
    let v = call(
        &p,
        json!({"action": "plan_start", "plan": "shop", "drill": true}),
    )
    .await;
    let r: PlanRun = serde_json::from_value(v).unwrap();
    assert_eq!(r.waves[0].vms[0].stage, VmStage::Starting);
    // The start that happened before the crash (the record never heard of it).
    let settings: Value = serde_json::from_slice(
        &w.store
            .object("pilotlight-dr/vms/site1/db-01.json")
            .unwrap(),
    )
    .unwrap();
    let lost = start(
        &env,
        json!({"action": "start", "site": "site1", "vm": "db-01", "disks": settings["disks"],
               "recovery_point": {"point": r.point_time}, "method": "snapshot",
               "launch": settings["launch"], "drill": true, "group": r.plan_run_id}),
    )
    .await
    .unwrap();
    let r = until_final(&p, &r.plan_run_id).await;
    assert_eq!(r.phase, PlanPhase::Done, "{:#?}", r.log);
    assert_eq!(
        r.waves[0].vms[0].run_id.as_deref(),
        Some(lost.run_id.as_str())
    );
    let launched = env.ec2.inner.snapshot().instances.len();
    assert_eq!(launched, 3, "one instance per VM, none twice");
}
