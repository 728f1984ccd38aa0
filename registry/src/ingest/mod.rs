//! Ingest: device status, presence and events from the broker into the database, with
//! nothing the broker accepted lost on the way.
//!
//! One MQTT 5 connection with a **persistent session** (a stable client id, no clean
//! start, a session expiry) subscribes at QoS 1 to every device's reports, and
//! acknowledges a message only **after the database transaction that holds it
//! committed**. So a slow database, a burst, a crash or a restart of the registry costs
//! nothing: the broker keeps what is unacknowledged (in flight, up to the receive
//! maximum) or queued (while the registry is away) and delivers it again.
//!
//! ```text
//! broker ──PUBLISH (QoS 1)──▶ connection task ──channel──▶ writer: decode, batch, commit ──▶ PUBACK
//! ```
//!
//! The connection task never waits for the writer: the writer's acknowledgements travel
//! back through the same connection, so a connection task blocked on a full channel
//! would stop them, and the writer, blocked on acknowledging, would never empty the
//! channel (a deadlock measured with Mosquitto at 10,000 devices). The channel is
//! unbounded; the broker bounds it, as it may not have more than the receive maximum
//! of unacknowledged QoS 1 messages out to us (devices publish everything at QoS 1). Messages refused on
//! purpose (undecodable, spoofed, unstorable) are counted by [`Refusal`] reason and
//! acknowledged: they will not get better by being delivered again.
//!
//! The registry never trusts the broker for who speaks: every report is sealed by its
//! device's own key and numbered (`wpm_manifests::report`); ingest takes only reports
//! of registered, non-revoked devices whose seal verifies and whose counter is new
//! ([`admit`]), whatever broker carried them and whoever could publish there.

mod admit;
mod decode;
mod keys;
mod writer;

pub use admit::Counters;
pub use decode::{event_detail, Refusal};

use crate::db::Db;
use crate::publish::{wait_connected, MqttSettings};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use wpm_manifests::TopicFilter;

pub const BATCH_MAX: usize = 1000;
pub const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// Unacknowledged messages the broker may have in flight to the registry (MQTT 5 receive
/// maximum): the most a database stall can hold up, and the largest batch.
pub const RECEIVE_MAXIMUM: u16 = 4096;

/// Counters, reported by `/v1/health`.
#[derive(Default, Debug)]
pub struct IngestStats {
    /// Messages the broker delivered (redeliveries after a reconnect included).
    pub received: AtomicU64,
    /// Of those, redeliveries of a message not yet acknowledged (the DUP flag): a
    /// report received twice, written twice (idempotent for status and presence).
    pub redelivered: AtomicU64,
    /// Of those, retained copies (a device's last status or presence, sent when the
    /// subscription is new).
    pub retained: AtomicU64,
    /// Messages whose batch committed (and that were then acknowledged).
    pub written: AtomicU64,
    /// Messages dropped on purpose, by [`Refusal`] reason.
    refused: [AtomicU64; Refusal::ALL.len()],
    /// Batch writes that failed and were tried again.
    pub write_retries: AtomicU64,
}

impl IngestStats {
    pub fn refused(&self) -> Vec<(Refusal, u64)> {
        Refusal::ALL
            .iter()
            .map(|r| (*r, self.refused[*r as usize].load(Ordering::Relaxed)))
            .collect()
    }

    fn refuse(&self, reason: Refusal, topic: &str, detail: &str) {
        self.refused[reason as usize].fetch_add(1, Ordering::Relaxed);
        if reason.is_routine() {
            tracing::debug!(%topic, reason = reason.as_str(), detail, "device message dropped");
        } else {
            tracing::warn!(
                %topic, reason = reason.as_str(), detail,
                "device message refused"
            );
        }
    }

    /// Received but neither written nor refused yet: in the writer's hands.
    pub fn pending(&self) -> u64 {
        let done = self.written.load(Ordering::Relaxed)
            + self.refused().iter().map(|(_, n)| n).sum::<u64>();
        self.received.load(Ordering::Relaxed).saturating_sub(done)
    }
}

