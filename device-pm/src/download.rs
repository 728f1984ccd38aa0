//! Which chunks of the module being downloaded to ask for, and whether one that arrived
//! may be written. No I/O: the device turns the answers into subscriptions and writes.
//!
//! Chunks are retained on the broker, one topic each, so subscribing to a chunk's topic
//! fetches it; the device unsubscribes once it has arrived. At most `window` chunk
//! topics are subscribed at a time, which bounds the bytes in flight on a cellular link.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use wpm_manifests::{Chunk, ModuleManifest, ModuleRef};

/// How often one chunk may fail its check before the download is given up.
pub const MAX_ATTEMPTS: u8 = 4;
/// Wait before fetching a rejected chunk again, doubled on each further failure.
pub const RETRY_BACKOFF_MS: u64 = 1_000;
/// Least time between two progress reports of one download.
pub const PROGRESS_INTERVAL_MS: u64 = 10_000;
/// A requested chunk (or the module manifest) that has not arrived after this long is
/// asked for again (the broker may have dropped the subscription's delivery).
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// A download that got nothing (no manifest, no chunk) for this long with the link up
/// is given up with a named reason and tried again [`RETRY_LATER_MS`] later: what it
/// waits for is not on the broker (a retained topic cleared or never published), and
/// asking every [`REQUEST_TIMEOUT_MS`] forever would cost radio time and hide it.
pub const STALL_MS: u64 = 300_000;
/// How long a download given up for a stall waits before it is tried again.
pub const RETRY_LATER_MS: u64 = 600_000;

/// A module download into one staging bank.
#[derive(Debug)]
pub struct Download {
    pub module: ModuleRef,
    pub bank: u16,
    /// The signed chunk index; `None` until it arrived and matched `module`.
    pub manifest: Option<ModuleManifest>,
    have: Vec<bool>,
    /// Chunk index → when it was requested.
    outstanding: BTreeMap<u32, u64>,
    /// Chunk index → earliest time to request it again after a rejection.
    retry_at: BTreeMap<u32, u64>,
    failures: BTreeMap<u32, u8>,
    /// When progress was last reported (or the first chunk arrived).
    last_report_ms: Option<u64>,
    /// When the manifest was last asked for, while it has not arrived.
    manifest_requested_ms: Option<u64>,
    /// Since when the download has got nothing with the link up (`None`: link down).
    idle_since_ms: Option<u64>,
}

/// What to do about a chunk that failed its check.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejection {
    RetryLater,
    GiveUp,
}

impl Download {
    pub fn new(module: ModuleRef, bank: u16) -> Self {
        let count = module.chunk_count() as usize;
        Self {
            module,
            bank,
            manifest: None,
            have: vec![false; count],
            outstanding: BTreeMap::new(),
            retry_at: BTreeMap::new(),
            failures: BTreeMap::new(),
            last_report_ms: None,
            manifest_requested_ms: None,
            idle_since_ms: None,
        }
    }

    /// The manifest was asked for now (with the link up).
    pub fn manifest_requested(&mut self, now_ms: u64) {
        self.manifest_requested_ms = Some(now_ms);
        self.idle_since_ms.get_or_insert(now_ms);
    }

    /// Whether the manifest, asked for and not arrived, should be asked for again.
    pub fn manifest_late(&mut self, now_ms: u64) -> bool {
        let late = self.manifest.is_none()
            && (self.manifest_requested_ms).is_some_and(|at| now_ms >= at + REQUEST_TIMEOUT_MS);
        if late {
            self.manifest_requested_ms = Some(now_ms);
        }
        late
    }

    /// Why the download is stalled, once it has got nothing for [`STALL_MS`] with the
    /// link up.
    pub fn stalled(&self, now_ms: u64) -> Option<String> {
        let since = self.idle_since_ms?;
        (now_ms >= since + STALL_MS).then(|| match self.manifest {
            None => format!(
                "its module manifest did not come in {} s (retained topic empty?)",
                STALL_MS / 1000
            ),
            Some(_) => format!(
                "no chunk came in {} s ({} of {} held; retained chunk topics empty?)",
                STALL_MS / 1000,
                self.held(),
                self.chunk_count()
            ),
        })
    }

