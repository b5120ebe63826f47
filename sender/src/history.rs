//! What the bucket holds of one disk's history, as far as a sender must know it before it
//! numbers a generation.
//!
//! A key that looks like a manifest is history only when its object parses, validates and
//! names this disk and generation: the bucket is untrusted, and a garbage object or a
//! foreign writer's manifest at a high number must not stop the disk for good. Such keys
//! are stepped over (the next generation goes past them; the receiver follows parents, so
//! the gap is harmless) and logged with their key.

use pilotlight_cloud::{CloudError, ObjectStore};
use pilotlight_protocol::{DiskId, Prefix};
use pilotlight_store::{manifests, DocError};

/// A valid manifest the bucket holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub generation: u64,
    pub key: String,
}

/// The disk's manifest keys above a generation the sender already knows of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketHistory {
    /// The newest generation with a valid manifest of this disk, if any.
    pub newest_valid: Option<Committed>,
    /// The highest generation number a manifest-shaped key occupies, valid or not: a new
    /// generation must be numbered above it.
    pub highest_key: Option<u64>,
    /// Keys stepped over, and why each is not this disk's manifest.
    pub stepped_over: Vec<(String, String)>,
}

impl BucketHistory {
    /// The generation number a new generation takes after `last_committed`.
    pub fn next_generation(&self, last_committed: Option<u64>) -> u64 {
        last_committed.max(self.highest_key).map_or(1, |g| g + 1)
    }
}

/// Lists the disk's manifest keys (one LIST) and reads those above `known` newest first
/// (usually none) until one is valid. Keys at or below `known` are not read: the sender's
/// own state already says it committed up to there.
pub async fn read<S: ObjectStore>(
    store: &S,
    prefix: &Prefix,
    disk: &DiskId,
    known: Option<u64>,
) -> Result<BucketHistory, CloudError> {
    // Newest first (the listing is ascending).
    let above: Vec<(u64, String)> = manifests::list(store, prefix, disk)
        .await?
        .into_iter()
        .rev()
        .filter(|g| Some(*g) > known)
        .map(|g| (g, manifests::key(prefix, disk, g)))
        .collect();
    let mut history = BucketHistory {
        highest_key: above.first().map(|(g, _)| *g),
        ..BucketHistory::default()
    };
    for (generation, key) in above {
        match check(store, prefix, disk, generation).await? {
            Verdict::Valid => {
                history.newest_valid = Some(Committed { generation, key });
                break;
            }
            Verdict::NotOurs(why) => {
                tracing::warn!(
                    key,
                    why,
                    "not a manifest of this disk: stepped over (the next generation is numbered past it)"
                );
                history.stepped_over.push((key, why));
            }
        }
    }
    Ok(history)
}

/// What the object at a manifest key is.
enum Verdict {
    /// A valid manifest of this disk and generation.
    Valid,
    /// Anything else, and why.
    NotOurs(String),
}

/// Reads and checks the manifest of `generation` (a failure to read it is the error).
async fn check<S: ObjectStore>(
    store: &S,
    prefix: &Prefix,
    disk: &DiskId,
    generation: u64,
) -> Result<Verdict, CloudError> {
    match manifests::read(store, prefix, disk, generation).await {
        Ok(_) => Ok(Verdict::Valid),
        Err(DocError::Missing { .. }) => Ok(Verdict::NotOurs("it is gone".into())),
        Err(DocError::Invalid { detail, .. }) => Ok(Verdict::NotOurs(detail)),
        Err(DocError::Read(e)) => Err(e),
    }
}
