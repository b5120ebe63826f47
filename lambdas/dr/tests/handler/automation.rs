//! Guarded automatic failover with a simulated clock: a plan runs once, only after the
//! site is silent and the witness says down continuously for the hold-down and a
//! countdown nobody cancelled; each reason not to act is logged.

use super::plans::{points_of, world, World, P, PLAN};
use super::*;
use chrono::Duration as D;
use pilotlight_dr::plans::automation::{self, AutoPhase, AutomationState};
use pilotlight_dr::plans::run::PlanEnv;

const AUTO: &str = r#"
[automation]
enabled = true
site_silent = "30m"
hold_down = "10m"
countdown = "15m"
witness = { cloudwatch_alarm = "primary-down" }
topic = "arn:aws:sns:us-east-1:123456789012:ops"
"#;

/// The newest generation of the plan's VMs is at 11:00 (`at(60)`).
fn t(minutes_after_newest: i64) -> chrono::DateTime<chrono::Utc> {
    at(60) + D::minutes(minutes_after_newest)
}

async fn setup<'a>(w: &'a World, extra: &str) -> Env<'a, Arc<MemoryEbs>> {
    let env = snapshot_env(&w.store, &w.ebs);
    let p = PlanEnv {
        dr: &env,
        dns: &w.dns,
        cmd: &w.ssm,
        witness: &w.witness,
    };
    let text = format!("{PLAN}{AUTO}{extra}");
    let v = pilotlight_dr::plans::handle(&p, json!({"action": "plan_put", "text": text}))
        .await
        .unwrap();
    assert_eq!(v["ok"], true, "{v}");
    env
}

async fn eval(p: &P<'_>, now: chrono::DateTime<chrono::Utc>) -> AutomationState {
    let plan = pilotlight_dr::plans::store::get(p.dr, "shop")
        .await
        .unwrap();
    automation::evaluate(p, &plan, now).await.unwrap()
}

fn plan_runs(store: &MemoryStore) -> usize {
    store
        .keys()
        .iter()
        .filter(|k| k.starts_with("pilotlight-dr/runs/plans/") && k.ends_with(".json"))
        .count()
}

fn logged(s: &AutomationState, what: &str) -> bool {
    s.decisions.iter().any(|d| d.what.contains(what))
}

#[tokio::test]
async fn silence_and_a_down_witness_held_then_a_countdown_run_the_plan_once() {
    let w = world().await;
    let env = setup(&w, "").await;
    let p = PlanEnv {
        dr: &env,
        dns: &w.dns,
        cmd: &w.ssm,
        witness: &w.witness,
    };
    w.witness.set_alarm("primary-down", "ALARM");
    // 20 minutes of silence: not yet.
    let s = eval(&p, t(20)).await;
    assert_eq!(s.phase, AutoPhase::Watching);
    assert!(
        logged(&s, "the site sent a generation"),
        "{:?}",
        s.decisions
    );
    // Silent 31 minutes and the witness down: the hold-down starts.
    let s = eval(&p, t(31)).await;
    assert!(logged(&s, "hold-down until"), "{:?}", s.decisions);
    assert_eq!(eval(&p, t(40)).await.phase, AutoPhase::Watching);
    // Held 10 minutes: the countdown, announced with how to cancel and the point.
    let s = eval(&p, t(41)).await;
    assert_eq!(s.phase, AutoPhase::Countdown, "{:?}", s.decisions);
    assert_eq!(s.point_time, Some(at(45)), "the plan's common point");
    let sent = w.witness.snapshot().sent;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, "arn:aws:sns:us-east-1:123456789012:ops");
    assert!(
        sent[0].2.contains("pilotlight-dr cancel shop") && sent[0].2.contains("REAL recovery"),
        "{}",
        sent[0].2
    );
    assert_eq!(plan_runs(&w.store), 0);
    assert_eq!(eval(&p, t(55)).await.phase, AutoPhase::Countdown);
    assert_eq!(plan_runs(&w.store), 0, "nothing before the countdown ends");
    // Countdown over: latched, the plan runs as a real recovery from the announced point.
    let s = eval(&p, t(56)).await;
    assert_eq!(s.phase, AutoPhase::Ran, "{:?}", s.decisions);
    let id = s.plan_run_id.clone().unwrap();
    let r = pilotlight_dr::plans::run::load_plan_run(&env, &id)
        .await
        .unwrap();
    assert!(!r.drill);
    // The run (and its report) says why it started.
    assert!(
        r.automation
            .iter()
            .any(|d| d.contains("triggered: site silent")),
        "{:?}",
        r.automation
    );
    let html = pilotlight_dr::report::plan::render(&r, t(56));
    assert!(html.contains("Started by guarded automatic failover") && html.contains("latched"));
    assert_eq!(r.point_time, at(45));
    // Never twice: later evaluations change nothing.
    for m in [60, 120, 600] {
        assert_eq!(eval(&p, t(m)).await.phase, AutoPhase::Ran);
    }
    assert_eq!(plan_runs(&w.store), 1);
    // A person re-arms: watching from nothing (a new hold-down before anything).
    let s = automation::arm(&env, "shop", t(700)).await.unwrap();
    assert_eq!(s.phase, AutoPhase::Watching);
    let s = eval(&p, t(701)).await;
    assert_eq!(s.phase, AutoPhase::Watching);
    assert_eq!(plan_runs(&w.store), 1);
}

