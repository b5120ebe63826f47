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
