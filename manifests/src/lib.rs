//! The one crate both sides of wpm share.
//!
//! Everything that crosses the wire between the registry and a device is defined here:
//! the CBOR message types ([`types`]), the MQTT topic names ([`topic`]) and how signed
//! messages are sealed and opened ([`signing`]). Both sides test against the golden
//! vectors in `tests/vectors/`, so a change to the encoding shows up as a failing test on
//! both sides at once.
//!
//! `no_std` + `alloc`: the same code runs on the nRF9160 and in the registry.
//! Decoding never panics on malformed input; it returns [`DecodeError`].
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod golden;
pub mod report;
pub mod signing;
pub mod topic;
pub mod trust;
pub mod types;

pub use report::{check_login_password, login_password, Report, ReportBody};
#[cfg(feature = "batch")]
pub use signing::open_many;
pub use signing::{is_usable_key, is_weak_key, sha256, KeyPair, OpenError, Sealed, TrustedKeys};
pub use topic::{Topic, TopicFilter};
pub use trust::{TrustChain, TrustUpdate};
pub use types::*;

/// A malformed CBOR message.
pub type DecodeError = minicbor::decode::Error;

/// Encodes any wire type to CBOR.
pub fn encode<T: minicbor::Encode<()>>(value: &T) -> alloc::vec::Vec<u8> {
    // Encoding into a Vec cannot fail: the writer is infallible.
    minicbor::to_vec(value).unwrap_or_default()
}

/// Decodes a wire type from CBOR, refusing trailing bytes.
pub fn decode<'b, T: minicbor::Decode<'b, ()>>(bytes: &'b [u8]) -> Result<T, DecodeError> {
    let mut d = minicbor::Decoder::new(bytes);
    let v = d.decode()?;
    if d.position() != bytes.len() {
        return Err(minicbor::decode::Error::message(
            "trailing bytes after CBOR item",
        ));
    }
    Ok(v)
}

/// Names used in topics (device ids, groups, module names) must be short and topic-safe:
/// 1 to 64 of `A-Z a-z 0-9 _ - .`, not starting with `.`. MQTT wildcards and `/` are thus
/// impossible, so no name can widen a subscription or escape its topic level.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}
