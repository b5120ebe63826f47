use super::*;

const GOOD: &str = r#"name = "shop"
site = "site1"

[dns]
zone_id = "Z0123456789ABC"
zone = "example.com"
ttl = 60
drill_zone_id = "Z0DRILL"
drill_zone = "drill.example.com"

[[waves]]
vms = ["db-01"]

[[waves]]
vms = ["app-01", "web-01"]

[vms.db-01]
dns = ["db.example.com"]
health = { tcp = 5432 }
steps = [{ document = "AWS-RunShellScript", parameters = { commands = ["systemctl start postgresql"] } }]

[vms.web-01]
optional = true
dns = ["www.example.com."]
health = { http = "http://127.0.0.1/healthz" }
"#;

#[test]
fn a_good_plan_reads_wave_by_wave() {
    let p = parse(GOOD).unwrap();
    assert_eq!(p.name, "shop");
    assert_eq!(
        p.waves,
        vec![
            vec!["db-01".to_string()],
            vec!["app-01".into(), "web-01".into()]
        ]
    );
    assert_eq!(p.vm("db-01").health, Some(Health::Tcp(5432)));
    assert_eq!(
        p.vm("db-01").steps[0].parameters["commands"],
        vec!["systemctl start postgresql"]
    );
    assert!(p.vm("web-01").optional);
    assert_eq!(p.vm("web-01").dns, vec!["www.example.com"]);
    assert_eq!(p.vm("app-01"), VmPlan::default());
    assert_eq!(
        p.drill_name("db.example.com").as_deref(),
        Some("db.drill.example.com")
    );
    assert_eq!(p.dns.as_ref().unwrap().ttl, 60);
}

/// `plan check`'s refusals: each with its line and reason (issue: unknown VM, a VM in
/// two waves, an empty wave, a DNS name outside the zone; and the rest).
#[test]
fn a_malformed_plan_is_refused_with_each_line_and_reason() {
    let cases: &[(&str, usize, &str)] = &[
        ("name = \"shop\"\nsite = \"site1\"\n[[waves]]\nvms = [\"a\"]\n[[waves]]\nvms = [\"b\", \"a\"]\n", 6, "in wave 1 and again in wave 2"),
        ("name = \"shop\"\nsite = \"site1\"\n[[waves]]\nvms = [\"a\"]\n[[waves]]\nvms = []\n", 5, "wave 2 is empty"),
        ("name = \"shop\"\nsite = \"site1\"\n[dns]\nzone_id = \"Z\"\nzone = \"example.com\"\n[[waves]]\nvms = [\"a\"]\n[vms.a]\ndns = [\"a.example.org\"]\n", 9, "outside the zone example.com"),
        ("name = \"shop\"\nsite = \"site1\"\n[[waves]]\nvms = [\"a\"]\n[vms.a]\ndns = [\"a.example.com\"]\n", 6, "needs a [dns] zone"),
        ("name = \"shop\"\nsite = \"site1\"\n[[waves]]\nvms = [\"a\"]\n[vms.b]\noptional = true\n", 5, "in no wave"),
        ("name = \"shop\"\nsite = \"site1\"\n[[waves]]\nvms = [\"../a\"]\n", 4, "not a VM name"),
        ("name = \"shop\"\nsite = \"site1\"\n[[waves]]\nvms = [\"a\"]\n[vms.a]\nhelth = { tcp = 1 }\n", 6, "unknown field `helth`"),
        ("name = \"shop\"\nsite = \"site1\"\n[[waves]]\nvms = [\"a\"\n", 5, "expected `]`"),
        ("name = \"shop\"\nsite = \"site1\"\n[[waves]]\nvms = [\"a\"]\n[vms.a]\nhealth = { http = \"ftp://x\" }\n", 5, "not an http"),
    ];
    for (text, line, why) in cases {
        let problems = parse(text).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.line == Some(*line) && p.message.contains(why)),
            "{text}\n=> {problems:?}"
        );
    }
    let none = parse("name = \"shop\"\nsite = \"site1\"\n").unwrap_err();
    assert!(none[0].message.contains("no waves"), "{none:?}");
    assert!(parse(&"#".repeat(MAX_PLAN_BYTES + 1)).is_err());
    // Several problems: all of them, in line order.
    let many = parse(
        "name = \"shop\"\nsite = \"site1\"\n[[waves]]\nvms = []\n[[waves]]\nvms = [\"a\", \"a\"]\n",
    )
    .unwrap_err();
    assert_eq!(many.len(), 2, "{many:?}");
    assert!(many[0].line < many[1].line);
}

#[test]
fn automation_is_off_unless_on_and_its_durations_are_checked_with_their_line() {
    assert_eq!(parse(GOOD).unwrap().automation, None);
    let on = format!("{GOOD}\n[automation]\nenabled = true\nsite_silent = \"30m\"\nhold_down = \"10m\"\ncountdown = \"15m\"\nwitness = {{ route53_health_check = \"abcd\" }}\n");
    let a = parse(&on).unwrap().automation.unwrap();
    assert!(a.enabled);
    assert_eq!(
        (
            a.site_silent_seconds,
            a.hold_down_seconds,
            a.countdown_seconds
        ),
        (1800, 600, 900)
    );
    assert_eq!(
        a.witness,
        pilotlight_cloud::witness::Witness::Route53HealthCheck("abcd".into())
    );
    let line = GOOD.lines().count() + 2;
    for (bad, why) in [
        (on.replace("\"10m\"", "\"soon\""), "hold_down \"soon\""),
        (on.replace("\"15m\"", "\"5s\""), "at least 60 seconds"),
        (
            on.replace("route53_health_check", "pager"),
            "unknown variant",
        ),
    ] {
        let problems = parse(&bad).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.message.contains(why) && p.line.is_some_and(|l| l >= line - 1)),
            "{problems:?}"
        );
    }
}
