//! Device messages, decoded and checked: what ingest writes, or why it refuses.
//!
//! Pure: topic and payload in, a database write or a [`Refusal`] out.

use crate::db::{DeviceModule, EventWrite, PresenceWrite, StatusWrite};
use wpm_manifests::topic::{parse_device_topic, DeviceTopic};
use wpm_manifests::{decode, DeviceStatus, Event as DeviceEvent, EventKind, Presence};

/// A message as the broker delivered it.
pub struct Raw {
    pub topic: String,
    pub payload: Vec<u8>,
    /// A retained copy (a replay of an older report), not a live one.
    pub retained: bool,
}

/// Why ingest dropped a device message on purpose. Every refusal is counted by reason
/// and logged with the topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The topic is not a device report topic.
    NotADeviceTopic,
    /// The payload is not the CBOR record the topic carries.
    Undecodable,
    /// The record names another device than the topic it came on.
    DeviceMismatch,
    /// A text field holds a NUL character, which PostgreSQL cannot store.
    NulInText,
    /// The database refused this one message (others of its batch were written).
    DatabaseRefused,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::NotADeviceTopic,
        Refusal::Undecodable,
        Refusal::DeviceMismatch,
        Refusal::NulInText,
        Refusal::DatabaseRefused,
    ];

    /// The name `/v1/health` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotADeviceTopic => "not_a_device_topic",
            Refusal::Undecodable => "undecodable_payload",
            Refusal::DeviceMismatch => "device_id_does_not_match_topic",
            Refusal::NulInText => "nul_character_in_text",
            Refusal::DatabaseRefused => "database_refused",
        }
    }
}

/// A refusal with the detail for the log.
#[derive(Debug)]
pub struct Refused {
    pub reason: Refusal,
    pub detail: String,
}

fn refuse(reason: Refusal, detail: impl Into<String>) -> Refused {
    Refused {
        reason,
        detail: detail.into(),
    }
}

fn undecodable(e: wpm_manifests::DecodeError) -> Refused {
    refuse(Refusal::Undecodable, e.to_string())
}

/// Refuses text the database cannot store.
fn check_text<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<(), Refused> {
    match texts.into_iter().find(|t| t.contains('\0')) {
        Some(t) => Err(refuse(Refusal::NulInText, format!("{t:?}"))),
        None => Ok(()),
    }
}

pub enum Decoded {
    Status(StatusWrite),
    Presence(PresenceWrite),
    Event(EventWrite),
    /// Module telemetry: only proves the device is alive.
    Seen(String),
    /// An empty retained payload: a device's record being cleared.
    Ignored,
}

pub fn decode_message(m: &Raw, now: i64) -> Result<Decoded, Refused> {
    let topic = parse_device_topic(&m.topic)
        .ok_or_else(|| refuse(Refusal::NotADeviceTopic, m.topic.clone()))?;
    if m.payload.is_empty() {
        return Ok(Decoded::Ignored);
    }
    match topic {
        DeviceTopic::Status(device) => {
            let s: DeviceStatus = decode(&m.payload).map_err(undecodable)?;
            // The topic, not the payload, says who it is: the broker's ACLs apply to topics.
            if s.device != device {
                return Err(refuse(
                    Refusal::DeviceMismatch,
                    format!("status for {:?} on the topic of {device:?}", s.device),
                ));
            }
            check_text(
                (s.groups.iter().map(String::as_str))
                    .chain(s.last_error.as_deref())
                    .chain(s.modules.iter().flat_map(|m| {
                        [m.name.as_str(), m.version.as_str()]
                            .into_iter()
                            .chain(m.last_error.as_deref())
                    })),
            )?;
            let at = i64::try_from(s.at_ms).unwrap_or(i64::MAX);
            Ok(Decoded::Status(StatusWrite {
                device: device.to_string(),
                groups: s.groups.clone(),
                sequence: i64::try_from(s.sequence).unwrap_or(i64::MAX),
                slots_used: s.slots_used.into(),
                slots_total: s.slots_total.into(),
                flash_free: s.flash_free.into(),
                ram_free: s.ram_free.into(),
                last_error: s.last_error.clone(),
                rows_digest: wpm_manifests::sha256(&wpm_manifests::encode(&(
                    &s.groups, &s.modules,
                )))[..16]
                    .to_vec(),
                status: m.payload.to_vec(),
                status_at: at,
                seen_at: if m.retained { at } else { now },
                modules: s
                    .modules
                    .iter()
                    .map(|x| DeviceModule {
                        name: x.name.clone(),
                        version: x.version.clone(),
                        sha256: x.sha256.to_vec(),
                        state: x.state.as_str().to_string(),
                        last_error: x.last_error.clone(),
                    })
                    .collect(),
            }))
        }
        DeviceTopic::Presence(device) => {
            let p: Presence = decode(&m.payload).map_err(undecodable)?;
            Ok(Decoded::Presence(PresenceWrite {
                device: device.to_string(),
                online: p.online,
                seen_at: if m.retained { 0 } else { now },
            }))
        }
        DeviceTopic::Events(device) => {
            let e: DeviceEvent = decode(&m.payload).map_err(undecodable)?;
            if e.device != device {
                return Err(refuse(
                    Refusal::DeviceMismatch,
                    format!("event of {:?} on the topic of {device:?}", e.device),
                ));
            }
            let (module, version, reason) = subject(&e.kind);
            Ok(Decoded::Event(EventWrite {
                module,
                version,
                reason,
                device: device.to_string(),
                at_ms: i64::try_from(e.at_ms).unwrap_or(i64::MAX),
                kind: e.kind.name().to_string(),
                detail: event_detail(&e.kind).to_string(),
                received_at: now,
            }))
        }
        DeviceTopic::Telemetry(device, _) => Ok(if m.retained {
            Decoded::Ignored
        } else {
            Decoded::Seen(device.to_string())
        }),
    }
}

