use super::*;
use pilotlight_cloud::{Fault, MemoryStore};
use std::os::unix::fs::FileExt;

fn opts(disk: &std::path::Path, state: &std::path::Path) -> (UploadSettings, Target) {
    (
        UploadSettings {
            prefix: Prefix::new("p").unwrap(),
            max_object: 1 << 20,
            zstd_level: Some(3),
            concurrency: 4,
            bwlimit: None,
            state_dir: state.into(),
            dry_run: false,
            pack: true,
            rebase: false,
        },
        Target {
            disk: DiskId::parse("s/v/d").unwrap(),
            source: SourceSpec::Full { disk: disk.into() },
            change_id: Some("c1".into()),
            snapshot_time: None,
            consistency: Consistency::Crash,
        },
    )
}

/// An 8 MiB sparse disk with 3 MiB of data at 1 MiB.
fn sample_disk(dir: &std::path::Path) -> std::path::PathBuf {
    let disk = dir.join("d.raw");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(8 << 20).unwrap();
    f.write_all_at(&[5u8; 3 << 20], 1 << 20).unwrap();
    disk
}

#[tokio::test]
async fn a_failed_manifest_put_is_finished_by_the_next_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, t) = opts(&sample_disk(tmp.path()), &tmp.path().join("state"));

    // Three 1 MiB objects go up, then the manifest PUT fails.
    let failing = MemoryStore::default();
    failing.faults.add(Fault::on("PutObject").after(3).always());
    let err = send_generation(&o, &t, &failing, &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::Store(_)), "{err}");
    let st = state::peek(&o.state_dir, &t.disk).unwrap().unwrap();
    assert_eq!(st.last_committed, None);
    assert_eq!(
        st.pending.as_ref().map(|p| p.phase.clone()),
        Some(Phase::Committing)
    );

    // The next run first puts the saved manifest of generation 1, then sends 2.
    let store = MemoryStore::default();
    let s = send_generation(&o, &t, &store, &NoProgress).await.unwrap();
    assert_eq!(s.generation, 2);
    let objects = store.objects();
    let m1 = Manifest::from_json(&objects["p/s/v/d/g/00000000000000000001/manifest.json"]).unwrap();
    assert_eq!(m1.generation, 1);
    assert_eq!(m1.objects.len(), 3);
    assert!(objects.contains_key("p/s/v/d/g/00000000000000000002/manifest.json"));
    let st = state::peek(&o.state_dir, &t.disk).unwrap().unwrap();
    assert_eq!((st.last_committed, st.pending), (Some(2), None));
    assert_eq!(st.last_change_id.as_deref(), Some("c1"));
}

#[tokio::test]
async fn a_lost_state_never_overwrites_the_bucket_and_rebase_continues_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, t) = opts(&sample_disk(tmp.path()), &tmp.path().join("state"));
    let store = MemoryStore::default();
    for want in 1..=3 {
        let s = send_generation(&o, &t, &store, &NoProgress).await.unwrap();
        assert_eq!(s.generation, want);
    }
    let before = store.objects();
    std::fs::remove_dir_all(&o.state_dir).unwrap();
    let err = send_generation(&o, &t, &store, &NoProgress)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SendError::AlreadyCommitted {
                newest: 3,
                last_committed: None,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("--rebase"), "{msg}");
    assert!(
        msg.contains("generation 3 (p/s/v/d/g/00000000000000000003/manifest.json)"),
        "{msg}"
    );
    assert_eq!(
        store.objects(),
        before,
        "nothing written, nothing overwritten"
    );

    // The way back: a full generation after the bucket's newest, a new base.
    let rebase = UploadSettings {
        rebase: true,
        ..o.clone()
    };
    let s = send_generation(&rebase, &t, &store, &NoProgress)
        .await
        .unwrap();
    assert_eq!((s.generation, s.parent), (4, None));
    for (k, v) in &before {
        assert_eq!(store.object(k).as_ref(), Some(v), "{k} unchanged");
    }
    // And the state carries on from there.
    let s = send_generation(&o, &t, &store, &NoProgress).await.unwrap();
    assert_eq!(s.generation, 5);
}

