//! A disk's chain head (`r/head.json`), read with its ETag and replaced only over the
//! version read: two invocations that read the same head cannot both advance it.

use crate::error::ReplicaError;
use chrono::{DateTime, Utc};
use pilotlight_cloud::{ErrorKind, ObjectStore, PutOptions};
use pilotlight_protocol::replica::{ChainHead, MAX_HEAD_BYTES};
use pilotlight_protocol::{DiskId, ObjectKey, Prefix};

pub fn head_key(prefix: &Prefix, disk: &DiskId) -> String {
    ObjectKey::ReplicaHead { disk: disk.clone() }.to_key(prefix)
}

/// A head as read: `etag` none when the disk has none yet.
#[derive(Debug, Clone)]
pub struct Read {
    pub head: ChainHead,
    pub etag: Option<String>,
}

pub async fn read<S: ObjectStore>(
    store: &S,
    prefix: &Prefix,
    disk: &DiskId,
    now: DateTime<Utc>,
) -> Result<Read, ReplicaError> {
    let key = head_key(prefix, disk);
    match store.get_versioned(&key, MAX_HEAD_BYTES as u64).await {
        Ok(Some(v)) => {
            let head = ChainHead::from_json(&v.body, disk).map_err(|e| ReplicaError::BadHead {
                key: key.clone(),
                detail: e.to_string(),
            })?;
            Ok(Read {
                head,
                etag: Some(v.etag),
            })
        }
        Ok(None) => Ok(Read {
            head: ChainHead::new(disk.clone(), now),
            etag: None,
        }),
        Err(e) if e.kind == ErrorKind::TooLarge => Err(ReplicaError::BadHead {
            key,
            detail: format!("larger than a chain head may be ({MAX_HEAD_BYTES} bytes)"),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Replaces the head read as `read` with `head`. `Ok(false)`: another invocation changed
/// it first (412, or it was created meanwhile): read again and decide again.
pub async fn replace<S: ObjectStore>(
    store: &S,
    prefix: &Prefix,
    read: &Read,
    head: &ChainHead,
) -> Result<bool, ReplicaError> {
    let key = head_key(prefix, &head.disk);
    let opts = match &read.etag {
        Some(etag) => PutOptions::json().replacing(etag.clone()),
        None => PutOptions::json().create_only(),
    };
    match store.put(&key, head.to_json().into(), opts).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind == ErrorKind::PreconditionFailed || e.kind == ErrorKind::NotFound => {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Every disk's chain head under `prefix` (one listing of the bucket's head keys).
pub async fn all<S: ObjectStore>(
    store: &S,
    prefix: &Prefix,
    now: DateTime<Utc>,
) -> Result<Vec<ChainHead>, ReplicaError> {
    let keys = store
        .list(&prefix.key_start(), |k| k.ends_with("/r/head.json"))
        .await?;
    let mut out = Vec::new();
    for k in keys {
        if let Ok(ObjectKey::ReplicaHead { disk }) = ObjectKey::parse(prefix, &k) {
            out.push(read(store, prefix, &disk, now).await?.head);
        }
    }
    Ok(out)
}

/// One line per disk: its newest point, the point being written, the last error.
pub fn describe(h: &ChainHead) -> String {
    let mut s = format!("{}:", h.disk);
    match &h.point {
        Some(p) => s.push_str(&format!(
            " point generation {} ({}, {})",
            p.generation,
            p.snapshot_id,
            p.snapshot_time.format("%Y-%m-%dT%H:%M:%SZ")
        )),
        None => s.push_str(" no point yet"),
    }
    if let Some(p) = &h.pending {
        let state = match (&p.snapshot_id, p.sealed_at) {
            (None, _) => "starting".to_string(),
            (Some(id), None) => format!("writing {id} in {} shard(s)", p.shards),
            (Some(id), Some(_)) => format!("sealed {id}, completing"),
        };
        s.push_str(&format!(
            "; generation {} attempt {}: {state}",
            p.generation, p.attempt
        ));
    }
    s.push_str(&format!("; {} points written", h.points_written));
    if let Some(e) = &h.last_error {
        s.push_str(&format!("; last error: {e}"));
    }
    s
}
