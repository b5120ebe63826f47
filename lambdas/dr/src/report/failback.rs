//! The failback report: one self-contained HTML page per failback, kept beside its record
//! (`{runs_prefix}failback/{run_id}.html`) once it is returned or failed. It says what a
//! person signing off the way home asks: from which recovery, which return snapshots
//! were taken and kept, what each disk's newest round wrote and whether it was verified,
//! how long the cutover took (the downtime of coming home), and what happened, in order.
//! Every string is escaped: the sender's rounds and AWS's answers are untrusted.

use super::{duration, esc, page, row, time};
use crate::failback::{Failback, FailbackPhase};
use chrono::{DateTime, Utc};
use std::fmt::Write;

/// The report of `fb` as of `now`.
pub fn render(fb: &Failback, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let (text, good) = match fb.phase {
        FailbackPhase::Returned => (
            "Returned: every disk's final round wrote and verified the final return snapshot"
                .to_string(),
            true,
        ),
        FailbackPhase::Failed => (
            format!(
                "Failed: {}",
                fb.reason.as_deref().unwrap_or("no reason recorded")
            ),
            false,
        ),
        p => (format!("Under way: {p:?}"), true),
    };
    let _ = write!(
        out,
        "<p class=\"outcome {}\">{}</p>",
        if good { "good" } else { "bad" },
        esc(&text)
    );
    out.push_str("<table>");
    row(&mut out, "Recovery run", &fb.run_id);
    row(&mut out, "VM", &format!("{}/{}", fb.site, fb.vm));
    row(&mut out, "Instance", &fb.instance_id);
    row(&mut out, "Started", &time(fb.created_at));
    if let Some(c) = fb.cutover_at {
        row(&mut out, "Cutover asked", &time(c));
    }
    if let Some(r) = fb.returned_at {
        row(&mut out, "Returned", &time(r));
        if let Some(c) = fb.cutover_at {
            // The instance stops at cutover; the site's VM starts after the final rounds.
            let secs = (r - c).num_milliseconds().max(0) as f64 / 1000.0;
            row(&mut out, "Cutover took", &duration(secs));
        }
    }
    row(
        &mut out,
        "Schedule",
        &format!(
            "a return set every {}, the newest {} kept",
            duration(fb.every_seconds as f64),
            fb.keep
        ),
    );
    out.push_str("</table>");

    out.push_str("<h2>Disks</h2><table class=\"list\"><tr><th>Disk</th><th>Device, volume</th><th>Point</th><th>Newest round</th><th>Written</th><th>Verified</th></tr>");
    for d in &fb.disks {
        let (round, written, verified) = match &d.round {
            Some(r) => (
                format!(
                    "{} to {}{}{} in {}",
                    r.target,
                    r.snapshot_id,
                    if r.r#final { " (final)" } else { "" },
                    if r.drill { ", a drill" } else { "" },
                    duration(r.seconds)
                ),
                match (r.rounds, r.total_bytes_written, r.disk_bytes) {
                    (Some(n), Some(moved), Some(size)) if size > 0 => format!(
                        "{} blocks, {} bytes this round; {n} rounds moved {moved} bytes, {:.2} % of the {size}-byte disk",
                        r.blocks_written,
                        r.bytes_written,
                        moved as f64 * 100.0 / size as f64
                    ),
                    _ => format!("{} blocks, {} bytes", r.blocks_written, r.bytes_written),
                },
                if r.verified { "yes" } else { "NO" },
            ),
            None => ("none yet".into(), "-".into(), "-"),
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{} <code>{}</code></td><td><code>{}</code> (generation {})</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&d.disk.to_string()),
            esc(&d.device),
            esc(&d.volume_id),
            esc(&d.point_snapshot),
            d.point_generation,
            esc(&round),
            esc(&written),
            verified
        );
    }
    out.push_str("</table>");

    out.push_str("<h2>Return sets</h2><table class=\"list\"><tr><th>Set</th><th>Requested</th><th>State</th><th>Snapshots</th></tr>");
    for s in &fb.sets {
        let snaps: Vec<&str> = s.snapshots.iter().map(|(_, id)| id.as_str()).collect();
        let _ = write!(
            out,
            "<tr><td>{}{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            esc(&s.set_id),
            if s.r#final { " (final)" } else { "" },
            esc(&time(s.requested_at)),
            esc(&s.state),
            esc(&snaps.join(", "))
        );
    }
    out.push_str("</table>");

    out.push_str("<h2>What happened</h2><pre>");
    for line in &fb.log {
        out.push_str(&esc(line));
        out.push('\n');
    }
    out.push_str("</pre>");
    page(
        &format!("pilotlight failback report: {}/{}", fb.site, fb.vm),
        &format!(
            "<meta name=\"pilotlight-failback\" content=\"{} {}\">",
            esc(&fb.run_id),
            fb.updated_at.to_rfc3339()
        ),
        &out,
        &format!(
            "the failback record <code>failback/{}.json</code>",
            esc(&fb.run_id)
        ),
        now,
    )
}
