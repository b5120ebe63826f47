use super::*;

fn block(byte: u8) -> (Bytes, String, [u8; 32]) {
    let data = Bytes::from(vec![byte; BLOCK_SIZE as usize]);
    let d: [u8; 32] = Sha256::digest(&data).into();
    (data, block_checksum(&d), d)
}

fn start(parent: Option<&str>, token: &str) -> StartSnapshot {
    StartSnapshot {
        volume_size_gib: 1,
        parent: parent.map(String::from),
        description: "t".into(),
        tags: vec![("k".into(), "v".into())],
        client_token: token.into(),
        encrypted: None,
        kms_key_arn: None,
        timeout_minutes: 60,
    }
}

/// Every row of the "Encryption outcomes for EBS direct APIs" tables (EBS User
/// Guide): unencrypted parent, encrypted parent, no parent; encryption by default on
/// and off.
#[tokio::test]
async fn start_snapshot_follows_the_encryption_outcomes_table() {
    const KEY: &str = "arn:aws:kms:eu-west-1:111122223333:key/k";
    let req = |parent: Option<&str>, enc: Option<bool>, key: bool, token: &str| StartSnapshot {
        encrypted: enc,
        kms_key_arn: key.then(|| KEY.to_string()),
        ..start(parent, token)
    };
    for by_default in [false, true] {
        let ebs = MemoryEbs {
            encryption_by_default: by_default,
            ..MemoryEbs::new()
        };
        let outcome = |r: StartSnapshot| {
            let ebs = &ebs;
            async move {
                match ebs.start_snapshot(&r).await {
                    Ok(id) => {
                        let s = ebs.get(&id).unwrap();
                        Ok((s.encrypted, s.kms_key_arn))
                    }
                    Err(e) => {
                        assert_eq!(e.code.as_deref(), Some("ValidationException"), "{e}");
                        Err(())
                    }
                }
            }
        };
        // No parent.
        let default_outcome = if by_default {
            Ok((true, None))
        } else {
            Ok((false, None))
        };
        assert_eq!(outcome(req(None, None, false, "n1")).await, default_outcome);
        assert_eq!(outcome(req(None, None, true, "n2")).await, Err(()));
        assert_eq!(
            outcome(req(None, Some(true), false, "n3")).await,
            Ok((true, None))
        );
        assert_eq!(
            outcome(req(None, Some(true), true, "n4")).await,
            Ok((true, Some(KEY.into())))
        );
        let unencrypted = if by_default {
            Err(())
        } else {
            Ok((false, None))
        };
        assert_eq!(
            outcome(req(None, Some(false), false, "n5")).await,
            unencrypted
        );
        assert_eq!(outcome(req(None, Some(false), true, "n6")).await, Err(()));

        // Parents, completed: one encrypted with the key, one not (made before
        // encryption by default was turned on).
        let enc_parent = {
            let id = ebs
                .start_snapshot(&req(None, Some(true), true, "pe"))
                .await
                .unwrap();
            ebs.complete_snapshot(&id, 0, &linear_checksum([]))
                .await
                .unwrap();
            id
        };
        let plain_parent = {
            let id = ebs.start_snapshot(&start(None, "pp")).await.unwrap();
            ebs.complete_snapshot(&id, 0, &linear_checksum([]))
                .await
                .unwrap();
            lock(&ebs.state).snapshots.get_mut(&id).unwrap().encrypted = false;
            id
        };
        // Encrypted parent: inherited with its key; anything specified fails.
        assert_eq!(
            outcome(req(Some(&enc_parent), None, false, "e1")).await,
            Ok((true, Some(KEY.into())))
        );
        for (enc, key, t) in [
            (None, true, "e2"),
            (Some(true), false, "e3"),
            (Some(true), true, "e4"),
            (Some(false), false, "e5"),
            (Some(false), true, "e6"),
        ] {
            assert_eq!(
                outcome(req(Some(&enc_parent), enc, key, t)).await,
                Err(()),
                "{t}"
            );
        }
        // Unencrypted parent: unencrypted only with encryption by default off and
        // nothing specified.
        let plain_child = if by_default {
            Err(())
        } else {
            Ok((false, None))
        };
        assert_eq!(
            outcome(req(Some(&plain_parent), None, false, "u1")).await,
            plain_child
        );
        for (enc, key, t) in [
            (None, true, "u2"),
            (Some(true), false, "u3"),
            (Some(false), false, "u4"),
        ] {
            assert_eq!(
                outcome(req(Some(&plain_parent), enc, key, t)).await,
                Err(()),
                "{t}"
            );
        }
    }
    // What the receiver sends is valid in every case.
    assert_eq!(
        StartSnapshot::encryption(Some("snap-1"), Some(KEY)),
        (None, None)
    );
    assert_eq!(StartSnapshot::encryption(None, None), (None, None));
    assert_eq!(
        StartSnapshot::encryption(None, Some(KEY)),
        (Some(true), Some(KEY.to_string()))
    );
}

