//! Helpers shared by the registry's integration tests: starting registries against real
//! services, a fake device, an MQTT observer.
#![allow(dead_code)]

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::time::Duration;
use wpm_registry::{Config, Registry};

pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const MOSQUITTO: &str = "mqtt://127.0.0.1:1883";

/// A short random hex string, so names never collide across runs on shared services.
pub fn unique(prefix: &str) -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    format!("{prefix}-{}", hex::encode(b))
}

/// A free TCP port on localhost for an embedded broker.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A valid module, made unique by `tag` (different bytes, different sha256) and padded so
/// it spans several 64-byte chunks.
pub fn module_wasm(tag: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
             (import "wpm" "log" (func $log (param i32 i32 i32)))
             (memory (export "memory") 1)
             (data (i32.const 0) "{tag} padding padding padding padding padding padding padding padding")
             (func (export "wpm_init") (result i32) i32.const 0)
             (func (export "wpm_tick") (call $log (i32.const 2) (i32.const 0) (i32.const 8))))"#
    ))
    .unwrap()
}

/// Config for a registry on a temp data dir with the embedded broker on a free port.
pub fn embedded_config(dir: &std::path::Path) -> Config {
    let mut c = Config::new(dir);
    c.http = "127.0.0.1:0".parse().unwrap();
    c.mqtt_listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    c.chunk_size = 64;
    c
}

/// A fresh PostgreSQL schema; the URL puts every table of the registry in it.
pub struct PgSchema {
    pub name: String,
    pub url: String,
}

impl PgSchema {
    pub async fn create() -> PgSchema {
        let name = unique("wpm_test").replace('-', "_");
        let pool = sqlx::PgPool::connect(POSTGRES).await.unwrap_or_else(|e| {
            panic!("PostgreSQL at {POSTGRES} is needed for this test: {e} (start it with pg_ctlcluster)")
        });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let url = format!("{POSTGRES}?options=-c%20search_path%3D{name}");
        PgSchema { name, url }
    }

    pub async fn drop(self) {
        let pool = sqlx::PgPool::connect(POSTGRES).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.name
        )))
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
}

pub fn pg_mosquitto_config(dir: &std::path::Path, pg: &PgSchema) -> Config {
    let mut c = Config::new(dir);
    c.http = "127.0.0.1:0".parse().unwrap();
    c.broker = Some(MOSQUITTO.parse().unwrap());
    c.database = Some(pg.url.clone());
    c.chunk_size = 64;
    // The machine's Mosquitto outlives the test: its ingest session should not.
    c.ingest_session_expiry = std::time::Duration::from_secs(60);
    c
}

/// HTTP client bound to one registry.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(reg: &Registry) -> Api {
        Api {
            base: reg.http_url(),
            token: reg.token().to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    pub async fn put_module(
        &self,
        name: &str,
        version: &str,
        bytes: Vec<u8>,
    ) -> (u16, serde_json::Value) {
        let r = self
            .http
            .put(format!("{}/v1/modules/{name}/{version}", self.base))
            .bearer_auth(&self.token)
            .body(bytes)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    /// Any request with the API token; the answer's status and JSON body (null if none).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_default())
    }

    /// Revokes a device; the answer's status.
    pub async fn revoke(&self, device: &str) -> u16 {
        let path = format!("/v1/devices/{device}/revoke");
        self.send(reqwest::Method::POST, &path, None).await.0
    }

    pub async fn deploy(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}/v1/deployments", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }
}

/// A username and password for the broker.
pub type Login = Option<(String, String)>;

