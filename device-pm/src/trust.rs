//! Key rotation on the device: following the registry's trust chain
//! ([`wpm_manifests::trust`]) and keeping the keys reached in flash.
//!
//! The keys in force are the provisioned ones (epoch 0) until the first update applies;
//! from then on they live in the state record ([`crate::store::State::trust`]), written
//! like every other change of state: a power cut while writing it leaves the old record,
//! so the device boots with the old keys or the new ones, never a mix, and follows the
//! retained chain again on its next connection.

use crate::store::{State, TrustState};
use crate::{Config, Device};
use alloc::format;
use alloc::string::ToString;
use alloc::vec::Vec;
use embedded_storage::nor_flash::NorFlash;
use wpm_manifests::trust::follow;
use wpm_manifests::{EventKind, TrustedKeys};

/// The epoch and keys in force: the state record's, or the provisioned ones.
pub(crate) fn in_force(state: &State, config: &Config) -> (u64, Vec<[u8; 32]>) {
    match &state.trust {
        Some(t) => (t.epoch, t.keys.iter().map(|k| **k).collect()),
        None => (0, config.trusted_keys.clone()),
    }
}

impl<F: NorFlash> Device<F> {
    /// The epoch and keys in force: the state record's, or the provisioned ones.
    pub fn trust(&self) -> (u64, Vec<[u8; 32]>) {
        in_force(self.store.state(), &self.config)
    }

    /// The epoch of the trust chain reached (0: the provisioned keys).
    pub fn trust_epoch(&self) -> u64 {
        self.store.state().trust.as_ref().map_or(0, |t| t.epoch)
    }

    /// The retained trust chain arrived (again): applies what is new in it, persists the
    /// keys reached before using them, and says so in one event.
    pub(crate) fn on_trust(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            // A cleared retained message: nothing to follow.
            return;
        }
        let (epoch, keys) = self.trust();
        let reached = follow(payload, epoch, &keys);
        if reached.moved_from(epoch) {
            let state = TrustState {
                epoch: reached.epoch,
                keys: reached.keys.iter().map(|k| (*k).into()).collect(),
            };
            if let Err(e) = self.store.update(|s| s.trust = Some(state)) {
                // Not persisted, so not used: the chain is followed again on the next
                // connection.
                return self.device_error(format!(
                    "could not keep the keys of trust epoch {}: {e}",
                    reached.epoch
                ));
            }
            self.keys = TrustedKeys::new(&reached.keys);
            self.event(EventKind::TrustUpdated {
                epoch: reached.epoch,
            });
            // A retained deployment sealed by a key just learnt may have been refused
            // before the chain arrived: ask for it again.
            if self.link_up {
                for topic in self.deploy_topics.clone() {
                    self.unsubscribe(topic.clone());
                    self.subscribe(topic);
                }
            }
        }
        if let Some(error) = reached.error {
            self.event(EventKind::TrustRejected {
                epoch: reached.epoch,
                reason: error.to_string(),
            });
        }
    }
}