async fn write(ebs: &MemoryEbs, parent: Option<&str>, token: &str, blocks: &[(u64, u8)]) -> String {
    let id = ebs.start_snapshot(&start(parent, token)).await.unwrap();
    let mut digests = BTreeMap::new();
    for (i, b) in blocks {
        let (data, sum, d) = block(*b);
        ebs.put_snapshot_block(&id, *i, data, &sum).await.unwrap();
        digests.insert(*i, d);
    }
    let st = ebs
        .complete_snapshot(
            &id,
            digests.len() as u64,
            &linear_checksum(digests.values()),
        )
        .await
        .unwrap();
    assert_eq!(st, SnapshotStatus::Completed);
    id
}

#[tokio::test]
async fn a_child_inherits_and_outlives_its_parent() {
    let ebs = MemoryEbs::new();
    let a = write(&ebs, None, "a", &[(0, 1), (5, 2)]).await;
    let b = write(&ebs, Some(&a), "b", &[(5, 3), (7, 4)]).await;
    ebs.delete_snapshot(&a).await.unwrap();
    let blocks = ebs.list_snapshot_blocks(&b).await.unwrap();
    assert_eq!(
        blocks.iter().map(|b| b.index).collect::<Vec<_>>(),
        [0, 5, 7]
    );
    let got = ebs.get_snapshot_block(&b, &blocks[1]).await.unwrap();
    assert_eq!(got[0], 3);
    let got = ebs.get_snapshot_block(&b, &blocks[0]).await.unwrap();
    assert_eq!(got[0], 1);
    assert!(ebs
        .list_snapshot_blocks(&a)
        .await
        .unwrap_err()
        .is_not_found());
}

#[tokio::test]
async fn checksums_sizes_and_states_are_enforced() {
    let ebs = MemoryEbs::new();
    let id = ebs.start_snapshot(&start(None, "t")).await.unwrap();
    // Same token: same snapshot.
    assert_eq!(ebs.start_snapshot(&start(None, "t")).await.unwrap(), id);
    let (data, sum, d) = block(9);
    let (_, wrong, _) = block(8);
    let e = ebs
        .put_snapshot_block(&id, 0, data.clone(), &wrong)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid);
    let e = ebs
        .put_snapshot_block(&id, 0, data.slice(..512), &sum)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("524288"), "{e}");
    let e = ebs
        .put_snapshot_block(&id, 2048, data.clone(), &sum)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("beyond"), "{e}");
    ebs.put_snapshot_block(&id, 1, data, &sum).await.unwrap();
    // Not completed: not readable, and not a parent.
    assert!(ebs.list_snapshot_blocks(&id).await.is_err());
    assert!(ebs.start_snapshot(&start(Some(&id), "c")).await.is_err());
    // A wrong aggregate sends it to error.
    let st = ebs
        .complete_snapshot(&id, 1, &linear_checksum([&[0u8; 32]]))
        .await
        .unwrap();
    assert_eq!(st, SnapshotStatus::Error);
    let good = linear_checksum([&d]);
    assert!(ebs.complete_snapshot(&id, 1, &good).await.is_err());
    // A missing parent is "not found".
    assert!(ebs
        .start_snapshot(&start(Some("snap-nope"), "d"))
        .await
        .unwrap_err()
        .is_not_found());
}

