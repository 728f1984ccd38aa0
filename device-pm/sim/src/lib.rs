//! The PC device simulator: the same sans-IO [`wpm_device_pm::Device`] core the firmware
//! runs, driven by tokio and a real MQTT 5 connection (rumqttc), on a simulated NOR flash.
//!
//! Each simulated device is one tokio task owning one MQTT connection, with its own
//! client id (= device id) and last will. The task is the device's "firmware main loop":
//! it feeds the core link, message and timer inputs and carries out the core's outputs,
//! with the firmware's own [`Tuning`] (QoS, keep-alive, chunk window, intervals,
//! reconnect back-off), so a simulated fleet speaks exactly what a real one speaks.
//! Flash images can be kept in a state directory so a restarted simulator resumes where
//! its devices stood, as real devices do after a reboot.

mod device;
mod probe;

pub use device::SimDevice;
pub use probe::{Milestone, Probe, Tally};
pub use wpm_device_pm::{Qos, Tuning, PUBLISH_WINDOW};

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use wpm_transport::BrokerUrl;

/// How to run a fleet of simulated devices.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `mqtt://host:port` (or `mqtts://` for TLS) of the broker the devices connect to.
    pub broker_url: String,
    /// PEM file of the CA an `mqtts://` broker's certificate must chain to; `None`: the
    /// system's roots.
    pub broker_ca: Option<PathBuf>,
    /// Registry public keys the devices trust.
    pub trusted_keys: Vec<[u8; 32]>,
    /// Each device's own key is derived from this secret and its id
    /// ([`FleetConfig::device_key`]), so a fleet started again with the same secret keeps
    /// its identities; register them with [`FleetConfig::identities`].
    pub identity_secret: [u8; 32],
    /// Group tags every device of this fleet carries.
    pub groups: Vec<String>,
    /// Device ids are `{id_prefix}-{index:04}`.
    pub id_prefix: String,
    pub devices: usize,
    /// Simulated flash size per device, bytes (the nRF9160 has 1 MiB, part of it firmware).
    pub flash_size: usize,
    /// Keep each device's flash image here across runs (`{id}.flash`).
    pub state_dir: Option<PathBuf>,
    /// Link and scheduling settings; [`Tuning::NRF9160`] unless a test speeds it up.
    pub tuning: Tuning,
    /// Counts what the devices publish, when set.
    pub probe: Option<Arc<Probe>>,
}

impl FleetConfig {
    pub fn new(
        broker_url: impl Into<String>,
        trusted_keys: Vec<[u8; 32]>,
        identity_secret: [u8; 32],
    ) -> Self {
        Self {
            broker_url: broker_url.into(),
            broker_ca: None,
            trusted_keys,
            identity_secret,
            groups: Vec::new(),
            id_prefix: "sim".into(),
            devices: 1,
            flash_size: 512 * 1024,
            state_dir: None,
            tuning: Tuning::NRF9160,
            probe: None,
        }
    }

    /// The id of device number `index`.
    pub fn device_id(&self, index: usize) -> String {
        format!("{}-{index:04}", self.id_prefix)
    }

    /// The secret seed of a device's own ed25519 key: sha256 of the fleet's identity
    /// secret and the device id.
    pub fn device_key(&self, id: &str) -> [u8; 32] {
        let mut seed = self.identity_secret.to_vec();
        seed.extend_from_slice(id.as_bytes());
        wpm_manifests::sha256(&seed)
    }

    /// Every device's id and public key, to register with the registry before the
    /// fleet starts (the registry drops reports of devices it does not know).
    pub fn identities(&self) -> Vec<(String, [u8; 32])> {
        (0..self.devices)
            .map(|i| {
                let id = self.device_id(i);
                let public = wpm_manifests::KeyPair::from_seed(&self.device_key(&id)).public();
                (id, public)
            })
            .collect()
    }
}

/// A running fleet of simulated devices.
pub struct Fleet {
    ids: Vec<String>,
    cancel: CancellationToken,
    tasks: JoinSet<Result<()>>,
}

impl Fleet {
    /// Boots every device (from its saved flash image if there is one) and connects it.
    pub async fn start(config: FleetConfig) -> Result<Fleet> {
        anyhow::ensure!(
            !config.trusted_keys.is_empty(),
            "a device must trust at least one registry key"
        );
        if let Some(dir) = &config.state_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut ids = Vec::with_capacity(config.devices);
        let broker: BrokerUrl = config.broker_url.parse()?;
        // Once for the fleet: a TLS configuration reads its CA file.
        let transport = broker.transport(config.broker_ca.as_deref())?;
        for index in 0..config.devices {
            let id = config.device_id(index);
            let device = SimDevice::boot(&config, &broker, transport.clone(), id)?;
            ids.push(device.id().to_string());
            tasks.spawn(device.run(cancel.clone()));
        }
        Ok(Fleet { ids, cancel, tasks })
    }

    pub fn device_ids(&self) -> &[String] {
        &self.ids
    }

    /// Powers every device off gracefully: each says it goes offline, then its flash
    /// image is saved (when a state directory is set).
    pub async fn stop(mut self) -> Result<()> {
        self.cancel.cancel();
        let mut first_error = None;
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(e) = joined.context("device task panicked").and_then(|r| r) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
