//! What a received message is, decided from its body alone (no I/O).

use super::context::EngineConfig;
use pilotlight_protocol::keys::{EXPORT_REQUEST_FILE, EXPORT_RESULT_FILE, MANIFEST_FILE};
use pilotlight_protocol::{parse_notification, DiskId, Name, ObjectKey, S3Notification};

/// What to do with one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    Delete(&'static str),
    /// Leave it: malformed or not ours. The reason is logged; the queue's redrive moves
    /// it to the dead-letter queue.
    Leave(String),
    /// Manifest events: delete once each generation is applied.
    Manifests(Vec<(DiskId, u64)>),
    /// Data-object events (disk, generation, offset): prefetch, then delete.
    Data(Vec<(DiskId, u64, u64)>),
    /// Export requests: delete once each is answered.
    Exports(Vec<(DiskId, Name)>),
}

/// Classifies a message body without I/O.
pub fn classify(cfg: &EngineConfig, body: &str) -> Disposition {
    let n = match parse_notification(body.as_bytes()) {
        Ok(n) => n,
        Err(e) => return Disposition::Leave(format!("malformed event: {e}")),
    };
    let records = match n {
        S3Notification::Test { .. } => return Disposition::Delete("s3:TestEvent"),
        S3Notification::Records(r) => r,
    };
    let mut manifests = Vec::new();
    let mut data = Vec::new();
    let mut exports = Vec::new();
    let mut export_outputs = 0;
    let mut failback_docs = 0;
    let mut replica_docs = 0;
    for r in records {
        if r.bucket != cfg.bucket {
            return Disposition::Leave(format!(
                "event for bucket {:?}, not {:?}: check the bucket notification",
                r.bucket, cfg.bucket
            ));
        }
        if !r.is_object_created() {
            continue;
        }
        match ObjectKey::parse(&cfg.prefix, &r.key) {
            Ok(ObjectKey::Manifest { disk, generation }) => manifests.push((disk, generation)),
            Ok(ObjectKey::Data {
                disk,
                generation,
                offset,
            }) => data.push((disk, generation, offset)),
            Ok(ObjectKey::ExportRequest { disk, id }) => exports.push((disk, id)),
            // What a receiver's export writes comes back as events too.
            Ok(ObjectKey::ExportImage { .. } | ObjectKey::ExportResult { .. }) => {
                export_outputs += 1
            }
            // Failback's documents (DR function <-> sender) are not the receiver's.
            Ok(ObjectKey::FailbackReturn { .. } | ObjectKey::FailbackRound { .. }) => {
                failback_docs += 1
            }
            // Snapshots mode's own documents (a stack switched between modes).
            Ok(
                ObjectKey::ReplicaHead { .. }
                | ObjectKey::ReplicaShard { .. }
                | ObjectKey::ExportPlan { .. }
                | ObjectKey::ExportRange { .. },
            ) => replica_docs += 1,
            Err(e) => return Disposition::Leave(format!("rejected key: {e}")),
        }
    }
    if !exports.is_empty() {
        Disposition::Exports(exports)
    } else if !manifests.is_empty() {
        Disposition::Manifests(manifests)
    } else if !data.is_empty() {
        Disposition::Data(data)
    } else if export_outputs > 0 {
        Disposition::Delete("export output written by a receiver")
    } else if failback_docs > 0 {
        Disposition::Delete("a failback document (DR function and sender)")
    } else if replica_docs > 0 {
        Disposition::Delete("a snapshots-mode document (the replica function's)")
    } else {
        Disposition::Delete("no object-created records")
    }
}