#[tokio::test]
async fn completion_settles_and_listing_pages() {
    let ebs = MemoryEbs {
        settle_describes: 2,
        page_size: 2,
        ..MemoryEbs::new()
    };
    let id = ebs.start_snapshot(&start(None, "s")).await.unwrap();
    let mut ds = vec![];
    for i in 0..5 {
        let (data, sum, d) = block(i as u8 + 1);
        ebs.put_snapshot_block(&id, i, data, &sum).await.unwrap();
        ds.push(d);
    }
    let st = ebs
        .complete_snapshot(&id, 5, &linear_checksum(&ds))
        .await
        .unwrap();
    assert_eq!(st, SnapshotStatus::Pending);
    let f = SnapshotFilter::default().tag("k", "v");
    let mut states = vec![];
    for _ in 0..3 {
        states.push(ebs.describe_snapshots(&f).await.unwrap()[0].status);
    }
    assert_eq!(
        states,
        [
            SnapshotStatus::Pending,
            SnapshotStatus::Pending,
            SnapshotStatus::Completed
        ]
    );
    assert_eq!(ebs.list_snapshot_blocks(&id).await.unwrap().len(), 5);
    assert_eq!(ebs.faults.calls("ListSnapshotBlocks"), 3);
}

/// Writes `blocks` (index, byte) into a new snapshot on `parent` and completes it.
async fn snapshot_with(
    ebs: &MemoryEbs,
    parent: Option<&str>,
    token: &str,
    blocks: &[(u64, u8)],
) -> String {
    let id = ebs.start_snapshot(&start(parent, token)).await.unwrap();
    let mut digests = BTreeMap::new();
    for &(i, b) in blocks {
        let (data, sum, d) = block(b);
        ebs.put_snapshot_block(&id, i, data, &sum).await.unwrap();
        digests.insert(i, d);
    }
    let n = digests.len() as u64;
    ebs.complete_snapshot(&id, n, &linear_checksum(digests.values()))
        .await
        .unwrap();
    id
}

/// Every page of ListChangedBlocks, following NextToken through empty pages.
async fn all_changed(ebs: &MemoryEbs, a: &str, b: &str, from: u64) -> Vec<ChangedBlock> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    let mut calls = 0;
    loop {
        let start = token
            .as_deref()
            .map_or(PageStart::Index(from), PageStart::Token);
        let page = ebs.list_changed_blocks_page(a, b, start).await.unwrap();
        calls += 1;
        assert!(calls < 1000, "paging does not end");
        out.extend(page.blocks);
        match page.next_token {
            Some(t) => token = Some(t),
            None => return out,
        }
    }
}

