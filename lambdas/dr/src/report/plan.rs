//! The report of a plan run: one self-contained HTML page (`{runs_prefix}{id}.html`, like
//! a run's), written when the plan ends or is cleaned up. Waves on one timeline (each
//! wave and each VM from its start to ready), each VM's RTO (plan start to ready), its
//! steps and probes with their SSM status, the DNS records written and removed, and why
//! anything failed. Every string is escaped.

use super::{duration, esc, page, row, time};
use crate::plans::run::{PlanPhase, PlanRun, VmStage};
use chrono::{DateTime, Utc};
use std::fmt::Write;

fn secs(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_milliseconds().max(0) as f64 / 1000.0
}

/// Bars on one time axis: `(label, from, to, colour)`, seconds from the plan's start.
fn bars(rows: &[(String, f64, f64, &str)]) -> String {
    let total = rows.iter().map(|r| r.2).fold(0.001_f64, f64::max);
    let (label_w, bar_w, row_h) = (160.0, 520.0, 26.0);
    let width = label_w + bar_w + 120.0;
    let axis_y = row_h * rows.len() as f64 + 10.0;
    let height = axis_y + 28.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="Waves of the plan on a timeline" width="{width}" height="{height}" viewBox="0 0 {width} {height}">"#
    );
    for (i, (label, from, to, fill)) in rows.iter().enumerate() {
        let y = row_h * i as f64;
        let x = label_w + bar_w * from / total;
        let w = (bar_w * (to - from) / total).max(2.0);
        let _ = write!(
            svg,
            r#"<text x="{tx}" y="{ty}" text-anchor="end" class="label">{l}</text><rect x="{x:.1}" y="{ry}" width="{w:.1}" height="{rh}" rx="3" fill="{fill}"/><text x="{dx:.1}" y="{ty}" class="secs">{d}</text>"#,
            tx = label_w - 8.0,
            ty = y + 17.0,
            ry = y + 4.0,
            rh = row_h - 8.0,
            l = esc(label),
            d = esc(&duration(to - from)),
            dx = x + w + 6.0,
        );
    }
    let _ = write!(
        svg,
        r##"<line x1="{label_w}" y1="{axis_y}" x2="{x2}" y2="{axis_y}" stroke="#555"/><text x="{label_w}" y="{ty}" class="tick">0 s</text><text x="{x2}" y="{ty}" text-anchor="end" class="tick">{end}</text></svg>"##,
        x2 = label_w + bar_w,
        ty = axis_y + 18.0,
        end = esc(&duration(total)),
    );
    svg
}

pub fn render(r: &PlanRun, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let (text, good) = match r.phase {
        PlanPhase::Done => (
            "Done: every wave recovered, verified and healthy".to_string(),
            true,
        ),
        PlanPhase::CleanedUp => (
            "Cleaned up: every run's resources and record removed".to_string(),
            true,
        ),
        PlanPhase::Failed => (
            format!("Failed: {}", r.reason.as_deref().unwrap_or("")),
            false,
        ),
        PlanPhase::Running => ("Running".to_string(), true),
    };
    let _ = write!(
        out,
        "<p class=\"outcome {}\">{}</p><table>",
        if good { "good" } else { "bad" },
        esc(&text)
    );
    row(&mut out, "Plan run", &r.plan_run_id);
    row(
        &mut out,
        "Plan",
        &format!("{} (site {})", r.plan.name, r.plan.site),
    );
    row(
        &mut out,
        "Kind",
        if r.drill { "drill" } else { "real recovery" },
    );
    row(&mut out, "Recovery point (every VM)", &time(r.point_time));
    row(&mut out, "Started", &time(r.created_at));
    out.push_str("</table><h2>Waves</h2>");
    let start = r.created_at;
    let mut rows = Vec::new();
    for (i, w) in r.waves.iter().enumerate() {
        if let Some(s) = w.started_at {
            rows.push((
                format!("wave {}", i + 1),
                secs(start, s),
                secs(start, w.ended_at.unwrap_or(now)),
                "#4a78b5",
            ));
        }
        for v in &w.vms {
            if let Some(s) = v.started_at {
                let colour = if v.stage == VmStage::Failed {
                    "#c0392b"
                } else {
                    "#5aa05a"
                };
                rows.push((
                    format!("  {}", v.vm),
                    secs(start, s),
                    secs(start, v.ready_at.unwrap_or(now)),
                    colour,
                ));
            }
        }
    }
    if rows.is_empty() {
        out.push_str("<p>No wave started.</p>");
    } else {
        out.push_str(&bars(&rows));
    }
    out.push_str("<table class=\"list\"><tr><th>Wave</th><th>VM</th><th>Run</th><th>Stage</th><th>RTO</th><th>Steps and probes</th></tr>");
    for (i, w) in r.waves.iter().enumerate() {
        for v in &w.vms {
            let rto = v
                .ready_at
                .map_or("-".to_string(), |t| duration(secs(start, t)));
            let cmds: Vec<String> = v
                .commands
                .iter()
                .map(|(what, st, _)| format!("{what}: {st}"))
                .collect();
            let stage = match &v.reason {
                Some(why) => format!("{:?}: {why}", v.stage),
                None => format!(
                    "{:?}{}",
                    v.stage,
                    if v.optional { " (optional)" } else { "" }
                ),
            };
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                i + 1,
                esc(&v.vm),
                esc(v.run_id.as_deref().unwrap_or("-")),
                esc(&stage),
                esc(&rto),
                esc(&cmds.join("; "))
            );
        }
    }
    out.push_str("</table><h2>DNS</h2>");
    if r.dns.is_empty() {
        out.push_str("<p>No records written.</p>");
    } else {
        out.push_str("<table class=\"list\"><tr><th>Record</th><th>Address</th><th>Zone</th><th>Written</th><th>Removed</th></tr>");
        for c in &r.dns {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&c.record.name),
                esc(&c.record.addresses.join(", ")),
                esc(&c.zone_id),
                esc(&time(c.written_at)),
                esc(&c.removed_at.map_or("-".to_string(), time))
            );
        }
        out.push_str("</table>");
    }
    if !r.automation.is_empty() {
        out.push_str("<h2>Started by guarded automatic failover</h2><pre>");
        for l in &r.automation {
            out.push_str(&esc(l));
            out.push('\n');
        }
        out.push_str("</pre>");
    }
    out.push_str("<h2>What happened</h2><pre>");
    for l in &r.log {
        out.push_str(&esc(l));
        out.push('\n');
    }
    out.push_str("</pre>");
    page(
        &format!("pilotlight plan report: {}", r.plan.name),
        &format!(
            "<meta name=\"pilotlight-plan-run\" content=\"{} {}\">",
            esc(&r.plan_run_id),
            r.updated_at.to_rfc3339()
        ),
        &out,
        &format!(
            "the plan run record <code>plans/{}.json</code>",
            esc(&r.plan_run_id)
        ),
        now,
    )
}
