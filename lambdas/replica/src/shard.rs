//! One shard of a point: fetch and verify the objects its blocks need, read the parent's
//! block where the generation touches a block only partly, write each block into the
//! pending snapshot, then record what was written (`r/{generation}/{attempt}-{shard}.json`,
//! create-only). A shard already recorded is never written again.

use crate::error::ReplicaError;
use crate::plan::{self, Layout};
use crate::Replica;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use pilotlight_cloud::ebs::{block_checksum, BlockRef, EbsApi, PageStart};
use pilotlight_cloud::{ErrorKind, ObjectStore, PutOptions};
use pilotlight_protocol::replica::{
    PendingPoint, ShardDoc, WrittenBlock, MAX_SHARD_DOC_BYTES, REPLICA_VERSION,
};
use pilotlight_protocol::{DiskId, Manifest, ObjectKey, Sha256Hex};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

pub fn shard_key<S, E, Q>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    g: u64,
    attempt: u32,
    shard: u32,
) -> String {
    ObjectKey::ReplicaShard {
        disk: disk.clone(),
        generation: g,
        attempt,
        shard,
    }
    .to_key(&r.cfg.prefix)
}

/// The point's plan: its blocks and their shards.
#[derive(Debug, Clone)]
pub struct PointPlan {
    pub layout: Layout,
    pub blocks: Vec<u64>,
    pub shards: Vec<std::ops::Range<usize>>,
}

impl PointPlan {
    pub fn new(m: &Manifest, full: bool, shard_blocks: u64, shard_bytes: u64) -> Self {
        let layout = Layout::of(m);
        let blocks = plan::touched_blocks(&layout, full);
        let shards = plan::shards(&layout, m, &blocks, shard_blocks, shard_bytes);
        PointPlan {
            layout,
            blocks,
            shards,
        }
    }
}

