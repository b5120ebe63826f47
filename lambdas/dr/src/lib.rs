//! pilotlight one-click DR: turns replicated disks into a running EC2 instance.
//!
//! - [`model`]: the request and the run record (JSON in S3);
//! - [`handler`]: start, advance (exporting → importing → launching → done), cleanup;
//! - [`api`]: the narrow `ObjectStore` and `Ec2Api` traits, for the AWS SDK clients;
//! - [`sim`]: a simulated EC2 image import (the emulator has none) and in-memory fakes;
//! - [`config`]: settings shared by the Lambda and the CLI, and client setup.

pub mod api;
pub mod config;
pub mod handler;
pub mod model;
pub mod sim;

pub use handler::{handle, DrConfig, DrEnv, DrError};