fn mqtt_options(url: &str, id: &str, login: Login) -> MqttOptions {
    let wpm_transport::BrokerUrl { host, port, .. } = url.parse().unwrap();
    let mut o = MqttOptions::new(id, host, port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_keep_alive(Duration::from_secs(30));
    if let Some((user, password)) = login {
        o.set_credentials(user, password);
    }
    o
}

/// Subscribes to `filters` and collects messages (last one per topic) until `done` holds
/// or `timeout` passes.
pub async fn collect(
    url: &str,
    login: Login,
    filters: &[String],
    timeout: Duration,
    done: impl Fn(&HashMap<String, Vec<u8>>) -> bool,
) -> HashMap<String, Vec<u8>> {
    let (client, mut ev) = AsyncClient::new(mqtt_options(url, &unique("observer"), login), 100);
    for f in filters {
        client.subscribe(f.clone(), QoS::AtMostOnce).await.unwrap();
    }
    let mut got = HashMap::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(&got) {
        match tokio::time::timeout_at(deadline, ev.poll()).await {
            Err(_) => break,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                if p.payload.is_empty() {
                    got.remove(&p.topic);
                } else {
                    got.insert(p.topic.clone(), p.payload.to_vec());
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("observer lost the broker at {url}: {e}"),
        }
    }
    let _ = client.disconnect().await;
    got
}

/// A plain MQTT client, connected: the attacker on the wire, or a device's link.
pub async fn plain_client(
    url: &str,
    id: &str,
    login: Login,
    will: Option<LastWill>,
) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    try_client(url, id, login, will)
        .await
        .unwrap_or_else(|e| panic!("MQTT client {id} does not connect: {e}"))
}

/// A plain MQTT client, or why the broker would not have it.
pub async fn try_client(
    url: &str,
    id: &str,
    login: Login,
    will: Option<LastWill>,
) -> Result<(AsyncClient, tokio::task::JoinHandle<()>), String> {
    let mut o = mqtt_options(url, id, login);
    if let Some(will) = will {
        o.set_last_will(will);
    }
    let (client, mut ev) = AsyncClient::new(o, 100);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
                Ok(_) => {}
                // Refused, or disconnected (cut_power, disconnect): the test sees it.
                Err(e) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(Err(e.to_string()));
                    }
                    break;
                }
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), rx).await {
        Ok(Ok(Ok(()))) => Ok((client, task)),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(_)) | Err(_) => Err("no answer".into()),
    }
}

/// A device stand-in: an MQTT client with its own registered key, sealing and
/// numbering its reports as a device does, with a sealed last will it announces.
pub struct FakeDevice {
    pub id: String,
    pub client: AsyncClient,
    pub key: wpm_manifests::KeyPair,
    counter: std::sync::atomic::AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl FakeDevice {
    /// Registers a new key for `id` with the registry, then connects with the will
    /// sealed first (counter 1).
    pub async fn connect(reg: &Registry, id: &str) -> FakeDevice {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).unwrap();
        let key = wpm_manifests::KeyPair::from_seed(&seed);
        Self::connect_as(reg, &key, id, 1).await
    }

    /// Connects as `id` with `key` (registered if it is not), its will sealed with
    /// counter `first` and its reports numbered from there on.
    pub async fn connect_as(
        reg: &Registry,
        key: &wpm_manifests::KeyPair,
        id: &str,
        first: u64,
    ) -> FakeDevice {
        let key = wpm_manifests::KeyPair::from_seed(&key.seed());
        let (status, answer) = Api::new(reg)
            .send(
                reqwest::Method::POST,
                "/v1/devices",
                Some(serde_json::json!({"devices": [
                    {"id": id, "public_key": hex::encode(key.public()), "groups": []}
                ]})),
            )
            .await;
        assert!(status == 201 || status == 200, "{status} {answer}");
        let will = LastWill::new(
            wpm_manifests::Topic::Presence(id).render(),
            seal(&key, id, first, offline()),
            QoS::AtLeastOnce,
            false,
        );
        let login = Some((id.to_string(), wpm_manifests::login_password(&key, id)));
        let (client, task) = plain_client(&reg.mqtt_url(), id, login, Some(will)).await;
        FakeDevice {
            id: id.to_string(),
            client,
            key,
            counter: (first + 1).into(),
            task,
        }
    }

    /// Seals `body` with the next counter; the bytes a genuine report has on the wire.
    pub fn seal(&self, body: wpm_manifests::ReportBody) -> Vec<u8> {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        seal(&self.key, &self.id, n, body)
    }

    /// Seals and publishes `body` on `topic`.
    pub async fn report(&self, topic: String, body: wpm_manifests::ReportBody) {
        let payload = self.seal(body);
        self.publish(topic, payload).await;
    }

    /// Publishes bytes as they are (a replay, a forgery, garbage).
    pub async fn publish(&self, topic: String, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// Drops the connection without DISCONNECT, so the broker sends the last will.
    pub fn cut_power(self) {
        self.task.abort();
    }
}

fn offline() -> wpm_manifests::ReportBody {
    wpm_manifests::ReportBody::Presence(wpm_manifests::Presence {
        online: false,
        will: None,
    })
}

pub fn seal(
    key: &wpm_manifests::KeyPair,
    device: &str,
    counter: u64,
    body: wpm_manifests::ReportBody,
) -> Vec<u8> {
    key.seal(&wpm_manifests::Report {
        device: device.to_string(),
        counter,
        body,
    })
}

/// Polls `f` until it returns Some or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
