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

/// One object checked as its stored bytes arrive, chunk by chunk: the decoded bytes are
/// handed on with their offset in the object as they come, hashed on the way, never more
/// than the manifest's length of them (a bomb stops there), and [`Streamed::finish`]
/// checks lengths and SHA-256 at the end. Memory: one output buffer, and for zstd the
/// decoder's window (at most the object's own length, which bounds what a hostile frame
/// can ask for). The caller must not use what it was handed unless `finish` passes.
pub struct Streamed {
    expected: DataObject,
    stored: u64,
    decoded: u64,
    hasher: Sha256,
    zstd: Option<(zstd::stream::raw::Decoder<'static>, Vec<u8>, usize)>,
}

impl std::fmt::Debug for Streamed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamed")
            .field("offset", &self.expected.offset)
            .field("stored", &self.stored)
            .field("decoded", &self.decoded)
            .finish_non_exhaustive()
    }
}

/// Why streaming an object stopped: the object is wrong, or the caller's sink failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError<E> {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error(transparent)]
    Sink(E),
}

/// Decoded bytes handed on at once by the zstd path.
const STREAM_OUT: usize = 256 * 1024;

impl Streamed {
    pub fn new(o: &DataObject) -> Result<Streamed, ObjectError> {
        let zstd = match o.encoding {
            Encoding::Raw => None,
            Encoding::Zstd => {
                use zstd::stream::raw::DParameter;
                let mut d = zstd::stream::raw::Decoder::new()
                    .map_err(|e| ObjectError::Decode(e.to_string()))?;
                // A frame of an object of L bytes never needs a window past L: refuse
                // one that asks for more (zstd's own limit is 128 MiB).
                let log = (64 - o.length.max(1).saturating_sub(1).leading_zeros()).clamp(10, 27);
                d.set_parameter(DParameter::WindowLogMax(log))
                    .map_err(|e| ObjectError::Decode(e.to_string()))?;
                // The last `run`'s hint: 0 once a frame is complete.
                Some((d, vec![0u8; STREAM_OUT], 1))
            }
        };
        Ok(Streamed {
            expected: o.clone(),
            stored: 0,
            decoded: 0,
            hasher: Sha256::new(),
            zstd,
        })
    }

    /// Takes the next stored bytes; hands each decoded piece to `sink(offset, bytes)`.
    pub fn feed<E>(
        &mut self,
        chunk: &[u8],
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), StreamError<E>> {
        self.stored += chunk.len() as u64;
        if self.stored > self.expected.stored_length {
            return Err(ObjectError::StoredLength {
                expected: self.expected.stored_length,
                got: self.stored,
            }
            .into());
        }
        let Some((d, out, hint)) = self.zstd.as_mut() else {
            return emit(
                &self.expected,
                &mut self.decoded,
                &mut self.hasher,
                chunk,
                &mut sink,
            );
        };
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut input = InBuffer::around(chunk);
        loop {
            let mut output = OutBuffer::around(&mut out[..]);
            *hint = d
                .run(&mut input, &mut output)
                .map_err(|e| ObjectError::Decode(e.to_string()))?;
            let produced = output.pos();
            emit(
                &self.expected,
                &mut self.decoded,
                &mut self.hasher,
                &out[..produced],
                &mut sink,
            )?;
            // Done with this chunk once it is consumed and either the frame is complete
            // (hint 0: another call now would start reading a next frame) or the
            // decoder had room to spare (it flushed all it could).
            if input.pos() == chunk.len() && (*hint == 0 || produced < out.len()) {
                return Ok(());
            }
        }
    }

    /// Checks the whole: stored length, a complete zstd frame, decoded length, SHA-256.
    pub fn finish(self) -> Result<(), ObjectError> {
        if self.stored != self.expected.stored_length {
            return Err(ObjectError::StoredLength {
                expected: self.expected.stored_length,
                got: self.stored,
            });
        }
        if let Some((_, _, hint)) = &self.zstd {
            if *hint != 0 {
                return Err(ObjectError::Decode("the zstd frame ends early".into()));
            }
        }
        if self.decoded != self.expected.length {
            return Err(ObjectError::DecodedLength {
                expected: self.expected.length,
                got: self.decoded,
            });
        }
        let sha: [u8; 32] = self.hasher.finalize().into();
        if sha != self.expected.sha256.0 {
            return Err(ObjectError::Checksum {
                expected: self.expected.sha256.to_string(),
                got: Sha256Hex(sha).to_string(),
            });
        }
        Ok(())
    }
}

