#![allow(clippy::unwrap_used)]

use super::*;
use chrono::{DateTime, Utc};
use pilotlight_cloud::PutOptions;
use pilotlight_cloud::{Fault, MemoryStore};
use pilotlight_protocol::{ExportFormat, ExportStatus, EXPORT_VERSION};

fn at() -> (Prefix, DiskId, Name) {
    (
        Prefix::new("dr").unwrap(),
        DiskId::new("s", "vm", "d0").unwrap(),
        Name::new("run1.d0").unwrap(),
    )
}

fn request(id: &Name) -> ExportRequest {
    ExportRequest {
        version: EXPORT_VERSION,
        id: id.clone(),
        generation: 3,
        format: ExportFormat::Raw,
        run_id: Some("run1".into()),
        requested_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
    }
}

#[tokio::test]
async fn requests_and_results_round_trip_and_bad_ones_say_which_key_and_why() {
    let store = MemoryStore::new("b");
    let (p, d, id) = at();
    let key = write_request(&store, &p, &d, &request(&id)).await.unwrap();
    assert_eq!(key, request_key(&p, &d, &id));
    assert_eq!(
        read_request(&store, &p, &d, &id).await.unwrap(),
        request(&id)
    );

    assert!(matches!(
        read_result(&store, &p, &d, &id).await,
        Err(DocError::Missing { .. })
    ));
    let result = ExportResult {
        version: EXPORT_VERSION,
        id: id.clone(),
        status: ExportStatus::Done,
        generation: Some(3),
        image_key: Some(image_key(&p, &d, &id)),
        size: Some(1),
        sha256: None,
        parts_sha256: None,
        part_size: None,
        reason: None,
        seconds: 1.0,
        finished_at: Utc::now(),
    };
    write_result(&store, &p, &d, &result).await.unwrap();
    assert_eq!(read_result(&store, &p, &d, &id).await.unwrap(), result);

    // Another id's document at this key, garbage, and one too large: invalid, never
    // missing, never a panic.
    let other = Name::new("run2.d0").unwrap();
    let key = request_key(&p, &d, &id);
    for body in [
        serde_json::to_vec(&request(&other)).unwrap(),
        b"{not json".to_vec(),
        vec![b' '; MAX_EXPORT_DOC_BYTES + 1],
    ] {
        store
            .put(&key, body.into(), PutOptions::json())
            .await
            .unwrap();
        match read_request(&store, &p, &d, &id).await {
            Err(DocError::Invalid { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{other:?}"),
        }
    }
    // The bucket failing for now is transient, and says so.
    store.faults.add(Fault::on("GetObject").nth(1).transient());
    let e = read_result(&store, &p, &d, &id).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
}