#[tokio::test]
async fn a_commit_whose_manifest_landed_before_the_crash_is_recognised_not_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, t) = opts(&sample_disk(tmp.path()), &tmp.path().join("state"));
    let store = MemoryStore::default();
    // The manifest PUT fails from the sender's view...
    store.faults.add(Fault::on("PutObject").after(3).times(1));
    send_generation(&o, &t, &store, &NoProgress)
        .await
        .unwrap_err();
    // ...but had landed (a timeout after S3 stored it): the same bytes are there.
    let sd = StateDir::open(&o.state_dir, &t.disk).unwrap();
    let saved = sd.read_pending_manifest().unwrap();
    drop(sd);
    store.insert(
        "p/s/v/d/g/00000000000000000001/manifest.json",
        saved.clone(),
    );
    let s = send_generation(&o, &t, &store, &NoProgress).await.unwrap();
    assert_eq!(s.generation, 2, "generation 1 counted as committed");
    // Other bytes under that key are another writer's: refused.
    let tmp2 = tempfile::tempdir().unwrap();
    let (o2, t2) = opts(&sample_disk(tmp2.path()), &tmp2.path().join("state"));
    let other = MemoryStore::default();
    other.faults.add(Fault::on("PutObject").after(3).times(1));
    send_generation(&o2, &t2, &other, &NoProgress)
        .await
        .unwrap_err();
    // A valid manifest of this disk (another sender's): refused, nothing written.
    let mut theirs = Manifest::from_json(&saved).unwrap();
    theirs.created_by = "another sender".into();
    other.insert(
        "p/s/v/d/g/00000000000000000001/manifest.json",
        theirs.to_json(),
    );
    let before = other.objects();
    let err = send_generation(&o2, &t2, &other, &NoProgress)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SendError::AlreadyCommitted { newest: 1, .. }),
        "{err}"
    );
    assert_eq!(other.objects(), before);
    // Garbage there instead: this run commits nothing and drops the generation; the
    // next run numbers past the key, and the garbage stays as it was.
    other.insert("p/s/v/d/g/00000000000000000001/manifest.json", &b"{}"[..]);
    let err = send_generation(&o2, &t2, &other, &NoProgress)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SendError::Occupied { generation: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("Run again"), "{err}");
    let s = send_generation(&o2, &t2, &other, &NoProgress)
        .await
        .unwrap();
    assert_eq!((s.generation, s.parent), (2, None));
    assert_eq!(
        other
            .object("p/s/v/d/g/00000000000000000001/manifest.json")
            .as_deref(),
        Some(&b"{}"[..])
    );
}

const G2: &str = "p/s/v/d/g/00000000000000000002/manifest.json";

/// Two generations committed; returns the store and generation 2's manifest.
async fn two_generations(o: &UploadSettings, t: &Target) -> (MemoryStore, Manifest) {
    let store = MemoryStore::default();
    for _ in 0..2 {
        send_generation(o, t, &store, &NoProgress).await.unwrap();
    }
    let m2 = Manifest::from_json(&store.object(G2).unwrap()).unwrap();
    (store, m2)
}

fn incremental(disk: &std::path::Path, t: &Target) -> Target {
    let list = disk.with_extension("txt");
    std::fs::write(&list, format!("{} {}\n", 1 << 20, 1 << 20)).unwrap();
    Target {
        source: SourceSpec::ExtentList {
            list,
            disk: disk.into(),
        },
        ..t.clone()
    }
}

