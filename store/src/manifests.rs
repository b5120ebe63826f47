//! A disk's generation listing and its manifests
//! (`{prefix}/{site}/{vm}/{disk}/g/{generation:020}/manifest.json`, at most
//! [`MAX_MANIFEST_BYTES`]).

use crate::DocError;
use pilotlight_cloud::{CloudError, ObjectStore};
use pilotlight_protocol::keys::generation_prefix;
use pilotlight_protocol::{DiskId, Manifest, ObjectKey, Prefix, MAX_MANIFEST_BYTES};

/// The key of a generation's manifest.
pub fn key(prefix: &Prefix, disk: &DiskId, generation: u64) -> String {
    ObjectKey::Manifest {
        disk: disk.clone(),
        generation,
    }
    .to_key(prefix)
}

/// Reads and validates a generation's manifest: the object must parse, validate and name
/// exactly this disk and generation.
pub async fn read<S: ObjectStore + ?Sized>(
    store: &S,
    prefix: &Prefix,
    disk: &DiskId,
    generation: u64,
) -> Result<Manifest, DocError> {
    let of = ObjectKey::Manifest {
        disk: disk.clone(),
        generation,
    };
    let key = of.to_key(prefix);
    crate::read(store, key, MAX_MANIFEST_BYTES, "a manifest", |b| {
        let m = Manifest::from_json(b)?;
        m.check_key(&of)?;
        Ok::<_, pilotlight_protocol::ManifestError>(m)
    })
    .await
}

/// The generations of `disk` whose keys a listing shows a manifest at, ascending (keys
/// only: whether each object is a valid manifest is [`read`]'s to say).
pub fn generations_in<'a>(
    prefix: &Prefix,
    disk: &DiskId,
    keys: impl IntoIterator<Item = &'a String>,
) -> Vec<u64> {
    let mut out: Vec<u64> = keys
        .into_iter()
        .filter_map(|k| match ObjectKey::parse(prefix, k) {
            Ok(ObjectKey::Manifest {
                disk: d,
                generation,
            }) if d == *disk => Some(generation),
            _ => None,
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Lists the generations of `disk` that have a manifest key (one paginated LIST of the
/// disk's `g/` prefix, manifest keys only), ascending.
pub async fn list<S: ObjectStore + ?Sized>(
    store: &S,
    prefix: &Prefix,
    disk: &DiskId,
) -> Result<Vec<u64>, CloudError> {
    let keys = store
        .list(&generation_prefix(prefix, disk), |k| {
            k.ends_with("/manifest.json")
        })
        .await?;
    Ok(generations_in(prefix, disk, &keys))
}

#[cfg(test)]
mod tests;
