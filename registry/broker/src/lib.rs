//! The registry's embedded MQTT broker: [rmqtt] configured for a wpm fleet.
//!
//! rmqtt was chosen over rumqttd by measurement (see `docs/broker.md`): it serves MQTT
//! 3.1.1 and 5, keeps retained messages in a topic trie (a subscribe looks up only the
//! topics it matches), serves MQTT 5 shared subscriptions, and lets the embedding program
//! decide authentication and topic access in its own hooks.
//!
//! The broker runs on a tokio runtime of its own, on its own threads: its load never
//! starves the registry's tasks, and [`Broker::stop`] drops the runtime, which closes
//! every listener and every client connection, so a registry can stop and start again
//! in one process.
//!
//! Two listeners:
//!
//! * the **device listener** (the address devices are given): small per-session queues,
//!   because a device subscribes to a handful of retained topics at a time;
//! * the **registry listener** on loopback: deep queues, a wide in-flight window and no
//!   message expiry, because the registry's ingest session is persistent and must receive
//!   everything devices sent while it was restarting or while its database was slow.

mod cluster;
mod gate;
mod stats;

pub use cluster::ClusterConfig;
pub use gate::{Access, Directory, REGISTRY_USER};
pub use stats::{BrokerStats, DropReason};

use anyhow::Context as _;
use rmqtt::context::ServerContext;
use rmqtt::hook::Type;
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

/// How the broker is set up.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Where devices connect (port 0: any free port).
    pub listen: SocketAddr,
    /// Where the registry's own clients connect: loopback when the broker runs inside
    /// the registry; the address registry replicas reach when it runs on its own.
    pub registry_listen: SocketAddr,
    /// Largest MQTT packet accepted or sent: a module chunk or manifest plus headers.
    pub max_packet_size: u32,
    /// Messages the broker sends a registry client before it must acknowledge them
    /// (MQTT 5 receive maximum, upper bound).
    pub registry_inflight: u16,
    /// Messages queued for one registry session beyond the in-flight window, while it is
    /// disconnected or slow. Beyond this the broker drops, and counts it.
    pub registry_queue: usize,
    /// How long the broker keeps a disconnected registry session and its queue.
    pub registry_session_expiry: Duration,
    /// Set when this broker is one node of a cluster.
    pub cluster: Option<ClusterConfig>,
    /// Who may connect and what each may do (`gate.rs`). `None`: anyone may do
    /// anything, for a broker node run on its own (`wpm broker serve`) that has no
    /// registry database to check devices against.
    pub access: Option<Access>,
    /// Certificate and key: the device listener speaks MQTT over TLS (rustls). The
    /// registry listener stays in the clear: it is loopback, or a replicas' network.
    pub device_tls: Option<wpm_transport::TlsFiles>,
}

impl BrokerConfig {
    pub fn new(listen: SocketAddr, max_packet_size: u32) -> Self {
        Self {
            listen,
            registry_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_packet_size,
            registry_inflight: 4096,
            // Ten thousand devices reporting an install (some ten messages each) twice.
            registry_queue: 200_000,
            registry_session_expiry: Duration::from_secs(24 * 3600),
            cluster: None,
            device_tls: None,
            access: None,
        }
    }
}

