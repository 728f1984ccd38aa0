//! Publishing what devices must run: module chunks, module manifests (chunk indexes) and
//! deployment manifests, all QoS 1 and retained so the broker serves the fleet.

use crate::db::{Db, DeploymentRow, ModuleRow};
use crate::keys;
use crate::signer::Signer;
use anyhow::Context as _;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex};
use wpm_manifests::{encode, sha256, Chunk, ModuleManifest, Topic};

/// MQTT connection settings shared by the registry's clients (all MQTT 5).
#[derive(Clone, Debug)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub max_packet_size: usize,
    /// Username and password the registry's clients log in with, if the broker wants
    /// them (the embedded one does).
    pub credentials: Option<(String, String)>,
    /// TLS to the broker (an external `mqtts://` one), trusting this configuration's roots.
    pub tls: Option<Arc<wpm_transport::rustls::ClientConfig>>,
}

impl MqttSettings {
    /// A clean session: the publisher keeps nothing at the broker between connections
    /// (everything it publishes is republished after a reconnect anyway).
    pub fn options(&self, client_id: String) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, self.host.clone(), self.port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(Some(self.max_packet_size as u32));
        o.set_clean_start(true);
        o.set_outgoing_inflight_upper_limit(100);
        if let Some((user, password)) = &self.credentials {
            o.set_credentials(user.clone(), password.clone());
        }
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        o
    }
}

/// A client id no other registry replica or test run uses.
pub fn client_id(role: &str) -> String {
    let r = keys::random_bytes().unwrap_or_default();
    format!("wpm-registry-{role}-{}", hex::encode(&r[..6]))
}

