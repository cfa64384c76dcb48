//! Serde helpers that keep a length read from the wire from allocating by
//! itself.
//!
//! bincode reads a container's length before its elements. Left to serde's
//! defaults, a `String` allocates its claimed length at once (a 32-byte
//! frame claiming 2^50 bytes aborts the process) and a `Vec<T>` reserves up
//! to 1 MiB whatever the frame holds. Every variable-length field of a
//! [`super::Message`] goes through one of these instead:
//!
//! - [`string`], [`opt_string`] and [`bytes`] borrow the bytes from the
//!   header first. bincode's slice reader refuses a length beyond the bytes
//!   that remain before anything is allocated; only then are they copied,
//!   so the allocation is at most what the frame really holds.
//! - [`vec()`] reserves at most [`MAX_PREALLOCATED_BYTES`] up front and grows
//!   only with the elements it has actually decoded, each of which took
//!   bytes from the frame.
//!
//! The wire format is unchanged: bincode writes a byte string and a
//! sequence of `u8` the same way (a `u64` length, then the bytes).
//! `common/tests/wire_limits.rs` forges every length in every message kind
//! and fails if a field is left out.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

/// The most a sequence reserves before its elements arrive.
pub const MAX_PREALLOCATED_BYTES: usize = 4096;

/// How many `T` a sequence claiming `claimed` elements may reserve.
fn cautious_capacity<T>(claimed: Option<usize>) -> usize {
    let most = MAX_PREALLOCATED_BYTES / std::mem::size_of::<T>().max(1);
    claimed.unwrap_or(0).min(most)
}

/// A `String` whose length is checked against the frame before it is
/// allocated.
pub fn string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct StringVisitor;
    impl Visitor<'_> for StringVisitor {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
    }
    deserializer.deserialize_str(StringVisitor)
}

/// An `Option<String>` decoded like [`string`].
pub fn opt_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    struct OptVisitor;
    impl<'de> Visitor<'de> for OptVisitor {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an optional string")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            string(d).map(Some)
        }
    }
    deserializer.deserialize_option(OptVisitor)
}

/// A byte string (`Vec<u8>`) whose length is checked against the frame
/// before it is allocated.
pub fn bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    struct BytesVisitor;
    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a byte string")
        }
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        // Self-describing formats (JSON) write bytes as a sequence.
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<u8>, A::Error> {
            collect(seq)
        }
    }
    deserializer.deserialize_bytes(BytesVisitor)
}

/// A `Vec<T>` that reserves at most [`MAX_PREALLOCATED_BYTES`] before its
/// elements are decoded.
pub fn vec<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct VecVisitor<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for VecVisitor<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a sequence")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<T>, A::Error> {
            collect(seq)
        }
    }
    deserializer.deserialize_seq(VecVisitor(PhantomData))
}

fn collect<'de, A: SeqAccess<'de>, T: Deserialize<'de>>(mut seq: A) -> Result<Vec<T>, A::Error> {
    let mut out = Vec::with_capacity(cautious_capacity::<T>(seq.size_hint()));
    while let Some(element) = seq.next_element()? {
        out.push(element);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, Deserialize)]
    struct Fields {
        #[serde(deserialize_with = "string")]
        name: String,
        #[serde(deserialize_with = "opt_string")]
        alias: Option<String>,
        #[serde(deserialize_with = "bytes")]
        blob: Vec<u8>,
        #[serde(deserialize_with = "vec")]
        ids: Vec<u64>,
    }

    fn sample() -> Fields {
        Fields {
            name: "node-ä".into(),
            alias: Some("a\"b".into()),
            blob: vec![0, 255, 7],
            ids: vec![1, u64::MAX],
        }
    }

    #[test]
    fn json_round_trips_too() {
        // The helpers must not tie the types to bincode.
        for value in [
            sample(),
            Fields {
                alias: None,
                ..sample()
            },
        ] {
            let json = serde_json::to_string(&value).unwrap();
            assert_eq!(serde_json::from_str::<Fields>(&json).unwrap(), value);
        }
    }

    #[test]
    fn a_sequence_reserves_little_whatever_it_claims() {
        assert_eq!(cautious_capacity::<u8>(Some(usize::MAX)), 4096);
        assert_eq!(cautious_capacity::<u64>(Some(1 << 50)), 512);
        assert_eq!(cautious_capacity::<u64>(Some(3)), 3);
        assert_eq!(cautious_capacity::<u64>(None), 0);
        assert_eq!(cautious_capacity::<()>(Some(10_000)), 4096);
    }
}
