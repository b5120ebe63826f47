//! Plans in the bucket.
