//! `pilotlight-replica plan-capacity`: what a fleet of disks asks of snapshots mode, set
//! against the documented quotas (per account and region), and what it costs at list
//! prices. A model, not a bill: every input has a flag, every price is the us-east-1 list
//! price named next to it.
//!
//! Quotas (EBS endpoints and quotas, AWS General Reference; EBS direct APIs): 1 000
//! PutSnapshotBlock requests per second per snapshot and per account, StartSnapshot and
//! CompleteSnapshot 10 per second per account, 100 snapshots pending at once per account.

use serde::Serialize;

pub const PUT_PER_ACCOUNT: f64 = 1000.0;
pub const START_COMPLETE_PER_SECOND: f64 = 10.0;
pub const PENDING_PER_ACCOUNT: f64 = 100.0;
const BLOCK_GIB: f64 = 1.0 / 2048.0;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Protected disks.
    #[arg(long, default_value_t = 10)]
    pub disks: u64,
    /// Average disk size, GiB.
    #[arg(long, default_value_t = 100.0)]
    pub disk_gib: f64,
    /// Share of each disk changed per day, percent.
    #[arg(long, default_value_t = 5.0)]
    pub daily_change_pct: f64,
    /// Minutes between generations of a disk (the sender's schedule).
    #[arg(long, default_value_t = 15.0)]
    pub interval_minutes: f64,
    /// How much larger than the changed bytes the 512 KiB blocks written are (small,
    /// scattered changes touch whole blocks).
    #[arg(long, default_value_t = 1.3)]
    pub block_amplification: f64,
    /// Seconds EBS takes to turn a sealed snapshot `completed` (it stays pending until).
    #[arg(long, default_value_t = 60.0)]
    pub complete_seconds: f64,
    /// PutSnapshotBlock requests one invocation keeps in flight, and their latency (ms).
    #[arg(long, default_value_t = 16)]
    pub put_concurrency: u64,
    #[arg(long, default_value_t = 60.0)]
    pub put_latency_ms: f64,
    /// The function's memory, MB.
    #[arg(long, default_value_t = 1024.0)]
    pub lambda_mb: f64,
    /// Stored bytes as a share of the disks' size (allocated, not zero).
    #[arg(long, default_value_t = 1.0)]
    pub used_fraction: f64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub disks: u64,
    pub blocks_per_round: f64,
    pub rounds_per_day: f64,
    /// Seconds a round of every disk takes at each limit, and the one that binds.
    pub seconds_by_limit: Vec<(String, f64)>,
    pub binding_limit: String,
    pub round_seconds: f64,
    pub interval_seconds: f64,
    /// Accounts (or regions) needed so a round fits the interval.
    pub accounts_needed: u64,
    pub lambda_concurrency: u64,
    pub monthly: Vec<(String, f64)>,
    pub monthly_total: f64,
    pub image_mode_monthly_total: f64,
    pub drs_monthly_total: f64,
}

#[derive(Debug, thiserror::Error)]
#[error("plan-capacity: {0}")]
pub struct CapacityError(String);

