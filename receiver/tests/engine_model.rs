//! The engine's ordering logic against a model, at unit speed: several disks'
//! generations reach the engine through the in-memory bucket and queue in random
//! interleavings (duplicated, reordered and lost events, late manifests, parents that
//! arrive after their children, redeliveries after a visibility timeout, transient bucket
//! failures, crashes between an apply and its message's deletion). After every step no
//! disk's state names a generation whose bytes are not in its image; at the end every
//! image equals the sequential application of its generations and the queue is empty.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

use pilotlight_cloud::{Fault, MemoryQueue, MemoryStore};
use pilotlight_protocol::ObjectKey;
use pilotlight_receiver::engine::Engine;
use pilotlight_receiver::state::{self, DiskPaths};
use proptest::prelude::*;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const DISK_SECTORS: u64 = 64;

/// What happens next.
#[derive(Debug, Clone)]
enum Action {
    /// The next generation of disk `d` is committed (objects, then manifest); its events
    /// are sent, each `dup` times, the manifest's unless `lose`.
    Commit { d: usize, dup: u8, lose: bool },
    /// One receive-handle-apply round.
    Step,
    /// Time passes on the queue: invisible messages whose timeout passed come back.
    Advance,
    /// The receiver dies and restarts (state on disk survives; in-memory state does not).
    Crash,
    /// The next deletion of messages fails, then the receiver dies: the messages of an
    /// applied generation come back.
    CrashBeforeDelete,
    /// The next `n` manifest reads fail transiently.
    ManifestReadsFail { n: u8 },
    /// The bucket is listed (lost events are found).
    Reconcile,
}

fn action_strategy(disks: usize) -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0..disks, 1u8..3, prop::bool::weighted(0.15)).prop_map(|(d, dup, lose)| Action::Commit { d, dup, lose }),
        6 => Just(Action::Step),
        1 => Just(Action::Advance),
        1 => Just(Action::Crash),
        1 => Just(Action::CrashBeforeDelete),
        1 => (1u8..4).prop_map(|n| Action::ManifestReadsFail { n }),
        1 => Just(Action::Reconcile),
    ]
}

/// No state names a generation whose bytes are not in the image.
fn check_states(root: &Path, chains: &[Chain]) -> Result<Vec<Option<u64>>, TestCaseError> {
    let cfg = config(root);
    let mut out = vec![];
    for (i, c) in chains.iter().enumerate() {
        let paths = DiskPaths::new(&cfg.image_dir, &cfg.state_dir, &disk(i));
        let st = state::load(&paths, &disk(i)).unwrap();
        if let Some(g) = st.applied {
            let mut img = std::fs::read(&paths.image).unwrap();
            img.resize((DISK_SECTORS * SECTOR) as usize, 0);
            prop_assert!(
                img == c.images[g as usize - 1],
                "disk {i}: state says generation {g}, the image holds something else"
            );
        }
        out.push(st.applied);
    }
    Ok(out)
}

type TestEngine = Engine<Arc<MemoryStore>, Arc<MemoryQueue>>;

fn run_case(
    specs: Vec<Vec<GenSpec>>,
    actions: Vec<Action>,
    seed: u64,
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let chains: Vec<Chain> = specs
            .iter()
            .enumerate()
            .map(|(d, s)| build_chain(d, s, DISK_SECTORS))
            .collect();
        let store = Arc::new(MemoryStore::new("b"));
        let queue = Arc::new(MemoryQueue::new(VISIBILITY, None).shuffled(seed));
        let new_engine =
            || -> TestEngine { Engine::new(config(root), store.clone(), queue.clone()) };
        let mut engine = new_engine();
        let mut committed = vec![0usize; chains.len()];
        let lost = std::cell::Cell::new(false);
        let commit = |d: usize, dup: u8, lose: bool, committed: &mut Vec<usize>| {
            let i = committed[d];
            if i >= chains[d].manifests.len() {
                return;
            }
            committed[d] += 1;
            let m = &chains[d].manifests[i];
            for (key, bytes) in &chains[d].objects[i] {
                store.insert(key, bytes.clone());
                for _ in 0..dup {
                    queue.send(event(key));
                }
            }
            let key = ObjectKey::Manifest {
                disk: disk(d),
                generation: m.generation,
            }
            .to_key(&prefix());
            store.insert(&key, serde_json::to_vec(m).unwrap());
            if lose {
                lost.set(true);
            } else {
                for _ in 0..dup {
                    queue.send(event(&key));
                }
            }
        };
        for a in actions {
            match a {
                Action::Commit { d, dup, lose } => commit(d, dup, lose, &mut committed),
                Action::Step => {
                    engine.step().await.unwrap();
                }
                Action::Advance => queue.advance(VISIBILITY + Duration::from_secs(1)),
                Action::Crash => engine = new_engine(),
                Action::CrashBeforeDelete => {
                    store.faults.clear();
                    queue.faults.add(Fault::on("DeleteMessageBatch").nth(1));
                    engine.step().await.unwrap();
                    queue.faults.clear();
                    engine = new_engine();
                }
                Action::ManifestReadsFail { n } => store.faults.add(
                    Fault::on("GetObject")
                        .resource_contains("manifest.json")
                        .times(n as u64),
                ),
                Action::Reconcile => {
                    let _ = engine.reconcile().await;
                }
            }
            check_states(root, &chains)?;
        }
        // Everything is committed. Where events were lost, one listing finds them (only
        // then: a message the engine dropped too early must show as a disk left behind).
        // Then rounds of receiving, with time passing, until nothing is left.
        for d in 0..chains.len() {
            while committed[d] < chains[d].manifests.len() {
                commit(d, 1, false, &mut committed);
            }
        }
        store.faults.clear();
        if lost.get() {
            let _ = engine.reconcile().await;
        }
        for _ in 0..200 {
            engine.step().await.unwrap();
            check_states(root, &chains)?;
            if queue.is_empty() {
                break;
            }
            if queue.visible() == 0 {
                queue.advance(VISIBILITY + Duration::from_secs(1));
            }
        }
        let applied = check_states(root, &chains)?;
        for (i, c) in chains.iter().enumerate() {
            prop_assert_eq!(
                applied[i],
                Some(c.manifests.len() as u64),
                "disk {} not fully applied",
                i
            );
        }
        prop_assert!(queue.is_empty(), "{} messages never deleted", queue.len());
        prop_assert!(queue.dead_letters().is_empty());
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_interleaving_applies_each_disk_in_order(
        specs in prop::collection::vec(prop::collection::vec(gen_strategy(DISK_SECTORS, 12, 1..5), 1..5), 1..4),
        actions in prop::collection::vec(action_strategy(3), 10..60),
        seed in any::<u64>(),
    ) {
        let disks = specs.len();
        let actions = actions
            .into_iter()
            .map(|a| match a {
                Action::Commit { d, dup, lose } => Action::Commit { d: d % disks, dup, lose },
                a => a,
            })
            .collect();
        run_case(specs, actions, seed)?;
    }
}

