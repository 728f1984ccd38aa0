//! Ingest: device status, presence and events from the broker into the database.
//!
//! One MQTT connection subscribes to every device's status, presence and events. Its
//! event loop only forwards raw messages; a writer task decodes them and writes them in
//! batches (up to [`BATCH_MAX`] messages or [`BATCH_WINDOW`], one transaction), so a
//! fleet reporting at once costs a few transactions and not one per message.

use crate::db::{self, Db, DeviceModule, EventWrite, PresenceWrite, StatusWrite};
use crate::publish::{client_id, drive, wait_connected, MqttSettings};
use rumqttc::{AsyncClient, Event, Packet, QoS, SubscribeFilter};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use wpm_manifests::topic::{parse_device_topic, DeviceTopic};
use wpm_manifests::{decode, DeviceStatus, Event as DeviceEvent, EventKind, Presence, TopicFilter};

pub const BATCH_MAX: usize = 500;
pub const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// Messages held between the MQTT connection and the writer.
pub const QUEUE: usize = 200_000;

/// Counters, reported by `/v1/health`.
#[derive(Default, Debug)]
pub struct IngestStats {
    pub received: AtomicU64,
    pub malformed: AtomicU64,
    pub written: AtomicU64,
    pub write_errors: AtomicU64,
}

struct Raw {
    topic: String,
    payload: Vec<u8>,
    retained: bool,
}

pub struct Ingest {
    client: AsyncClient,
    mqtt_task: tokio::task::JoinHandle<()>,
    writer_task: tokio::task::JoinHandle<()>,
}

impl Ingest {
    /// Connects, subscribes and returns once the broker acknowledged the subscription.
    pub async fn start(
        settings: &MqttSettings,
        db: Db,
        stats: Arc<IngestStats>,
        share_group: Option<&str>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Ingest> {
        let (client, eventloop) = AsyncClient::new(settings.options(client_id("ingest")), 1024);
        // Room for a whole fleet's burst (an install sends some ten messages per device).
        let (tx, rx) = mpsc::channel::<Raw>(QUEUE);
        let (connected_tx, _) = watch::channel(false);
        let (subscribed_tx, subscribed_rx) = watch::channel(false);
        let filters: Vec<SubscribeFilter> = [
            TopicFilter::AllStatus,
            TopicFilter::AllPresence,
            TopicFilter::AllEvents,
            TopicFilter::AllTelemetry,
        ]
        .into_iter()
        .map(|f| SubscribeFilter::new(shared_filter(share_group, f), QoS::AtLeastOnce))
        .collect();
        let sub_client = client.clone();
        let mqtt_stats = stats.clone();
        let mqtt_task = tokio::spawn(drive(
            eventloop,
            stop.clone(),
            connected_tx,
            "ingest",
            move |ev| match ev {
                // Clean sessions: subscribe again after every (re)connect.
                Event::Incoming(Packet::ConnAck(_)) => {
                    if let Err(e) = sub_client.try_subscribe_many(filters.clone()) {
                        tracing::error!(error = %e, "cannot queue the ingest subscription");
                    }
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    let _ = subscribed_tx.send(true);
                }
                Event::Incoming(Packet::Publish(p)) => {
                    mqtt_stats.received.fetch_add(1, Ordering::Relaxed);
                    let raw = Raw {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        retained: p.retain,
                    };
                    // The channel is large; if the writer cannot keep up, dropping is
                    // better than stalling the connection into a broker timeout. Status
                    // is retained and republished periodically, so it comes back.
                    if tx.try_send(raw).is_err() {
                        mqtt_stats.write_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("ingest queue full; dropped a device message");
                    }
                }
                _ => {}
            },
        ));
        let writer_task = tokio::spawn(writer(db, rx, stats));
        wait_connected(subscribed_rx, "ingest", Duration::from_secs(10)).await?;
        Ok(Ingest {
            client,
            mqtt_task,
            writer_task,
        })
    }

    /// Disconnects and lets the writer flush what it holds.
    pub async fn shutdown(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.mqtt_task).await;
        // The MQTT task owned the sender; with it gone the writer drains and ends.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.writer_task).await;
    }
}

/// The filter to subscribe to: `$share/{group}/{filter}` when replicas split the ingest
/// (each message goes to one member of the group), else the plain filter.
///
/// Shared subscriptions are an MQTT 5 feature that Mosquitto (since 1.6) and rumqttd also
/// serve to MQTT 3.1.1 clients, which is what the registry's rumqttc client speaks. Per
/// the MQTT 5 rules neither broker sends retained messages to a shared subscription: a
/// replica (re)starting learns status from the database and the devices' periodic
/// republishing, not from the broker's retained copies.
pub fn shared_filter(share_group: Option<&str>, f: TopicFilter) -> String {
    match share_group {
        Some(g) => format!("$share/{g}/{}", f.render()),
        None => f.render(),
    }
}