/// Drives a client's event loop until `stop` flips, reconnecting after errors. Sends
/// `true` on `connected` at every ConnAck; `on_event` sees every event.
pub async fn drive(
    mut eventloop: EventLoop,
    mut stop: watch::Receiver<bool>,
    connected: watch::Sender<bool>,
    name: &'static str,
    mut on_event: impl FnMut(Event) + Send,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            ev = eventloop.poll() => match ev {
                Ok(ev) => {
                    if let Event::Incoming(Packet::ConnAck(_)) = ev {
                        tracing::info!(client = name, "connected to the MQTT broker");
                        let _ = connected.send(true);
                    }
                    on_event(ev);
                }
                Err(e) => {
                    let _ = connected.send(false);
                    tracing::warn!(client = name, error = %e, "MQTT connection lost; retrying in 1 s");
                    // rumqttc reconnects on the next poll; pace it.
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
}

/// Waits until `connected` reads true, or fails after `timeout`.
pub async fn wait_connected(
    mut rx: watch::Receiver<bool>,
    what: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    tokio::time::timeout(timeout, rx.wait_for(|c| *c))
        .await
        .with_context(|| format!("{what}: no connection to the MQTT broker within {timeout:?}"))?
        .with_context(|| format!("{what}: MQTT task ended"))?;
    Ok(())
}

#[derive(Default)]
struct Retained {
    topics: HashMap<String, [u8; 32]>,
    modules: HashMap<[u8; 32], ModuleRow>,
}

/// The registry's publishing connection.
pub struct Publisher {
    client: AsyncClient,
    signer: Arc<Signer>,
    /// Modules whose chunks and manifest this process has already published: the broker
    /// retains them, so a later deployment of the same bytes need not send them again.
    published: Mutex<HashSet<[u8; 32]>>,
    /// What this process last retained on each topic (the sha256 of the payload), and
    /// the modules it published by digest: what [`crate::retained_guard`] puts back.
    retained: std::sync::Mutex<Retained>,
    /// Flips to true at every ConnAck: a broker that restarted without persistence has
    /// lost every retained message, so each reconnect means publishing everything again.
    connected: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub async fn connect(
        settings: &MqttSettings,
        signer: Arc<Signer>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Publisher> {
        let (client, eventloop) = AsyncClient::new(settings.options(client_id("pub")), 1024);
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(drive(eventloop, stop, tx, "publisher", |_| {}));
        wait_connected(rx.clone(), "publisher", Duration::from_secs(10)).await?;
        Ok(Publisher {
            client,
            signer,
            published: Mutex::new(HashSet::new()),
            retained: Default::default(),
            connected: rx,
            task,
        })
    }

    /// The connection state, true from each ConnAck until the connection drops.
    pub fn connection(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Whether this connection already published the module (its bytes need not be read).
    pub async fn has_published(&self, sha256: &[u8; 32]) -> bool {
        self.published.lock().await.contains(sha256)
    }

    /// Forgets what was published: the broker lost its retained messages.
    pub async fn forget_published(&self) {
        self.published.lock().await.clear();
    }

    async fn publish(&self, topic: String, payload: Vec<u8>) -> anyhow::Result<()> {
        self.retained()
            .topics
            .insert(topic.clone(), sha256(&payload));
        self.publish_with(topic, payload, true).await
    }

    fn retained(&self) -> std::sync::MutexGuard<'_, Retained> {
        self.retained.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sha256 of what this process last retained on `topic`, if it did.
    pub fn retained_hash(&self, topic: &str) -> Option<[u8; 32]> {
        self.retained().topics.get(topic).copied()
    }

    /// A module this process published, by digest.
    pub fn published_module(&self, sha256: &[u8; 32]) -> Option<ModuleRow> {
        self.retained().modules.get(sha256).cloned()
    }

    /// Publishes a module again, whether or not this process did already.
    pub async fn republish_module(&self, module: &ModuleRow, wasm: &[u8]) -> anyhow::Result<()> {
        self.published.lock().await.remove(&module.sha256);
        self.publish_module(module, wasm).await
    }

    async fn publish_with(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .context("queueing an MQTT publish")
    }

    /// Publishes a module's chunks, then its signed manifest, unless already done by
    /// this process. Chunks first: a device that sees the manifest finds every chunk.
    pub async fn publish_module(&self, module: &ModuleRow, wasm: &[u8]) -> anyhow::Result<()> {
        let mut published = self.published.lock().await;
        if published.contains(&module.sha256) {
            return Ok(());
        }
        for (topic, payload) in module_messages(module, wasm, &self.signer.key())? {
            self.publish(topic, payload).await?;
        }
        published.insert(module.sha256);
        (self.retained().modules).insert(module.sha256, module.clone());
        tracing::info!(
            module = %module.name, version = %module.version,
            chunks = module.chunk_count(), "published module"
        );
        Ok(())
    }

    /// The sha256 of each message of `module` as this process would retain it now.
    ///
    /// # Errors
    /// When `wasm` is not the module's bytes.
    pub fn module_hashes(
        &self,
        module: &ModuleRow,
        wasm: &[u8],
    ) -> anyhow::Result<HashMap<String, [u8; 32]>> {
        Ok(module_messages(module, wasm, &self.signer.key())?
            .into_iter()
            .map(|(topic, payload)| (topic, sha256(&payload)))
            .collect())
    }

    /// Takes `hashes` (from [`Self::module_hashes`]) as what is retained for `module`,
    /// without publishing: another replica published exactly these bytes.
    pub fn adopt_module(&self, module: &ModuleRow, hashes: HashMap<String, [u8; 32]>) {
        let mut retained = self.retained();
        retained.topics.extend(hashes);
        retained.modules.insert(module.sha256, module.clone());
    }

    pub async fn publish_deployment(&self, d: &DeploymentRow) -> anyhow::Result<()> {
        self.publish(Topic::Deployment(&d.target).render(), d.sealed.clone())
            .await?;
        tracing::info!(sequence = d.sequence, target = ?d.target, "published deployment");
        Ok(())
    }

    /// Retains the trust chain (`crate::trust`).
    pub async fn publish_trust(&self, chain: Vec<u8>) -> anyhow::Result<()> {
        self.publish(Topic::Trust.render(), chain).await
    }

    /// Sends a sealed command to one device, QoS 1 and not retained: a command is for
    /// now, and a retained one would be carried out again by a device that reconnects.
    pub async fn publish_command(&self, device: &str, sealed: Vec<u8>) -> anyhow::Result<()> {
        self.publish_with(Topic::Command(device).render(), sealed, false)
            .await
    }

    pub async fn shutdown(self) {
        let _ = self.client.disconnect().await;
        // The event loop sends the DISCONNECT, then the stop signal ends it.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

/// The retained messages of a module: each chunk, then its manifest sealed by `key`.
/// The same for every replica with that key (ed25519 signatures are deterministic).
fn module_messages(
    module: &ModuleRow,
    wasm: &[u8],
    key: &wpm_manifests::KeyPair,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    anyhow::ensure!(
        sha256(wasm) == module.sha256,
        "stored bytes of {}@{} do not match their sha256",
        module.name,
        module.version
    );
    let chunk_size = module.chunk_size.max(1) as usize;
    let mut messages = Vec::new();
    let mut hashes = Vec::new();
    for (i, data) in wasm.chunks(chunk_size).enumerate() {
        hashes.push(sha256(data).into());
        let chunk = Chunk {
            module: module.sha256.into(),
            index: i as u32,
            data: data.to_vec().into(),
        };
        messages.push((
            Topic::Chunk(&module.sha256, i as u32).render(),
            encode(&chunk),
        ));
    }
    let manifest = ModuleManifest {
        name: module.name.clone(),
        version: module.version.clone(),
        sha256: module.sha256.into(),
        size: module.size,
        chunk_size: module.chunk_size,
        chunk_hashes: hashes,
    };
    messages.push((
        Topic::ModuleManifest(&module.sha256).render(),
        keys::seal_module_manifest(key, &manifest),
    ));
    Ok(messages)
}

/// Publishes everything deployed: the trust chain, the modules of every desired set,
/// then the newest deployment of every target. The broker may have lost its retained messages (the
/// embedded one keeps them in memory only), so this runs on every start. Publishing the same retained
/// bytes again is harmless, so replicas can all do it.
pub async fn republish_all(db: &Db, publisher: &Publisher) -> anyhow::Result<()> {
    // The chain before any deployment sealed by a key it introduces.
    let chain = db.trust_chain().await?;
    if !chain.is_empty() {
        publisher
            .publish_trust(crate::trust::chain_payload(&chain))
            .await?;
    }
    let modules = db.desired_modules().await?;
    for m in &modules {
        let wasm = db.module_wasm(&m.name, &m.version).await?;
        publisher.publish_module(m, &wasm).await?;
    }
    let deployments = db.latest_deployments().await?;
    for d in &deployments {
        publisher.publish_deployment(d).await?;
    }
    tracing::info!(
        modules = modules.len(),
        deployments = deployments.len(),
        "republished retained state"
    );
    Ok(())
}
