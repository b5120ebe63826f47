//! pilotlight protocol v1: the contract between sender, receiver and lambdas.
//!
//! One place defines the format on S3; everything else uses these types:
//! - [`names`]: validated names, disk ids and key prefixes;
//! - [`keys`]: object keys of data objects and manifests, built and parsed;
//! - [`manifest`]: the commit record of a generation, with validation;
//! - [`export`]: export requests and results (DR Lambda <-> receiver);
//! - [`failback`]: return snapshots (DR Lambda -> sender) and rounds (sender -> DR Lambda);
//! - [`event`]: S3 event notifications (real S3 and the emulator), parsed tolerantly;
//! - [`extent`]: byte ranges and the alignment rules shared by all parts;
//! - [`replica`]: snapshots mode's chain heads, shard records and shard tasks;
//! - [`points`]: recovery points' snapshot tags, VM points, retention tiers.
//!
//! Nothing here does I/O. Everything that parses untrusted input returns a typed error
//! and never panics.

pub mod event;
pub mod export;
pub mod extent;
pub mod failback;
pub mod keys;
pub mod manifest;
pub mod names;
pub mod points;
pub mod replica;
pub mod replica_export;

pub use event::{parse_notification, EventError, S3Notification, S3Record};
pub use export::{
    ExportDocError, ExportFormat, ExportRequest, ExportResult, ExportStatus, EXPORT_VERSION,
    MAX_EXPORT_DOC_BYTES,
};
pub use extent::{Extent, SECTOR_SIZE, SPLIT_ALIGN};
pub use failback::{
    FailbackDocError, ReturnDoc, ReturnPoint, RoundDoc, FAILBACK_VERSION, MAX_FAILBACK_DOC_BYTES,
};
pub use keys::{KeyError, ObjectKey};
pub use manifest::{
    Consistency, DataObject, Encoding, Manifest, ManifestError, Sha256Hex, DEFAULT_MAX_OBJECT,
    FORMAT_VERSION, MAX_MANIFEST_BYTES, MAX_OBJECT_LIMIT,
};
pub use names::{DiskId, Name, NameError, Prefix};
