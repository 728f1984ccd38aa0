//! Device messages, verified and decoded: what ingest writes, or why it refuses.
//!
//! Pure: topic, payload and the registered keys in, a verified report or a
//! [`Refusal`] out. Whether a verified report is new is decided later, in the write
//! transaction, by its counter ([`super::admit`]).

use super::keys::DeviceKeys;
use crate::db::{DeviceModule, EventWrite, PresenceWrite, StatusWrite};
use wpm_manifests::topic::{parse_device_topic, DeviceTopic};
use wpm_manifests::{EventKind, OpenError, Report, ReportBody, Sealed};

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
    /// Not a sealed report at all: unsigned (an old or foreign client) or garbled.
    Unsealed,
    /// The topic names a device that is not registered.
    UnknownDevice,
    /// The seal does not verify with the device's registered key: forged or altered.
    BadSignature,
    /// The device is revoked: nothing it says is taken.
    Revoked,
    /// A genuine report seen before: a retained copy or a redelivery.
    Duplicate,
    /// A genuine report older than the device's recent ones, or a last will that was
    /// not announced or was used: a replay.
    Replayed,
    /// The signed report names another device than the topic it came on.
    DeviceMismatch,
    /// The signed report is of another kind than its topic carries.
    WrongTopic,
    /// The device signed a report this registry cannot read.
    Undecodable,
    /// A text field holds a NUL character, which PostgreSQL cannot store.
    NulInText,
    /// The database refused this one message (others of its batch were written).
    DatabaseRefused,
}

impl Refusal {
    pub const ALL: [Refusal; 12] = [
        Refusal::NotADeviceTopic,
        Refusal::Unsealed,
        Refusal::UnknownDevice,
        Refusal::BadSignature,
        Refusal::Revoked,
        Refusal::Duplicate,
        Refusal::Replayed,
        Refusal::DeviceMismatch,
        Refusal::WrongTopic,
        Refusal::Undecodable,
        Refusal::NulInText,
        Refusal::DatabaseRefused,
    ];

    /// The name `/v1/health` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotADeviceTopic => "not_a_device_topic",
            Refusal::Unsealed => "not_a_sealed_report",
            Refusal::UnknownDevice => "unknown_device",
            Refusal::BadSignature => "bad_signature",
            Refusal::Revoked => "revoked_device",
            Refusal::Duplicate => "duplicate_report",
            Refusal::Replayed => "replayed_report",
            Refusal::DeviceMismatch => "device_id_does_not_match_topic",
            Refusal::WrongTopic => "report_kind_does_not_match_topic",
            Refusal::Undecodable => "undecodable_payload",
            Refusal::NulInText => "nul_character_in_text",
            Refusal::DatabaseRefused => "database_refused",
        }
    }

    /// Expected in normal operation (a retained copy after a reconnect), so logged
    /// quietly; every other refusal is a warning.
    pub fn is_routine(self) -> bool {
        self == Refusal::Duplicate
    }
}

/// A refusal with the detail for the log.
#[derive(Debug)]
pub struct Refused {
    pub reason: Refusal,
    pub detail: String,
}

pub fn refuse(reason: Refusal, detail: impl Into<String>) -> Refused {
    Refused {
        reason,
        detail: detail.into(),
    }
}

/// Refuses text the database cannot store.
fn check_text<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<(), Refused> {
    match texts.into_iter().find(|t| t.contains('\0')) {
        Some(t) => Err(refuse(Refusal::NulInText, format!("{t:?}"))),
        None => Ok(()),
    }
}

/// A report whose seal verified with its device's key.
#[derive(Debug)]
pub struct Verified {
    pub topic: String,
    pub device: String,
    pub counter: u64,
    pub decoded: Decoded,
}

#[derive(Debug)]
pub enum Decoded {
    Status(StatusWrite),
    /// A presence, and the last will it announces (the first of a session).
    Presence(PresenceWrite, Option<u64>),
    Event(EventWrite),
    /// Module telemetry: only proves the device is alive.
    Seen(String),
}

fn mismatch(what: &str, named: &str, device: &str) -> Refused {
    refuse(
        Refusal::DeviceMismatch,
        format!("{what} of {named:?} on the topic of {device:?}"),
    )
}

/// Verifies and decodes one message. `Ok(None)`: an empty retained payload, a record
/// being cleared, which says nothing.
///
/// # Errors
/// Why the message is refused.
#[cfg(test)]
pub fn decode_message(m: &Raw, now: i64, keys: &DeviceKeys) -> Result<Option<Verified>, Refused> {
    decode_batch(std::slice::from_ref(m), now, keys)
        .pop()
        .expect("one result per message")
}

