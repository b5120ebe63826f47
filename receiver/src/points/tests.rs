use super::*;

#[test]
fn blocks_cover_touched_extents() {
    let b = BLOCK_SIZE;
    let r = block_ranges([
        Extent::new(0, 512),
        Extent::new(b - 512, 1024),
        Extent::new(10 * b, b),
        Extent::new(3 * b + 4096, 0),
    ]);
    assert_eq!(r, vec![(0, 2), (10, 11)]);
    assert_eq!(volume_gib(1), 1);
    assert_eq!(volume_gib(1 << 30), 1);
    assert_eq!(volume_gib((1 << 30) + 512), 2);
}

/// Points that settle at the same time are polled together: one DescribeSnapshots per
/// round for all of them (the `snapshot-id` filter), not one per point per round. Ten
/// sealed snapshots that EBS reports `pending` once: two calls in all, not twenty.
#[tokio::test(start_paused = true)]
async fn points_settling_together_share_one_describe_call_a_round() {
    use pilotlight_cloud::ebs::MemoryEbs;
    let ebs = Arc::new(MemoryEbs {
        settle_describes: 1,
        ..MemoryEbs::new()
    });
    let mut cfg = PointsConfig::new("t");
    cfg.retry_base = Duration::from_millis(50);
    let pw = PointWriter::new(ebs.clone(), cfg);
    let mut sids = Vec::new();
    for i in 0..10u8 {
        let sid = ebs
            .start_snapshot(&StartSnapshot {
                volume_size_gib: 1,
                parent: None,
                description: format!("d{i}"),
                tags: vec![],
                client_token: format!("token-{i}"),
                encrypted: None,
                kms_key_arn: None,
                timeout_minutes: 60,
            })
            .await
            .unwrap();
        let data = Bytes::from(vec![i; BLOCK_SIZE as usize]);
        let digest: [u8; 32] = Sha256::digest(&data).into();
        ebs.put_snapshot_block(&sid, 0, data, &block_checksum(&digest))
            .await
            .unwrap();
        let status = ebs
            .complete_snapshot(&sid, 1, &linear_checksum([&digest]))
            .await
            .unwrap();
        assert_eq!(status, SnapshotStatus::Pending);
        sids.push(sid);
    }
    let before = ebs.calls("DescribeSnapshots");
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    let phase = Phase::default();
    let settled = futures::future::join_all(sids.iter().map(|s| pw.settle(s, far, &phase))).await;
    for s in settled {
        assert_eq!(s.unwrap(), Sealed::Completed);
    }
    assert_eq!(ebs.calls("DescribeSnapshots") - before, 2);
    assert_eq!(PointCalls::get(&pw.calls.describe_snapshots), 2);
    assert_eq!(
        phase.calls(),
        20,
        "each point polled twice, in two shared calls"
    );
}
