//! The function's schedule (EventBridge, every 10 minutes): chains whose events were lost
//! move to their newest generation ([`crate::drive::sweep`]), retention and Snapshot Lock
//! ([`crate::prune`]), fanned-out exports whose tasks were lost or whose invocations died
//! ([`crate::export_fanout::sweep`]), then each disk's replication lag and the stack's largest as metric
//! lines ([`crate::emf::lag_lines`]): between points a disk publishes nothing, so this is
//! what makes a silent site's lag grow and the RPO alarm page.

use crate::drive::{self, Step};
use crate::error::ReplicaError;
use crate::prune::{self, Pruned};
use crate::Replica;
use chrono::{DateTime, Utc};
use pilotlight_cloud::ebs::EbsApi;
use pilotlight_cloud::sqs::Queue;
use pilotlight_cloud::ObjectStore;
use pilotlight_protocol::DiskId;

/// What one run of the schedule did.
#[derive(Debug)]
pub struct Tick {
    pub swept: Vec<(DiskId, Result<Step, String>)>,
    pub pruned: Pruned,
    /// Embedded-metric lines (each disk's lag, then the stack's largest and a heartbeat).
    pub lag_lines: Vec<String>,
    /// Fanned-out exports not answered yet, driven again.
    pub exports: Vec<String>,
}

pub async fn tick<S: ObjectStore, E: EbsApi, Q: Queue>(
    r: &Replica<S, E, Q>,
    now: impl Fn() -> DateTime<Utc> + Copy,
) -> Result<Tick, ReplicaError> {
    let swept = drive::sweep(r, now).await?;
    // The heads after the sweep: one listing serves retention and the lag.
    let heads = crate::chain::all(&r.store, &r.cfg.prefix, now()).await?;
    let pruned = prune::prune_with_heads(r, &heads, &r.cfg.tiers, now()).await?;
    let lag_lines = crate::emf::lag_lines(&r.cfg.stack, &heads, now());
    let exports = crate::export_fanout::sweep(r, heads.iter().map(|h| &h.disk), now()).await?;
    Ok(Tick {
        swept,
        pruned,
        lag_lines,
        exports,
    })
}
