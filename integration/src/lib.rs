//! Helpers for the end-to-end tests: real services, a typed registry API client, example
//! modules, and polling with deadlines.

use anyhow::{bail, Context, Result};
use std::future::Future;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

mod api;
mod processes;

pub use api::{device_runs, Answer, Api};
pub use processes::{cli_binary, registry_binary, shared_data_dir, Child, OwnMosquitto, Replica};

/// Compiles an example module (`examples/{path}`, WAT) to wasm bytes.
pub fn example(path: &str) -> Vec<u8> {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(path);
    wat::parse_file(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// A short random suffix so tests sharing one broker or database never collide.
pub fn unique(prefix: &str) -> String {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).unwrap();
    format!("{prefix}-{}", hex::encode(b))
}

/// A fresh secret for a simulated fleet's device keys.
pub fn identity_secret() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).unwrap();
    b
}

pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)).is_ok()
}

/// Starts a local service with `start` unless something already listens on `port`.
fn ensure_service(name: &str, port: u16, start: &str) -> Result<()> {
    if port_open(port) {
        return Ok(());
    }
    let status = Command::new("sh")
        .arg("-c")
        .arg(start)
        .status()
        .with_context(|| format!("starting {name}"))?;
    if !status.success() {
        bail!("{name} is not running on 127.0.0.1:{port} and `{start}` failed ({status})");
    }
    for _ in 0..50 {
        if port_open(port) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{name} did not come up on 127.0.0.1:{port}")
}

/// The machine's Mosquitto at 127.0.0.1:1883, started if it is down.
pub fn mosquitto() -> Result<String> {
    ensure_service(
        "mosquitto",
        1883,
        "mosquitto -d -c /etc/mosquitto/mosquitto.conf",
    )?;
    Ok("mqtt://127.0.0.1:1883".into())
}

/// A fresh database on the machine's PostgreSQL at 127.0.0.1:5432 (started if down),
/// so every test run starts from empty tables.
pub async fn postgres_database() -> Result<String> {
    ensure_service(
        "postgresql",
        5432,
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    )?;
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/test")
        .await
        .context("connecting to PostgreSQL")?;
    let name = unique("wpm_e2e").replace('-', "_");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    Ok(format!("postgres://postgres@127.0.0.1:5432/{name}"))
}

/// Polls `probe` every 200 ms until it yields a value, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where the registry keeps its data and which broker it uses.
pub enum Backend {
    /// The registry's own embedded broker and a SQLite file: the single-machine default.
    EmbeddedSqlite,
    /// The machine's Mosquitto and a fresh PostgreSQL database.
    MosquittoPostgres,
    /// This broker (`mqtt://host:port`) and a SQLite file.
    BrokerSqlite(String),
}

/// A running registry with a client for its API.
pub struct Env {
    pub registry: wpm_registry::Registry,
    pub api: Api,
    pub mqtt_url: String,
    _data: tempfile::TempDir,
}

impl Env {
    pub async fn start(backend: Backend) -> Result<Env> {
        let data = tempfile::tempdir()?;
        let mut config = wpm_registry::Config::new(data.path().to_path_buf());
        config.http = "127.0.0.1:0".parse()?;
        match backend {
            Backend::EmbeddedSqlite => {
                config.mqtt_listen = format!("127.0.0.1:{}", free_port()).parse()?
            }
            Backend::MosquittoPostgres => {
                config.broker = Some(mosquitto()?.parse()?);
                // The machine's Mosquitto outlives the test: its ingest session should not.
                config.ingest_session_expiry = Duration::from_secs(60);
                config.database = Some(postgres_database().await?);
            }
            Backend::BrokerSqlite(url) => config.broker = Some(url.parse()?),
        }
        let registry = wpm_registry::Registry::start(config).await?;
        let api = Api::new(registry.http_url(), registry.token());
        let mqtt_url = registry.mqtt_url();
        Ok(Env {
            registry,
            api,
            mqtt_url,
            _data: data,
        })
    }

    /// `n` registered simulated devices in `group` running hello 1.0.0, with hello 2.0.0
    /// (good) and 3.0.0 (traps) published: where the rollout tests start.
    pub async fn hello_fleet(
        &self,
        n: usize,
        group: &str,
        timeout: Duration,
    ) -> Result<(wpm_sim::Fleet, Vec<String>)> {
        let fleet = self.api.start_fleet(self.fleet_config(n, group)).await?;
        let devices = fleet.device_ids().to_vec();
        for (v, file) in [
            ("1.0.0", "hello/v1.wat"),
            ("2.0.0", "hello/v2.wat"),
            ("3.0.0", "faulty/traps.wat"),
        ] {
            self.api.publish("hello", v, example(file)).await?.ok()?;
        }
        self.api.deploy("hello", "1.0.0", group).await?.ok()?;
        self.api
            .wait_running(&devices, "hello", "1.0.0", timeout)
            .await?;
        Ok((fleet, devices))
    }

    /// The registry's data directory (its key files).
    pub fn data_dir(&self) -> &std::path::Path {
        self._data.path()
    }

    /// Configuration for `n` simulated devices in `group`, trusting this registry.
    pub fn fleet_config(&self, n: usize, group: &str) -> wpm_sim::FleetConfig {
        let mut config = wpm_sim::FleetConfig::new(
            self.mqtt_url.clone(),
            vec![self.registry.public_key()],
            identity_secret(),
        );
        config.devices = n;
        config.groups = vec![group.to_string()];
        config.id_prefix = unique("dev");
        config.tuning.turn_interval_ms = 200;
        config
    }
}

/// A plain MQTT client for tests: plays the operator's dashboard, or the attacker on
/// the wire.
pub struct Mqtt {
    client: rumqttc::AsyncClient,
    messages: tokio::sync::mpsc::Receiver<rumqttc::Publish>,
    /// PUBACKs received so far: a publish returns once the broker took it.
    acks: tokio::sync::watch::Receiver<u64>,
    published: u64,
    task: tokio::task::JoinHandle<()>,
}

impl Mqtt {
    /// An anonymous client (on the embedded broker, refused).
    pub async fn connect(mqtt_url: &str) -> Result<Mqtt> {
        Self::connect_as(mqtt_url, None).await
    }

    /// A client logged in with `login`.
    pub async fn connect_as(mqtt_url: &str, login: Option<(String, String)>) -> Result<Mqtt> {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
        let mut opts = MqttOptions::parse_url(format!("{mqtt_url}?client_id={}", unique("test")))?;
        opts.set_max_packet_size(1 << 20, 1 << 20);
        if let Some((user, password)) = login {
            opts.set_credentials(user, password);
        }
        let (client, mut events) = AsyncClient::new(opts, 64);
        let (tx, messages) = tokio::sync::mpsc::channel(4096);
        let (acks_tx, acks) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(p).await.is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acks_tx.send_modify(|n| *n += 1);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Ok(Mqtt {
            client,
            messages,
            acks,
            published: 0,
            task,
        })
    }

    pub async fn subscribe(&self, filter: &str) -> Result<()> {
        Ok(self
            .client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await?)
    }

    /// Publishes at QoS 1 and returns once the broker acknowledged it: whoever acts
    /// next (a device connecting, say) finds it there.
    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<()> {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
            .await?;
        self.published += 1;
        let want = self.published;
        tokio::time::timeout(Duration::from_secs(10), self.acks.wait_for(|n| *n >= want))
            .await
            .with_context(|| format!("the broker did not acknowledge a publish on {topic}"))?
            .context("MQTT client ended")?;
        Ok(())
    }

    /// The next message on any subscribed topic.
    pub async fn next(&mut self, timeout: Duration) -> Result<rumqttc::Publish> {
        tokio::time::timeout(timeout, self.messages.recv())
            .await
            .context("no MQTT message in time")?
            .context("MQTT client ended")
    }

    /// The message retained on `topic`.
    pub async fn retained(&mut self, topic: &str) -> Result<Vec<u8>> {
        self.subscribe(topic).await?;
        loop {
            let p = self
                .next(Duration::from_secs(10))
                .await
                .with_context(|| format!("nothing retained on {topic}"))?;
            if p.topic == topic {
                self.client.unsubscribe(topic).await?;
                return Ok(p.payload.to_vec());
            }
        }
    }
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Collects module telemetry from the broker, as an operator's dashboard would.
pub struct Telemetry {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Telemetry {
    /// Watches `module`'s telemetry with `login` (the registry's own, on its embedded
    /// broker: a dashboard reads every device's topics).
    pub async fn watch(
        mqtt_url: &str,
        login: Option<(String, String)>,
        module: &str,
    ) -> Result<Telemetry> {
        let mut mqtt = Mqtt::connect_as(mqtt_url, login).await?;
        mqtt.subscribe(&format!("wpm/v1/device/+/telemetry/{module}"))
            .await?;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(p) = mqtt.messages.recv().await {
                let device = p.topic.split('/').nth(3).unwrap_or_default().to_string();
                // A dashboard shows what the device sealed (the registry checks seals).
                let text = match wpm_manifests::Report::read_unverified(&p.payload) {
                    Ok(wpm_manifests::Report {
                        body: wpm_manifests::ReportBody::Telemetry(bytes),
                        ..
                    }) => String::from_utf8_lossy(&bytes).into_owned(),
                    _ => continue,
                };
                sink.lock().unwrap().push((device, text));
            }
        });
        Ok(Telemetry { seen, task })
    }

    /// Waits until every device has sent a record containing `needle`.
    pub async fn wait_from_all(
        &self,
        devices: &[String],
        needle: &str,
        timeout: Duration,
    ) -> Result<()> {
        wait_for(
            &format!("telemetry {needle:?} from {} devices", devices.len()),
            timeout,
            || async {
                let seen = self.seen.lock().unwrap();
                let all = devices
                    .iter()
                    .all(|d| seen.iter().any(|(dev, p)| dev == d && p.contains(needle)));
                Ok(all.then_some(()))
            },
        )
        .await
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.task.abort();
    }
}
