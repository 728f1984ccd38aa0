//! Sealing (signing) and opening (verifying) registry statements.
//!
//! A [`Sealed`] envelope carries the CBOR body as bytes, so the signature covers exactly
//! the bytes that were signed and no re-encoding can change what was verified. The
//! signed message is `context || body`, where the context names the body's type: a
//! signature over a module manifest can never be passed off as one over a deployment.

use crate::types::{Command, Deployment, ModuleManifest};
use crate::DecodeError;
use alloc::vec::Vec;
use core::fmt;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use minicbor::bytes::{ByteArray, ByteVec};
use minicbor::{CborLen, Decode, Encode};
use sha2::{Digest as _, Sha256};

/// sha256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A signed statement on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct Sealed {
    /// First 8 bytes of sha256 of the signer's public key: picks the key to verify with
    /// when a device trusts several (key rotation) without trying each.
    #[n(0)]
    pub key_id: ByteArray<8>,
    /// The CBOR encoding of the statement.
    #[n(1)]
    pub body: ByteVec,
    #[n(2)]
    pub signature: ByteArray<64>,
}

/// A statement type the registry signs.
pub trait SignedBody: Encode<()> + for<'b> Decode<'b, ()> {
    /// Domain separation: prepended to the body before signing.
    const CONTEXT: &'static [u8];
}

impl SignedBody for Deployment {
    const CONTEXT: &'static [u8] = b"wpm/v1/deployment\0";
}

impl SignedBody for Command {
    const CONTEXT: &'static [u8] = b"wpm/v1/command\0";
}

impl SignedBody for ModuleManifest {
    const CONTEXT: &'static [u8] = b"wpm/v1/module-manifest\0";
}

fn key_id(key: &VerifyingKey) -> [u8; 8] {
    let h = sha256(key.as_bytes());
    let mut id = [0; 8];
    id.copy_from_slice(&h[..8]);
    id
}

fn signed_message(context: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(context.len() + body.len());
    m.extend_from_slice(context);
    m.extend_from_slice(body);
    m
}

/// The registry's signing key.
pub struct KeyPair {
    key: SigningKey,
}

impl KeyPair {
    /// The key made from a 32-byte secret seed (which the caller draws from a CSPRNG).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(seed),
        }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn public(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs `body` and returns the CBOR bytes of its [`Sealed`] envelope.
    pub fn seal<T: SignedBody>(&self, body: &T) -> Vec<u8> {
        let body = crate::encode(body);
        let signature = self.key.sign(&signed_message(T::CONTEXT, &body));
        crate::encode(&Sealed {
            key_id: key_id(&self.key.verifying_key()).into(),
            body: body.into(),
            signature: signature.to_bytes().into(),
        })
    }
}

/// Why a sealed statement was refused.
#[derive(Debug)]
pub enum OpenError {
    /// The envelope or the body is not valid CBOR of the expected shape.
    Malformed(DecodeError),
    /// Signed by a key this side does not trust.
    UnknownKey,
    /// The signature does not verify: altered in transit or forged.
    BadSignature,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Malformed(e) => write!(f, "malformed CBOR: {e}"),
            OpenError::UnknownKey => f.write_str("signed by an untrusted key"),
            OpenError::BadSignature => f.write_str("signature does not verify"),
        }
    }
}

/// The public keys a device accepts statements from.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<VerifyingKey>,
}

impl TrustedKeys {
    /// Keys given as raw 32-byte ed25519 public keys; invalid points are skipped.
    pub fn new(keys: &[[u8; 32]]) -> Self {
        Self {
            keys: keys
                .iter()
                .filter_map(|k| VerifyingKey::from_bytes(k).ok())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies a sealed statement and decodes its body. Verification comes before
    /// decoding the body, so unauthenticated bytes never reach the body decoder.
    pub fn open<T: SignedBody>(&self, bytes: &[u8]) -> Result<T, OpenError> {
        let sealed: Sealed = crate::decode(bytes).map_err(OpenError::Malformed)?;
        let key = self
            .keys
            .iter()
            .find(|k| key_id(k) == *sealed.key_id)
            .ok_or(OpenError::UnknownKey)?;
        let signature = Signature::from_bytes(&sealed.signature);
        key.verify_strict(&signed_message(T::CONTEXT, &sealed.body), &signature)
            .map_err(|_| OpenError::BadSignature)?;
        crate::decode(&sealed.body).map_err(OpenError::Malformed)
    }
}
