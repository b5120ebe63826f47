#![allow(clippy::unwrap_used)]

use super::*;
use bytes::Bytes;
use chrono::DateTime;
use pilotlight_cloud::{Fault, MemoryStore, PutOptions};
use pilotlight_protocol::{Consistency, Extent, DEFAULT_MAX_OBJECT, FORMAT_VERSION};

fn disk(name: &str) -> DiskId {
    DiskId::new("s", "vm", name).unwrap()
}

fn prefix() -> Prefix {
    Prefix::new("dr").unwrap()
}

fn manifest(d: &DiskId, generation: u64) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        disk: d.clone(),
        generation,
        parent: None,
        disk_size: 1 << 20,
        max_object: DEFAULT_MAX_OBJECT,
        source_kind: "full".into(),
        source_change_id: None,
        snapshot_time: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        consistency: Consistency::Crash,
        objects: Vec::new(),
        zero_ranges: vec![Extent::new(0, 1 << 20)],
        created_by: "test".into(),
    }
}

async fn put(store: &MemoryStore, key: &str, body: Vec<u8>) {
    store
        .put(key, Bytes::from(body), PutOptions::json())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_valid_manifest_reads_and_everything_else_says_which_key_and_why() {
    let store = MemoryStore::new("b");
    let (p, d) = (prefix(), disk("d0"));
    put(&store, &key(&p, &d, 1), manifest(&d, 1).to_json()).await;
    assert_eq!(read(&store, &p, &d, 1).await.unwrap().generation, 1);

    // Nothing there.
    match read(&store, &p, &d, 2).await {
        Err(DocError::Missing { key: k }) => assert_eq!(k, key(&p, &d, 2)),
        other => panic!("{other:?}"),
    }
    // Garbage, another disk's manifest, another generation's, one too large.
    put(&store, &key(&p, &d, 3), b"{not json".to_vec()).await;
    put(&store, &key(&p, &d, 4), manifest(&disk("d1"), 4).to_json()).await;
    put(&store, &key(&p, &d, 5), manifest(&d, 6).to_json()).await;
    put(&store, &key(&p, &d, 7), vec![b' '; MAX_MANIFEST_BYTES + 1]).await;
    for g in [3, 4, 5, 7] {
        match read(&store, &p, &d, g).await {
            Err(DocError::Invalid { key: k, detail }) => {
                assert_eq!(k, key(&p, &d, g));
                assert!(!detail.is_empty());
            }
            other => panic!("generation {g}: {other:?}"),
        }
    }
    // The bucket failing is neither missing nor invalid.
    store.faults.add(Fault::on("GetObject").nth(1).transient());
    match read(&store, &p, &d, 1).await {
        Err(DocError::Read(e)) => assert!(e.is_transient()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_listing_names_this_disks_manifest_keys_only() {
    let store = MemoryStore::new("b");
    let (p, d) = (prefix(), disk("d0"));
    for g in [3, 1, 2] {
        put(&store, &key(&p, &d, g), b"x".to_vec()).await;
    }
    put(&store, &key(&p, &disk("d00"), 9), b"x".to_vec()).await;
    put(
        &store,
        "dr/s/vm/d0/g/00000000000000000004/d/00000000000000000000",
        b"x".to_vec(),
    )
    .await;
    put(
        &store,
        "dr/s/vm/d0/g/not-a-number/manifest.json",
        b"x".to_vec(),
    )
    .await;
    assert_eq!(list(&store, &p, &d).await.unwrap(), vec![1, 2, 3]);
}
