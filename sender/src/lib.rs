//! pilotlight sender: ships the changed extents of one disk to S3 as one generation.
//!
//! A run: open and validate the source, pick the generation number from the local state,
//! upload data objects ([`pipeline`]), then commit with the manifest, written last.
//! The local state ([`state`]) makes a re-run after a crash reuse the generation and
//! converge to the same manifest.

pub mod history;
pub mod pipeline;
pub mod read_buf;
pub mod source;
pub mod state;
pub mod vsphere;

use bytes::Bytes;
use chrono::{DateTime, SubsecRound, Utc};
use pilotlight_cloud::{CloudError, ObjectStore, PutOptions};
use pilotlight_protocol::{
    Consistency, DiskId, Manifest, ManifestError, ObjectKey, Prefix, FORMAT_VERSION,
};
use pipeline::{Bandwidth, PipelineError, PipelineOptions, Progress};
use serde::Serialize;
use sha2::{Digest, Sha256};
use source::{OpenSource, SourceError, SourceSpec};
use state::{Pending, Phase, StateDir, StateError};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where and how every disk of a run is uploaded, resolved from config file,
/// environment and flags.
#[derive(Debug, Clone)]
pub struct UploadSettings {
    pub prefix: Prefix,
    pub max_object: u64,
    pub zstd_level: Option<i32>,
    pub concurrency: usize,
    pub bwlimit: Option<u64>,
    pub state_dir: PathBuf,
    pub dry_run: bool,
    /// Pack scattered changes into shared objects (manifest format v2; default). Off
    /// (`--no-pack`): format v1, for receivers older than packing.
    pub pack: bool,
    /// Send a full generation numbered after the bucket's newest, as a new base, whatever
    /// the local state says (the way back after the state was lost).
    pub rebase: bool,
}