/// ListChangedBlocks (API reference and the ChangedBlock type): the blocks that differ
/// between two snapshots of one lineage, each with its token in the snapshots that have
/// it; pages of at most MaxResults, possibly empty with a next token (EBS direct APIs
/// FAQ); StartingBlockIndex starts a listing part way; two snapshots of different
/// lineages are refused with Reason UNRELATED_SNAPSHOTS; a pending snapshot cannot be
/// read.
#[tokio::test]
async fn list_changed_blocks_follows_the_api_reference() {
    for (page_size, empty_pages) in [(10_000, false), (1, true), (2, false)] {
        let ebs = MemoryEbs {
            page_size,
            empty_pages,
            ..MemoryEbs::new()
        };
        let point = snapshot_with(&ebs, None, "p", &[(0, 1), (1, 1), (2, 1), (7, 1)]).await;
        // The recovered instance's writes: block 1 rewritten, 5 new, 7 rewritten with the
        // same bytes (a write is a change, whatever it wrote).
        let back = snapshot_with(&ebs, Some(&point), "r1", &[(1, 2), (5, 2), (7, 1)]).await;
        let changed = all_changed(&ebs, &point, &back, 0).await;
        let summary: Vec<(u64, bool, bool)> = changed
            .iter()
            .map(|c| (c.index, c.first.is_some(), c.second.is_some()))
            .collect();
        assert_eq!(
            summary,
            [(1, true, true), (5, false, true), (7, true, true)]
        );
        for c in &changed {
            let tok = c.second.clone().unwrap();
            let data = ebs
                .get_snapshot_block(
                    &back,
                    &BlockRef {
                        index: c.index,
                        token: tok,
                    },
                )
                .await
                .unwrap();
            assert_eq!(data[0], if c.index == 7 { 1 } else { 2 });
        }
        // Part way, and the other direction.
        let later: Vec<u64> = all_changed(&ebs, &point, &back, 2)
            .await
            .iter()
            .map(|c| c.index)
            .collect();
        assert_eq!(later, [5, 7]);
        let reverse: Vec<(u64, bool)> = all_changed(&ebs, &back, &point, 0)
            .await
            .iter()
            .map(|c| (c.index, c.second.is_some()))
            .collect();
        assert_eq!(reverse, [(1, true), (5, false), (7, true)]);
        // A grandchild compares with its grandparent: one lineage.
        let back2 = snapshot_with(&ebs, Some(&back), "r2", &[(9, 3)]).await;
        let idx: Vec<u64> = all_changed(&ebs, &point, &back2, 0)
            .await
            .iter()
            .map(|c| c.index)
            .collect();
        assert_eq!(idx, [1, 5, 7, 9]);
        let idx: Vec<u64> = all_changed(&ebs, &back, &back2, 0)
            .await
            .iter()
            .map(|c| c.index)
            .collect();
        assert_eq!(idx, [9]);

        // Another lineage: refused with the reason, not an empty difference.
        let other = snapshot_with(&ebs, None, "o", &[(1, 2)]).await;
        let e = ebs
            .list_changed_blocks_page(&point, &other, PageStart::Index(0))
            .await
            .unwrap_err();
        assert_eq!(e.code.as_deref(), Some(UNRELATED_SNAPSHOTS), "{e}");
        // A pending snapshot is not readable; a made-up token is refused.
        let pending = ebs
            .start_snapshot(&start(Some(&point), "pend"))
            .await
            .unwrap();
        let e = ebs
            .list_changed_blocks_page(&point, &pending, PageStart::Index(0))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        let e = ebs
            .list_changed_blocks_page(&point, &back, PageStart::Token("zzz"))
            .await
            .unwrap_err();
        assert_eq!(e.code.as_deref(), Some("INVALID_PAGE_TOKEN"), "{e}");
        // ListSnapshotBlocks pages the same way.
        let mut blocks = Vec::new();
        let mut start_at = PageStart::Index(0);
        let mut token;
        loop {
            let page = ebs
                .list_snapshot_blocks_page(&back2, start_at)
                .await
                .unwrap();
            blocks.extend(page.blocks.into_iter().map(|b| b.index));
            match page.next_token {
                Some(t) => {
                    token = t;
                    start_at = PageStart::Token(&token);
                }
                None => break,
            }
        }
        assert_eq!(blocks, [0, 1, 2, 5, 7, 9]);
        assert_eq!(ebs.list_snapshot_blocks(&back2).await.unwrap().len(), 6);
    }
}

/// StartSnapshot's Timeout: a pending snapshot idle (no block written, not completed)
/// for that long is cancelled: it reads as `error`, and accepts no more blocks.
#[tokio::test(start_paused = true)]
async fn an_idle_pending_snapshot_times_out_into_error() {
    let ebs = MemoryEbs::new();
    let id = ebs.start_snapshot(&start(None, "t1")).await.unwrap();
    let (data, sum, _) = block(1);
    tokio::time::advance(Duration::from_secs(59 * 60)).await;
    // A write within the timeout keeps it alive ...
    ebs.put_snapshot_block(&id, 0, data.clone(), &sum)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(59 * 60)).await;
    assert_eq!(ebs.get(&id).unwrap().status, SnapshotStatus::Pending);
    tokio::time::advance(Duration::from_secs(61)).await;
    // ... an hour after the last one, it is cancelled.
    let listed = ebs
        .describe_snapshots(&SnapshotFilter::id(&id))
        .await
        .unwrap();
    assert_eq!(listed[0].status, SnapshotStatus::Error);
    assert!(ebs.put_snapshot_block(&id, 1, data, &sum).await.is_err());
    // A completed one never times out.
    let done = ebs.start_snapshot(&start(None, "t2")).await.unwrap();
    let (d, s, digest) = block(2);
    ebs.put_snapshot_block(&done, 0, d, &s).await.unwrap();
    ebs.complete_snapshot(&done, 1, &linear_checksum([&digest]))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(3 * 3600)).await;
    let listed = ebs
        .describe_snapshots(&SnapshotFilter::id(&done))
        .await
        .unwrap();
    assert_eq!(listed[0].status, SnapshotStatus::Completed);
}

