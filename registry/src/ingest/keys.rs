//! The registered devices' public keys, as ingest verifies reports with them: loaded
//! from the database in one query per batch for the devices it does not hold yet.
//!
//! A key only changes when a device is removed and registered again, so entries live
//! [`KEY_TTL`]; an id that is not registered is remembered as such for [`UNKNOWN_TTL`],
//! so a flood of reports from invented devices costs one lookup per id and interval,
//! not one per report. A report whose signature fails drops its device's entry, so a
//! device registered again with a new key is heard after one refused report.

use crate::db::Db;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use wpm_manifests::TrustedKeys;

pub const KEY_TTL: Duration = Duration::from_secs(300);
pub const UNKNOWN_TTL: Duration = Duration::from_secs(10);
/// Entries kept at most; beyond it the unknown ids go first, then everything.
const CAPACITY: usize = 200_000;

struct Entry {
    /// `None`: not registered.
    key: Option<TrustedKeys>,
    loaded: Instant,
}

#[derive(Default)]
pub struct DeviceKeys {
    entries: HashMap<String, Entry>,
}

impl DeviceKeys {
    /// Makes sure every one of `ids` is known, registered or not.
    ///
    /// # Errors
    /// The database did not answer; nothing is known about the ids not yet held.
    pub async fn load<'a>(
        &mut self,
        db: &Db,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut missing: Vec<&str> = ids
            .into_iter()
            .filter(|id| self.entries.get(*id).is_none_or(|e| !e.fresh(now)))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort_unstable();
        missing.dedup();
        let found: HashMap<String, [u8; 32]> =
            db.public_keys(&missing).await?.into_iter().collect();
        self.make_room(missing.len());
        for id in missing {
            self.remember(id, found.get(id).copied(), now);
        }
        Ok(())
    }

    /// Holds `key` (`None`: not registered) for `id` as loaded at `now`.
    pub fn remember(&mut self, id: &str, key: Option<[u8; 32]>, now: Instant) {
        let key = key.map(|k| TrustedKeys::new(&[k]));
        self.entries
            .insert(id.to_string(), Entry { key, loaded: now });
    }

    /// The key of a registered device (after [`DeviceKeys::load`]).
    pub fn get(&self, id: &str) -> Option<&TrustedKeys> {
        self.entries.get(id).and_then(|e| e.key.as_ref())
    }

    /// Drops a device's entry: its report did not verify with the key held.
    pub fn forget(&mut self, id: &str) {
        self.entries.remove(id);
    }

    fn make_room(&mut self, adding: usize) {
        if self.entries.len() + adding <= CAPACITY {
            return;
        }
        self.entries.retain(|_, e| e.key.is_some());
        if self.entries.len() + adding > CAPACITY {
            self.entries.clear();
        }
    }
}

impl Entry {
    fn fresh(&self, now: Instant) -> bool {
        let ttl = if self.key.is_some() {
            KEY_TTL
        } else {
            UNKNOWN_TTL
        };
        now.duration_since(self.loaded) < ttl
    }
}