#[tokio::test]
async fn garbage_and_foreign_manifests_at_higher_numbers_are_stepped_over() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = sample_disk(tmp.path());
    let (o, t) = opts(&disk, &tmp.path().join("state"));
    let (store, m2) = two_generations(&o, &t).await;
    // Garbage far above, and a valid manifest of another disk under this disk's key.
    let garbage = "p/s/v/d/g/00000000000000099990/manifest.json";
    store.insert(garbage, &b"\x00 not json"[..]);
    let mut foreign = m2.clone();
    foreign.disk = DiskId::parse("s/v/other").unwrap();
    foreign.generation = 5;
    store.insert(
        "p/s/v/d/g/00000000000000000005/manifest.json",
        foreign.to_json(),
    );
    let history = history::read(&store, &o.prefix, &t.disk, Some(2))
        .await
        .unwrap();
    assert_eq!(history.newest_valid, None);
    assert_eq!(history.highest_key, Some(99990));
    assert_eq!(history.stepped_over.len(), 2, "{history:?}");
    let s = send_generation(&o, &incremental(&disk, &t), &store, &NoProgress)
        .await
        .unwrap();
    assert_eq!((s.generation, s.parent), (99991, Some(2)));
    assert_eq!(
        store.object(garbage).as_deref(),
        Some(&b"\x00 not json"[..])
    );
    let m = Manifest::from_json(
        &store
            .object("p/s/v/d/g/00000000000000099991/manifest.json")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(m.parent, Some(2));
    // And the state carries on from there.
    let s = send_generation(&o, &incremental(&disk, &t), &store, &NoProgress)
        .await
        .unwrap();
    assert_eq!((s.generation, s.parent), (99992, Some(99991)));
}

#[tokio::test]
async fn a_valid_manifest_above_the_state_is_refused_naming_it_even_under_garbage() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = sample_disk(tmp.path());
    let (o, t) = opts(&disk, &tmp.path().join("state"));
    let (store, m2) = two_generations(&o, &t).await;
    store.insert("p/s/v/d/g/00000000000000099990/manifest.json", &b"{}"[..]);
    let mut theirs = m2.clone();
    theirs.generation = 7;
    let key7 = "p/s/v/d/g/00000000000000000007/manifest.json";
    store.insert(key7, theirs.to_json());
    let before = store.objects();
    let err = send_generation(&o, &incremental(&disk, &t), &store, &NoProgress)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SendError::AlreadyCommitted { newest: 7, key, last_committed: Some(2), .. } if key == key7),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("already has generation 7 ({key7})"))
            && msg.contains("last committed: generation 2"),
        "{msg}"
    );
    assert_eq!(store.objects(), before, "nothing written");
    // --rebase goes past every occupied key.
    let rebase = UploadSettings {
        rebase: true,
        ..o.clone()
    };
    let s = send_generation(&rebase, &t, &store, &NoProgress)
        .await
        .unwrap();
    assert_eq!((s.generation, s.parent), (99991, None));
}

#[tokio::test]
async fn a_generation_under_way_is_renumbered_when_its_key_is_taken() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, t) = opts(&sample_disk(tmp.path()), &tmp.path().join("state"));
    let store = MemoryStore::default();
    store.faults.add(Fault::on("PutObject").after(1).times(1));
    send_generation(&o, &t, &store, &NoProgress)
        .await
        .unwrap_err();
    store.insert("p/s/v/d/g/00000000000000000001/manifest.json", &b"junk"[..]);
    let s = send_generation(&o, &t, &store, &NoProgress).await.unwrap();
    assert_eq!((s.generation, s.resumed), (2, true));
}

#[tokio::test]
async fn a_failed_upload_leaves_no_manifest_and_the_rerun_reuses_the_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, t) = opts(&sample_disk(tmp.path()), &tmp.path().join("state"));
    let failing = MemoryStore::default();
    failing.faults.add(Fault::on("PutObject").after(1).always());
    send_generation(&o, &t, &failing, &NoProgress)
        .await
        .unwrap_err();
    assert!(failing.keys().iter().all(|k| !k.ends_with("manifest.json")));
    let store = MemoryStore::default();
    let s = send_generation(&o, &t, &store, &NoProgress).await.unwrap();
    assert_eq!((s.generation, s.resumed), (1, true));
}