/// The documented quotas (AWS General Reference, Amazon EBS endpoints and quotas):
/// StartSnapshot 10 per second, 100 pending snapshots, PutSnapshotBlock 1 000 per second
/// per snapshot; over them a call is refused as throttled, and succeeds a second later.
#[tokio::test(start_paused = true)]
async fn the_twin_enforces_the_documented_quotas_when_asked() {
    let ebs = MemoryEbs {
        limits: Some(Limits::default()),
        ..MemoryEbs::new()
    };
    let mut ids = vec![];
    for i in 0..10 {
        ids.push(
            ebs.start_snapshot(&start(None, &format!("a{i}")))
                .await
                .unwrap(),
        );
    }
    let e = ebs.start_snapshot(&start(None, "a10")).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    tokio::time::advance(Duration::from_secs(1)).await;
    ids.push(ebs.start_snapshot(&start(None, "a10")).await.unwrap());
    // Up to 100 pending, 10 a second.
    let mut n = 11;
    while n < 100 {
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..10.min(100 - n) {
            ids.push(
                ebs.start_snapshot(&start(None, &format!("a{n}")))
                    .await
                    .unwrap(),
            );
            n += 1;
        }
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    let e = ebs.start_snapshot(&start(None, "over")).await.unwrap_err();
    assert_eq!(
        e.code.as_deref(),
        Some("ServiceQuotaExceededException"),
        "{e}"
    );
    assert!(e.is_transient());
    // 1 000 blocks a second into one snapshot, then refused until the next second.
    let (data, sum, _) = block(3);
    for i in 0..1000 {
        ebs.put_snapshot_block(&ids[0], i, data.clone(), &sum)
            .await
            .unwrap();
    }
    assert!(ebs
        .put_snapshot_block(&ids[0], 1000, data.clone(), &sum)
        .await
        .is_err());
    tokio::time::advance(Duration::from_secs(1)).await;
    ebs.put_snapshot_block(&ids[0], 1000, data, &sum)
        .await
        .unwrap();
    assert_eq!(ebs.throttled().get("PutSnapshotBlock"), Some(&1));
    assert_eq!(ebs.throttled().get("StartSnapshot"), Some(&2));
}

/// DescribeSnapshots API reference: "If you specify an invalid snapshot ID, an error is
/// returned" (SnapshotIds); the `snapshot-id` filter instead matches what exists, so the
/// points that settle together are asked about in one call, whichever is not visible yet.
#[tokio::test]
async fn snapshot_ids_fail_on_an_unknown_id_where_the_snapshot_id_filter_does_not() {
    let ebs = MemoryEbs::new();
    let a = ebs.start_snapshot(&start(None, "a")).await.unwrap();
    let b = ebs.start_snapshot(&start(None, "b")).await.unwrap();
    let err = ebs
        .describe_snapshots(&SnapshotFilter::id("snap-0000000000000000"))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let mut found: Vec<String> = ebs
        .describe_snapshots(&SnapshotFilter::any_of([
            &a,
            &b,
            &"snap-0000000000000000".to_string(),
        ]))
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    found.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(found, want);
    assert_eq!(ebs.calls("DescribeSnapshots"), 2);
    assert_eq!(ebs.calls("StartSnapshot"), 2);
}