    /// Something arrived: the wait starts again.
    pub fn progressed(&mut self, now_ms: u64) {
        if self.idle_since_ms.is_some() {
            self.idle_since_ms = Some(now_ms);
        }
    }

    /// Checks the signed chunk index against the deployment's module reference.
    pub fn set_manifest(&mut self, manifest: ModuleManifest) -> Result<(), String> {
        let m = &self.module;
        if manifest.name != m.name
            || manifest.version != m.version
            || manifest.sha256 != m.sha256
            || manifest.size != m.size
            || manifest.chunk_size != m.chunk_size
        {
            return Err(format!(
                "module manifest {}@{} ({} bytes, chunks of {}) does not match the deployment's {}@{} ({} bytes, chunks of {})",
                manifest.name, manifest.version, manifest.size, manifest.chunk_size,
                m.name, m.version, m.size, m.chunk_size
            ));
        }
        if manifest.chunk_hashes.len() != self.have.len() {
            return Err(format!(
                "module manifest lists {} chunk hashes, {} expected",
                manifest.chunk_hashes.len(),
                self.have.len()
            ));
        }
        self.manifest = Some(manifest);
        self.manifest_requested_ms = None;
        Ok(())
    }

    pub fn chunk_count(&self) -> u32 {
        self.have.len() as u32
    }

    /// Offset of chunk `index` in the module, and its length.
    pub fn chunk_span(&self, index: u32) -> (u32, usize) {
        let offset = index * self.module.chunk_size;
        let len = self.module.chunk_size.min(self.module.size - offset);
        (offset, len as usize)
    }

    /// The expected sha256 of chunk `index`, once the manifest is known.
    pub fn chunk_hash(&self, index: u32) -> Option<&[u8; 32]> {
        self.manifest
            .as_ref()
            .and_then(|m| m.chunk_hashes.get(index as usize))
            .map(|h| &**h)
    }

    pub fn is_outstanding(&self, index: u32) -> bool {
        self.outstanding.contains_key(&index)
    }

    pub fn held(&self) -> u32 {
        self.have.iter().filter(|h| **h).count() as u32
    }

    pub fn is_complete(&self) -> bool {
        self.have.iter().all(|h| *h)
    }

    /// Why `chunk` may not be written, if it may not.
    pub fn check(&self, chunk: &Chunk) -> Result<(), String> {
        let want = self
            .chunk_hash(chunk.index)
            .ok_or_else(|| format!("chunk {} is out of range", chunk.index))?;
        let (_, len) = self.chunk_span(chunk.index);
        if chunk.data.len() != len {
            return Err(format!(
                "chunk has {} bytes, {} expected",
                chunk.data.len(),
                len
            ));
        }
        if wpm_manifests::sha256(&chunk.data) != *want {
            return Err("chunk sha256 does not match the module manifest".into());
        }
        Ok(())
    }

    /// Records that chunk `index` arrived and is in flash at `now_ms`.
    pub fn chunk_arrived(&mut self, index: u32, now_ms: u64) {
        self.progressed(now_ms);
        self.mark_held(index);
    }

    /// Records that chunk `index` is in flash.
    pub fn mark_held(&mut self, index: u32) {
        if let Some(h) = self.have.get_mut(index as usize) {
            *h = true;
        }
        self.outstanding.remove(&index);
        self.retry_at.remove(&index);
    }

    /// Records a failed check of an outstanding chunk.
    pub fn reject(&mut self, index: u32, now_ms: u64) -> Rejection {
        self.outstanding.remove(&index);
        let failures = self.failures.entry(index).or_insert(0);
        *failures += 1;
        if *failures >= MAX_ATTEMPTS {
            return Rejection::GiveUp;
        }
        let backoff = RETRY_BACKOFF_MS << (*failures - 1);
        self.retry_at.insert(index, now_ms + backoff);
        Rejection::RetryLater
    }

