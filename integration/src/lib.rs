//! Helpers for the end-to-end tests: real services, a typed registry API client, example
//! modules, and polling with deadlines.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::future::Future;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

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

/// A typed client of the registry's HTTP API.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// An HTTP answer: status code and JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    /// The body, if the status is a success; the registry's error message otherwise.
    pub fn ok(self) -> Result<Value> {
        if (200..300).contains(&self.status) {
            Ok(self.body)
        } else {
            bail!("HTTP {}: {}", self.status, self.body)
        }
    }
}

impl Api {
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.into(),
            token: token.into(),
        }
    }

    pub fn with_token(&self, token: &str) -> Self {
        Self {
            token: token.into(),
            ..self.clone()
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Answer> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .context("registry unreachable")?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Answer { status, body })
    }

    pub async fn publish(&self, name: &str, version: &str, wasm: Vec<u8>) -> Result<Answer> {
        self.send(
            self.http
                .put(format!("{}/v1/modules/{name}/{version}", self.base))
                .body(wasm),
        )
        .await
    }

    /// Publishes the example module `hello` as 1.0.0 and 2.0.0 (`examples/hello/`), the
    /// pair most scenarios install and upgrade between; returns the registry's answers.
    pub async fn publish_hello(&self) -> Result<[Value; 2]> {
        let v1 = self
            .publish("hello", "1.0.0", example("hello/v1.wat"))
            .await?
            .ok()?;
        let v2 = self
            .publish("hello", "2.0.0", example("hello/v2.wat"))
            .await?
            .ok()?;
        Ok([v1, v2])
    }

    /// Deploys to a group, or to one device when `device` is true.
    pub async fn deploy(&self, module: &str, version: &str, group: &str) -> Result<Answer> {
        let body = json!({"module": module, "version": version, "group": group});
        self.send(
            self.http
                .post(format!("{}/v1/deployments", self.base))
                .json(&body),
        )
        .await
    }

    pub async fn deploy_to_device(
        &self,
        module: &str,
        version: &str,
        device: &str,
    ) -> Result<Answer> {
        let body = json!({"module": module, "version": version, "device": device});
        self.send(
            self.http
                .post(format!("{}/v1/deployments", self.base))
                .json(&body),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Result<Answer> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Answer> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    /// Starts a rollout of `module@version` to `group` in `stages` (percentages) that
    /// halts on the first failure; returns its id.
    pub async fn create_rollout(
        &self,
        module: &str,
        version: &str,
        group: &str,
        stages: &[u32],
        stage_timeout_s: u64,
    ) -> Result<i64> {
        let body = json!({"module": module, "version": version, "group": group, "stages": stages,
                          "max_failure_pct": 0, "stage_timeout_s": stage_timeout_s});
        let r = self.post("/v1/rollouts", body).await?.ok()?;
        r["id"].as_i64().context("rollout answer without an id")
    }

    /// Waits until rollout `id` has started stage `stage` (0: the first) or a later one.
    pub async fn wait_stage(&self, id: i64, stage: i64, timeout: Duration) -> Result<()> {
        wait_for(&format!("rollout {id} stage {stage}"), timeout, || async {
            let r = self.get(&format!("/v1/rollouts/{id}")).await?.ok()?;
            Ok((r["stage"].as_i64() >= Some(stage)).then_some(()))
        })
        .await
    }

    /// The registry's public signing key, which devices trust.
    pub async fn public_key(&self) -> Result<[u8; 32]> {
        let k = self.get("/v1/keys").await?.ok()?;
        let hex_key = k["public_key"].as_str().context("no public_key")?;
        hex::decode(hex_key)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("public key is not 32 bytes"))
    }

    /// Waits until rollout `id` is in `state`; fails early if it ends in another one.
    pub async fn wait_rollout(&self, id: i64, state: &str, timeout: Duration) -> Result<Value> {
        wait_for(&format!("rollout {id} to be {state}"), timeout, || async {
            let r = self.get(&format!("/v1/rollouts/{id}")).await?.ok()?;
            let now = r["state"].as_str().unwrap_or_default().to_string();
            if now == state {
                return Ok(Some(r));
            }
            if ["completed", "rolled_back"].contains(&now.as_str()) {
                bail!("rollout {id} ended {now}, not {state}: {r}");
            }
            Ok(None)
        })
        .await
    }

    pub async fn fleet_status(&self) -> Result<Value> {
        self.send(self.http.get(format!("{}/v1/fleet/status", self.base)))
            .await?
            .ok()
    }

    pub async fn events(&self, device: &str) -> Result<Vec<Value>> {
        let v = self
            .send(self.http.get(format!(
                "{}/v1/devices/{device}/events?limit=500",
                self.base
            )))
            .await?
            .ok()?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// The version of `module` each of `devices` reports running, once all of them run
    /// `version`.
    pub async fn wait_running(
        &self,
        devices: &[String],
        module: &str,
        version: &str,
        timeout: Duration,
    ) -> Result<()> {
        wait_for(
            &format!("{} devices to run {module}@{version}", devices.len()),
            timeout,
            || async {
                let status = self.fleet_status().await?;
                let running = devices
                    .iter()
                    .all(|d| device_runs(&status, d, module, version));
                Ok(running.then_some(()))
            },
        )
        .await
    }

    /// Waits until `device` has recorded an event of `kind` whose detail mentions `needle`.
    pub async fn wait_event(
        &self,
        device: &str,
        kind: &str,
        needle: &str,
        timeout: Duration,
    ) -> Result<Value> {
        wait_for(
            &format!("a {kind} event mentioning {needle:?} from {device}"),
            timeout,
            || async {
                let events = self.events(device).await?;
                Ok(events
                    .into_iter()
                    .find(|e| e["kind"] == kind && e["detail"].to_string().contains(needle)))
            },
        )
        .await
    }
}

/// Whether the fleet status JSON shows `device` running `module@version`.
pub fn device_runs(status: &Value, device: &str, module: &str, version: &str) -> bool {
    status["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["device"] == device)
        .any(|d| {
            d["modules"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["name"] == module && m["version"] == version && m["state"] == "running")
        })
}

/// The `wpm-registry` binary, built if needed.
pub fn registry_binary() -> Result<PathBuf> {
    workspace_binary("wpm-registry", "wpm-registry")
}

/// The `wpm` CLI binary, built if needed.
pub fn cli_binary() -> Result<PathBuf> {
    workspace_binary("wpm-cli", "wpm")
}

/// A binary of this workspace, built if needed (it is not a target of this crate, so
/// cargo does not build it for these tests by itself).
fn workspace_binary(package: &str, bin: &str) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-q", "-p", package, "--bin", bin])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .with_context(|| format!("running cargo build -p {package}"))?;
    if !status.success() {
        bail!("cargo build -p {package} failed ({status})");
    }
    // Tests run from target/debug/deps; the binary sits in target/debug.
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary outside target/")?
        .join(bin);
    anyhow::ensure!(path.exists(), "{} not found", path.display());
    Ok(path)
}

/// A registry replica in a child process, one of several on one database.
pub struct Replica {
    pub process: Child,
    pub api: Api,
}

impl Replica {
    /// Starts `wpm-registry` on a free HTTP port, using `broker`, splitting ingest with
    /// the replicas of share group `share`, and under the stable name `name`.
    pub fn start(
        data: &std::path::Path,
        db: &str,
        broker: &str,
        share: &str,
        token: &str,
        name: &str,
    ) -> Result<Replica> {
        let http = format!("127.0.0.1:{}", free_port());
        let child = Command::new(registry_binary()?)
            .arg("--data-dir")
            .arg(data)
            .args(["--http", &http, "--broker", broker, "--database", db])
            .args(["--ingest-share-group", share, "--token", token])
            .args(["--replica", name, "--ingest-session-hours", "1"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()?;
        Ok(Replica {
            process: Child(child),
            api: Api::new(format!("http://{http}"), token),
        })
    }

    /// Waits until it answers HTTP.
    pub async fn wait_up(&self) -> Result<()> {
        wait_for("a replica to answer", Duration::from_secs(30), || async {
            Ok(self.api.get("/v1/health").await.ok().map(|_| ()))
        })
        .await
    }
}

/// A data directory holding one signing key, for replicas that must sign alike.
pub fn shared_data_dir() -> Result<tempfile::TempDir> {
    let data = tempfile::tempdir()?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).unwrap();
    std::fs::write(data.path().join("signing.key"), hex::encode(seed))?;
    Ok(data)
}

/// A child process killed (SIGKILL) when dropped.
pub struct Child(pub std::process::Child);

impl Child {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Mosquitto of the test's own on a free port, without persistence: killing it loses
/// every retained message, as a broker restart without persistence does.
pub struct OwnMosquitto {
    pub port: u16,
    config: tempfile::NamedTempFile,
    process: Option<Child>,
}

impl OwnMosquitto {
    /// With the configuration `wpm broker config --mosquitto` writes, in memory only.
    pub fn start() -> Result<OwnMosquitto> {
        use std::io::Write as _;
        let port = free_port();
        let mut o = wpm_registry::external_broker::MosquittoOptions::new(port);
        o.bind = "127.0.0.1".into();
        o.persistence_dir = None;
        let mut config = tempfile::NamedTempFile::new()?;
        config.write_all(wpm_registry::external_broker::mosquitto_conf(&o).as_bytes())?;
        let mut m = OwnMosquitto {
            port,
            config,
            process: None,
        };
        m.restart()?;
        Ok(m)
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no clean disconnects, no last wills delivered by a graceful shutdown.
    pub fn kill(&mut self) {
        self.process.take();
    }

    /// Starts it (again) on the same port.
    pub fn restart(&mut self) -> Result<()> {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.config.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting mosquitto (apt-get install mosquitto)")?;
        self.process = Some(Child(child));
        for _ in 0..100 {
            if port_open(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("mosquitto did not come up on port {}", self.port)
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
                config.broker = Some(mosquitto()?);
                // The machine's Mosquitto outlives the test: its ingest session should not.
                config.ingest_session_expiry = Duration::from_secs(60);
                config.database = Some(postgres_database().await?);
            }
            Backend::BrokerSqlite(url) => config.broker = Some(url),
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

    /// Configuration for `n` simulated devices in `group`, trusting this registry.
    pub fn fleet_config(&self, n: usize, group: &str) -> wpm_sim::FleetConfig {
        let mut config =
            wpm_sim::FleetConfig::new(self.mqtt_url.clone(), vec![self.registry.public_key()]);
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
    pub async fn connect(mqtt_url: &str) -> Result<Mqtt> {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
        let mut opts = MqttOptions::parse_url(format!("{mqtt_url}?client_id={}", unique("test")))?;
        opts.set_max_packet_size(1 << 20, 1 << 20);
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
    pub async fn watch(mqtt_url: &str, module: &str) -> Result<Telemetry> {
        let mut mqtt = Mqtt::connect(mqtt_url).await?;
        mqtt.subscribe(&format!("wpm/v1/device/+/telemetry/{module}"))
            .await?;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(p) = mqtt.messages.recv().await {
                let device = p.topic.split('/').nth(3).unwrap_or_default().to_string();
                sink.lock()
                    .unwrap()
                    .push((device, String::from_utf8_lossy(&p.payload).into_owned()));
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
