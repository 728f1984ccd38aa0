//! Key rotation: the chain of trust updates a device follows from the keys it was
//! provisioned with to the keys the registry signs with now.
//!
//! A [`TrustUpdate`] names the complete set of keys trusted from its epoch on, and is
//! sealed by a key of the set in force before it: adding a new key, retiring an old one
//! after the fleet has moved, and distrusting a compromised one are all the same step.
//! The registry publishes every update so far, oldest first, as one retained
//! [`TrustChain`] on [`crate::Topic::Trust`]. A device applies, in order, the updates
//! above its own epoch that open with the keys the ones before left it ([`follow`]), so a
//! device that slept through several rotations still arrives at today's keys, one
//! provisioned with only the first key follows the whole chain, and one provisioned with
//! a later key joins the chain where that key comes in.
//!
//! A key that signs an update can name any set: whoever steals a trusted signing key can
//! also issue updates until a device has applied the one that distrusts it
//! (`docs/security.md`).

use crate::signing::{SignedBody, TrustedKeys};
use crate::{is_usable_key, DecodeError, OpenError};
use alloc::vec::Vec;
use core::fmt;
use minicbor::bytes::{ByteArray, ByteVec};
use minicbor::{CborLen, Decode, Encode};

/// Keys a device trusts at once, at most: bounds the state it keeps in flash.
pub const MAX_TRUSTED_KEYS: usize = 4;

/// The keys trusted from `epoch` on.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct TrustUpdate {
    /// Strictly increasing along the chain; the provisioned keys are epoch 0.
    #[n(0)]
    pub epoch: u64,
    /// The complete set, 1 to [`MAX_TRUSTED_KEYS`] ed25519 public keys.
    #[n(1)]
    pub keys: Vec<ByteArray<32>>,
}

impl SignedBody for TrustUpdate {
    const CONTEXT: &'static [u8] = b"wpm/v1/trust-update\0";
}

impl TrustUpdate {
    /// The update to `epoch` trusting `keys`, sealed by `signer` (a key in force before
    /// it, for devices to apply it).
    pub fn seal(signer: &crate::KeyPair, epoch: u64, keys: &[[u8; 32]]) -> Vec<u8> {
        signer.seal(&TrustUpdate {
            epoch,
            keys: keys.iter().map(|k| (*k).into()).collect(),
        })
    }
}

/// Every trust update so far, oldest first, each a sealed [`TrustUpdate`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct TrustChain {
    #[n(0)]
    pub links: Vec<ByteVec>,
}

/// Why a device stopped following a chain.
#[derive(Debug)]
pub enum TrustError {
    /// The chain itself is not valid CBOR.
    Malformed(DecodeError),
    /// The update after `epoch` does not open with the keys of `epoch`.
    Open { epoch: u64, error: OpenError },
    /// The update to `epoch` names no key, too many, or a key that is not a usable
    /// ed25519 point (invalid or of small order).
    BadKeySet { epoch: u64 },
}

impl fmt::Display for TrustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustError::Malformed(e) => write!(f, "trust chain: malformed CBOR: {e}"),
            TrustError::Open { epoch, error } => {
                write!(f, "trust update after epoch {epoch}: {error}")
            }
            TrustError::BadKeySet { epoch } => write!(
                f,
                "trust update to epoch {epoch}: needs 1 to {MAX_TRUSTED_KEYS} valid keys"
            ),
        }
    }
}

/// Where following a chain ended: the epoch and keys reached (the ones given if no
/// update applied), and why it stopped early, if it did.
#[derive(Debug)]
pub struct Followed {
    pub epoch: u64,
    pub keys: Vec<[u8; 32]>,
    pub error: Option<TrustError>,
}

impl Followed {
    /// Whether the chain moved the device past `epoch`.
    pub fn moved_from(&self, epoch: u64) -> bool {
        self.epoch > epoch
    }
}

/// Follows `chain` (an encoded [`TrustChain`]) from `epoch` and `keys`: skips the
/// updates at or below the epoch reached so far, and applies each later one that opens
/// with the keys in force at that point. An update that does not open is passed over (a
/// device provisioned with a newer key cannot open the older links, and a forged link
/// must not stop the real ones after it); if nothing after it applied, it is the error
/// reported. Pure.
pub fn follow(chain: &[u8], epoch: u64, keys: &[[u8; 32]]) -> Followed {
    let mut at = Followed {
        epoch,
        keys: keys.to_vec(),
        error: None,
    };
    let chain: TrustChain = match crate::decode(chain) {
        Ok(c) => c,
        Err(e) => {
            at.error = Some(TrustError::Malformed(e));
            return at;
        }
    };
    for link in &chain.links {
        let update: TrustUpdate = match TrustedKeys::new(&at.keys).open(link) {
            Ok(u) => u,
            // An update this device already passed may be signed by a key it has since
            // dropped; only one above its epoch must open.
            Err(_) if link_epoch(link).is_some_and(|e| e <= at.epoch) => continue,
            Err(error) => {
                at.error = Some(TrustError::Open {
                    epoch: at.epoch,
                    error,
                });
                continue;
            }
        };
        if update.epoch <= at.epoch {
            continue;
        }
        if update.keys.is_empty()
            || update.keys.len() > MAX_TRUSTED_KEYS
            || !update.keys.iter().all(|k| is_usable_key(k))
        {
            at.error = Some(TrustError::BadKeySet {
                epoch: update.epoch,
            });
            return at;
        }
        at.epoch = update.epoch;
        at.keys = update.keys.iter().map(|k| **k).collect();
        at.error = None;
    }
    at
}

