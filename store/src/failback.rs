//! Failback documents under a disk's `b/{run}/`: the DR function's return snapshots
//! (`return.json`) and the sender's newest round (`round.json`), each at most
//! [`MAX_FAILBACK_DOC_BYTES`] and naming its own run and disk.

use crate::exports::WriteError;
use crate::{put_json, DocError};
use pilotlight_cloud::ObjectStore;
use pilotlight_protocol::{
    DiskId, Name, ObjectKey, Prefix, ReturnDoc, RoundDoc, MAX_FAILBACK_DOC_BYTES,
};

pub fn return_key(prefix: &Prefix, disk: &DiskId, run: &Name) -> String {
    ObjectKey::FailbackReturn {
        disk: disk.clone(),
        run: run.clone(),
    }
    .to_key(prefix)
}

pub fn round_key(prefix: &Prefix, disk: &DiskId, run: &Name) -> String {
    ObjectKey::FailbackRound {
        disk: disk.clone(),
        run: run.clone(),
    }
    .to_key(prefix)
}

pub async fn read_return<S: ObjectStore + ?Sized>(
    store: &S,
    prefix: &Prefix,
    disk: &DiskId,
    run: &Name,
) -> Result<ReturnDoc, DocError> {
    let key = return_key(prefix, disk, run);
    crate::read(
        store,
        key,
        MAX_FAILBACK_DOC_BYTES,
        "a failback's return snapshots",
        |b| ReturnDoc::from_json(b, run, disk),
    )
    .await
}

pub async fn read_round<S: ObjectStore + ?Sized>(
    store: &S,
    prefix: &Prefix,
    disk: &DiskId,
    run: &Name,
) -> Result<RoundDoc, DocError> {
    let key = round_key(prefix, disk, run);
    crate::read(
        store,
        key,
        MAX_FAILBACK_DOC_BYTES,
        "a failback round",
        |b| RoundDoc::from_json(b, run, disk),
    )
    .await
}

/// Writes the return snapshots of one disk (the DR function); returns the key.
pub async fn write_return<S: ObjectStore + ?Sized>(
    store: &S,
    prefix: &Prefix,
    doc: &ReturnDoc,
) -> Result<String, WriteError> {
    let key = return_key(prefix, &doc.disk, &doc.run_id);
    put_json(store, &key, "the return snapshots", doc).await?;
    Ok(key)
}

/// Writes the newest round of one disk (the sender); returns the key.
pub async fn write_round<S: ObjectStore + ?Sized>(
    store: &S,
    prefix: &Prefix,
    doc: &RoundDoc,
) -> Result<String, WriteError> {
    let key = round_key(prefix, &doc.disk, &doc.run_id);
    put_json(store, &key, "the failback round", doc).await?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use pilotlight_cloud::MemoryStore;
    use pilotlight_protocol::{ReturnPoint, FAILBACK_VERSION};

    #[tokio::test]
    async fn return_docs_round_trip_and_garbage_is_invalid_not_a_panic() {
        let store = MemoryStore::default();
        let prefix = Prefix::new("dr").unwrap();
        let disk = DiskId::new("s", "v", "d0").unwrap();
        let run = Name::new("dr-1").unwrap();
        assert!(matches!(
            read_return(&store, &prefix, &disk, &run).await,
            Err(DocError::Missing { .. })
        ));
        let doc = ReturnDoc {
            version: FAILBACK_VERSION,
            run_id: run.clone(),
            disk: disk.clone(),
            point_snapshot: "snap-1".into(),
            point_generation: 2,
            instance_id: "i-1".into(),
            volume_id: "vol-1".into(),
            returns: vec![ReturnPoint {
                set_id: "s1".into(),
                snapshot_id: "snap-2".into(),
                taken_at: Utc::now(),
                r#final: false,
            }],
            updated_at: Utc::now(),
        };
        let key = write_return(&store, &prefix, &doc).await.unwrap();
        assert_eq!(key, "dr/s/v/d0/b/dr-1/return.json");
        assert_eq!(
            read_return(&store, &prefix, &disk, &run).await.unwrap(),
            doc
        );
        store.insert(&key, b"not json".to_vec());
        assert!(matches!(
            read_return(&store, &prefix, &disk, &run).await,
            Err(DocError::Invalid { .. })
        ));
        store.insert(&key, vec![b' '; MAX_FAILBACK_DOC_BYTES + 1]);
        assert!(matches!(
            read_return(&store, &prefix, &disk, &run).await,
            Err(DocError::Invalid { .. })
        ));
    }
}