pub fn estimate(a: &Args) -> Result<Estimate, CapacityError> {
    let positive = [
        ("--disks", a.disks as f64),
        ("--disk-gib", a.disk_gib),
        ("--interval-minutes", a.interval_minutes),
        ("--put-concurrency", a.put_concurrency as f64),
        ("--put-latency-ms", a.put_latency_ms),
        ("--lambda-mb", a.lambda_mb),
    ];
    if let Some((name, _)) = positive
        .iter()
        .find(|(_, v)| v.is_nan() || *v <= 0.0 || !v.is_finite())
    {
        return Err(CapacityError(format!("{name} must be more than 0")));
    }
    if !(0.0..=100.0).contains(&a.daily_change_pct) || a.block_amplification < 1.0 {
        return Err(CapacityError(
            "--daily-change-pct is 0 to 100, --block-amplification at least 1".into(),
        ));
    }
    let n = a.disks as f64;
    let rounds_per_day = 24.0 * 60.0 / a.interval_minutes;
    let changed_gib_day = a.disk_gib * a.daily_change_pct / 100.0;
    let blocks_per_disk_round =
        (changed_gib_day / rounds_per_day / BLOCK_GIB * a.block_amplification).max(1.0);
    let blocks_per_round = blocks_per_disk_round * n;
    let per_invocation = a.put_concurrency as f64 / (a.put_latency_ms / 1000.0);
    // A disk's point: its blocks at what one invocation writes (a large one is sharded),
    // then EBS completing it; it holds a pending snapshot all along.
    let write_seconds = blocks_per_disk_round / per_invocation.min(PUT_PER_ACCOUNT);
    let pending_seconds = write_seconds + a.complete_seconds;
    let limits = vec![
        (
            "PutSnapshotBlock 1 000/s per account".to_string(),
            blocks_per_round / PUT_PER_ACCOUNT,
        ),
        (
            "StartSnapshot and CompleteSnapshot 10/s".to_string(),
            n / START_COMPLETE_PER_SECOND,
        ),
        (
            "100 pending snapshots per account".to_string(),
            (n / PENDING_PER_ACCOUNT).ceil() * pending_seconds,
        ),
        ("one disk's own point".to_string(), pending_seconds),
    ];
    let (binding, round) = limits
        .iter()
        .cloned()
        .fold((String::new(), 0.0f64), |acc, (k, v)| {
            if v > acc.1 {
                (k, v)
            } else {
                acc
            }
        });
    let interval = a.interval_minutes * 60.0;
    // Shared account-wide limits scale with accounts; a disk's own point does not.
    let account_bound = limits[..3].iter().map(|l| l.1).fold(0.0, f64::max);
    let accounts = (account_bound / interval).ceil().max(1.0) as u64;
    let concurrency = (blocks_per_round / interval / per_invocation)
        .ceil()
        .max(1.0)
        .max((n / PENDING_PER_ACCOUNT).ceil().min(n)) as u64;

    // Monthly cost (30 days), us-east-1 list prices.
    let days = 30.0;
    let blocks_month = blocks_per_round * rounds_per_day * days;
    let stored_gib = n * a.disk_gib * a.used_fraction + n * changed_gib_day * days;
    let object_gib_day = n * changed_gib_day;
    let s3_puts = object_gib_day * 128.0 * days + n * rounds_per_day * days;
    let lambda_gb_s = blocks_month / per_invocation * a.lambda_mb / 1024.0;
    let monthly = vec![
        (
            "EBS snapshot storage ($0.05/GB-month)".to_string(),
            stored_gib * 0.05,
        ),
        (
            "PutSnapshotBlock ($0.006/1 000 blocks)".to_string(),
            blocks_month / 1000.0 * 0.006,
        ),
        (
            "GetSnapshotBlock, partial blocks ($0.003/1 000; a tenth of the blocks)".to_string(),
            blocks_month * 0.1 / 1000.0 * 0.003,
        ),
        (
            "S3 PUTs by senders ($0.005/1 000)".to_string(),
            s3_puts / 1000.0 * 0.005,
        ),
        (
            "S3 storage, objects kept 2 days ($0.023/GB-month)".to_string(),
            object_gib_day * 2.0 * 0.023,
        ),
        (
            "Lambda ($0.0000166667/GB-s, $0.20/M requests)".to_string(),
            lambda_gb_s * 0.000_016_666_7 + n * rounds_per_day * days * 3.0 / 1e6 * 0.2,
        ),
        (
            "SQS ($0.40/M requests)".to_string(),
            n * rounds_per_day * days * 6.0 / 1e6 * 0.4,
        ),
    ];
    let total: f64 = monthly.iter().map(|m| m.1).sum();
    // Image mode: the same points and objects, plus the receiver and its image volume
    // (m6i.large $0.096/h, gp3 $0.08/GB-month); one receiver per ~150 disks of 100 GiB.
    let receivers = (n * a.disk_gib / 16_384.0).ceil().max(1.0);
    let image = total + receivers * 0.096 * 730.0 + n * a.disk_gib * 0.08;
    // DRS: $0.028 per source server hour (a disk counted as a server: a lower bound),
    // replication servers (t3.small $0.0208/h, one per 15 disks), staging volumes (gp3
    // $0.08/GB-month), its snapshots (as ours).
    let drs = n * 0.028 * 730.0
        + (n / 15.0).ceil() * 0.0208 * 730.0
        + n * a.disk_gib * 0.08
        + stored_gib * 0.05;
    Ok(Estimate {
        disks: a.disks,
        blocks_per_round,
        rounds_per_day,
        seconds_by_limit: limits,
        binding_limit: binding,
        round_seconds: round,
        interval_seconds: interval,
        accounts_needed: accounts,
        lambda_concurrency: concurrency,
        monthly,
        monthly_total: total,
        image_mode_monthly_total: image,
        drs_monthly_total: drs,
    })
}