/// How the ingest connects.
#[derive(Clone, Debug)]
pub struct IngestConfig {
    /// Stable across restarts: the broker finds the session, and what it queued, by it.
    pub client_id: String,
    /// How long the broker keeps the session (and queues reports) while the registry is
    /// away.
    pub session_expiry: Duration,
    /// `$share/{group}/…` subscriptions: replicas split the ingest between them.
    pub share_group: Option<String>,
}

pub struct Ingest {
    client: AsyncClient,
    mqtt_task: tokio::task::JoinHandle<()>,
    writer_task: tokio::task::JoinHandle<()>,
}

impl Ingest {
    /// Connects, subscribes (unless the broker kept the session and its subscriptions)
    /// and returns once the broker acknowledged it.
    pub async fn start(
        settings: &MqttSettings,
        config: IngestConfig,
        db: Db,
        stats: Arc<IngestStats>,
        written: Arc<Notify>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Ingest> {
        let mut options = settings.options(config.client_id.clone());
        options
            .set_clean_start(false)
            .set_session_expiry_interval(Some(
                u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX),
            ))
            .set_receive_maximum(Some(RECEIVE_MAXIMUM))
            .set_manual_acks(true);
        let (client, eventloop) = AsyncClient::new(options, 4 * usize::from(RECEIVE_MAXIMUM));
        let (tx, rx) = mpsc::unbounded_channel::<Publish>();
        let (subscribed_tx, subscribed_rx) = watch::channel(false);
        let filters: Vec<Filter> = [
            TopicFilter::AllStatus,
            TopicFilter::AllPresence,
            TopicFilter::AllEvents,
            TopicFilter::AllTelemetry,
        ]
        .into_iter()
        .map(|f| {
            let mut filter = Filter::new(
                shared_filter(config.share_group.as_deref(), f),
                QoS::AtLeastOnce,
            );
            // Retained reports (every device's last status and presence) only when the
            // subscription is new, not again at every reconnect.
            filter.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
            filter
        })
        .collect();
        let mqtt_task = tokio::spawn(connection(
            eventloop,
            client.clone(),
            filters,
            tx,
            subscribed_tx,
            stats.clone(),
            stop,
        ));
        let writer_task = tokio::spawn(writer::run(db, client.clone(), rx, stats, written));
        wait_connected(subscribed_rx, "ingest", Duration::from_secs(10)).await?;
        Ok(Ingest {
            client,
            mqtt_task,
            writer_task,
        })
    }

    /// Disconnects (the session stays at the broker) and lets the writer flush what it
    /// holds. What it could not acknowledge the broker delivers again next time.
    pub async fn shutdown(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.mqtt_task).await;
        // The connection task owned the sender; with it gone the writer drains and ends.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.writer_task).await;
    }
}

/// The filter to subscribe to: `$share/{group}/{filter}` when replicas split the ingest
/// (each message goes to one member of the group), else the plain filter.
///
/// Per the MQTT 5 rules brokers send no retained messages to a shared subscription: a
/// replica (re)starting learns status from the database and the devices' reports, not
/// from the broker's retained copies.
pub fn shared_filter(share_group: Option<&str>, f: TopicFilter) -> String {
    match share_group {
        Some(g) => format!("$share/{g}/{}", f.render()),
        None => f.render(),
    }
}

/// Drives the MQTT connection until `stop`: subscribes after a connect that found no
/// session, hands every report to the writer, and reconnects (pausing 1 s) after errors.
async fn connection(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filters: Vec<Filter>,
    tx: mpsc::UnboundedSender<Publish>,
    subscribed: watch::Sender<bool>,
    stats: Arc<IngestStats>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(
                    session_present = ack.session_present,
                    "ingest connected to the MQTT broker"
                );
                if ack.session_present {
                    let _ = subscribed.send(true);
                } else if let Err(e) = client.try_subscribe_many(filters.clone()) {
                    tracing::error!(error = %e, "cannot queue the ingest subscription");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                let _ = subscribed.send(true);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                stats.received.fetch_add(1, Ordering::Relaxed);
                if p.dup {
                    stats.redelivered.fetch_add(1, Ordering::Relaxed);
                }
                if p.retain {
                    stats.retained.fetch_add(1, Ordering::Relaxed);
                }
                if tx.send(p).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let _ = subscribed.send(false);
                tracing::warn!(error = %e, "ingest lost the MQTT broker; retrying in 1 s");
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}