fn emit<E>(
    o: &DataObject,
    decoded: &mut u64,
    hasher: &mut Sha256,
    bytes: &[u8],
    sink: &mut impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), StreamError<E>> {
    if bytes.is_empty() {
        return Ok(());
    }
    if *decoded + bytes.len() as u64 > o.length {
        return Err(ObjectError::DecodedLength {
            expected: o.length,
            got: *decoded + bytes.len() as u64,
        }
        .into());
    }
    hasher.update(bytes);
    sink(*decoded, bytes).map_err(StreamError::Sink)?;
    *decoded += bytes.len() as u64;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn object(data: &[u8], zstd: bool) -> (DataObject, Vec<u8>) {
        let stored = if zstd {
            zstd::bulk::compress(data, 3).unwrap()
        } else {
            data.to_vec()
        };
        let o = DataObject {
            offset: 0,
            length: data.len() as u64,
            encoding: if zstd { Encoding::Zstd } else { Encoding::Raw },
            stored_length: stored.len() as u64,
            sha256: Sha256Hex(Sha256::digest(data).into()),
            pieces: Vec::new(),
        };
        (o, stored)
    }

    /// Streams `stored` in chunks of `chunk` bytes; the bytes handed on, or the error.
    fn stream(o: &DataObject, stored: &[u8], chunk: usize) -> Result<Vec<u8>, ObjectError> {
        let mut out = vec![0u8; o.length as usize];
        let mut s = Streamed::new(o)?;
        for c in stored.chunks(chunk.max(1)) {
            s.feed(c, |at, b| {
                out[at as usize..at as usize + b.len()].copy_from_slice(b);
                Ok::<(), ()>(())
            })
            .map_err(|e| match e {
                StreamError::Object(e) => e,
                StreamError::Sink(()) => unreachable!(),
            })?;
        }
        s.finish()?;
        Ok(out)
    }

    proptest! {
        /// Streamed in any chunking, an object gives what the whole-object check gives:
        /// the same bytes, or a refusal.
        #[test]
        fn streaming_agrees_with_the_whole_object_check(
            seed in any::<u64>(),
            // Lengths that end exactly on the decoder's output buffer too (a frame then
            // completes on a full buffer: the call after it would start a next frame).
            len in prop_oneof![0usize..600_000, (1usize..=4).prop_map(|k| k * STREAM_OUT)],
            zstd in any::<bool>(),
            chunk in 1usize..100_000,
            corrupt in proptest::option::of((any::<prop::sample::Index>(), 1u8..=255)),
        ) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            // Half compressible, half random.
            let data: Vec<u8> = (0..len).map(|i| if i % 2 == 0 { (i / 1000) as u8 } else { rng.gen() }).collect();
            let (o, mut stored) = object(&data, zstd);
            if let (Some((at, x)), false) = (corrupt, stored.is_empty()) {
                let i = at.index(stored.len());
                stored[i] ^= x;
            }
            let whole = verify(&o, &Bytes::from(stored.clone()));
            let streamed = stream(&o, &stored, chunk);
            match (whole, streamed) {
                (Ok(w), Ok(s)) => prop_assert_eq!(&w[..], &s[..]),
                (Err(_), Err(_)) => {}
                (w, s) => prop_assert!(false, "whole {:?} streamed {:?}", w.map(|b| b.len()), s.map(|b| b.len())),
            }
        }
    }

    #[test]
    fn eight_mib_of_text_streams_whole_in_any_chunking() {
        let line = b"2026-11-23 INFO request served in 12 ms path=/api/v1/items id=00000000\n";
        let data: Vec<u8> = line.iter().cycle().take(8 << 20).copied().collect();
        let (o, stored) = object(&data, true);
        for chunk in [16 * 1024, 1000, 7] {
            assert!(stream(&o, &stored, chunk).unwrap() == data, "chunk {chunk}");
        }
    }

    #[test]
    fn bombs_truncation_and_wrong_lengths_are_refused() {
        // A zstd bomb: 4 MiB of zeroes compressed, declared as 1 KiB.
        let (mut o, stored) = object(&vec![0u8; 4 << 20], true);
        o.length = 1024;
        assert!(matches!(
            stream(&o, &stored, 4096),
            Err(ObjectError::DecodedLength { .. } | ObjectError::Decode(_))
        ));
        // A frame cut short.
        let (o, stored) = object(&vec![7u8; 300_000], true);
        let mut cut = o.clone();
        cut.stored_length -= 5;
        assert!(stream(&cut, &stored[..stored.len() - 5], 1000).is_err());
        // More stored bytes than declared, and fewer.
        let (o, stored) = object(b"hello world", false);
        let mut short = o.clone();
        short.stored_length = 5;
        assert!(matches!(
            stream(&short, &stored, 3),
            Err(ObjectError::StoredLength { .. })
        ));
        assert!(matches!(
            stream(&o, &stored[..4], 3),
            Err(ObjectError::StoredLength { .. })
        ));
        // Not a zstd frame at all.
        let mut garbage = o.clone();
        garbage.encoding = Encoding::Zstd;
        assert!(stream(&garbage, &stored, 4).is_err());
    }
}
