//! The key the registry signs deployments, module manifests and commands with: one
//! shared handle, swapped by a key rotation (`crate::trust`).

use std::sync::{Arc, RwLock};
use wpm_manifests::KeyPair;

/// The current signing key. Readers take a clone of the `Arc`, so a rotation never
/// changes the key under a statement half-way through sealing.
pub struct Signer(RwLock<Arc<KeyPair>>);

impl Signer {
    pub fn new(key: KeyPair) -> Signer {
        Signer(RwLock::new(Arc::new(key)))
    }

    pub fn key(&self) -> Arc<KeyPair> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Signs with `key` from now on.
    pub fn replace(&self, key: KeyPair) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }
}
