//! `wpm broker config --mosquitto`: the configuration an external broker needs to serve
//! a registry without losing device reports (one definition, in the registry crate,
//! shared with the bench and the tests). `wpm broker serve`: wpm's own broker on its
//! own, alone or as one node of a cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::output::emit;

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Write a mosquitto.conf (Mosquitto 2.0)
    #[arg(long)]
    pub mosquitto: bool,

    /// Listener port
    #[arg(long, default_value_t = 1883)]
    pub port: u16,

    /// Listener address
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: String,

    /// Where the broker keeps retained messages and sessions across its restarts
    #[arg(long, value_name = "DIR", default_value = "/var/lib/mosquitto")]
    pub persistence_dir: PathBuf,

    /// Keep nothing across broker restarts (a test broker)
    #[arg(long, conflicts_with = "persistence_dir")]
    pub no_persistence: bool,

    /// Write to this file instead of standard output
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,

    /// Lock the broker down: no anonymous clients, devices limited to their own topics.
    /// Writes the registry's login into this password file (devices' logins are added by
    /// `wpm device add|import --mosquitto-passwd`)
    #[arg(long, value_name = "PATH", requires = "acl_file")]
    pub password_file: Option<PathBuf>,

    /// Where to write the ACL of a locked-down broker
    #[arg(long, value_name = "PATH", requires = "password_file")]
    pub acl_file: Option<PathBuf>,

    /// The listener registries log in on, when locked down (keep it off the devices'
    /// network)
    #[arg(long, default_value = "127.0.0.1:1884", value_name = "ADDR")]
    pub registry_listen: SocketAddr,
}

pub fn config(args: ConfigArgs) -> Result<()> {
    if !args.mosquitto {
        bail!("say which broker: --mosquitto (for EMQX and others see docs/broker.md)");
    }
    let mut o = wpm_registry::external_broker::MosquittoOptions::new(args.port);
    o.bind = args.bind;
    o.persistence_dir = (!args.no_persistence).then_some(args.persistence_dir);
    if let (Some(password_file), Some(acl_file)) = (args.password_file, args.acl_file) {
        use wpm_registry::external_broker as eb;
        std::fs::write(&acl_file, eb::mosquitto_acl())
            .with_context(|| format!("writing {}", acl_file.display()))?;
        let password = hex::encode(wpm_registry::keys::random_bytes()?);
        let login = [(eb::REGISTRY_USER.to_string(), password.clone())];
        eb::set_mosquitto_passwords(&password_file, &login)?;
        let r = args.registry_listen;
        emit(&format!(
            "wrote {} and the registry's login into {}; registries connect with \
             --broker mqtt://{}:{password}@{}",
            acl_file.display(),
            password_file.display(),
            eb::REGISTRY_USER,
            // A registry on this machine reaches an any-address listener on loopback.
            if r.ip().is_unspecified() {
                SocketAddr::new([127, 0, 0, 1].into(), r.port())
            } else {
                r
            }
        ));
        o.access = Some(eb::MosquittoAccess {
            password_file: std::path::absolute(&password_file)?,
            acl_file: std::path::absolute(&acl_file)?,
            registry_bind: r.ip().to_string(),
            registry_port: r.port(),
        });
    }
    let text = wpm_registry::external_broker::mosquitto_conf(&o);
    match args.out {
        Some(path) => {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            emit(&format!("wrote {}", path.display()));
        }
        None => print!("{text}"),
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where devices connect
    #[arg(long, default_value = "0.0.0.0:1883", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Where registries connect (`wpm registry serve --broker mqtt://THIS`): deep queues
    /// and a wide in-flight window for their persistent ingest sessions. Keep it off the
    /// devices' network.
    #[arg(long, default_value = "127.0.0.1:1884", value_name = "ADDR")]
    pub registry_listen: SocketAddr,

    /// Largest MQTT packet, bytes: at least the registry's (a chunk, or a manifest of
    /// the largest module)
    #[arg(long, default_value_t = 256 * 1024, value_name = "BYTES")]
    pub max_packet_size: u32,

    /// This node's id in a cluster (1, 2, …); requires --cluster-listen and --node
    #[arg(long, requires_all = ["cluster_listen", "nodes"])]
    pub node_id: Option<u64>,

    /// Where this node serves the other nodes
    #[arg(long, value_name = "ADDR", requires = "node_id")]
    pub cluster_listen: Option<SocketAddr>,

    /// A node of the cluster, this one included: ID@HOST:PORT of its --cluster-listen
    #[arg(long = "node", value_name = "ID@HOST:PORT", value_parser = parse_node, requires = "node_id")]
    pub nodes: Vec<(u64, String)>,

    /// Serve devices MQTT over TLS with this certificate chain (PEM); needs --tls-key
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

fn parse_node(s: &str) -> Result<(u64, String)> {
    let (id, addr) = s
        .split_once('@')
        .context("expected ID@HOST:PORT, e.g. 2@10.0.0.2:5364")?;
    let id = id.parse().context("node id must be a number")?;
    anyhow::ensure!(addr.contains(':'), "expected ID@HOST:PORT, got {s:?}");
    Ok((id, addr.to_string()))
}

/// Runs the broker until Ctrl-C or SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<()> {
    let mut config = wpm_broker::BrokerConfig::new(args.listen, args.max_packet_size);
    config.registry_listen = args.registry_listen;
    config.device_tls =
        (args.tls_cert.zip(args.tls_key)).map(|(cert, key)| wpm_transport::TlsFiles { cert, key });
    config.cluster = match (args.node_id, args.cluster_listen) {
        (Some(node_id), Some(listen)) => Some(wpm_broker::ClusterConfig {
            node_id,
            listen,
            nodes: args.nodes,
            peer_timeout: Duration::from_secs(5),
        }),
        _ => None,
    };
    let cluster = config.cluster.as_ref().map(|c| c.node_id);
    let broker = tokio::task::spawn_blocking(move || wpm_broker::Broker::start(config)).await??;
    emit(&format!(
        "MQTT broker: devices on {}, registries on {}{}",
        broker.addr(),
        broker.registry_addr(),
        cluster
            .map(|id| format!(", cluster node {id}"))
            .unwrap_or_default()
    ));
    super::shutdown_signal().await?;
    tokio::task::spawn_blocking(move || broker.stop()).await?;
    Ok(())
}