pub fn report(e: &Estimate) -> String {
    let mut s = format!(
        "{} disks: {:.0} blocks (512 KiB) per round, {:.0} rounds a day\n",
        e.disks, e.blocks_per_round, e.rounds_per_day
    );
    s.push_str("seconds a round of every disk needs, by limit:\n");
    for (k, v) in &e.seconds_by_limit {
        s.push_str(&format!("  {v:>10.1} s  {k}\n"));
    }
    s.push_str(&format!(
        "binding limit: {} ({:.0} s of a {:.0} s interval)\n",
        e.binding_limit, e.round_seconds, e.interval_seconds
    ));
    if e.accounts_needed > 1 {
        s.push_str(&format!(
            "split: the account-wide EBS limits need {} accounts (or regions) to keep up; one stack per account\n",
            e.accounts_needed
        ));
    } else {
        s.push_str("one account keeps up\n");
    }
    s.push_str(&format!(
        "Lambda: reserve a concurrency of about {}\n",
        e.lambda_concurrency
    ));
    s.push_str("monthly cost (us-east-1 list prices):\n");
    for (k, v) in &e.monthly {
        s.push_str(&format!("  ${v:>10.2}  {k}\n"));
    }
    s.push_str(&format!(
        "  ${:>10.2}  snapshots mode in all\n  ${:>10.2}  image mode (receiver and image volume added)\n  ${:>10.2}  AWS DRS for as many servers (service, replication servers, staging volumes, snapshots)\n",
        e.monthly_total, e.image_mode_monthly_total, e.drs_monthly_total
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: Args,
    }

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["t"];
        v.extend(extra);
        T::parse_from(v).a
    }

    #[test]
    fn ten_vms_fit_one_account_at_under_half_of_drs() {
        let e = estimate(&args(&[])).unwrap();
        assert_eq!(e.accounts_needed, 1);
        assert!(e.round_seconds < e.interval_seconds);
        assert!(e.monthly_total * 2.0 <= e.drs_monthly_total, "{e:#?}");
        assert!(e.monthly_total < e.image_mode_monthly_total);
    }

    #[test]
    fn a_thousand_disks_are_bound_by_the_pending_snapshot_quota() {
        let e = estimate(&args(&["--disks", "1000"])).unwrap();
        assert_eq!(e.binding_limit, "100 pending snapshots per account");
        let busy = estimate(&args(&["--disks", "1000", "--interval-minutes", "5"])).unwrap();
        assert!(busy.accounts_needed > 1, "{busy:#?}");
        assert!(report(&busy).contains("split"));
    }

    #[test]
    fn nonsense_inputs_are_refused() {
        assert!(estimate(&args(&["--disks", "0"])).is_err());
        assert!(estimate(&args(&["--daily-change-pct", "150"])).is_err());
        assert!(estimate(&args(&["--interval-minutes", "0"])).is_err());
    }
}
