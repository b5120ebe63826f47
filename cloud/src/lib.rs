//! pilotlight's one AWS access layer.
//!
//! - [`s3::ObjectStore`], [`sqs::Queue`], [`ec2::Ec2Api`], [`ebs::EbsApi`]: narrow traits, one per service,
//!   as pilotlight's code uses them;
//! - each implemented once for the AWS SDK for Rust (`SdkS3`, `SdkSqs`, `SdkEc2`, `SdkEbs`, `SdkMetrics`,
//!   behind the features `s3`, `sqs`, `ec2`, `ebs`, `metrics`, so a crate compiles only the SDK crates it needs) and
//!   once in memory (`MemoryStore`, `MemoryQueue`, `MemoryEc2`, `MemoryEbs`) with fault injection
//!   ([`fault`]): the logic above is tested at unit speed, the end-to-end tests still go
//!   through the SDK to the emulator;
//! - one error type, [`CloudError`], that says whether trying again later can help;
//! - one SDK configuration builder, [`config::AwsSettings`], for every binary and the test kit.
//!
//! Names follow one pattern: the SDK client of a service is `Sdk<Service>` (`SdkS3`,
//! `SdkSqs`, `SdkEc2`, `SdkEbs`, `SdkMetrics`), its twin `Memory<...>`, and its trait is
//! named for what pilotlight asks of it: a role where the service is one (`ObjectStore`,
//! `Queue`), `<Service>Api` where the trait is a slice of the service's own calls
//! (`Ec2Api`, `EbsApi`, `MetricsApi`).
//!
//! Each large service is a folder: `mod.rs` the trait and its request types, `memory.rs`
//! the in-memory twin, `sdk.rs` the SDK client, `tests.rs` the twin's tests.

pub mod config;
pub mod ebs;
pub mod ec2;
pub mod error;
pub mod fault;
pub mod metrics;
pub mod retry;
pub mod route53;
pub mod s3;
pub mod sqs;
pub mod ssm;
pub mod witness;

#[cfg(feature = "s3")]
pub use config::LazyS3;
pub use config::{Aws, AwsSettings};
pub use error::{CloudError, ErrorKind};
pub use fault::{Fault, Faults};
pub use s3::{ChunksError, MemoryStore, ObjectStore, PutOptions, Versioned};
pub use sqs::{MemoryQueue, Message, Queue};