async fn writer(db: Db, mut rx: mpsc::Receiver<Raw>, stats: Arc<IngestStats>) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    loop {
        let Some(first) = rx.recv().await else { break };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
        while batch.len() < BATCH_MAX {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => batch.push(m),
                Ok(None) | Err(_) => break,
            }
        }
        write(&db, &stats, std::mem::take(&mut batch)).await;
    }
}

async fn write(db: &Db, stats: &IngestStats, batch: Vec<Raw>) {
    let now = db::now_ms();
    // Keep only the newest status and presence per device: they replace each other.
    let mut statuses: HashMap<String, StatusWrite> = HashMap::new();
    let mut presences: HashMap<String, PresenceWrite> = HashMap::new();
    let mut events = Vec::new();
    // Devices heard from live (events, telemetry): their last_seen moves to now.
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let n = batch.len();
    for m in batch {
        match decode_message(&m, now) {
            Ok(Decoded::Status(s)) => {
                statuses.insert(s.device.clone(), s);
            }
            Ok(Decoded::Presence(p)) => {
                presences.insert(p.device.clone(), p);
            }
            Ok(Decoded::Event(e)) => {
                seen.insert(e.device.clone());
                events.push(e)
            }
            Ok(Decoded::Seen(device)) => {
                seen.insert(device);
            }
            Ok(Decoded::Ignored) => {}
            Err(reason) => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(topic = %m.topic, %reason, "malformed device message ignored");
            }
        }
    }
    let statuses: Vec<_> = statuses.into_values().collect();
    let presences: Vec<_> = presences.into_values().collect();
    let seen: Vec<_> = seen.into_iter().collect();
    match db
        .write_batch(&statuses, &presences, &events, &seen, now)
        .await
    {
        Ok(()) => {
            stats.written.fetch_add(n as u64, Ordering::Relaxed);
            tracing::debug!(messages = n, "ingest batch written");
        }
        Err(e) => {
            stats.write_errors.fetch_add(n as u64, Ordering::Relaxed);
            tracing::error!(error = %e, messages = n, "ingest batch failed");
        }
    }
}

enum Decoded {
    Status(StatusWrite),
    Presence(PresenceWrite),
    Event(EventWrite),
    /// Module telemetry: only proves the device is alive.
    Seen(String),
    /// An empty retained payload: a device's record being cleared.
    Ignored,
}

fn decode_message(m: &Raw, now: i64) -> Result<Decoded, String> {
    let topic = parse_device_topic(&m.topic).ok_or("not a device topic")?;
    if m.payload.is_empty() {
        return Ok(Decoded::Ignored);
    }
    match topic {
        DeviceTopic::Status(device) => {
            let s: DeviceStatus = decode(&m.payload).map_err(|e| e.to_string())?;
            // The topic, not the payload, says who it is: the broker's ACLs apply to topics.
            if s.device != device {
                return Err(format!(
                    "status for {:?} published on the topic of {device:?}",
                    s.device
                ));
            }
            let at = i64::try_from(s.at_ms).unwrap_or(i64::MAX);
            Ok(Decoded::Status(StatusWrite {
                device: device.to_string(),
                groups_json: serde_json::to_string(&s.groups).unwrap_or_else(|_| "[]".into()),
                sequence: i64::try_from(s.sequence).unwrap_or(i64::MAX),
                slots_used: s.slots_used.into(),
                slots_total: s.slots_total.into(),
                flash_free: s.flash_free.into(),
                ram_free: s.ram_free.into(),
                last_error: s.last_error.clone(),
                status: m.payload.to_vec(),
                status_at: at,
                seen_at: if m.retained { at } else { now },
                live: !m.retained,
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
            let p: Presence = decode(&m.payload).map_err(|e| e.to_string())?;
            Ok(Decoded::Presence(PresenceWrite {
                device: device.to_string(),
                online: p.online,
                seen_at: now,
                live: !m.retained,
            }))
        }
        DeviceTopic::Events(device) => {
            let e: DeviceEvent = decode(&m.payload).map_err(|e| e.to_string())?;
            if e.device != device {
                return Err(format!(
                    "event of {:?} published on the topic of {device:?}",
                    e.device
                ));
            }
            Ok(Decoded::Event(EventWrite {
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
        assert!(!w.live);

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
    }

    #[test]
    fn refuses_garbage_and_spoofed_devices() {
        let g = raw("wpm/v1/device/d/status", vec![0xff, 0x00, 0x13], false);
        assert!(decode_message(&g, 0).is_err());
        let spoof = raw(
            "wpm/v1/device/other/status",
            encode(&golden::status()),
            false,
        );
        assert!(decode_message(&spoof, 0).is_err());
        let off = raw(
            "wpm/v1/device/d/presence",
            encode(&Presence { online: false }),
            false,
        );
        assert!(matches!(
            decode_message(&off, 0),
            Ok(Decoded::Presence(PresenceWrite { online: false, .. }))
        ));
    }
}