/// A manifest the bucket cannot serve for now (throttled) is held and read again, never
/// counted as a rejection; an invalid manifest is left for the dead-letter queue.
#[tokio::test]
async fn a_throttled_manifest_read_is_retried_an_invalid_manifest_is_dead_lettered() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let w = |seed| Write {
        at: 3,
        len: 5,
        zero: false,
        seed,
    };
    let specs = vec![
        GenSpec {
            base: true,
            writes: vec![w(7)],
        },
        GenSpec {
            base: false,
            writes: vec![w(9)],
        },
    ];
    let chain = build_chain(0, &specs, DISK_SECTORS);
    let store = Arc::new(MemoryStore::new("b"));
    // Redrive after 3 receives, as a tight production queue might be set.
    let queue = Arc::new(MemoryQueue::new(VISIBILITY, Some(3)));
    let mut engine: TestEngine = Engine::new(config(root), store.clone(), queue.clone());
    let commit = |i: usize| {
        for (key, bytes) in &chain.objects[i] {
            store.insert(key, bytes.clone());
        }
        let m = &chain.manifests[i];
        let key = ObjectKey::Manifest {
            disk: disk(0),
            generation: m.generation,
        }
        .to_key(&prefix());
        store.insert(&key, serde_json::to_vec(m).unwrap());
        queue.send(event(&key));
    };
    commit(0);
    engine.step().await.unwrap();
    assert_eq!(
        check_states(root, std::slice::from_ref(&chain)).unwrap(),
        vec![Some(1)]
    );

    // Generation 2's manifest: throttled five times (more than any one receive's worth).
    store.faults.add(
        Fault::on("GetObject")
            .resource_contains("manifest.json")
            .times(5)
            .throttle(),
    );
    commit(1);
    for _ in 0..20 {
        engine.step().await.unwrap();
        // Time passes too: a held message must stay held, not come back and count.
        queue.advance(Duration::from_secs(10));
    }
    assert_eq!(
        check_states(root, std::slice::from_ref(&chain)).unwrap(),
        vec![Some(2)]
    );
    assert!(store.faults.calls("GetObject") >= 6);
    assert!(
        queue.is_empty(),
        "the manifest's message was deleted once applied"
    );
    assert!(
        queue.dead_letters().is_empty(),
        "a throttled read is not a rejection"
    );

    // Generation 3's manifest is garbage: rejected, its message redriven.
    let key = ObjectKey::Manifest {
        disk: disk(0),
        generation: 3,
    }
    .to_key(&prefix());
    store.insert(&key, b"{not a manifest".to_vec());
    queue.send(event(&key));
    for _ in 0..6 {
        engine.step().await.unwrap();
        queue.advance(VISIBILITY + Duration::from_secs(1));
    }
    engine.step().await.unwrap();
    assert_eq!(
        queue.dead_letters().len(),
        1,
        "the invalid manifest's event is dead-lettered"
    );
    assert_eq!(
        check_states(root, std::slice::from_ref(&chain)).unwrap(),
        vec![Some(2)]
    );
}
