//! The drill and recovery report: one self-contained HTML page per run (no scripts, no
//! fonts, no external references), kept beside the run record as
//! `{runs_prefix}{run_id}.html` and written when the run ends. It says what an auditor
//! asks of a test failover: which VM, from which point (the RPO achieved), how long each
//! phase took (the RTO achieved, drawn as an SVG timeline), with which launch settings,
//! whether the instance passed verification, what was created and removed, and why
//! anything failed.
//!
//! Everything in a run record can come from a request or from AWS: every string is
//! escaped before it reaches the page.

pub mod failback;
pub mod plan;

use crate::model::{Created, Phase, Run};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::fmt::Write;

/// HTML text and attribute escaping.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Planned => "planned",
        Phase::Exporting => "exporting",
        Phase::Importing => "importing",
        Phase::Registering => "registering",
        Phase::Launching => "launching",
        Phase::Verifying => "verifying",
        Phase::Done => "done",
        Phase::Failed => "failed",
        Phase::CleanedUp => "cleaned up",
    }
}

fn phase_colour(p: Phase) -> &'static str {
    match p {
        Phase::Exporting => "#6c8ebf",
        Phase::Importing => "#9673a6",
        Phase::Registering => "#d79b00",
        Phase::Launching => "#82b366",
        Phase::Verifying => "#3a9e8f",
        _ => "#999999",
    }
}

/// `1 h 2 min 3.4 s`, `2 min 5.0 s`, `0.3 s`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 0.995 {
        return format!("{s:.2} s");
    }
    // Rounded before splitting, so 59.96 s reads "1 min 0.0 s", never "60.0 s".
    let tenths = (s * 10.0).round() as u64;
    let (h, m) = (tenths / 36_000, (tenths % 36_000) / 600);
    let rest = (tenths % 600) as f64 / 10.0;
    match (h, m) {
        (0, 0) => format!("{rest:.1} s"),
        (0, m) => format!("{m} min {rest:.1} s"),
        (h, m) => format!("{h} h {m} min {:.0} s", rest.floor()),
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn seconds_between(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_milliseconds() as f64 / 1000.0
}

/// The run's VM as `site/vm`, from the request or its disks.
pub fn vm_of(run: &Run) -> String {
    let field = |k: &str| run.request.get(k).and_then(Value::as_str);
    match (field("site"), field("vm")) {
        (Some(s), Some(v)) => format!("{s}/{v}"),
        _ => run
            .disks
            .first()
            .and_then(|d| d.disk.rsplit_once('/').map(|(vm, _)| vm.to_string()))
            .unwrap_or_else(|| "(no VM: the request was not readable)".into()),
    }
}

/// The outcome in a few words, and whether it is good news.
fn outcome(run: &Run) -> (String, bool) {
    let verified = run.verification.as_ref().map(|v| v.passed);
    match run.phase {
        Phase::Planned => ("Planned (dry run): nothing was created".into(), true),
        Phase::Failed => ("FAILED".into(), false),
        Phase::Done | Phase::CleanedUp if verified == Some(false) => {
            ("Launched, verification FAILED".into(), false)
        }
        Phase::Done | Phase::CleanedUp => {
            let what = if run.drill { "Drill" } else { "Recovery" };
            let cleaned = if run.phase == Phase::CleanedUp {
                ", cleaned up"
            } else {
                ""
            };
            let checked = if verified == Some(true) {
                " and verified"
            } else {
                ""
            };
            (format!("{what} succeeded: running{checked}{cleaned}"), true)
        }
        p => (format!("In progress ({})", phase_name(p)), true),
    }
}

/// The phases as SVG: one bar per phase on a shared time axis, with its duration.
fn timeline(run: &Run, now: DateTime<Utc>) -> String {
    if run.phases.is_empty() {
        return "<p>No phases ran.</p>".into();
    }
    let start = run.created_at;
    let end_of = |p: &crate::model::PhaseTime| p.ended_at.unwrap_or(now);
    let total = run
        .phases
        .iter()
        .map(|p| seconds_between(start, end_of(p)))
        .fold(0.0_f64, f64::max)
        .max(0.001);
    let (label_w, bar_w, row_h, top) = (120.0, 560.0, 30.0, 10.0);
    let width = label_w + bar_w + 150.0;
    let axis_y = top + row_h * run.phases.len() as f64 + 6.0;
    let height = axis_y + 30.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="Timeline of the run's phases" width="{width}" height="{height}" viewBox="0 0 {width} {height}">"#
    );
    for (i, p) in run.phases.iter().enumerate() {
        let y = top + row_h * i as f64;
        let from = seconds_between(start, p.started_at).max(0.0);
        let secs = p
            .seconds
            .unwrap_or_else(|| seconds_between(p.started_at, end_of(p)))
            .max(0.0);
        let x = label_w + bar_w * from / total;
        let w = (bar_w * secs / total).max(2.0);
        let name = phase_name(p.phase);
        let open = if p.ended_at.is_none() {
            " (running)"
        } else {
            ""
        };
        let _ = write!(
            svg,
            r#"<text x="{tx}" y="{ty}" text-anchor="end" class="label">{name}</text><rect class="bar" x="{x:.1}" y="{ry}" width="{w:.1}" height="{rh}" rx="3" fill="{fill}"><title>{name}: {d}</title></rect><text x="{dx:.1}" y="{ty}" class="secs">{d}{open}</text>"#,
            tx = label_w - 8.0,
            ty = y + 19.0,
            ry = y + 5.0,
            rh = row_h - 10.0,
            fill = phase_colour(p.phase),
            d = esc(&duration(secs)),
            dx = x + w + 6.0,
        );
    }
    // The axis: start, quarters, end.
    let _ = write!(
        svg,
        r##"<line x1="{label_w}" y1="{axis_y}" x2="{x2}" y2="{axis_y}" stroke="#555"/>"##,
        x2 = label_w + bar_w
    );
    for q in 0..=4 {
        let x = label_w + bar_w * q as f64 / 4.0;
        let _ = write!(
            svg,
            r##"<line x1="{x:.1}" y1="{axis_y}" x2="{x:.1}" y2="{t}" stroke="#555"/><text x="{x:.1}" y="{ty}" text-anchor="middle" class="tick">{label}</text>"##,
            t = axis_y + 5.0,
            ty = axis_y + 20.0,
            label = esc(&duration(total * q as f64 / 4.0)),
        );
    }
    svg.push_str("</svg>");
    svg
}

