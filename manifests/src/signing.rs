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

    /// Signs `context || message` (a statement that is not a sealed body: a login).
    pub(crate) fn sign_with_context(&self, context: &[u8], message: &[u8]) -> [u8; 64] {
        self.key.sign(&signed_message(context, message)).to_bytes()
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

/// Verifies many sealed statements of one type, each against its own keys, in batches:
/// ed25519 batch verification costs about a third of one check per signature (measured
/// 15 µs against 40 µs on the registry's machine). A batch that fails is checked one by
/// one, so each statement gets exactly what [`TrustedKeys::open`] would give it, and a
/// flood of forgeries costs no more than checking them singly.
///
/// Batch verification accepts what single verification accepts for keys that are not
/// of small order; whoever registers keys must refuse those ([`is_weak_key`]).
#[cfg(feature = "batch")]
pub fn open_many<T: SignedBody>(items: &[(&TrustedKeys, &[u8])]) -> Vec<Result<T, OpenError>> {
    /// Signatures per batch: past this the saving per signature hardly grows, while a
    /// forgery costs its whole batch a second, single check.
    const BATCH: usize = 64;
    struct Candidate {
        index: usize,
        key: VerifyingKey,
        message: Vec<u8>,
        signature: Signature,
        body: ByteVec,
    }
    let mut results: Vec<Option<Result<T, OpenError>>> = (0..items.len()).map(|_| None).collect();
    let mut candidates = Vec::with_capacity(items.len());
    for (index, (keys, bytes)) in items.iter().enumerate() {
        let sealed: Sealed = match crate::decode(bytes) {
            Ok(s) => s,
            Err(e) => {
                results[index] = Some(Err(OpenError::Malformed(e)));
                continue;
            }
        };
        let Some(key) = keys.keys.iter().find(|k| key_id(k) == *sealed.key_id) else {
            results[index] = Some(Err(OpenError::UnknownKey));
            continue;
        };
        candidates.push(Candidate {
            index,
            key: *key,
            message: signed_message(T::CONTEXT, &sealed.body),
            signature: Signature::from_bytes(&sealed.signature),
            body: sealed.body,
        });
    }
    for chunk in candidates.chunks(BATCH) {
        let messages: Vec<&[u8]> = chunk.iter().map(|c| c.message.as_slice()).collect();
        let signatures: Vec<Signature> = chunk.iter().map(|c| c.signature).collect();
        let keys: Vec<VerifyingKey> = chunk.iter().map(|c| c.key).collect();
        let all_good = ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok();
        for c in chunk {
            let good = all_good || c.key.verify_strict(&c.message, &c.signature).is_ok();
            results[c.index] = Some(if good {
                crate::decode(&c.body).map_err(OpenError::Malformed)
            } else {
                Err(OpenError::BadSignature)
            });
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every statement was judged"))
        .collect()
}

/// Whether `key` is of small order: a key that makes batch and single verification
/// disagree, and that no honest device has. Registration refuses it.
pub fn is_weak_key(key: &[u8; 32]) -> bool {
    VerifyingKey::from_bytes(key).is_ok_and(|k| k.is_weak())
}

/// Whether `key` is a valid ed25519 point that is not of small order: one a signature
/// can be checked with.
pub fn is_usable_key(key: &[u8; 32]) -> bool {
    VerifyingKey::from_bytes(key).is_ok_and(|k| !k.is_weak())
}

/// Whether `signature` is `public`'s signature over `context || message`.
pub(crate) fn verify_with_context(
    public: &[u8; 32],
    context: &[u8],
    message: &[u8],
    signature: &[u8; 64],
) -> bool {
    VerifyingKey::from_bytes(public).is_ok_and(|k| {
        k.verify_strict(
            &signed_message(context, message),
            &Signature::from_bytes(signature),
        )
        .is_ok()
    })
}