/// One disk to send: which disk, where its bytes come from, and what its manifest says
/// of the source.
#[derive(Debug, Clone)]
pub struct Target {
    pub disk: DiskId,
    pub source: SourceSpec,
    pub change_id: Option<String>,
    pub snapshot_time: Option<DateTime<Utc>>,
    pub consistency: Consistency,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Store(#[from] CloudError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the manifest this run built is invalid, which is a bug in pilotlight-sender: {0}")]
    BadManifest(#[from] ManifestError),
    #[error("saved manifest {path} does not match the pending generation {generation}: {why}; move it away and re-run")]
    PendingManifest {
        path: String,
        generation: u64,
        why: String,
    },
    #[error("{disk}: the bucket already has generation {newest} ({key}), a valid manifest of this disk newer than this sender's state (last committed: {}), so the state is behind the bucket (the state directory was lost or restored from an old copy, or another sender writes this disk); nothing was written. Continue with `pilotlight-sender send --rebase --source full` (or `pilotlight-sender vsphere --rebase`), same disk and bucket: a full generation after the bucket's newest, which the receiver applies as a new base", last_committed.map_or("none".to_string(), |g| format!("generation {g}")))]
    AlreadyCommitted {
        disk: String,
        /// The newest valid generation in the bucket, and the key of its manifest.
        newest: u64,
        key: String,
        last_committed: Option<u64>,
    },
    #[error("{disk}: {key}, where generation {generation} was to be committed, holds an object that is not a manifest of this disk ({why}); nothing was committed. Run again: the next run numbers its generation past that key")]
    Occupied {
        disk: String,
        generation: u64,
        key: String,
        why: String,
    },
    #[error("--rebase needs a source that describes the whole disk (--source full, or vSphere's changeId \"*\"): a new base must")]
    RebaseNeedsFull,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub disk: String,
    pub generation: u64,
    pub parent: Option<u64>,
    pub manifest_key: String,
    pub dry_run: bool,
    /// True when this run finished a generation an earlier run had started.
    pub resumed: bool,
    pub disk_size: u64,
    pub objects: usize,
    /// PUT requests made for the generation: its objects and its manifest.
    pub put_requests: u64,
    /// PUT requests per GiB of changed data (what S3 bills and a WAN waits for).
    pub requests_per_gib: f64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Decoded bytes in data objects.
    pub bytes_data: u64,
    /// Bytes sent (stored sizes, after compression).
    pub bytes_uploaded: u64,
    /// Changed bytes that are zero (never uploaded), found by reading or by the allocation map.
    pub bytes_zero: u64,
    /// Of those, bytes the allocation map said were holes (never read).
    pub bytes_holes: u64,
    pub seconds: f64,
}

impl Summary {
    pub fn line(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        format!(
            "{}{} generation {} (parent {}): {} objects, {} PUT requests ({:.0} per GiB changed), read {:.1} MiB, data {:.1} MiB, uploaded {:.1} MiB, zero {:.1} MiB ({:.1} MiB holes never read), {:.2} s, {:.1} MiB/s read",
            if self.dry_run { "dry run: " } else { "" },
            self.disk,
            self.generation,
            self.parent.map_or("none".to_string(), |p| p.to_string()),
            self.objects,
            self.put_requests,
            self.requests_per_gib,
            mib(self.bytes_read),
            mib(self.bytes_data),
            mib(self.bytes_uploaded),
            mib(self.bytes_zero),
            mib(self.bytes_holes),
            self.seconds,
            mib(self.bytes_read) / self.seconds.max(1e-6),
        )
    }
}

/// Sends one generation. With `dry_run`, reads and encodes everything but uploads
/// nothing and leaves the state untouched.
pub async fn send_generation<S: ObjectStore>(
    up: &UploadSettings,
    target: &Target,
    store: &S,
    progress: &dyn ProgressFactory,
) -> Result<Summary, SendError> {
    let started = Instant::now();
    let lock = if up.dry_run {
        None
    } else {
        Some(StateDir::open(&up.state_dir, &target.disk)?)
    };
    let mut st = match &lock {
        Some(sd) => sd.load(&target.disk)?,
        None => state::peek(&up.state_dir, &target.disk)?.unwrap_or(state::DiskState {
            disk: target.disk.clone(),
            last_committed: None,
            last_change_id: None,
            last_snapshot_time: None,
            pending: None,
        }),
    };

    // A generation whose data is all up but whose manifest may not be: finish it first.
    if let (Some(sd), Some(p)) = (&lock, st.pending.clone()) {
        if p.phase == Phase::Committing {
            finish_commit(up, target, store, sd, &mut st, &p).await?;
        }
    }

    // Validate all input before anything is uploaded.
    let source = Arc::new(OpenSource::open_async(&target.source).await?);
    // A committed generation is never written again, and a valid manifest newer than the
    // state means the state is behind: one LIST of the disk's manifests, and a read of
    // each above the state's last commit (usually none). Other objects at manifest keys
    // are stepped over: numbered past, never believed.
    let history = if lock.is_some() {
        history::read(store, &up.prefix, &target.disk, st.last_committed).await?
    } else {
        history::BucketHistory::default()
    };
    if up.rebase {
        if !source.self_contained {
            return Err(SendError::RebaseNeedsFull);
        }
        // A fresh base after everything there is; whatever was under way is dropped.
        st.pending = None;
    } else if let Some(c) = &history.newest_valid {
        return Err(SendError::AlreadyCommitted {
            disk: target.disk.to_string(),
            newest: c.generation,
            key: c.key.clone(),
            last_committed: st.last_committed,
        });
    }
    if let Some(p) = st.pending.as_mut() {
        if history.highest_key >= Some(p.generation) {
            let next = history.next_generation(st.last_committed);
            tracing::warn!(
                disk = %target.disk,
                "generation {} was under way, but a key at or above it is taken: it becomes generation {next}",
                p.generation
            );
            p.generation = next;
        }
    }
    let resumed = st.pending.is_some();
    let (generation, snapshot_time) = match &st.pending {
        Some(p) => (
            p.generation,
            target.snapshot_time.unwrap_or(p.snapshot_time),
        ),
        None => (
            history.next_generation(st.last_committed),
            target
                .snapshot_time
                .unwrap_or_else(|| Utc::now().trunc_subsecs(3)),
        ),
    };
    let parent = if source.self_contained {
        None
    } else {
        st.last_committed
    };
    if parent.is_none() && !source.self_contained {
        tracing::warn!(
            disk = %target.disk,
            "first generation from a {} source: it becomes the base, so it must list every allocated extent (e.g. changeId \"*\")",
            source.kind
        );
    }
    tracing::info!(
        disk = %target.disk, generation, ?parent, source = %source.describe(), resumed,
        to_read = source.to_read.iter().map(|e| e.length).sum::<u64>(),
        holes = source.known_zero.iter().map(|e| e.length).sum::<u64>(),
        "sending generation"
    );
    if let Some(sd) = &lock {
        st.pending = Some(Pending {
            generation,
            snapshot_time,
            phase: Phase::Uploading,
        });
        sd.save(&st)?;
    }

    let popts = PipelineOptions {
        prefix: up.prefix.clone(),
        disk: target.disk.clone(),
        generation,
        max_object: up.max_object,
        zstd_level: up.zstd_level,
        concurrency: up.concurrency,
        pack: up.pack,
    };
    let bandwidth = up.bwlimit.map(|b| Bandwidth::new(b, up.max_object));
    let total: u64 = source.to_read.iter().map(|e| e.length).sum();
    let bar = progress.start(total);
    let out = pipeline::run(source.clone(), store, &popts, bandwidth.as_ref(), &*bar).await?;
    drop(bar);

    let mut zero_ranges = out.zero_ranges;
    zero_ranges.extend(source.known_zero.iter().copied());
    zero_ranges.sort();
    let zero_ranges = pilotlight_protocol::extent::coalesce(zero_ranges);
    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        disk: target.disk.clone(),
        generation,
        parent,
        disk_size: source.disk_size,
        max_object: up.max_object,
        source_kind: source.kind.to_string(),
        source_change_id: target.change_id.clone(),
        snapshot_time,
        consistency: target.consistency,
        objects: out.objects,
        zero_ranges,
        created_by: concat!("pilotlight-sender ", env!("CARGO_PKG_VERSION")).to_string(),
    };
    // The oldest format that says it: v1 unless an object is packed, so receivers from
    // before packing still read what they can.
    manifest.format_version = manifest.required_version();
    manifest.validate()?;
    let manifest_key = ObjectKey::Manifest {
        disk: target.disk.clone(),
        generation,
    }
    .to_key(&up.prefix);

    if let Some(sd) = &lock {
        // Save the manifest, then say so: a crash from here on re-puts exactly it.
        sd.write_pending_manifest(&manifest.to_json())?;
        let committing = Pending {
            generation,
            snapshot_time,
            phase: Phase::Committing,
        };
        st.pending = Some(committing.clone());
        sd.save(&st)?;
        finish_commit(up, target, store, sd, &mut st, &committing).await?;
    }

    Ok(Summary {
        disk: target.disk.to_string(),
        generation,
        parent,
        manifest_key,
        dry_run: up.dry_run,
        resumed,
        disk_size: manifest.disk_size,
        objects: manifest.objects.len(),
        put_requests: out.puts + 1,
        requests_per_gib: {
            let changed = manifest.data_bytes() + manifest.zero_bytes();
            if changed == 0 {
                0.0
            } else {
                (out.puts + 1) as f64 * (1u64 << 30) as f64 / changed as f64
            }
        },
        bytes_read: out.bytes_read,
        bytes_data: manifest.data_bytes(),
        bytes_uploaded: out.bytes_stored,
        bytes_zero: manifest.zero_bytes(),
        bytes_holes: source.known_zero.iter().map(|e| e.length).sum(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// PUTs the saved manifest of a Committing generation and records the commit.
async fn finish_commit<S: ObjectStore>(
    up: &UploadSettings,
    target: &Target,
    store: &S,
    sd: &StateDir,
    st: &mut state::DiskState,
    pending: &Pending,
) -> Result<(), SendError> {
    let bytes = sd.read_pending_manifest()?;
    let bad = |why: String| SendError::PendingManifest {
        path: sd.pending_manifest_path().display().to_string(),
        generation: pending.generation,
        why,
    };
    let manifest = Manifest::from_json(&bytes).map_err(|e| bad(e.to_string()))?;
    if manifest.generation != pending.generation || manifest.disk != target.disk {
        return Err(bad(format!(
            "it is {} generation {}",
            manifest.disk, manifest.generation
        )));
    }
    let key = ObjectKey::Manifest {
        disk: target.disk.clone(),
        generation: pending.generation,
    }
    .to_key(&up.prefix);
    let sha: [u8; 32] = Sha256::digest(&bytes).into();
    // Never over a committed manifest: a 412 is either this run's own earlier PUT (a
    // commit interrupted before the state was saved: the same bytes) or another's.
    match store
        .put(
            &key,
            Bytes::from(bytes.clone()),
            PutOptions::checksum(sha).create_only(),
        )
        .await
    {
        Ok(_) => {}
        Err(e) if e.kind == pilotlight_cloud::ErrorKind::PreconditionFailed => {
            let there = store
                .get(&key, pilotlight_protocol::MAX_MANIFEST_BYTES as u64)
                .await?;
            if there != bytes {
                let known = pending.generation.checked_sub(1).filter(|g| *g > 0);
                let history = history::read(store, &up.prefix, &target.disk, known).await?;
                if let Some(c) = history.newest_valid {
                    return Err(SendError::AlreadyCommitted {
                        disk: target.disk.to_string(),
                        newest: c.generation,
                        key: c.key,
                        last_committed: st.last_committed,
                    });
                }
                // Not a manifest of ours: this generation cannot be committed at its
                // number. Drop it (its data objects are inert without a manifest); the
                // next run numbers past the key.
                st.pending = None;
                sd.save(st)?;
                sd.remove_pending_manifest()?;
                return Err(SendError::Occupied {
                    disk: target.disk.to_string(),
                    generation: pending.generation,
                    why: history
                        .stepped_over
                        .into_iter()
                        .find(|(k, _)| *k == key)
                        .map_or_else(
                            || "it changed while this run read it".into(),
                            |(_, why)| why,
                        ),
                    key,
                });
            }
        }
        Err(e) => return Err(e.into()),
    }
    st.last_committed = Some(pending.generation);
    st.last_change_id = manifest.source_change_id.clone();
    st.last_snapshot_time = Some(manifest.snapshot_time);
    st.pending = None;
    sd.save(st)?;
    sd.remove_pending_manifest()?;
    tracing::info!(key, "committed");
    Ok(())
}

/// Makes a progress display for a run of `total` bytes.
pub trait ProgressFactory: Send + Sync {
    fn start(&self, total: u64) -> Box<dyn Progress>;
}

/// No progress display.
#[derive(Debug, Default)]
pub struct NoProgress;

impl ProgressFactory for NoProgress {
    fn start(&self, _total: u64) -> Box<dyn Progress> {
        Box::new(())
    }
}

/// A progress bar on stderr (for a TTY).
#[derive(Debug, Default)]
pub struct BarProgress;

impl ProgressFactory for BarProgress {
    fn start(&self, total: u64) -> Box<dyn Progress> {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Box::new(FinishOnDrop(bar))
    }
}

struct FinishOnDrop(indicatif::ProgressBar);

impl Progress for FinishOnDrop {
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests;
