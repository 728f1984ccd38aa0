//! One simulated device: the device-pm core, a simulated flash and one MQTT 5 connection.

use crate::{FleetConfig, Probe};
use anyhow::{Context, Result};
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Transport;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wpm_device_pm::sim_flash::SimFlash;
use wpm_device_pm::{Config, Device, Input, Output, Qos, Tuning};
use wpm_transport::BrokerUrl;

/// Largest MQTT packet a device accepts: a chunk plus headers, with room to spare.
const MAX_PACKET: u32 = 64 * 1024;
/// Requests the core may queue towards the broker between two polls of the event loop.
/// The core bounds its own in-flight chunk requests far below this.
const REQUEST_QUEUE: usize = 1024;
/// A connection that lasted this long resets the reconnect back-off.
const STABLE_CONNECTION: Duration = Duration::from_secs(60);

fn qos(q: Qos) -> QoS {
    match q {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A booted device, not yet connected.
pub struct SimDevice {
    id: String,
    core: Device<SimFlash>,
    options: MqttOptions,
    tuning: Tuning,
    flash_path: Option<PathBuf>,
    probe: Option<Arc<Probe>>,
}

impl SimDevice {
    /// Boots from the saved flash image in the state directory, or from blank flash.
    pub fn boot(
        config: &FleetConfig,
        broker: &BrokerUrl,
        transport: Transport,
        id: String,
    ) -> Result<Self> {
        let flash_path = config
            .state_dir
            .as_ref()
            .map(|d| d.join(format!("{id}.flash")));
        let flash = match &flash_path {
            Some(p) if p.exists() => {
                let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                SimFlash::from_bytes(bytes)
            }
            _ => SimFlash::new(config.flash_size),
        };
        let core_config = Config {
            device_id: id.clone(),
            groups: config.groups.clone(),
            trusted_keys: config.trusted_keys.clone(),
            device_key: config.device_key(&id),
            // Simulated devices boot blank and trust what is retained now.
            sequence_floor: 0,
            tuning: config.tuning,
        };
        let mut core = Device::new(core_config, flash, now_ms())
            .map_err(|e| anyhow::anyhow!("device {id}: flash store does not boot: {e:?}"))?;

        let mut options = MqttOptions::new(id.clone(), broker.host.clone(), broker.port);
        options.set_transport(transport);
        let will = last_will(&mut core, config.tuning)?;
        let (username, password) = core.broker_login();
        let tuning = config.tuning;
        options
            .set_keep_alive(Duration::from_secs(tuning.keep_alive_s.into()))
            // The firmware waits as long for the CONNACK (its socket timeout).
            .set_connection_timeout(2 * u64::from(tuning.keep_alive_s))
            .set_outgoing_inflight_upper_limit(wpm_device_pm::PUBLISH_WINDOW)
            .set_clean_start(true)
            .set_max_packet_size(Some(MAX_PACKET))
            .set_credentials(username, password)
            .set_last_will(will);
        Ok(Self {
            id,
            core,
            options,
            tuning,
            flash_path,
            probe: config.probe.clone(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The device's main loop, until `cancel` fires.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<()> {
        let (client, events) = AsyncClient::new(self.options.clone(), REQUEST_QUEUE);
        // The event loop runs in its own task: `EventLoop::poll` is not cancel-safe, so it
        // must never be a losing branch of the select below.
        let (tx, mut rx) = mpsc::channel(64);
        let (will_tx, will_rx) = mpsc::channel(1);
        let poller = tokio::spawn(drive(events, tx, will_rx, self.tuning));
        let mut online = false;
        loop {
            let timer = self
                .core
                .next_timer()
                .map(|at| Duration::from_millis(at.saturating_sub(now_ms())));
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = sleep_or_forever(timer) => self.core.handle(now_ms(), Input::Timer),
                event = rx.recv() => match event {
                    Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        online = true;
                        self.core.handle(now_ms(), Input::LinkUp);
                    }
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        if let Ok(topic) = std::str::from_utf8(&p.topic) {
                            self.core.handle(now_ms(), Input::Message { topic, payload: &p.payload });
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        if let Some(p) = &self.probe {
                            p.link_dropped();
                        }
                        // The next connection gets a will of its own (see `drive`).
                        let _ = will_tx.try_send(last_will(&mut self.core, self.tuning)?);
                        if online {
                            tracing::warn!(device = %self.id, "link down: {e}");
                            online = false;
                            self.core.handle(now_ms(), Input::LinkDown);
                        }
                    }
                    None => anyhow::bail!("device {}: MQTT event loop ended", self.id),
                },
            }
            self.carry_out(&client);
        }
        self.power_off(client, rx, poller).await
    }

    /// Hands the core's outputs to the MQTT client (or the log).
    fn carry_out(&mut self, client: &AsyncClient) {
        while let Some(output) = self.core.poll_output() {
            let sent = match output {
                Output::Subscribe { topic } => {
                    client.try_subscribe(topic, qos(self.tuning.subscribe_qos))
                }
                Output::Unsubscribe { topic } => client.try_unsubscribe(topic),
                Output::Publish {
                    topic,
                    payload,
                    retain,
                } => {
                    if let Some(p) = &self.probe {
                        p.published(&topic, &payload, now_ms());
                    }
                    client.try_publish(topic, qos(self.tuning.publish_qos), retain, payload)
                }
                Output::Log {
                    module,
                    level,
                    message,
                } => {
                    match level {
                        0 => tracing::error!(device = %self.id, module, "{message}"),
                        1 => tracing::warn!(device = %self.id, module, "{message}"),
                        2 => tracing::info!(device = %self.id, module, "{message}"),
                        _ => tracing::debug!(device = %self.id, module, "{message}"),
                    }
                    Ok(())
                }
            };
            if let Err(e) = sent {
                tracing::warn!(device = %self.id, "MQTT request dropped: {e}");
            }
        }
    }

    /// Says goodbye the way the last will would, disconnects, and keeps the flash.
    async fn power_off(
        mut self,
        client: AsyncClient,
        mut events: mpsc::Receiver<Polled>,
        poller: tokio::task::JoinHandle<()>,
    ) -> Result<()> {
        // A report like any other: sealed with the next counter.
        let (topic, payload) = self
            .core
            .last_will()
            .map_err(|e| anyhow::anyhow!("no counter for the goodbye: {e:?}"))?;
        if let Some(p) = &self.probe {
            p.published(&topic, &payload, now_ms());
        }
        let _ = client.try_publish(topic, qos(self.tuning.publish_qos), true, payload);
        let _ = client.try_disconnect();
        // Wait until the broker closed the connection after our DISCONNECT (so it
        // does not publish the will as well), or give up after a short while.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let mut disconnecting = false;
            while let Some(e) = events.recv().await {
                match e {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => disconnecting = true,
                    Err(_) if disconnecting => break,
                    _ => {}
                }
            }
        })
        .await;
        poller.abort();
        if let Some(path) = &self.flash_path {
            let flash = self.core.into_flash();
            std::fs::write(path, flash.as_bytes())
                .with_context(|| format!("saving {}", path.display()))?;
        }
        Ok(())
    }
}

type Polled = Result<Event, rumqttc::v5::ConnectionError>;

/// The device's next last will, sealed by the core.
fn last_will(core: &mut Device<SimFlash>, tuning: Tuning) -> Result<LastWill> {
    let (topic, payload) = core
        .last_will()
        .map_err(|e| anyhow::anyhow!("no counter for the last will: {e:?}"))?;
    Ok(LastWill::new(
        topic,
        payload,
        qos(tuning.publish_qos),
        true,
        None,
    ))
}

/// Polls the MQTT event loop forever, handing every event to the device task. rumqttc
/// reconnects on the next poll after an error; the pause, doubling as the firmware's
/// does, keeps a dead broker from being hammered. Before each reconnect it waits for
/// the will the main loop seals when it hears of the error, so every connection
/// carries the will its first presence announces.
async fn drive(
    mut events: EventLoop,
    tx: mpsc::Sender<Polled>,
    mut wills: mpsc::Receiver<LastWill>,
    tuning: Tuning,
) {
    let mut backoff_ms = 0;
    let mut connected_at = None;
    loop {
        let event = events.poll().await;
        let failed = event.is_err();
        if let Ok(Event::Incoming(Packet::ConnAck(_))) = &event {
            connected_at = Some(Instant::now());
        }
        if tx.send(event).await.is_err() {
            return;
        }
        if failed {
            let Some(will) = wills.recv().await else {
                return;
            };
            events.options.set_last_will(will);
            if connected_at
                .take()
                .is_some_and(|t| t.elapsed() > STABLE_CONNECTION)
            {
                backoff_ms = 0;
            }
            backoff_ms = tuning.next_backoff_ms(backoff_ms);
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
        }
    }
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
