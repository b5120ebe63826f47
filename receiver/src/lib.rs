//! pilotlight receiver: applies committed generations into sparse raw images, durably
//! and idempotently.
//!
//! - [`image`]: sparse raw images (pwrite, hole punching, space reservation);
//! - [`apply`]: one generation onto one image, verify-then-write;
//! - [`state`]: what each image holds, saved atomically after fsync;
//! - [`export`]: an image to the bucket, import-ready (DR);
//! - [`store`]: reading and writing the bucket.

pub mod apply;
pub mod engine;
pub mod export;
pub mod image;
pub mod queue;
pub mod state;
pub mod store;
