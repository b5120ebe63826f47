//! A busy queue is taken in at the pace of the applies: after a full receive the engine
//! receives a few batches more at once, and reads the manifests they name together.
//! Before, one step took ten messages and read their manifests one after another, and
//! the soak's 100 disks waited on that (#35).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use pilotlight_cloud::{MemoryQueue, MemoryStore};
use pilotlight_protocol::ObjectKey;
use pilotlight_receiver::engine::Engine;
use std::sync::Arc;

#[tokio::test]
async fn one_step_takes_in_forty_messages_and_applies_every_disk_they_name() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new("b"));
    let queue = Arc::new(MemoryQueue::new(VISIBILITY, None));
    let spec = [GenSpec {
        base: true,
        writes: vec![w(0, 16, 3)],
    }];
    let chains: Vec<Chain> = (0..40).map(|d| build_chain(d, &spec, 1024)).collect();
    for c in &chains {
        commit(&store, c, 0);
        let key = ObjectKey::Manifest {
            disk: c.manifests[0].disk.clone(),
            generation: c.manifests[0].generation,
        }
        .to_key(&prefix());
        queue.send(event(&key));
    }
    let mut eng = Engine::new(config(tmp.path()), store.clone(), queue.clone());
    let applied = eng.step().await.unwrap();
    assert_eq!(
        applied, 40,
        "one step applies every disk of its four receives"
    );
    let st = eng.status();
    assert_eq!(st.len(), 40);
    assert!(st
        .iter()
        .all(|d| d.applied == Some(chains[0].manifests[0].generation)));
    // Their messages are deleted once applied: none comes back.
    queue.advance(VISIBILITY * 2);
    assert_eq!(eng.step().await.unwrap(), 0);
    assert_eq!(queue.len(), 0, "every manifest event was deleted");
}
