//! The device's voice: every report it publishes, sealed with its own key and numbered.
//!
//! A report's counter is `epoch << 32 | n`: the epoch is kept in the flash state and
//! moves on once per boot (and whenever a boot's 2³² counters are used up), `n` counts
//! the reports sealed in this epoch. So counters grow across reboots and power cuts
//! with one state write per boot, never one per report; the registry drops a report
//! whose counter it has seen (see `wpm_manifests::report`).

use alloc::string::String;
use alloc::vec::Vec;
use wpm_manifests::{KeyPair, Presence, Report, ReportBody};

pub(crate) struct Reporter {
    device: String,
    key: KeyPair,
    epoch: u32,
    /// Reports sealed in this epoch: the low half of the next counter.
    sealed: u32,
    /// The counter of the last will handed out: the first presence of a session
    /// announces it.
    will: Option<u64>,
    /// The broker password, made on first use (one signature) and kept.
    login: Option<String>,
}

impl Reporter {
    pub fn new(device: String, seed: &[u8; 32], epoch: u32) -> Self {
        Self {
            device,
            key: KeyPair::from_seed(seed),
            epoch,
            sealed: 0,
            will: None,
            login: None,
        }
    }

    /// Whether this epoch's counters are used up: the caller persists the next epoch
    /// and calls [`Reporter::start_epoch`] before sealing again.
    pub fn exhausted(&self) -> bool {
        self.sealed == u32::MAX
    }

    pub fn start_epoch(&mut self, epoch: u32) {
        self.epoch = epoch;
        self.sealed = 0;
    }

    /// Seals `body` with the next counter.
    ///
    /// # Panics
    /// If the epoch is [`exhausted`](Reporter::exhausted): a counter must never repeat.
    pub fn seal(&mut self, body: ReportBody) -> Vec<u8> {
        assert!(
            !self.exhausted(),
            "report counters of epoch {} used up",
            self.epoch
        );
        let counter = (u64::from(self.epoch) << 32) | u64::from(self.sealed);
        self.sealed += 1;
        self.key.seal(&Report {
            device: self.device.clone(),
            counter,
            body,
        })
    }

    /// The offline presence for the broker to publish if the connection dies, sealed
    /// now, before anything else of the session, and remembered to be announced.
    pub fn seal_will(&mut self) -> Vec<u8> {
        self.will = Some((u64::from(self.epoch) << 32) | u64::from(self.sealed));
        self.seal(ReportBody::Presence(Presence {
            online: false,
            will: None,
        }))
    }

    /// The broker login: username (the device id) and password (see
    /// `wpm_manifests::login_password`).
    pub fn login(&mut self) -> (String, String) {
        let password = (self.login)
            .get_or_insert_with(|| wpm_manifests::login_password(&self.key, &self.device))
            .clone();
        (self.device.clone(), password)
    }

    /// The presence that opens a session: online, naming the session's will.
    pub fn online(&self) -> ReportBody {
        ReportBody::Presence(Presence {
            online: true,
            will: self.will,
        })
    }
}
