//! The provisioning record: what makes one device this device, its secret key included.
//!
//! It lives in a fixed flash region written once at the factory (or, on QEMU, loaded with
//! `-device loader,file=...,addr=...`), so the same firmware image serves every device
//! and no identity or key is compiled in.
//!
//! # Layout
//!
//! ```text
//! magic "WPMP" (u32 LE 0x504d_5057) | format version u16 | body length u16 | CBOR body | crc32
//! ```
//!
//! All little-endian; the CRC-32 (ISO-HDLC) covers everything before it. Erased flash
//! (`0xFF`) fails the magic check, a torn write fails the CRC. A newer format version is
//! refused rather than half-understood.
#![no_std]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use minicbor::{Decode, Encode};

pub const MAGIC: u32 = 0x504d_5057;
/// The format version this code writes and reads (2: the device's own key).
pub const VERSION: u16 = 2;
const HEADER: usize = 4 + 2 + 2;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// The device's identity and where it talks to.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Record {
    #[n(0)]
    pub device_id: String,
    #[n(1)]
    pub groups: Vec<String>,
    /// ed25519 public keys of the registry; more than one during a key rotation.
    #[n(2)]
    pub trusted_keys: Vec<minicbor::bytes::ByteArray<32>>,
    /// Host name or dotted IPv4 address of the MQTT broker.
    #[n(3)]
    pub broker_host: String,
    #[n(4)]
    pub broker_port: u16,
    /// The secret seed of the device's own ed25519 key, made by `wpm device add`; the
    /// registry holds its public half and takes only reports it signed.
    #[n(5)]
    pub device_key: minicbor::bytes::ByteArray<32>,
    /// The sequence of the newest deployment addressing the device when it was
    /// provisioned: it accepts none older, so a replayed old deployment cannot roll
    /// a fresh device back.
    #[n(6)]
    pub sequence_floor: u64,
}

/// Why a provisioning region does not hold a usable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// No record: erased or foreign bytes.
    NotProvisioned,
    UnsupportedVersion(u16),
    Truncated,
    BadCrc,
    Malformed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotProvisioned => f.write_str("no provisioning record (erased region)"),
            Error::UnsupportedVersion(v) => write!(f, "provisioning format {v} not supported"),
            Error::Truncated => f.write_str("provisioning record runs past its region"),
            Error::BadCrc => f.write_str("provisioning record fails its CRC"),
            Error::Malformed => f.write_str("provisioning record body is not valid CBOR"),
        }
    }
}

impl Record {
    /// The record as stored in flash.
    pub fn encode(&self) -> Vec<u8> {
        let body = minicbor::to_vec(self).expect("encoding into a Vec cannot fail");
        let mut out = Vec::with_capacity(HEADER + body.len() + 4);
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes());
        // A record is a few hundred bytes; the region is one flash page.
        out.extend_from_slice(&(body.len() as u16).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = CRC.checksum(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads the record at the start of `region`.
    pub fn decode(region: &[u8]) -> Result<Self, Error> {
        let header = region.get(..HEADER).ok_or(Error::Truncated)?;
        if u32::from_le_bytes(header[0..4].try_into().unwrap()) != MAGIC {
            return Err(Error::NotProvisioned);
        }
        let version = u16::from_le_bytes(header[4..6].try_into().unwrap());
        if version != VERSION {
            return Err(Error::UnsupportedVersion(version));
        }
        let len = u16::from_le_bytes(header[6..8].try_into().unwrap()) as usize;
        let end = HEADER + len;
        let stored = region.get(end..end + 4).ok_or(Error::Truncated)?;
        if CRC.checksum(&region[..end]) != u32::from_le_bytes(stored.try_into().unwrap()) {
            return Err(Error::BadCrc);
        }
        minicbor::decode(&region[HEADER..end]).map_err(|_| Error::Malformed)
    }

    pub fn trusted_keys(&self) -> Vec<[u8; 32]> {
        self.trusted_keys.iter().map(|k| **k).collect()
    }
}
