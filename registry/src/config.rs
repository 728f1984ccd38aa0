//! Command-line arguments and the configuration they turn into.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// for a locked-down one) instead of the embedded one.
    #[arg(long, env = "WPM_REGISTRY_BROKER", hide_env_values = true)]
    pub broker: Option<String>,
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
    /// External broker URL (`mqtt://[user:password@]host:port`); `None` runs the
    /// embedded broker.
    pub broker: Option<String>,
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

/// Splits `mqtt://host:port` (or `tcp://`, or bare `host:port`) into host and port; a
/// login in the URL (`user:password@`) is [`broker_url_login`]'s.
pub fn parse_broker_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .unwrap_or(url);
    if url.contains("://") && rest == url {
        anyhow::bail!("unsupported broker URL {url:?}: only mqtt://host:port is supported");
    }
    let rest = rest.trim_end_matches('/');
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse()
                .map_err(|_| anyhow::anyhow!("bad port in broker URL {url:?}"))?,
        ),
        None => (rest, 1883),
    };
    if host.is_empty() {
        anyhow::bail!("no host in broker URL {url:?}");
    }
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

/// The username and password of a broker URL (`mqtt://user:password@host:port`), if it
/// has them: how a registry logs in to a locked-down external broker.
///
/// # Errors
/// When the URL names a user without a password.
pub fn broker_url_login(url: &str) -> anyhow::Result<Option<(String, String)>> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let Some((userinfo, _)) = rest.rsplit_once('@') else {
        return Ok(None);
    };
    match userinfo.split_once(':') {
        Some((user, password)) if !user.is_empty() => {
            Ok(Some((user.to_string(), password.to_string())))
        }
        _ => anyhow::bail!(
            "the broker URL names a user but no password: mqtt://USER:PASSWORD@HOST:PORT"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("mqtt://127.0.0.1:1883").unwrap(),
            ("127.0.0.1".into(), 1883)
        );
        assert_eq!(
            parse_broker_url("mqtt://broker.local").unwrap(),
            ("broker.local".into(), 1883)
        );
        assert!(parse_broker_url("mqtts://x:1").is_err());
        assert!(parse_broker_url("mqtt://x:notaport").is_err());
        let url = "mqtt://wpm-registry:s3:cret@10.0.0.2:1884";
        assert_eq!(parse_broker_url(url).unwrap(), ("10.0.0.2".into(), 1884));
        assert_eq!(
            broker_url_login(url).unwrap(),
            Some(("wpm-registry".into(), "s3:cret".into()))
        );
        assert_eq!(broker_url_login("mqtt://h:1").unwrap(), None);
        assert!(broker_url_login("mqtt://user@h:1").is_err());
    }

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