/// A running embedded broker. Dropping it without [`Broker::stop`] leaves it running
/// until the process exits.
pub struct Broker {
    addr: SocketAddr,
    registry_addr: SocketAddr,
    stats: Arc<BrokerStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Broker {
    /// Binds both listeners and starts serving; returns once both accept connections.
    ///
    /// # Errors
    ///
    /// The device address is in use or cannot be bound, or the broker's runtime cannot
    /// be created.
    pub fn start(config: BrokerConfig) -> anyhow::Result<Broker> {
        // Bind here, not in the broker's thread: a port in use (say, by a system
        // Mosquitto) is then a clear startup error, not a registry talking to some
        // other broker.
        let devices = bind(config.listen).with_context(|| {
            format!(
                "embedded MQTT broker cannot listen on {} (port in use? pass --mqtt-listen or --broker)",
                config.listen
            )
        })?;
        let registry = bind(config.registry_listen).with_context(|| {
            format!(
                "MQTT broker: registry listener on {}",
                config.registry_listen
            )
        })?;
        let addr = connectable(devices.local_addr()?);
        let registry_addr = connectable(registry.local_addr()?);
        if let Some(c) = &config.cluster {
            c.validate()?;
        }
        // rmqtt binds by address; release ours just before it does.
        drop((devices, registry));

        // A cluster node may first copy the cluster's retained messages.
        let startup = Duration::from_secs(if config.cluster.is_some() { 70 } else { 10 });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("wpm-broker")
            .enable_all()
            .build()
            .context("embedded MQTT broker: runtime")?;
        let stats = Arc::new(BrokerStats::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let thread_stats = stats.clone();
        // Port 0 was resolved by the bind above; rmqtt binds the same ports again.
        let listen = SocketAddr::new(config.listen.ip(), addr.port());
        let registry_listen = SocketAddr::new(config.registry_listen.ip(), registry_addr.port());
        let thread = std::thread::Builder::new()
            .name("wpm-broker-main".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let server = match build(&config, listen, registry_listen, thread_stats).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    tokio::select! {
                        r = server.run() => {
                            if let Err(e) = r {
                                tracing::error!(error = %e, "embedded MQTT broker stopped");
                            }
                        }
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime cancels every connection task: clients see the
                // broker go away, as they would if it were a separate process.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        ready_rx
            .recv_timeout(startup)
            .with_context(|| format!("MQTT broker did not start within {startup:?}"))??;
        wait_accepting(addr)?;
        wait_accepting(registry_addr)?;
        tracing::info!(%addr, %registry_addr, "embedded MQTT broker listening");
        Ok(Broker {
            addr,
            registry_addr,
            stats,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Where devices (and anyone else) connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The loopback listener for the registry's own clients.
    pub fn registry_addr(&self) -> SocketAddr {
        self.registry_addr
    }

    /// Messages in, out and dropped since start.
    pub fn stats(&self) -> Arc<BrokerStats> {
        self.stats.clone()
    }

    /// Closes every listener and connection and waits for the broker's threads to end.
    pub fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn build(
    config: &BrokerConfig,
    listen: SocketAddr,
    registry_addr: SocketAddr,
    stats: Arc<BrokerStats>,
) -> anyhow::Result<MqttServer> {
    // rmqtt refuses new connections while the machine's CPU load is above 90 %. On a
    // registry machine that load is the registry's own work during a rollout; refusing
    // devices then only stretches the reconnect storm (each refused device backs off).
    let mut scx = ServerContext::new()
        .busy_check_enable(false)
        // No limit on retained messages: every chunk, manifest and device status is one.
        .plugins_config_map_add("rmqtt-retainer", "max_retained_messages = 0")
        // One device's reports go to one registry replica of a `$share/…` group, in order.
        .plugins_config_map_add("rmqtt-shared-subscription", "strategy = \"hash_clientid\"");
    if let Some(c) = &config.cluster {
        scx = cluster::configure(scx, c);
    }
    let scx = scx.build().await;
    if let Some(c) = &config.cluster {
        cluster::join(&scx, c).await?;
    }
    rmqtt_retainer::register(&scx, true, false)
        .await
        .map_err(|e| anyhow::anyhow!("retained message store: {e}"))?;
    // Without it rmqtt refuses `$share/…` subscriptions (registry replicas split the
    // ingest with one).
    rmqtt_shared_subscription::register(&scx, true, false)
        .await
        .map_err(|e| anyhow::anyhow!("shared subscriptions: {e}"))?;
    let register = scx.extends.hook_mgr().register();
    for typ in [
        Type::MessagePublish,
        Type::MessageDelivered,
        Type::MessageDropped,
    ] {
        register
            .add(typ, Box::new(stats::Counting(stats.clone())))
            .await;
    }
    if let Some(access) = &config.access {
        for typ in [
            Type::ClientAuthenticate,
            Type::ClientSubscribeCheckAcl,
            Type::MessagePublishCheckAcl,
        ] {
            let gate = gate::Gate {
                access: access.clone(),
                stats: stats.clone(),
            };
            register.add(typ, Box::new(gate)).await;
        }
    } else {
        tracing::warn!("embedded MQTT broker without access control: anyone may connect");
    }
    let open = config.access.is_none();
    register.start().await;
    if let Some(c) = &config.cluster {
        cluster::wait_for_retained(&scx, c, Duration::from_secs(60)).await;
    }

    let devices = Builder::new()
        .name("devices")
        .laddr(listen)
        .nodelay(true)
        .reuseaddr(Some(true))
        .max_packet_size(config.max_packet_size)
        // A device has at most a chunk window of retained topics outstanding.
        .max_inflight(NonZeroU16::new(64).expect("non-zero"))
        .max_mqueue_len(1_000)
        .allow_anonymous(open);
    let devices = match &config.device_tls {
        Some(files) => {
            // rmqtt reads the files itself; check them first for an error that names them.
            wpm_transport::server_config(files)?;
            let path = |p: &std::path::Path| Some(p.to_string_lossy().into_owned());
            devices
                .tls_cert(path(&files.cert))
                .tls_key(path(&files.key))
                .bind()
                .and_then(|l| l.tls())
        }
        None => devices.bind().and_then(|l| l.tcp()),
    }
    .map_err(|e| anyhow::anyhow!("device listener on {listen}: {e}"))?;
    let registry = Builder::new()
        .name("registry")
        .laddr(registry_addr)
        .nodelay(true)
        .reuseaddr(Some(true))
        .max_packet_size(config.max_packet_size)
        .max_inflight(NonZeroU16::new(config.registry_inflight.max(1)).expect("non-zero"))
        .max_mqueue_len(config.registry_queue)
        .session_expiry_interval(config.registry_session_expiry)
        .max_session_expiry_interval(config.registry_session_expiry)
        // rmqtt expires queued messages after 5 minutes by default: a registry restart
        // or a slow database must not cost device reports.
        .message_expiry_interval(config.registry_session_expiry)
        .allow_anonymous(open)
        .bind()
        .map_err(|e| anyhow::anyhow!("registry listener on {registry_addr}: {e}"))?
        .tcp()
        .map_err(|e| anyhow::anyhow!("registry listener on {registry_addr}: {e}"))?;
    Ok(MqttServer::new(scx)
        .listener(devices)
        .listener(registry)
        .build())
}

/// Binds with SO_REUSEADDR, as the listeners do: a broker restarted on its port must not fail on
/// the connections its previous run left closing.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(16)?;
    Ok(socket.into())
}

/// The address to connect to when listening on an unspecified one.
fn connectable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

fn wait_accepting(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "embedded MQTT broker did not accept connections on {addr} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