fn row(out: &mut String, key: &str, value: &str) {
    let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", esc(key), esc(value));
}

fn resources(out: &mut String, title: &str, items: &[Created], none: &str) {
    let _ = write!(out, "<h2>{}</h2>", esc(title));
    if items.is_empty() {
        let _ = write!(out, "<p>{}</p>", esc(none));
        return;
    }
    out.push_str("<table class=\"list\"><tr><th>Kind</th><th>Id</th><th>At</th></tr>");
    for c in items {
        let _ = write!(
            out,
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
            esc(c.kind.as_str()),
            esc(&c.id),
            esc(&time(c.at))
        );
    }
    out.push_str("</table>");
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:60em;color:#222;padding:0 1em}\
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}\
.outcome{font-size:1.2em;font-weight:600;padding:.5em .8em;border-radius:4px}.good{background:#e3f4e1;color:#1f5f1b}.bad{background:#fbe3e1;color:#8a1c12}\
table{border-collapse:collapse;margin:.4em 0}th,td{text-align:left;padding:.25em .8em .25em 0;vertical-align:top}th{white-space:nowrap}\
table.list th{border-bottom:1px solid #ccc}code,pre{font-family:ui-monospace,'DejaVu Sans Mono',monospace;font-size:.9em}\
pre{background:#f6f6f6;padding:.6em;overflow-x:auto}.label,.secs,.tick{font-size:12px;fill:#222}.tick{fill:#555}\
.figures{display:flex;gap:2em}.figure{font-size:1.6em;font-weight:600}.caption{color:#555;font-size:.85em}footer{margin-top:2em;color:#777;font-size:.8em}";

/// Names the version of the run record a report was written from, so a stored report
/// older than its record is known as such.
pub fn stamp(run: &Run) -> String {
    format!(
        "<meta name=\"pilotlight-run\" content=\"{} {}\">",
        esc(&run.run_id),
        run.updated_at.to_rfc3339()
    )
}

fn kind(run: &Run) -> &'static str {
    if run.drill {
        "DR drill"
    } else {
        "DR recovery"
    }
}

/// The page around a body: head (title, the record's stamp, the style sheet) and footer.
fn page(title: &str, stamp: &str, body: &str, from: &str, now: DateTime<Utc>) -> String {
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">{stamp}<title>{title}</title><style>{STYLE}</style></head><body><h1>{title}</h1>{body}<footer>Written by pilotlight {} at {} from {from}.</footer></body></html>\n",
        env!("CARGO_PKG_VERSION"),
        esc(&time(now)),
        title = esc(title),
    )
}

/// The report of `run`, as of `now` (only phases still running use it).
pub fn render(run: &Run, now: DateTime<Utc>) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        "<p>Run <code>{}</code>{}</p>",
        esc(&run.run_id),
        run.group.as_ref().map_or(String::new(), |g| format!(
            ", one VM of group <code>{}</code>",
            esc(g)
        )),
    );
    section(&mut body, run, now);
    page(
        &format!("pilotlight {} report: {}", kind(run), vm_of(run)),
        &stamp(run),
        &body,
        &format!("the run record <code>{}.json</code>", esc(&run.run_id)),
        now,
    )
}