    /// Chunks whose request timed out: the caller asks for them again.
    pub fn timed_out(&mut self, now_ms: u64) -> Vec<u32> {
        let late: Vec<u32> = self
            .outstanding
            .iter()
            .filter(|(_, at)| now_ms >= **at + REQUEST_TIMEOUT_MS)
            .map(|(i, _)| *i)
            .collect();
        for i in &late {
            self.outstanding.insert(*i, now_ms);
        }
        late
    }

    /// The next chunks to request, lowest index first, keeping at most `window` in
    /// flight; they count as outstanding from now.
    pub fn next_requests(&mut self, window: usize, now_ms: u64) -> Vec<u32> {
        if self.manifest.is_none() {
            return Vec::new();
        }
        let mut picked = Vec::new();
        self.idle_since_ms.get_or_insert(now_ms);
        for index in 0..self.chunk_count() {
            if self.outstanding.len() >= window.max(1) {
                break;
            }
            let waiting = self.retry_at.get(&index).is_some_and(|at| *at > now_ms);
            if !self.have[index as usize] && !self.is_outstanding(index) && !waiting {
                self.outstanding.insert(index, now_ms);
                self.retry_at.remove(&index);
                picked.push(index);
            }
        }
        picked
    }

    /// Forgets every request: the link went down and took the subscriptions with it.
    /// Time offline does not count towards a stall.
    pub fn link_lost(&mut self) {
        self.outstanding.clear();
        self.manifest_requested_ms = None;
        self.idle_since_ms = None;
    }

    /// Requested chunk topics, to unsubscribe when the download is dropped.
    pub fn outstanding(&self) -> impl Iterator<Item = u32> + '_ {
        self.outstanding.keys().copied()
    }

    /// When the download next needs the timer: a backoff or a request timeout ending,
    /// or the stall deadline.
    pub fn next_deadline(&self) -> Option<u64> {
        let retry = self.retry_at.values().copied();
        let timeout = (self.outstanding.values().copied())
            .chain(
                self.manifest_requested_ms
                    .filter(|_| self.manifest.is_none()),
            )
            .map(|at| at + REQUEST_TIMEOUT_MS);
        let stall = self.idle_since_ms.map(|at| at + STALL_MS);
        retry.chain(timeout).chain(stall).min()
    }

    /// `Some(held)` when the download, not complete yet, has gone on for another
    /// [`PROGRESS_INTERVAL_MS`] since the last report (or its first chunk): a download
    /// faster than that reports no progress at all, its `Installed` event says it all,
    /// and a slow one reports often enough to be followed, not a message per quarter.
    pub fn progress_to_report(&mut self, now_ms: u64) -> Option<u32> {
        let since = *self.last_report_ms.get_or_insert(now_ms);
        (!self.is_complete() && now_ms.saturating_sub(since) >= PROGRESS_INTERVAL_MS).then(|| {
            self.last_report_ms = Some(now_ms);
            self.held()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module of ten chunks, one arriving every `gap_ms`: the progress reports.
    fn reports(gap_ms: u64) -> alloc::vec::Vec<(u64, u32)> {
        let mut module = wpm_manifests::golden::module_ref();
        module.size = 10 * module.chunk_size;
        let mut d = Download::new(module, 0);
        let mut out = alloc::vec::Vec::new();
        for i in 0..10 {
            let now = 1_000 + u64::from(i) * gap_ms;
            d.mark_held(i);
            if let Some(have) = d.progress_to_report(now) {
                out.push((now, have));
            }
        }
        out
    }

    #[test]
    fn a_fast_download_reports_no_progress() {
        assert_eq!(reports(100), []);
    }

    #[test]
    fn a_slow_download_reports_progress_every_interval_but_not_at_the_end() {
        // A chunk every 4 s: reports at 12 s and 24 s after the first chunk; the tenth
        // chunk completes the module (its Installed event follows), no report.
        assert_eq!(reports(4_000), [(13_000, 4), (25_000, 7)]);
    }
}