/// [`decode_message`] for a batch, its seals checked together
/// ([`wpm_manifests::open_many`]); one result per message, in order.
pub fn decode_batch(
    messages: &[Raw],
    now: i64,
    keys: &DeviceKeys,
) -> Vec<Result<Option<Verified>, Refused>> {
    let mut results: Vec<Option<Result<Option<Verified>, Refused>>> =
        (0..messages.len()).map(|_| None).collect();
    let mut sealed = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        match check_envelope(m, keys) {
            Ok(Some((topic, key))) => sealed.push((i, topic, key)),
            Ok(None) => results[i] = Some(Ok(None)),
            Err(r) => results[i] = Some(Err(r)),
        }
    }
    let items: Vec<_> = (sealed.iter())
        .map(|(i, _, key)| (*key, messages[*i].payload.as_slice()))
        .collect();
    let opened = wpm_manifests::open_many::<Report>(&items);
    for ((i, topic, _), report) in sealed.into_iter().zip(opened) {
        let report = report.map_err(|e| match e {
            OpenError::Malformed(e) => refuse(Refusal::Undecodable, e.to_string()),
            OpenError::UnknownKey | OpenError::BadSignature => {
                refuse(Refusal::BadSignature, e.to_string())
            }
        });
        results[i] = Some(report.and_then(|r| interpret(&messages[i], topic, r, now).map(Some)));
    }
    results
        .into_iter()
        .map(|r| r.expect("every message was judged"))
        .collect()
}

/// What can be told before the seal is checked: a device topic, a sealed envelope, a
/// registered device. `Ok(None)` for an empty payload.
fn check_envelope<'a, 'k>(
    m: &'a Raw,
    keys: &'k DeviceKeys,
) -> Result<Option<(DeviceTopic<'a>, &'k wpm_manifests::TrustedKeys)>, Refused> {
    let topic = parse_device_topic(&m.topic)
        .ok_or_else(|| refuse(Refusal::NotADeviceTopic, m.topic.clone()))?;
    if m.payload.is_empty() {
        return Ok(None);
    }
    if let Err(e) = wpm_manifests::decode::<Sealed>(&m.payload) {
        return Err(refuse(Refusal::Unsealed, e.to_string()));
    }
    let key = keys
        .get(topic.device())
        .ok_or_else(|| refuse(Refusal::UnknownDevice, topic.device()))?;
    Ok(Some((topic, key)))
}

/// A report whose seal verified: checked against its topic and made a write.
fn interpret(
    m: &Raw,
    topic: DeviceTopic<'_>,
    report: Report,
    now: i64,
) -> Result<Verified, Refused> {
    let device = topic.device();
    if report.device != device {
        return Err(mismatch("report", &report.device, device));
    }
    let counter = report.counter;
    // Counters are BIGINT in the database.
    let signed_counter = i64::try_from(counter)
        .map_err(|_| refuse(Refusal::Undecodable, format!("counter {counter} too large")))?;
    let decoded = match (topic, report.body) {
        (DeviceTopic::Status(_), ReportBody::Status(s)) => {
            if s.device != device {
                return Err(mismatch("status", &s.device, device));
            }
            Decoded::Status(status_write(s, m.retained, now, signed_counter)?)
        }
        (DeviceTopic::Presence(_), ReportBody::Presence(p)) => Decoded::Presence(
            PresenceWrite {
                device: device.to_string(),
                online: p.online,
                counter: signed_counter,
                will: false,
                seen_at: if m.retained { 0 } else { now },
            },
            p.will,
        ),
        (DeviceTopic::Events(_), ReportBody::Event(e)) => {
            if e.device != device {
                return Err(mismatch("event", &e.device, device));
            }
            let (module, version, reason) = subject(&e.kind);
            check_text(
                module
                    .iter()
                    .chain(&version)
                    .chain(&reason)
                    .map(String::as_str),
            )?;
            Decoded::Event(EventWrite {
                module,
                version,
                reason,
                device: device.to_string(),
                at_ms: i64::try_from(e.at_ms).unwrap_or(i64::MAX),
                kind: e.kind.name().to_string(),
                detail: event_detail(&e.kind).to_string(),
                received_at: now,
            })
        }
        (DeviceTopic::Telemetry(..), ReportBody::Telemetry(_)) => Decoded::Seen(device.to_string()),
        (topic, body) => {
            return Err(refuse(
                Refusal::WrongTopic,
                format!("{} on {topic:?}", body_name(&body)),
            ))
        }
    };
    Ok(Verified {
        topic: m.topic.clone(),
        device: device.to_string(),
        counter,
        decoded,
    })
}

