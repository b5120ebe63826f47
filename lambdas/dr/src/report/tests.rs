use super::*;
use crate::model::{Method, ResourceKind, RunDisk, Verification};
use chrono::TimeZone;

fn at(s: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 29, 10, 0, 0).unwrap() + chrono::Duration::seconds(s)
}

fn drill() -> Run {
    let request = serde_json::json!({
        "action": "start", "site": "site1", "vm": "db-01", "drill": true,
        "disks": ["disk0"],
        "launch": {"instance_type": "t3.small", "subnet_id": "subnet-1", "tags": {}}
    });
    let mut run = Run::new("dr-1".into(), request, at(0));
    run.method = Some(Method::Snapshot);
    run.method_reason = Some("asked for".into());
    run.request["launch"]["security_group_ids"] = serde_json::json!(["sg-1", "sg-2"]);
    run.point_time = Some(at(-600));
    run.point_age_seconds = Some(600.0);
    run.disks.push(RunDisk {
        disk: "site1/db-01/disk0".into(),
        generation: 3,
        export_id: "e".into(),
        image_key: None,
        size: None,
        sha256: None,
        snapshot_id: Some("snap-1".into()),
    });
    run.enter(Phase::Registering, at(0));
    run.record(ResourceKind::Image, "ami-1", at(1));
    run.enter(Phase::Launching, at(5));
    run.record(ResourceKind::Instance, "i-1", at(6));
    run.enter(Phase::Verifying, at(7));
    run.verification = Some(Verification {
        passed: true,
        instance_id: "i-1".into(),
        state: "running".into(),
        instance_status: "ok".into(),
        system_status: "ok".into(),
        checked_at: at(67),
        console_tail: None,
        ssm_ping: None,
    });
    run.enter(Phase::Done, at(67));
    run
}

#[test]
fn a_report_names_the_figures_phases_and_resources() {
    let run = drill();
    let html = render(&run, at(100));
    for want in [
        "site1/db-01",
        "Drill succeeded: running and verified",
        "10 min 0.0 s", // RPO: the point's age
        "1 min 7.0 s",  // RTO: start to end
        "registering",
        "launching",
        "verifying",
        "5.0 s", // registering's bar
        "ami-1",
        "i-1",
        "t3.small",
        "Method</th><td>snapshot: asked for<",
        "Not cleaned up yet",
        "sg-1, sg-2",
    ] {
        assert!(html.contains(want), "{want} missing from the report");
    }
    // One bar per phase, and nothing loaded from anywhere.
    assert_eq!(html.matches("<rect class=\"bar\"").count(), 3);
    for external in ["<script", "src=", "href=", "@import", "url("] {
        assert!(
            !html.contains(external),
            "{external} in a self-contained page"
        );
    }
    // A cleanup long after does not count in the recovery time.
    let mut cleaned = run.clone();
    cleaned.enter(Phase::CleanedUp, at(4000));
    let html = render(&cleaned, at(4000));
    assert!(html.contains("figure rto\">1 min 7.0 s<"), "{html}");
    assert!(html.contains("running and verified, cleaned up"));
}

#[test]
fn every_string_from_the_record_is_escaped() {
    let mut run = drill();
    run.request["vm"] = Value::String("<script>alert(1)</script>".into());
    run.request["launch"]["instance_type"] = Value::String("\"><img src=x>".into());
    run.fail("bad <b>thing</b> & more", at(80));
    let html = render(&run, at(100));
    assert!(!html.contains("<script>alert"), "{html}");
    assert!(!html.contains("<img"), "{html}");
    assert!(!html.contains("<b>thing"), "{html}");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("bad &lt;b&gt;thing&lt;/b&gt; &amp; more"));
    assert!(html.contains("FAILED"));
}

#[test]
fn a_group_report_sums_up_each_vm_then_shows_each_run() {
    let ok = drill();
    let mut bad = drill();
    bad.run_id = "dr-2".into();
    bad.request["vm"] = Value::String("<h2>web</h2>".into());
    bad.fail("no point <at> 10:35", at(70));
    let html = render_group("grp-1", &[ok, bad], at(100));
    assert!(html.contains("2 VMs, each recovered independently; 1 without failure"));
    assert!(html.contains("<h2>site1/db-01</h2>"));
    // A name that looks like a heading stays text, before and after the headings move.
    assert!(
        html.contains("<h2>site1/&lt;h2&gt;web&lt;/h2&gt;</h2>"),
        "{html}"
    );
    assert!(!html.contains("<h3>web"));
    assert_eq!(html.matches("<h3>Timeline (RTO per phase)</h3>").count(), 2);
    assert_eq!(html.matches("<svg").count(), 2);
    assert!(html.contains("no point &lt;at&gt; 10:35"));
    assert!(!html.contains("figure rpo\" id"));
}

#[test]
fn a_run_still_going_draws_its_open_phase_up_to_now() {
    let mut run = drill();
    run.phase = Phase::Verifying;
    let last = run.phases.last_mut().unwrap();
    last.ended_at = None;
    last.seconds = None;
    let html = render(&run, at(30));
    assert!(html.contains("23.0 s (running)"), "{html}");
    assert!(html.contains("In progress (verifying)"));
    let none = render(&Run::new("dr-2".into(), Value::Null, at(0)), at(1));
    assert!(none.contains("No phases ran") && none.contains("the request was not readable"));
}

#[test]
fn phase_times_are_drawn_in_order() {
    let run = drill();
    let html = render(&run, at(100));
    let pos = |s: &str| html.find(s).unwrap();
    assert!(pos(">registering<") < pos(">launching<"));
    assert!(pos(">launching<") < pos(">verifying<"));
}

#[test]
fn durations_read_naturally() {
    assert_eq!(duration(0.26), "0.26 s");
    assert_eq!(duration(2.26), "2.3 s");
    assert_eq!(duration(65.0), "1 min 5.0 s");
    assert_eq!(duration(3725.0), "1 h 2 min 5 s");
    assert_eq!(duration(-3.0), "0.00 s");
    assert_eq!(duration(59.96), "1 min 0.0 s");
    assert_eq!(duration(0.999), "1.0 s");
    assert_eq!(duration(3599.99), "1 h 0 min 0 s");
}
