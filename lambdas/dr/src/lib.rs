//! pilotlight one-click DR: turns replicated disks into a running EC2 instance.
//!
//! - [`model`]: the request and the run record (JSON in S3);
//! - [`config`]: settings shared by the Lambda and the CLI, the handler's environment
//!   and client setup;
//! - [`handler`]: the commands: start, status, cleanup, configure, recover, report;
//! - [`plan`]: a start's validation, point resolution and method choice;
//! - [`steps`]: the phase machine (exporting → importing → launching → verifying, or
//!   registering → launching → verifying for the snapshot method);
//! - [`runs`]: the run store, reports and the documents beside the runs;
//! - [`report`]: the HTML drill and recovery report written beside each run record;
//! - [`sim`] (feature `sim`): a simulated EC2 image import (EMULATOR ONLY: the emulator
//!   has none); tests and the demo build it, the deployed Lambda does not.
//!
//! The bucket and EC2 are reached through `pilotlight-cloud`'s `ObjectStore` and `Ec2Api`
//! (the SDK, or the in-memory twins in tests).

pub mod config;
pub mod error;
pub mod failback;
pub mod handler;
pub mod model;
pub mod plan;
pub mod plans;
pub mod report;
pub mod runs;
#[cfg(feature = "sim")]
pub mod sim;
pub mod steps;

pub use config::{DrConfig, DrEnv};
pub use error::DrError;
pub use handler::handle;
