//! What a simulated fleet said, counted on the devices' side: how many reports each kind
//! of topic carried (to check that the registry wrote every one), and when the first and
//! the last device reached a milestone (accepted a manifest, installed or ran a version).
//!
//! The probe reads the device's own outgoing messages, so it measures what devices did,
//! not what the registry managed to hear.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use wpm_manifests::topic::{parse_device_topic, DeviceTopic};
use wpm_manifests::{Event, EventKind, ModuleState, Report, ReportBody};

/// The first and last time (unix ms) devices reached a milestone, and how many did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Milestone {
    pub first_ms: u64,
    pub last_ms: u64,
    pub devices: u64,
}

/// Reports devices published, by kind of topic, and events by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub status: u64,
    pub presence: u64,
    pub events: u64,
    pub telemetry: u64,
    /// Events by [`EventKind::name`].
    pub event_kinds: std::collections::BTreeMap<&'static str, u64>,
}

impl Tally {
    /// Every report: status, presence, events, telemetry.
    pub fn total(&self) -> u64 {
        self.status + self.presence + self.events + self.telemetry
    }

    /// What was published after `earlier` was taken.
    pub fn since(&self, earlier: &Tally) -> Tally {
        Tally {
            status: self.status - earlier.status,
            presence: self.presence - earlier.presence,
            events: self.events - earlier.events,
            telemetry: self.telemetry - earlier.telemetry,
            event_kinds: (self.event_kinds.iter())
                .map(|(k, n)| (*k, n - earlier.event_kinds.get(k).unwrap_or(&0)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }
}

/// Counters shared by every device of one or more fleets.
#[derive(Default, Debug)]
pub struct Probe {
    status: AtomicU64,
    presence: AtomicU64,
    events: AtomicU64,
    telemetry: AtomicU64,
    event_kinds: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    link_drops: AtomicU64,
    /// Milestone name → when; per device only the first time counts.
    milestones: Mutex<HashMap<String, (Milestone, std::collections::HashSet<String>)>>,
}

impl Probe {
    /// Reports devices published to the registry: status, presence, events, telemetry.
    pub fn sent(&self) -> u64 {
        self.tally().total()
    }

    /// Reports devices published so far, by kind.
    pub fn tally(&self) -> Tally {
        Tally {
            status: self.status.load(Ordering::Relaxed),
            presence: self.presence.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            telemetry: self.telemetry.load(Ordering::Relaxed),
            event_kinds: (self.event_kinds.lock())
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Events devices published (installed, failed, rolled back, …).
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Connections that failed or dropped (each one that had been accepted makes the
    /// broker publish the device's last will: a report the device itself never sent).
    pub fn link_drops(&self) -> u64 {
        self.link_drops.load(Ordering::Relaxed)
    }

    pub(crate) fn link_dropped(&self) {
        self.link_drops.fetch_add(1, Ordering::Relaxed);
    }

    /// A milestone by name: `accepted` (a deployment manifest), `installed NAME@VERSION`,
    /// `running NAME@VERSION`.
    pub fn milestone(&self, name: &str) -> Option<Milestone> {
        let m = self.milestones.lock().unwrap_or_else(|e| e.into_inner());
        m.get(name).map(|(m, _)| *m)
    }

    /// Forgets every milestone (counters keep counting).
    pub fn reset_milestones(&self) {
        self.milestones
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn reach(&self, name: String, device: &str, now_ms: u64) {
        let mut all = self.milestones.lock().unwrap_or_else(|e| e.into_inner());
        let (m, seen) = all.entry(name).or_insert_with(|| {
            (
                Milestone {
                    first_ms: now_ms,
                    ..Milestone::default()
                },
                Default::default(),
            )
        });
        if seen.insert(device.to_string()) {
            m.first_ms = m.first_ms.min(now_ms);
            m.last_ms = m.last_ms.max(now_ms);
            m.devices += 1;
        }
    }

    /// Notes one message a device published.
    pub(crate) fn published(&self, topic: &str, payload: &[u8], now_ms: u64) {
        let Some(t) = parse_device_topic(topic) else {
            return;
        };
        match t {
            DeviceTopic::Status(device) => {
                self.status.fetch_add(1, Ordering::Relaxed);
                if let Ok(ReportBody::Status(s)) = body(payload) {
                    for m in s.modules.iter().filter(|m| m.state == ModuleState::Running) {
                        self.reach(format!("running {}@{}", m.name, m.version), device, now_ms);
                    }
                }
            }
            DeviceTopic::Presence(_) => {
                self.presence.fetch_add(1, Ordering::Relaxed);
            }
            DeviceTopic::Events(device) => {
                self.events.fetch_add(1, Ordering::Relaxed);
                let Ok(ReportBody::Event(Event { kind, .. })) = body(payload) else {
                    return;
                };
                *(self.event_kinds.lock())
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(kind.name())
                    .or_default() += 1;
                match kind {
                    EventKind::ManifestAccepted { .. } => {
                        self.reach("accepted".into(), device, now_ms)
                    }
                    EventKind::Installed { module, version } => {
                        self.reach(format!("installed {module}@{version}"), device, now_ms)
                    }
                    _ => {}
                }
            }
            DeviceTopic::Telemetry(..) => {
                self.telemetry.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What a device's own report says; the probe counts the device's words, so it needs no
/// key to read them.
fn body(payload: &[u8]) -> Result<ReportBody, wpm_manifests::DecodeError> {
    Report::read_unverified(payload).map(|r| r.body)
}
