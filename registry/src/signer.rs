//! The key the registry signs deployments, module manifests and commands with: one
//! shared handle, swapped by a key rotation (`crate::trust`), made by this process or
//! followed from another replica that shares the data directory.

use crate::keys;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use wpm_manifests::KeyPair;

/// The current signing key and the data directory that holds its file. Readers take a
/// clone of the `Arc`, so a rotation never changes the key under a statement half-way
/// through sealing.
pub struct Signer {
    key: RwLock<Arc<KeyPair>>,
    data_dir: PathBuf,
}

impl Signer {
    /// The key of `data_dir`, created on first start.
    ///
    /// # Errors
    /// When the key file cannot be read or written.
    pub fn load(data_dir: &Path) -> anyhow::Result<Signer> {
        Ok(Signer {
            key: RwLock::new(Arc::new(keys::load_or_create_signing_key(data_dir)?)),
            data_dir: data_dir.to_path_buf(),
        })
    }

    pub fn key(&self) -> Arc<KeyPair> {
        self.key.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Where the key files live.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Signs with `key` from now on.
    pub fn replace(&self, key: KeyPair) {
        *self.key.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }
}