/// The report of a recovery of several VMs: a summary line per VM, then each run's
/// report with its headings one level down.
pub fn render_group(group: &str, runs: &[Run], now: DateTime<Utc>) -> String {
    let mut body = String::new();
    let ok = runs.iter().filter(|r| outcome(r).1).count();
    let _ = write!(
        body,
        "<p>Group <code>{}</code>: {} VMs, each recovered independently; {ok} without failure.</p>",
        esc(group),
        runs.len()
    );
    body.push_str("<table class=\"list\"><tr><th>VM</th><th>Run</th><th>Method</th><th>Outcome</th><th>RPO achieved</th><th>RTO achieved</th></tr>");
    for r in runs {
        let _ = write!(
            body,
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&vm_of(r)),
            esc(&r.run_id),
            r.method.map_or("-", |m| m.as_str()),
            esc(&outcome(r).0),
            esc(&r.point_age_seconds.map_or("unknown".into(), duration)),
            esc(&duration(r.recovery_seconds(now))),
        );
    }
    body.push_str("</table>");
    for r in runs {
        let mut one = String::new();
        section(&mut one, r, now);
        let _ = write!(
            body,
            "<h2>{}</h2><p>Run <code>{}</code></p>{}",
            esc(&vm_of(r)),
            esc(&r.run_id),
            // Every string from a record is escaped: these tags are only the section's own.
            one.replace("<h2>", "<h3>").replace("</h2>", "</h3>")
        );
    }
    let kind = runs.first().map_or("DR", kind);
    page(
        &format!("pilotlight {kind} report: group {group}"),
        "",
        &body,
        "the group's run records",
        now,
    )
}

