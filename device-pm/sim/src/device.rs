//! One simulated device: the device-pm core, a simulated flash and one MQTT connection.

use crate::FleetConfig;
use anyhow::{Context, Result};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wpm_device_pm::sim_flash::SimFlash;
use wpm_device_pm::{Config, Device, Input, Output};

/// Largest MQTT packet a device accepts: a chunk plus headers, with room to spare.
const MAX_PACKET: usize = 64 * 1024;
/// Requests the core may queue towards the broker between two polls of the event loop.
/// The core bounds its own in-flight chunk requests far below this.
const REQUEST_QUEUE: usize = 1024;
/// Wait after a failed connection before the event loop tries again.
const RECONNECT_BACKOFF: Duration = Duration::from_secs(1);

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
    flash_path: Option<PathBuf>,
}

impl SimDevice {
    /// Boots from the saved flash image in the state directory, or from blank flash.
    pub fn boot(config: &FleetConfig, id: String) -> Result<Self> {
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
            slots: config.slots,
            chunk_window: 4,
            turn_interval_ms: config.turn_interval_ms,
            status_interval_ms: 30_000,
        };
        let core = Device::new(core_config, flash, now_ms())
            .map_err(|e| anyhow::anyhow!("device {id}: flash store does not boot: {e:?}"))?;

        // rumqttc parses the broker URL; the client id travels as its query parameter.
        let mut options = MqttOptions::parse_url(format!("{}?client_id={id}", config.broker_url))
            .with_context(|| {
            format!(
                "bad broker URL {:?} (want mqtt://host:port)",
                config.broker_url
            )
        })?;
        let (will_topic, will_payload) = core.last_will();
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_last_will(LastWill::new(
                will_topic,
                will_payload,
                QoS::AtLeastOnce,
                true,
            ));
        Ok(Self {
            id,
            core,
            options,
            flash_path,
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
        let poller = tokio::spawn(drive(events, tx));
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
                        self.core.handle(now_ms(), Input::Message { topic: &p.topic, payload: &p.payload });
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
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
                Output::Subscribe { topic } => client.try_subscribe(topic, QoS::AtLeastOnce),
                Output::Unsubscribe { topic } => client.try_unsubscribe(topic),
                Output::Publish {
                    topic,
                    payload,
                    retain,
                } => client.try_publish(topic, QoS::AtLeastOnce, retain, payload),
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
        self,
        client: AsyncClient,
        mut events: mpsc::Receiver<Polled>,
        poller: tokio::task::JoinHandle<()>,
    ) -> Result<()> {
        let (topic, payload) = self.core.last_will();
        let _ = client.try_publish(topic, QoS::AtLeastOnce, true, payload);
        let _ = client.try_disconnect();
        // Wait until the goodbye is on the wire, or give up after a short while.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(e)) = events.recv().await {
                if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
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

type Polled = Result<Event, rumqttc::ConnectionError>;

/// Polls the MQTT event loop forever, handing every event to the device task. rumqttc
/// reconnects on the next poll after an error; the pause keeps a dead broker from being
/// hammered.
async fn drive(mut events: EventLoop, tx: mpsc::Sender<Polled>) {
    loop {
        let event = events.poll().await;
        let failed = event.is_err();
        if tx.send(event).await.is_err() {
            return;
        }
        if failed {
            tokio::time::sleep(RECONNECT_BACKOFF).await;
        }
    }
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
