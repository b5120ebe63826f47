//! pilotlight one-click DR: turns replicated disks into a running EC2 instance.
//!
//! - [`model`]: the request and the run record (JSON in S3);
//! - [`handler`]: start, advance (exporting → importing → launching → done), cleanup;
//! - [`report`]: the HTML drill and recovery report written beside each run record;
//! - [`sim`]: a simulated EC2 image import (EMULATOR ONLY: the emulator has none);
//!
//! The bucket and EC2 are reached through `pilotlight-cloud`'s `ObjectStore` and `Ec2Api`
//! (the SDK, or the in-memory twins in tests).
//! - [`config`]: settings shared by the Lambda and the CLI, and client setup.

pub mod config;
pub mod handler;
pub mod model;
pub mod report;
pub mod sim;

pub use handler::{handle, DrConfig, DrEnv, DrError};