fn body_name(body: &ReportBody) -> &'static str {
    match body {
        ReportBody::Status(_) => "a status",
        ReportBody::Event(_) => "an event",
        ReportBody::Presence(_) => "a presence",
        ReportBody::Telemetry(_) => "telemetry",
    }
}

fn status_write(
    s: wpm_manifests::DeviceStatus,
    retained: bool,
    now: i64,
    counter: i64,
) -> Result<StatusWrite, Refused> {
    check_text(
        (s.groups.iter().map(String::as_str))
            .chain(s.last_error.as_deref())
            .chain(s.modules.iter().flat_map(|m| {
                [m.name.as_str(), m.version.as_str()]
                    .into_iter()
                    .chain(m.last_error.as_deref())
            })),
    )?;
    Ok(StatusWrite {
        device: s.device.clone(),
        groups: s.groups.clone(),
        sequence: i64::try_from(s.sequence).unwrap_or(i64::MAX),
        slots_used: s.slots_used.into(),
        slots_total: s.slots_total.into(),
        flash_free: s.flash_free.into(),
        ram_free: s.ram_free.into(),
        last_error: s.last_error.clone(),
        rows_digest: crate::db::rows_digest(&s.groups, &s.modules),
        status: wpm_manifests::encode(&s),
        status_at: i64::try_from(s.at_ms).unwrap_or(i64::MAX),
        trust_epoch: s.trust_epoch.map(|e| i64::try_from(e).unwrap_or(i64::MAX)),
        counter,
        // A retained copy says nothing about when the device was last alive; the
        // device's own clock is not taken for it.
        seen_at: if retained { 0 } else { now },
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
    })
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
        | EventKind::CommandRejected { reason, .. }
        | EventKind::TrustRejected { reason, .. } => (None, None, s(reason)),
        EventKind::ManifestAccepted { .. }
        | EventKind::ManifestReplayed { .. }
        | EventKind::CommandApplied { .. }
        | EventKind::TrustUpdated { .. } => (None, None, None),
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
    use std::time::Instant;
    use wpm_manifests::{golden, KeyPair, Presence};

    const DEVICE: &str = "dev-0001";

    fn device_key() -> KeyPair {
        KeyPair::from_seed(&[0x42; 32])
    }

    fn keys() -> DeviceKeys {
        let mut keys = DeviceKeys::default();
        keys.remember(DEVICE, Some(device_key().public()), Instant::now());
        keys.remember("unregistered", None, Instant::now());
        keys
    }

    fn sealed(key: &KeyPair, device: &str, counter: u64, body: ReportBody) -> Vec<u8> {
        key.seal(&Report {
            device: device.into(),
            counter,
            body,
        })
    }

    fn raw(topic: &str, payload: Vec<u8>, retained: bool) -> Raw {
        Raw {
            topic: topic.into(),
            payload,
            retained,
        }
    }

    fn status_topic(device: &str) -> String {
        format!("wpm/v1/device/{device}/status")
    }

    #[test]
    fn decodes_a_sealed_status_and_event() {
        let s = raw(
            &status_topic(DEVICE),
            sealed(
                &device_key(),
                DEVICE,
                7,
                ReportBody::Status(golden::status()),
            ),
            true,
        );
        let Ok(Some(v)) = decode_message(&s, 5, &keys()) else {
            panic!("status not taken")
        };
        assert_eq!((v.device.as_str(), v.counter), (DEVICE, 7));
        let Decoded::Status(w) = v.decoded else {
            panic!("not a status")
        };
        assert_eq!(w.slots_total, 4);
        assert_eq!(w.modules[0].state, "running");
        assert_eq!(w.counter, 7);
        // A retained copy is not dated by the device's clock.
        assert_eq!(w.seen_at, 0);

        let e = raw(
            "wpm/v1/device/dev-0001/events",
            sealed(&device_key(), DEVICE, 8, ReportBody::Event(golden::event())),
            false,
        );
        let Ok(Some(Verified {
            decoded: Decoded::Event(w),
            ..
        })) = decode_message(&e, 5, &keys())
        else {
            panic!("event not taken")
        };
        assert_eq!(w.kind, "trapped");
        let d: serde_json::Value = serde_json::from_str(&w.detail).unwrap();
        assert_eq!(d["reason"], "out of fuel");
        // What it is about is typed, for rollout decisions.
        assert_eq!(w.module.as_deref(), Some("hello"));
        assert_eq!(w.reason.as_deref(), Some("out of fuel"));
    }

    fn refusal(m: &Raw) -> Refusal {
        match decode_message(m, 0, &keys()) {
            Err(r) => r.reason,
            Ok(_) => panic!("{} taken", m.topic),
        }
    }

    #[test]
    fn refuses_what_its_device_did_not_seal() {
        let status = || ReportBody::Status(golden::status());
        let unsigned = raw(
            &status_topic(DEVICE),
            wpm_manifests::encode(&golden::status()),
            false,
        );
        assert_eq!(refusal(&unsigned), Refusal::Unsealed);
        let garbage = raw(&status_topic(DEVICE), vec![0xff, 0x00, 0x13], false);
        assert_eq!(refusal(&garbage), Refusal::Unsealed);
        let forged = raw(
            &status_topic(DEVICE),
            sealed(&KeyPair::from_seed(&[9; 32]), DEVICE, 7, status()),
            false,
        );
        assert_eq!(refusal(&forged), Refusal::BadSignature);
        let invented = raw(
            &status_topic("unregistered"),
            sealed(&device_key(), "unregistered", 7, status()),
            false,
        );
        assert_eq!(refusal(&invented), Refusal::UnknownDevice);
        // The device's own genuine report, moved to another device's topic.
        let moved = raw(
            &status_topic("dev-0002"),
            sealed(&device_key(), DEVICE, 7, status()),
            false,
        );
        assert_eq!(refusal(&moved), Refusal::UnknownDevice);
        let mut keys = keys();
        keys.remember("dev-0002", Some(device_key().public()), Instant::now());
        assert_eq!(
            decode_message(&moved, 0, &keys).unwrap_err().reason,
            Refusal::DeviceMismatch
        );
        let wrong_topic = raw(
            "wpm/v1/device/dev-0001/events",
            sealed(&device_key(), DEVICE, 7, status()),
            false,
        );
        assert_eq!(refusal(&wrong_topic), Refusal::WrongTopic);
        let elsewhere = raw("wpm/v1/deploy/fleet", vec![1], false);
        assert_eq!(refusal(&elsewhere), Refusal::NotADeviceTopic);
    }

    #[test]
    fn in_a_batch_checked_together_a_forgery_costs_only_itself() {
        let status = || ReportBody::Status(golden::status());
        let stranger = KeyPair::from_seed(&[9; 32]);
        // 150 reports (three batches of seals), three of them forged.
        let forged = [3, 70, 149];
        let messages: Vec<Raw> = (0..150u64)
            .map(|n| {
                let key = if forged.contains(&n) {
                    &stranger
                } else {
                    &device_key()
                };
                raw(
                    &status_topic(DEVICE),
                    sealed(key, DEVICE, n + 1, status()),
                    false,
                )
            })
            .collect();
        let results = decode_batch(&messages, 0, &keys());
        for (n, r) in results.iter().enumerate() {
            match r {
                Ok(Some(v)) => {
                    assert!(!forged.contains(&(n as u64)), "forgery {n} taken");
                    assert_eq!(v.counter, n as u64 + 1);
                }
                Err(r) => {
                    assert!(forged.contains(&(n as u64)), "{n} refused: {r:?}");
                    assert_eq!(r.reason, Refusal::BadSignature);
                }
                Ok(None) => panic!("{n} ignored"),
            }
        }
    }

    #[test]
    fn refuses_text_the_database_cannot_store() {
        let mut nul = golden::status();
        nul.last_error = Some("bad\0byte".into());
        let nul = raw(
            &status_topic(DEVICE),
            sealed(&device_key(), DEVICE, 7, ReportBody::Status(nul)),
            false,
        );
        assert_eq!(refusal(&nul), Refusal::NulInText);
    }

    #[test]
    fn a_presence_carries_the_will_it_announces() {
        let p = raw(
            "wpm/v1/device/dev-0001/presence",
            sealed(
                &device_key(),
                DEVICE,
                9,
                ReportBody::Presence(Presence {
                    online: true,
                    will: Some(8),
                }),
            ),
            false,
        );
        assert!(matches!(
            decode_message(&p, 0, &keys()),
            Ok(Some(Verified {
                decoded: Decoded::Presence(PresenceWrite { online: true, .. }, Some(8)),
                ..
            }))
        ));
    }
}
