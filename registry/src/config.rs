//! Command-line arguments and the configuration they turn into.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use wpm_transport::{BrokerUrl, TlsFiles};

/// Default port of the embedded MQTT broker. Not 1883, so that the registry does not
/// clash with a Mosquitto already running on the machine (the usual development setup).
pub const DEFAULT_MQTT_PORT: u16 = 1884;

/// Largest wasm module accepted on upload.
pub const DEFAULT_MAX_MODULE_SIZE: usize = 1024 * 1024;

/// `wpm registry serve` / `wpm-registry` arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Directory holding the signing key, the API token and (by default) the SQLite database.
    #[arg(long, default_value = "./wpm-data")]
    pub data_dir: PathBuf,
    /// Address of the HTTP API (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8470")]
    pub http: SocketAddr,
    /// Address of the embedded MQTT broker (ignored with --broker). The default port is
    /// 1884 so a system Mosquitto on 1883 does not get in the way.
    #[arg(long, default_value = "127.0.0.1:1884")]
    pub mqtt_listen: SocketAddr,
    /// Use this external MQTT broker (mqtt://host:port, or mqtt://USER:PASSWORD@host:port
    /// for a locked-down one; mqtts:// for TLS) instead of the embedded one.
    #[arg(long, env = "WPM_REGISTRY_BROKER", hide_env_values = true)]
    pub broker: Option<BrokerUrl>,
    /// PEM file of the CA (or self-signed certificate) that an external mqtts:// broker's
    /// certificate must chain to (default: the system's roots).
    #[arg(long, value_name = "FILE")]
    pub broker_ca: Option<PathBuf>,
    /// Serve the HTTP API as HTTPS and the embedded broker's device listener as MQTT
    /// over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// sqlite://path or postgres://... (default: sqlite file `registry.db` in the data dir).
    #[arg(long)]
    pub database: Option<String>,
    /// API token (default: generated on first start into DATA_DIR/api-token).
    #[arg(long, env = "WPM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Size of the chunks modules are cut into, in bytes.
    #[arg(long, default_value_t = 2048)]
    pub chunk_size: u32,
    /// How long a deployment manifest stays valid, in hours.
    #[arg(long, default_value_t = 168)]
    pub manifest_ttl_hours: u64,
    /// Split status ingest with the other replicas of this name through an MQTT shared
    /// subscription ($share/NAME/...): give every replica on one database the same name.
    #[arg(long, value_name = "NAME")]
    pub ingest_share_group: Option<String>,
    /// This replica's name, stable across its restarts: the broker keeps its ingest
    /// session (and what it queued) under it. Give every replica its own; default: a
    /// name made on first start into DATA_DIR/mqtt-client-id.
    #[arg(long, env = "WPM_REPLICA", value_name = "NAME")]
    pub replica: Option<String>,
    /// How long the broker keeps the registry's ingest session, and queues device reports
    /// for it, while the registry is down.
    #[arg(long, default_value_t = 24, value_name = "HOURS")]
    pub ingest_session_hours: u64,
}

/// Everything [`crate::Registry::start`] needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    /// Where the embedded broker listens (port 0: any free port). Unused with `broker`.
    pub mqtt_listen: SocketAddr,
    /// External broker URL (`mqtt[s]://[user:password@]host:port`); `None` runs the
    /// embedded broker.
    pub broker: Option<BrokerUrl>,
    /// CA an external `mqtts://` broker's certificate must chain to; `None`: the
    /// system's roots.
    pub broker_ca: Option<PathBuf>,
    /// Certificate and key: the HTTP API speaks HTTPS, the embedded broker's device
    /// listener MQTT over TLS.
    pub tls: Option<TlsFiles>,
    /// Database URL; `None` is `sqlite://DATA_DIR/registry.db`.
    pub database: Option<String>,
    /// API token; `None` loads or generates DATA_DIR/api-token.
    pub token: Option<String>,
    pub chunk_size: u32,
    pub manifest_ttl: Duration,
    pub max_module_size: usize,
    /// Shared-subscription group of the ingest; `None`: this registry ingests everything.
    pub ingest_share_group: Option<String>,
    /// How long the broker keeps the ingest session while the registry is away.
    pub ingest_session_expiry: Duration,
    /// Replica name; `None` loads or makes one in the data dir.
    pub replica: Option<String>,
}

impl Config {
    /// Defaults for everything but the data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            http: SocketAddr::from(([127, 0, 0, 1], 8470)),
            mqtt_listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_MQTT_PORT)),
            broker: None,
            broker_ca: None,
            tls: None,
            database: None,
            token: None,
            chunk_size: 2048,
            manifest_ttl: Duration::from_secs(168 * 3600),
            max_module_size: DEFAULT_MAX_MODULE_SIZE,
            ingest_share_group: None,
            ingest_session_expiry: Duration::from_secs(24 * 3600),
            replica: None,
        }
    }

    /// The database URL actually used.
    pub fn database_url(&self) -> String {
        match &self.database {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("registry.db").display()
            ),
        }
    }

    /// Largest MQTT packet the registry sends or accepts: a chunk, or a module manifest
    /// listing one hash per chunk of the largest module, plus headroom for topic and CBOR.
    pub fn max_packet_size(&self) -> usize {
        let chunk_size = self.chunk_size.max(1) as usize;
        let chunks = self.max_module_size.div_ceil(chunk_size);
        let manifest = chunks * 36 + 4096;
        (64 * 1024).max(chunk_size + 4096).max(manifest)
    }
}

impl From<ServeArgs> for Config {
    fn from(a: ServeArgs) -> Self {
        Self {
            data_dir: a.data_dir,
            http: a.http,
            mqtt_listen: a.mqtt_listen,
            broker: a.broker,
            broker_ca: a.broker_ca,
            tls: a
                .tls_cert
                .zip(a.tls_key)
                .map(|(cert, key)| TlsFiles { cert, key }),
            database: a.database,
            token: a.token,
            chunk_size: a.chunk_size,
            manifest_ttl: Duration::from_secs(a.manifest_ttl_hours.saturating_mul(3600)),
            max_module_size: DEFAULT_MAX_MODULE_SIZE,
            ingest_share_group: a.ingest_share_group,
            ingest_session_expiry: Duration::from_secs(a.ingest_session_hours.saturating_mul(3600)),
            replica: a.replica,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_size_covers_chunks_and_manifests() {
        let mut c = Config::new("/tmp/x");
        assert_eq!(c.max_packet_size(), 64 * 1024);
        c.chunk_size = 256;
        assert!(c.max_packet_size() >= 4096 * 36);
        c.chunk_size = 100_000;
        assert!(c.max_packet_size() > 100_000);
    }
}