/// The epoch an update claims, read without checking its seal: only ever used to skip
/// an update, never to apply one.
fn link_epoch(link: &[u8]) -> Option<u64> {
    let sealed: crate::Sealed = crate::decode(link).ok()?;
    let update: TrustUpdate = crate::decode(&sealed.body).ok()?;
    Some(update.epoch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyPair;
    use alloc::vec;

    fn key(seed: u8) -> KeyPair {
        KeyPair::from_seed(&[seed; 32])
    }

    fn link(signer: &KeyPair, epoch: u64, keys: &[&KeyPair]) -> ByteVec {
        let keys: Vec<[u8; 32]> = keys.iter().map(|k| k.public()).collect();
        TrustUpdate::seal(signer, epoch, &keys).into()
    }

    fn chain(links: Vec<ByteVec>) -> Vec<u8> {
        crate::encode(&TrustChain { links })
    }

    #[test]
    fn a_device_provisioned_with_the_first_key_follows_every_rotation() {
        let (a, b, c) = (key(1), key(2), key(3));
        let chain = chain(vec![
            link(&a, 1, &[&a, &b]),
            link(&b, 2, &[&b]),
            link(&b, 3, &[&b, &c]),
            link(&c, 4, &[&c]),
        ]);
        let f = follow(&chain, 0, &[a.public()]);
        assert!(f.error.is_none(), "{:?}", f.error);
        assert_eq!((f.epoch, f.keys), (4, vec![c.public()]));
        // A device already at epoch 2 skips what it passed, old signers included.
        let f = follow(&chain, 2, &[b.public()]);
        assert!(f.error.is_none(), "{:?}", f.error);
        assert_eq!((f.epoch, f.keys), (4, vec![c.public()]));
        // And one that is current moves nowhere.
        let f = follow(&chain, 4, &[c.public()]);
        assert!(!f.moved_from(4) && f.error.is_none());
    }

    #[test]
    fn an_update_signed_by_a_key_not_in_force_is_passed_over() {
        let (a, b, thief) = (key(1), key(2), key(9));
        let forged = link(&thief, 2, &[&thief]);
        let with_forgery_last = chain(vec![link(&a, 1, &[&a, &b]), forged.clone()]);
        let f = follow(&with_forgery_last, 0, &[a.public()]);
        assert_eq!(f.epoch, 1);
        assert_eq!(f.keys, vec![a.public(), b.public()]);
        assert!(matches!(
            f.error,
            Some(TrustError::Open {
                epoch: 1,
                error: OpenError::UnknownKey
            })
        ));
        // A forgery in the middle does not stop the genuine update after it.
        let in_the_middle = chain(vec![link(&a, 1, &[&a, &b]), forged, link(&b, 3, &[&b])]);
        let f = follow(&in_the_middle, 0, &[a.public()]);
        assert_eq!((f.epoch, f.keys), (3, vec![b.public()]));
        assert!(f.error.is_none());
    }

    #[test]
    fn a_device_provisioned_after_a_rotation_picks_up_where_its_key_comes_in() {
        let (a, b) = (key(1), key(2));
        let chain = chain(vec![link(&a, 1, &[&a, &b]), link(&b, 2, &[&b])]);
        // Provisioned with b alone (epoch 0 on the device): link 1 does not open for it.
        let f = follow(&chain, 0, &[b.public()]);
        assert_eq!((f.epoch, f.keys), (2, vec![b.public()]));
        assert!(f.error.is_none());
    }

    #[test]
    fn a_distrusted_key_signs_nothing_after_the_update_that_drops_it() {
        let (a, b) = (key(1), key(2));
        // b is compromised: the registry drops it with a; b's later update is refused.
        let chain = chain(vec![
            link(&a, 1, &[&a, &b]),
            link(&a, 2, &[&a]),
            link(&b, 3, &[&b]),
        ]);
        let f = follow(&chain, 0, &[a.public()]);
        assert_eq!((f.epoch, f.keys.clone()), (2, vec![a.public()]));
        assert!(f.error.is_some());
    }

    #[test]
    fn a_key_set_that_is_empty_or_weak_is_refused() {
        let a = key(1);
        let empty = chain(vec![link(&a, 1, &[])]);
        let f = follow(&empty, 0, &[a.public()]);
        assert!(matches!(f.error, Some(TrustError::BadKeySet { epoch: 1 })));
        assert_eq!(f.keys, vec![a.public()]);
        let weak = a.seal(&TrustUpdate {
            epoch: 1,
            // The identity point: of small order.
            keys: vec![{
                let mut k = [0u8; 32];
                k[0] = 1;
                k
            }
            .into()],
        });
        let f = follow(&chain(vec![weak.into()]), 0, &[a.public()]);
        assert!(matches!(f.error, Some(TrustError::BadKeySet { epoch: 1 })));
    }

    #[test]
    fn garbage_on_the_trust_topic_changes_nothing() {
        let a = key(1);
        let f = follow(b"\xff\x00garbage", 0, &[a.public()]);
        assert!(matches!(f.error, Some(TrustError::Malformed(_))));
        assert_eq!((f.epoch, f.keys), (0, vec![a.public()]));
    }
}