/// A shard's record, if it was written.
pub async fn recorded<S: ObjectStore, E, Q>(
    r: &Replica<S, E, Q>,
    disk: &DiskId,
    g: u64,
    attempt: u32,
    shard: u32,
) -> Result<Option<ShardDoc>, ReplicaError> {
    let key = shard_key(r, disk, g, attempt, shard);
    match r
        .store
        .get_if_exists(&key, MAX_SHARD_DOC_BYTES as u64)
        .await
    {
        Ok(Some(b)) => ShardDoc::from_json(&b, disk, g, attempt, shard)
            .map(Some)
            .map_err(|e| ReplicaError::BadShard {
                key,
                detail: e.to_string(),
            }),
        Ok(None) => Ok(None),
        Err(e) if e.kind == ErrorKind::TooLarge => Err(ReplicaError::BadShard {
            key,
            detail: "larger than a shard record may be".into(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Writes shard `shard` of `pending` (its snapshot started) and records it; returns the
/// record (the existing one when it was already written).
pub async fn write<S: ObjectStore, E: EbsApi, Q>(
    r: &Replica<S, E, Q>,
    m: &Manifest,
    pending: &PendingPoint,
    plan: &PointPlan,
    shard: u32,
) -> Result<ShardDoc, ReplicaError> {
    match write_once(r, m, pending, plan, shard).await {
        Ok(doc) => Ok(doc),
        Err(e) => {
            // Another invocation may have written and recorded this shard meanwhile, and
            // even sealed the snapshot (PutSnapshotBlock: "The target snapshot must be in
            // the pending state"): then this one's work is moot, not failed.
            let (g, attempt) = (pending.generation, pending.attempt);
            if let Ok(Some(doc)) = recorded(r, &m.disk, g, attempt, shard).await {
                return Ok(doc);
            }
            if let Ok(read) =
                crate::chain::read(&r.store, &r.cfg.prefix, &m.disk, chrono::Utc::now()).await
            {
                let current = read.head.pending.as_ref().is_some_and(|p| {
                    p.generation == g && p.attempt == attempt && p.sealed_at.is_none()
                });
                if !current {
                    return Err(ReplicaError::Stale(format!(
                        "generation {g} attempt {attempt} moved on while shard {shard} was written ({e})"
                    )));
                }
            }
            Err(e)
        }
    }
}

async fn write_once<S: ObjectStore, E: EbsApi, Q>(
    r: &Replica<S, E, Q>,
    m: &Manifest,
    pending: &PendingPoint,
    plan: &PointPlan,
    shard: u32,
) -> Result<ShardDoc, ReplicaError> {
    let disk = &m.disk;
    let (g, attempt) = (pending.generation, pending.attempt);
    if let Some(done) = recorded(r, disk, g, attempt, shard).await? {
        return Ok(done);
    }
    let sid = pending
        .snapshot_id
        .clone()
        .ok_or_else(|| ReplicaError::Internal("a shard of a snapshot not started".into()))?;
    let range = plan.shards.get(shard as usize).cloned().ok_or_else(|| {
        ReplicaError::Internal(format!(
            "shard {shard} of a point planned in {} shards",
            plan.shards.len()
        ))
    })?;
    let mine = &plan.blocks[range];
    let (Some(&first), Some(&last)) = (mine.first(), mine.last()) else {
        return Err(ReplicaError::Internal(format!("shard {shard} is empty")));
    };
    let visible_by = tokio::time::Instant::now() + r.cfg.visibility_window;
    let layout = &plan.layout;

    // 1. The objects, each verified before any of its bytes is used.
    let wanted = layout.objects_in(first, last);
    let objects: HashMap<usize, Bytes> = futures::stream::iter(wanted)
        .map(|o| async move { fetch(r, m, o).await.map(|b| (o, b)) })
        .buffer_unordered(r.cfg.fetch_concurrency.max(1))
        .try_collect()
        .await?;
    let bytes_fetched = objects.keys().map(|&o| m.objects[o].stored_length).sum();

    // 2. Where the generation touches a block only partly, the parent's block.
    let full = pending.parent.is_none();
    let partial = !full && mine.iter().any(|&i| !layout.covers(i));
    let parent_blocks = match (&pending.parent, partial) {
        (Some(p), true) => parent_listing(r, &p.snapshot_id, first, last).await?,
        _ => BTreeMap::new(),
    };

    // 3. Every block, written.
    let parent_id = pending.parent.as_ref().map(|p| p.snapshot_id.clone());
    let (objects, parent_blocks, parent_id, sid) = (&objects, &parent_blocks, &parent_id, &sid);
    let written: Vec<(Option<WrittenBlock>, bool)> = futures::stream::iter(mine.iter().copied())
        .map(|i| async move {
            let mut read_parent = false;
            let parent = match (parent_id, parent_blocks.get(&i)) {
                (Some(pid), Some(b)) if !layout.covers(i) => {
                    read_parent = true;
                    let data = r
                        .cfg
                        .retry
                        .run(i, None, || r.ebs.get_snapshot_block(pid, b))
                        .await?;
                    Some(data)
                }
                _ => None,
            };
            let block = plan::compose(layout, i, parent.as_deref(), |o| {
                objects.get(&o).map(|b| &b[..])
            })
            .map_err(|o| ReplicaError::Internal(format!("object {o} of block {i} not fetched")))?;
            if full && block.iter().all(|&b| b == 0) {
                return Ok::<_, ReplicaError>((None, read_parent));
            }
            let digest: [u8; 32] = Sha256::digest(&block).into();
            let sum = block_checksum(&digest);
            let data = Bytes::from(block);
            r.cfg
                .retry
                .run(i, Some(visible_by), || {
                    r.ebs.put_snapshot_block(sid, i, data.clone(), &sum)
                })
                .await?;
            Ok((
                Some(WrittenBlock {
                    index: i,
                    sha256: Sha256Hex(digest),
                }),
                read_parent,
            ))
        })
        .buffered(r.cfg.put_concurrency.max(1))
        .try_collect()
        .await?;
    let parent_blocks_read = written.iter().filter(|w| w.1).count() as u64;
    let doc = ShardDoc {
        version: REPLICA_VERSION,
        disk: disk.clone(),
        generation: g,
        attempt,
        shard,
        snapshot_id: sid.clone(),
        blocks: written.into_iter().filter_map(|w| w.0).collect(),
        bytes_fetched,
        parent_blocks_read,
    };
    let key = shard_key(r, disk, g, attempt, shard);
    match r
        .store
        .put(&key, doc.to_json().into(), PutOptions::json().create_only())
        .await
    {
        Ok(_) => Ok(doc),
        // A duplicate task recorded it first: both wrote the same bytes.
        Err(e) if e.kind == ErrorKind::PreconditionFailed => recorded(r, disk, g, attempt, shard)
            .await?
            .ok_or_else(|| ReplicaError::Internal(format!("{key} refused and not there"))),
        Err(e) => Err(e.into()),
    }
}

/// One object's decoded bytes, verified against the manifest.
async fn fetch<S: ObjectStore, E, Q>(
    r: &Replica<S, E, Q>,
    m: &Manifest,
    o: usize,
) -> Result<Bytes, ReplicaError> {
    let obj = &m.objects[o];
    let key = ObjectKey::Data {
        disk: m.disk.clone(),
        generation: m.generation,
        offset: obj.offset,
    }
    .to_key(&r.cfg.prefix);
    let stored = r
        .cfg
        .retry
        .run(obj.offset, None, || r.store.get(&key, obj.stored_length))
        .await
        .map_err(|e| {
            if e.kind == ErrorKind::TooLarge {
                ReplicaError::Object {
                    key: key.clone(),
                    detail: format!("larger than the manifest's {} bytes", obj.stored_length),
                }
            } else {
                e.into()
            }
        })?;
    pilotlight_store::objects::verify(obj, &stored).map_err(|e| ReplicaError::Object {
        key,
        detail: e.to_string(),
    })
}

/// The parent's blocks with index in `[first, last]` (ListSnapshotBlocks from `first`,
/// paged; a block not listed reads as zeroes).
async fn parent_listing<S, E: EbsApi, Q>(
    r: &Replica<S, E, Q>,
    parent: &str,
    first: u64,
    last: u64,
) -> Result<BTreeMap<u64, BlockRef>, ReplicaError> {
    let mut out = BTreeMap::new();
    let mut token: Option<String> = None;
    loop {
        let start = token
            .as_deref()
            .map_or(PageStart::Index(first), PageStart::Token);
        let page = r
            .cfg
            .retry
            .run(first, None, || {
                r.ebs.list_snapshot_blocks_page(parent, start)
            })
            .await?;
        let mut past = false;
        for b in page.blocks {
            if b.index > last {
                past = true;
            } else if b.index >= first {
                out.insert(b.index, b);
            }
        }
        match page.next_token {
            Some(t) if !past => token = Some(t),
            _ => return Ok(out),
        }
    }
}
