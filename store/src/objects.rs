//! A generation's data objects as read back: the stored bytes checked against the
//! manifest (stored length, decoding, decoded length, SHA-256) before anything uses them.
//! One check for the receiver's apply and the replica function's points.

use bytes::Bytes;
use pilotlight_protocol::{DataObject, Encoding, Sha256Hex};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error("stored length is {got} bytes, the manifest says {expected}")]
    StoredLength { expected: u64, got: u64 },
    #[error("cannot decode zstd: {0}")]
    Decode(String),
    #[error("decodes to {got} bytes, the manifest says {expected}")]
    DecodedLength { expected: u64, got: u64 },
    #[error("SHA-256 is {got}, the manifest says {expected}")]
    Checksum { expected: String, got: String },
}

/// Checks one object's stored bytes against its manifest entry; returns the decoded bytes.
pub fn verify(o: &DataObject, stored: &Bytes) -> Result<Bytes, ObjectError> {
    if stored.len() as u64 != o.stored_length {
        return Err(ObjectError::StoredLength {
            expected: o.stored_length,
            got: stored.len() as u64,
        });
    }
    let data = decode(o, stored.clone())?;
    if data.len() as u64 != o.length {
        return Err(ObjectError::DecodedLength {
            expected: o.length,
            got: data.len() as u64,
        });
    }
    let sha: [u8; 32] = Sha256::digest(&data).into();
    if sha != o.sha256.0 {
        return Err(ObjectError::Checksum {
            expected: o.sha256.to_string(),
            got: Sha256Hex(sha).to_string(),
        });
    }
    Ok(data)
}

/// Decodes stored bytes per the manifest's encoding.
pub fn decode(o: &DataObject, stored: Bytes) -> Result<Bytes, ObjectError> {
    match o.encoding {
        Encoding::Raw => Ok(stored),
        // Capacity is the manifest's length: a bomb that inflates further fails here.
        Encoding::Zstd => zstd::bulk::decompress(&stored, o.length as usize)
            .map(Bytes::from)
            .map_err(|e| ObjectError::Decode(e.to_string())),
    }
}