/// The keys reconcile reads: manifests and export requests and results, never the data
/// objects, which are most of a bucket (parsing each key checks it properly).
pub fn is_control_key(key: &str) -> bool {
    [MANIFEST_FILE, EXPORT_REQUEST_FILE, EXPORT_RESULT_FILE]
        .iter()
        .any(|f| key.strip_suffix(f).is_some_and(|k| k.ends_with('/')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pilotlight_cloud::ObjectStore;
    use pilotlight_protocol::Prefix;
    use std::time::Duration;

    fn cfg() -> EngineConfig {
        EngineConfig {
            bucket: "b".into(),
            prefix: Prefix::new("dr").unwrap(),
            image_dir: "/nonexistent".into(),
            state_dir: "/nonexistent".into(),
            concurrency: 1,
            wait: Duration::from_secs(0),
            visibility_secs: 60,
            reconcile_every: None,
            prefetch: true,
            retry_base: Duration::from_secs(1),
            budget: Default::default(),
        }
    }

    fn event(bucket: &str, key: &str) -> String {
        serde_json::json!({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
            "eventTime": "2026-11-23T11:31:26.746", "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1}}}]})
        .to_string()
    }

    #[test]
    fn reconcile_keeps_only_control_keys() {
        let g = "dr/s/v/d/g/00000000000000000002/";
        assert!(is_control_key(&format!("{g}manifest.json")));
        assert!(is_control_key("dr/s/v/d/x/run1/request.json"));
        assert!(is_control_key("dr/s/v/d/x/run1/result.json"));
        assert!(!is_control_key(&format!("{g}d/00000000000000000512")));
        assert!(!is_control_key("dr/s/v/d/x/run1/image.raw"));
        assert!(!is_control_key(&format!("{g}xmanifest.json")));
        // The reconcile path end to end on the in-memory store: data objects are not listed.
        let src = pilotlight_cloud::MemoryStore::default();
        src.insert(&format!("{g}manifest.json"), b"{}".to_vec());
        src.insert(&format!("{g}d/00000000000000000512"), vec![1; 512]);
        let keys = futures::executor::block_on(src.list("dr/", is_control_key)).unwrap();
        assert_eq!(keys, vec![format!("{g}manifest.json")]);
    }

    /// A stack switched between modes: snapshots mode's own documents (chain heads, shard
    /// records, fanned-out exports' plans and ranges) are deleted from the queue, never
    /// refused as bad keys, and reconcile does not list them.
    #[test]
    fn snapshots_mode_documents_are_not_the_receivers() {
        let c = cfg();
        for key in [
            "dr/s/v/d/r/head.json",
            "dr/s/v/d/r/00000000000000000002/00001-000000.json",
            "dr/s/v/d/x/run-1.d0/plan.json",
            "dr/s/v/d/x/run-1.d0/p/00003.json",
        ] {
            assert_eq!(
                classify(&c, &event("b", key)),
                Disposition::Delete("a snapshots-mode document (the replica function's)"),
                "{key}"
            );
            assert!(!is_control_key(key), "{key}");
        }
    }

    #[test]
    fn dispositions() {
        let c = cfg();
        let m = "dr%2Fs%2Fv%2Fd%2Fg%2F00000000000000000002%2Fmanifest.json";
        assert_eq!(
            classify(&c, &event("b", m)),
            Disposition::Manifests(vec![(DiskId::new("s", "v", "d").unwrap(), 2)])
        );
        assert_eq!(
            classify(
                &c,
                &event(
                    "b",
                    "dr/s/v/d/g/00000000000000000002/d/00000000000000000512"
                )
            ),
            Disposition::Data(vec![(DiskId::new("s", "v", "d").unwrap(), 2, 512)])
        );
        assert!(matches!(
            classify(
                &c,
                r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"b"}"#
            ),
            Disposition::Delete(_)
        ));
        assert_eq!(
            classify(&c, &event("b", "dr/s/v/d/x/run-1.d0/request.json")),
            Disposition::Exports(vec![(
                DiskId::new("s", "v", "d").unwrap(),
                Name::new("run-1.d0").unwrap()
            )])
        );
        for output in ["image.raw", "result.json"] {
            assert_eq!(
                classify(&c, &event("b", &format!("dr/s/v/d/x/run-1.d0/{output}"))),
                Disposition::Delete("export output written by a receiver")
            );
        }
        for doc in ["return.json", "round.json"] {
            assert_eq!(
                classify(&c, &event("b", &format!("dr/s/v/d/b/dr-1/{doc}"))),
                Disposition::Delete("a failback document (DR function and sender)")
            );
        }
        for (body, why) in [
            ("{garbage".to_string(), "malformed"),
            (event("other", m), "bucket"),
            (
                event("b", "dr/s/../d/g/00000000000000000002/manifest.json"),
                "rejected key",
            ),
            (event("b", "dr/s/v/d/g/2/manifest.json"), "rejected key"),
            (event("b", "dr/s/v/d/x/../request.json"), "rejected key"),
            (event("b", "dr/s/v/d/x/id/other.json"), "rejected key"),
            (event("b", "dr/s/v/d/b/dr-1/other.json"), "rejected key"),
            (
                event("b", "elsewhere/s/v/d/g/00000000000000000002/manifest.json"),
                "rejected key",
            ),
        ] {
            match classify(&c, &body) {
                Disposition::Leave(reason) => assert!(reason.contains(why), "{why}: {reason}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }
}