/// What an event is about: module, version (for a rollback, the version that failed)
/// and reason, where it names them.
fn subject(kind: &EventKind) -> (Option<String>, Option<String>, Option<String>) {
    let s = |x: &String| Some(x.clone());
    match kind {
        EventKind::DownloadProgress {
            module, version, ..
        }
        | EventKind::Installed { module, version }
        | EventKind::Started { module, version }
        | EventKind::Removed { module, version }
        | EventKind::Evicted {
            module, version, ..
        }
        | EventKind::Restored { module, version } => (s(module), s(version), None),
        EventKind::InstallFailed {
            module,
            version,
            reason,
        }
        | EventKind::Trapped {
            module,
            version,
            reason,
        } => (s(module), s(version), s(reason)),
        EventKind::RolledBack {
            module,
            from_version,
            reason,
            ..
        } => (s(module), s(from_version), s(reason)),
        EventKind::ChunkRejected { module, reason, .. } => (s(module), None, s(reason)),
        EventKind::ManifestRejected { reason }
        | EventKind::MalformedMessage { reason, .. }
        | EventKind::CommandRejected { reason, .. } => (None, None, s(reason)),
        EventKind::ManifestAccepted { .. } | EventKind::CommandApplied { .. } => (None, None, None),
    }
}

/// The fields of an event, as the JSON `detail` object of the HTTP API.
pub fn event_detail(kind: &EventKind) -> serde_json::Value {
    let mut v = serde_json::to_value(kind).unwrap_or_default();
    // `kind` has its own column; the detail is the rest.
    if let Some(fields) = v.as_object_mut() {
        fields.remove("kind");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use wpm_manifests::{encode, golden};

    fn raw(topic: &str, payload: Vec<u8>, retained: bool) -> Raw {
        Raw {
            topic: topic.into(),
            payload,
            retained,
        }
    }

    #[test]
    fn decodes_golden_status_and_event() {
        let s = raw(
            "wpm/v1/device/dev-0001/status",
            encode(&golden::status()),
            true,
        );
        let Ok(Decoded::Status(w)) = decode_message(&s, 5) else {
            panic!("status not decoded")
        };
        assert_eq!(w.device, "dev-0001");
        assert_eq!(w.slots_total, 4);
        assert_eq!(w.modules[0].state, "running");
        // A retained replay is dated by the device, not by the registry's clock.
        assert_eq!(w.seen_at, 1_790_000_000_123);

        let e = raw(
            "wpm/v1/device/dev-0001/events",
            encode(&golden::event()),
            false,
        );
        let Ok(Decoded::Event(w)) = decode_message(&e, 5) else {
            panic!("event not decoded")
        };
        assert_eq!(w.kind, "trapped");
        let d: serde_json::Value = serde_json::from_str(&w.detail).unwrap();
        assert_eq!(d["reason"], "out of fuel");
        // What it is about is typed, for rollout decisions.
        assert_eq!(w.module.as_deref(), Some("hello"));
        assert_eq!(w.reason.as_deref(), Some("out of fuel"));
    }

    fn refusal(m: &Raw) -> Refusal {
        match decode_message(m, 0) {
            Err(r) => r.reason,
            Ok(_) => panic!("{} accepted", m.topic),
        }
    }

    #[test]
    fn refuses_garbage_spoofed_devices_and_unstorable_text() {
        let g = raw("wpm/v1/device/d/status", vec![0xff, 0x00, 0x13], false);
        assert_eq!(refusal(&g), Refusal::Undecodable);
        let spoof = raw(
            "wpm/v1/device/other/status",
            encode(&golden::status()),
            false,
        );
        assert_eq!(refusal(&spoof), Refusal::DeviceMismatch);
        let mut nul = golden::status();
        nul.last_error = Some("bad\0byte".into());
        let nul = raw("wpm/v1/device/dev-0001/status", encode(&nul), false);
        assert_eq!(refusal(&nul), Refusal::NulInText);
        let elsewhere = raw("wpm/v1/deploy/fleet", vec![1], false);
        assert_eq!(refusal(&elsewhere), Refusal::NotADeviceTopic);
        let off = raw(
            "wpm/v1/device/d/presence",
            encode(&Presence {
                online: false,
                will: None,
            }),
            false,
        );
        assert!(matches!(
            decode_message(&off, 0),
            Ok(Decoded::Presence(PresenceWrite { online: false, .. }))
        ));
    }
}
