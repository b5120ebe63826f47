//! Scale: 1 000 disks through the in-memory twins with a realistic round trip (30 ms per
//! EBS call) and the documented EBS direct API quotas enforced (10 StartSnapshot and 10
//! CompleteSnapshot per second, 1 000 PutSnapshotBlock per second per account and per
//! snapshot, 100 pending snapshots), on a simulated clock, 50 invocations at once. Every
//! point must read back equal to its disk; the simulated time per round and the calls the
//! quotas refused are printed (`--no-capture`), and the binding limit is the one the
//! refusals name.
#![allow(clippy::unwrap_used)]

mod kit;

use kit::*;
use pilotlight_cloud::ebs::{Limits, MemoryEbs};
use std::time::Duration;

#[test]
fn a_thousand_disks_at_the_documented_limits_all_have_their_points() {
    paused(async {
        let case = Case {
            disks: 1000,
            gens: 2,
            tiny: true,
            ..Case::fixed(2026, 2)
        };
        let ebs = MemoryEbs {
            limits: Some(Limits::default()),
            ..MemoryEbs::new().with_latency(Duration::from_millis(30))
        };
        let mut w = World::with(2048, ebs);
        // The function's defaults, as deployed.
        w.r.cfg.retry = Default::default();
        w.r.cfg.settle_wait = Duration::from_secs(20);
        let model = w.publish(&case);
        let mut rounds = vec![];
        for g in 1..=case.gens {
            let before = tokio::time::Instant::now();
            w.deliver_generation(&case, g);
            w.run(50, None, 100_000).await;
            rounds.push(before.elapsed());
        }
        let stats = w.verify(&model).await;
        assert_eq!(stats.points, 2000);
        let throttled = w.ebs.throttled();
        println!(
            "1000 disks, 50 invocations at once, 30 ms per EBS call, documented quotas:\n\
             round 1 (full points): {:.0} s simulated; round 2 (incremental): {:.0} s\n\
             calls refused by the quotas: {throttled:?}\n\
             StartSnapshot calls {}, CompleteSnapshot {}, PutSnapshotBlock {}, DescribeSnapshots {}",
            rounds[0].as_secs_f64(),
            rounds[1].as_secs_f64(),
            w.ebs.faults.calls("StartSnapshot"),
            w.ebs.faults.calls("CompleteSnapshot"),
            w.ebs.faults.calls("PutSnapshotBlock"),
            w.ebs.faults.calls("DescribeSnapshots"),
        );
        // 2 000 StartSnapshot and 2 000 CompleteSnapshot at 10 a second each cannot take
        // less than 200 s of simulated time per round of 1 000; the quota binds.
        assert!(rounds.iter().all(|r| r.as_secs() >= 100), "{rounds:?}");
        assert!(
            throttled.get("StartSnapshot").copied().unwrap_or(0) > 0,
            "{throttled:?}"
        );
    });
}