/// One run's report: outcome, figures, run, timeline, disks, launch settings,
/// verification, resources, failures (sub-headings `h2`).
fn section(out: &mut String, run: &Run, now: DateTime<Utc>) {
    let vm = vm_of(run);
    let (said, good) = outcome(run);
    let _ = write!(
        out,
        "<p class=\"outcome {}\">{}</p>",
        if good { "good" } else { "bad" },
        esc(&said),
    );

    // The two promises, as achieved.
    let rto = run.recovery_seconds(now);
    let rpo = run.point_age_seconds.map_or("unknown".into(), duration);
    let _ = write!(
        out,
        "<div class=\"figures\"><div><div class=\"figure rpo\">{}</div><div class=\"caption\">RPO achieved: the recovery point's age when the run started</div></div><div><div class=\"figure rto\">{}</div><div class=\"caption\">RTO achieved: start to the end of its last phase{}</div></div></div>",
        esc(&rpo),
        esc(&duration(rto)),
        if run.phase.is_final() { "" } else { " (still going)" },
    );

    out.push_str("<h2>Run</h2><table>");
    row(out, "VM", &vm);
    row(
        out,
        "Kind",
        if run.drill {
            "drill (a test: cleaned up afterwards, production untouched)"
        } else {
            "recovery"
        },
    );
    if let Some(m) = run.method {
        // The reason names the method already ("snapshot: as asked").
        let said = match &run.method_reason {
            Some(r) if r.starts_with(m.as_str()) => r.clone(),
            Some(r) => format!("{}: {r}", m.as_str()),
            None => m.as_str().to_string(),
        };
        row(out, "Method", &said);
    }
    if let Some(t) = run.point_time {
        row(out, "Recovery point", &time(t));
    }
    row(out, "Started", &time(run.created_at));
    if run.phase.is_final() {
        row(out, "Ended", &time(run.updated_at));
    }
    row(out, "Outcome", phase_name(run.phase));
    out.push_str("</table>");

    out.push_str("<h2>Timeline (RTO per phase)</h2>");
    out.push_str(&timeline(run, now));

    out.push_str("<h2>Disks</h2>");
    if run.disks.is_empty() {
        out.push_str("<p>None resolved.</p>");
    } else {
        out.push_str("<table class=\"list\"><tr><th>Disk</th><th>Generation</th><th>Source</th><th>SHA-256</th></tr>");
        for d in &run.disks {
            let source = match (&d.snapshot_id, &d.image_key) {
                (Some(s), _) if run.method == Some(crate::model::Method::Snapshot) => {
                    format!("recovery point snapshot {s}")
                }
                (_, Some(k)) => format!(
                    "exported to {k}{}",
                    d.size.map_or(String::new(), |s| format!(" ({s} bytes)"))
                ),
                (Some(s), None) => format!("recovery point snapshot {s}"),
                (None, None) => "export requested".into(),
            };
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                esc(&d.disk),
                d.generation,
                esc(&source),
                esc(d.sha256.as_deref().unwrap_or("-"))
            );
        }
        out.push_str("</table>");
    }

    out.push_str("<h2>Launch settings</h2><table>");
    match run.request.get("launch").and_then(Value::as_object) {
        Some(launch) if !launch.is_empty() => {
            for (k, v) in launch {
                let shown = match v {
                    Value::String(s) => s.clone(),
                    Value::Array(a) if !a.is_empty() => a
                        .iter()
                        .map(|x| x.as_str().map_or_else(|| x.to_string(), String::from))
                        .collect::<Vec<_>>()
                        .join(", "),
                    Value::Object(o) if !o.is_empty() => o
                        .iter()
                        .map(|(k, x)| {
                            format!(
                                "{k}={}",
                                x.as_str().map_or_else(|| x.to_string(), String::from)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    Value::Null | Value::Array(_) | Value::Object(_) => continue,
                    other => other.to_string(),
                };
                row(out, &k.replace('_', " "), &shown);
            }
        }
        _ => row(out, "Launch", "not given"),
    }
    out.push_str("</table>");

    out.push_str("<h2>Verification</h2>");
    match &run.verification {
        Some(v) => {
            out.push_str("<table>");
            row(out, "Result", if v.passed { "passed" } else { "FAILED" });
            row(out, "Instance", &v.instance_id);
            row(out, "State", &v.state);
            row(out, "Instance status check", &v.instance_status);
            row(out, "System status check", &v.system_status);
            row(
                out,
                "SSM agent",
                v.ssm_ping
                    .as_deref()
                    .unwrap_or("not checked (no instance profile)"),
            );
            row(out, "Checked at", &time(v.checked_at));
            out.push_str("</table>");
            if let Some(tail) = &v.console_tail {
                let _ = write!(
                    out,
                    "<p>Console output, last lines:</p><pre>{}</pre>",
                    esc(tail)
                );
            }
        }
        None => out.push_str("<p>Not verified (no instance was launched).</p>"),
    }

    resources(
        out,
        "Resources created",
        &run.created,
        "None: nothing was created.",
    );
    if run.drill {
        resources(
            out,
            "Removed by cleanup",
            &run.removed,
            if run.phase == Phase::CleanedUp {
                "Nothing needed removing."
            } else {
                "Not cleaned up yet (`pilotlight-dr cleanup RUN_ID`)."
            },
        );
    }
    if !run.held.is_empty() {
        let _ = write!(
            out,
            "<p>Recovery point snapshots held by this run: <code>{}</code></p>",
            esc(&run.held.join(", "))
        );
    }

    out.push_str("<h2>Failures</h2>");
    match (&run.reason, run.phase) {
        (Some(r), Phase::Failed) => {
            let _ = write!(out, "<p class=\"outcome bad\">{}</p>", esc(r));
        }
        (Some(r), _) if run.verification.as_ref().is_some_and(|v| !v.passed) => {
            let _ = write!(out, "<p class=\"outcome bad\">{}</p>", esc(r));
        }
        _ => out.push_str("<p>None.</p>"),
    }
}

#[cfg(test)]
mod tests;