#[tokio::test]
async fn a_flapping_witness_a_site_that_sends_again_and_a_cancel_run_nothing() {
    let w = world().await;
    let env = setup(&w, "").await;
    let p = PlanEnv {
        dr: &env,
        dns: &w.dns,
        cmd: &w.ssm,
        witness: &w.witness,
    };
    // The witness flaps: the hold-down starts over each time it says up.
    w.witness.set_alarm("primary-down", "ALARM");
    eval(&p, t(31)).await;
    w.witness.set_alarm("primary-down", "OK");
    let s = eval(&p, t(36)).await;
    assert!(
        logged(
            &s,
            "hold-down reset: the site is silent, but the witness says the primary is up"
        ),
        "{:?}",
        s.decisions
    );
    w.witness.set_alarm("primary-down", "ALARM");
    eval(&p, t(37)).await;
    let s = eval(&p, t(46)).await;
    assert_eq!(
        s.phase,
        AutoPhase::Watching,
        "only 9 minutes held: {:?}",
        s.decisions
    );
    // An alarm with no data is never counted as down.
    w.witness.set_alarm("primary-down", "INSUFFICIENT_DATA");
    let s = eval(&p, t(48)).await;
    assert!(logged(&s, "never counted as down"), "{:?}", s.decisions);
    // Into a countdown, then the site sends again: stopped, notified.
    w.witness.set_alarm("primary-down", "ALARM");
    eval(&p, t(50)).await;
    let s = eval(&p, t(60)).await;
    assert_eq!(s.phase, AutoPhase::Countdown);
    for vm in ["db-01", "app-01", "web-01"] {
        commit(
            &w.store,
            &DiskId::new("site1", vm, "disk0").unwrap(),
            9,
            60 + 65,
        );
    }
    let s = eval(&p, t(66)).await;
    assert_eq!(s.phase, AutoPhase::Watching);
    assert!(
        logged(&s, "countdown stopped: the site sent a generation"),
        "{:?}",
        s.decisions
    );
    assert!(w
        .witness
        .snapshot()
        .sent
        .iter()
        .any(|(_, subj, _)| subj.contains("stopped")));
    // Silent again for long enough, a countdown, and a person cancels it.
    eval(&p, t(65 + 31)).await;
    let s = eval(&p, t(65 + 41)).await;
    assert_eq!(s.phase, AutoPhase::Countdown);
    let s = automation::cancel(&env, "shop", t(65 + 42)).await.unwrap();
    assert_eq!(s.phase, AutoPhase::Cancelled);
    let s = eval(&p, t(65 + 200)).await;
    assert_eq!(s.phase, AutoPhase::Cancelled);
    assert!(logged(&s, "cancelled by a person"));
    assert_eq!(plan_runs(&w.store), 0);
}

