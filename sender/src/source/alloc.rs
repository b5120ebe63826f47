//! The allocation map of a source file: shared with the receiver, which reads only the
//! allocated parts of an image for a full recovery point.

pub use pilotlight_durable::sparse::{data_segments, holes};
