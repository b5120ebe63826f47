//! pilotlight receiver: applies committed generations into sparse raw images, durably
//! and idempotently.
//!
//! - [`image`]: sparse raw images (pwrite, hole punching, space reservation);
//! - [`apply`]: one generation onto one image, verify-then-write;
//! - [`budget`]: the bytes of objects held in memory at once (apply and prefetch);
//! - [`state`]: what each image holds, saved atomically after fsync;
//! - [`export`]: an image to the bucket, import-ready (DR);
//! - [`points`]: recovery points: each applied generation as an EBS snapshot, pruned by tiers;
//! - [`engine`]: the loop: events in, generations applied in order per disk;
//! - [`status`]: each disk's status from its state (the `status` command, the metrics).
//!
//! The bucket, the queue and EBS are reached through `pilotlight-cloud`'s `ObjectStore`,
//! `Queue` and `EbsApi` (the SDK against AWS or the emulator, or in-memory twins in tests).

pub mod apply;
pub mod budget;
pub mod engine;
/// Exports (the image or a recovery point, uploaded import-ready): shared with snapshots mode.
pub use pilotlight_store::upload as export;
pub mod image;
pub mod metrics;
pub mod points;
pub mod state;
pub mod status;