#[tokio::test]
async fn two_evaluators_at_once_run_the_plan_once() {
    let w = world().await;
    let env = setup(&w, "").await;
    let p = PlanEnv {
        dr: &env,
        dns: &w.dns,
        cmd: &w.ssm,
        witness: &w.witness,
    };
    w.witness.set_alarm("primary-down", "ALARM");
    eval(&p, t(31)).await;
    eval(&p, t(41)).await;
    let plan = pilotlight_dr::plans::store::get(&env, "shop")
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        automation::evaluate(&p, &plan, t(57)),
        automation::evaluate(&p, &plan, t(57))
    );
    // One ran; the other lost the race (a conflict on the state, or the latch).
    assert!(a.is_ok() || b.is_ok(), "{a:?} {b:?}");
    assert_eq!(plan_runs(&w.store), 1);
    let s = eval(&p, t(58)).await;
    assert_eq!(s.phase, AutoPhase::Ran);
    assert_eq!(plan_runs(&w.store), 1);
}

#[tokio::test]
async fn a_failing_fence_and_a_running_drill_keep_the_plan_from_running() {
    let w = world().await;
    let env = setup(
        &w,
        "fence = { ssm_document = \"Fence-Primary\", instance_id = \"mi-0123456789abcdef0\" }\n",
    )
    .await;
    let p = PlanEnv {
        dr: &env,
        dns: &w.dns,
        cmd: &w.ssm,
        witness: &w.witness,
    };
    w.witness.set_alarm("primary-down", "ALARM");
    // A drill of a VM of the plan is under way: never both at once.
    let drill = start(&env, {
        let mut r = db01_request("snapshot", json!("latest"));
        r["vm"] = json!("db-01");
        r["disks"] = json!(["disk0"]);
        r
    })
    .await
    .unwrap();
    eval(&p, t(31)).await;
    eval(&p, t(41)).await;
    let s = eval(&p, t(57)).await;
    assert_eq!(s.phase, AutoPhase::Countdown);
    assert!(logged(&s, "a drill of db-01"), "{:?}", s.decisions);
    // The drill is cleaned up; the fence runs first and fails: nothing recovered.
    let mut drill = drill;
    advance_until_final(&env, &mut drill).await;
    assert_eq!(
        cleanup(&env, &drill.run_id).await.unwrap().phase,
        Phase::CleanedUp
    );
    w.ssm
        .state
        .lock()
        .unwrap()
        .fail
        .insert("Fence-Primary".into(), "ports still open".into());
    let s = eval(&p, t(58)).await;
    assert_eq!(s.phase, AutoPhase::Fencing, "{:?}", s.decisions);
    eval(&p, t(59)).await; // the fence is in progress
    let s = eval(&p, t(60)).await;
    assert_eq!(s.phase, AutoPhase::FenceFailed, "{:?}", s.decisions);
    assert!(logged(&s, "fence ended Failed"), "{:?}", s.decisions);
    assert_eq!(plan_runs(&w.store), 0);
    assert!(w
        .witness
        .snapshot()
        .sent
        .iter()
        .any(|(_, subj, _)| subj.contains("NOT run")));
    // The sent fence was the user's document on their instance.
    let sent = w.ssm.snapshot().sent;
    assert!(sent
        .iter()
        .any(|(_, c)| c.document == "Fence-Primary" && c.instance_id == "mi-0123456789abcdef0"));
    let _ = points_of; // (shared setup)
}

/// Rehearsing the trigger: `drill = true` goes through every step, and the plan runs as
/// a drill, without the fence.
#[tokio::test]
async fn a_rehearsal_runs_the_plan_as_a_drill_without_the_fence() {
    let w = world().await;
    let env = setup(
        &w,
        "drill = true\nfence = { ssm_document = \"Fence-Primary\", instance_id = \"mi-0123456789abcdef0\" }\n",
    )
    .await;
    let p = PlanEnv {
        dr: &env,
        dns: &w.dns,
        cmd: &w.ssm,
        witness: &w.witness,
    };
    w.witness.set_alarm("primary-down", "ALARM");
    eval(&p, t(31)).await;
    let s = eval(&p, t(41)).await;
    assert_eq!(s.phase, AutoPhase::Countdown);
    assert!(w.witness.snapshot().sent[0].2.contains("a DRILL"));
    let s = eval(&p, t(57)).await;
    assert_eq!(s.phase, AutoPhase::Ran, "{:?}", s.decisions);
    assert!(logged(&s, "as a drill"));
    let r = pilotlight_dr::plans::run::load_plan_run(&env, s.plan_run_id.as_deref().unwrap())
        .await
        .unwrap();
    assert!(r.drill);
    assert!(w
        .ssm
        .snapshot()
        .sent
        .iter()
        .all(|(_, c)| c.document != "Fence-Primary"));
}
