//! The embedded MQTT broker: rmqtt (`wpm-broker`), or, for the side-by-side measurement
//! in `docs/broker.md`, rumqttd.
//!
//! rumqttd runs its router and listeners on threads of its own and offers no way to stop
//! them: once started, it lives until the process exits. Both keep retained messages in
//! memory only; the registry republishes everything deployed on every start (see
//! [`crate::publish::republish_all`]).

use anyhow::Context as _;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Which embedded broker to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Rmqtt,
    Rumqttd,
}

/// A running embedded broker.
pub enum EmbeddedBroker {
    Rmqtt(wpm_broker::Broker),
    Rumqttd(SocketAddr),
}

impl EmbeddedBroker {
    pub fn start(kind: Kind, listen: SocketAddr, max_payload: usize) -> anyhow::Result<Self> {
        Ok(match kind {
            Kind::Rmqtt => EmbeddedBroker::Rmqtt(wpm_broker::Broker::start(
                wpm_broker::BrokerConfig::new(listen, max_payload as u32),
            )?),
            Kind::Rumqttd => EmbeddedBroker::Rumqttd(start(listen, max_payload)?),
        })
    }

    /// Where devices connect.
    pub fn addr(&self) -> SocketAddr {
        match self {
            EmbeddedBroker::Rmqtt(b) => b.addr(),
            EmbeddedBroker::Rumqttd(a) => *a,
        }
    }

    /// Where the registry's own clients connect.
    pub fn registry_addr(&self) -> SocketAddr {
        match self {
            EmbeddedBroker::Rmqtt(b) => b.registry_addr(),
            EmbeddedBroker::Rumqttd(a) => *a,
        }
    }

    pub fn stats(&self) -> Option<std::sync::Arc<wpm_broker::BrokerStats>> {
        match self {
            EmbeddedBroker::Rmqtt(b) => Some(b.stats()),
            EmbeddedBroker::Rumqttd(_) => None,
        }
    }

    pub fn stop(self) {
        if let EmbeddedBroker::Rmqtt(b) = self {
            b.stop();
        }
    }
}

/// rumqttd's configuration, built in code so nothing depends on a config file.
fn broker_config(listen: SocketAddr, max_payload: usize) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: max_payload,
        // rumqttd caps outgoing QoS 1 in-flight at 100 per connection anyway.
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        // Devices subscribe to the chunks they lack one by one, so filters come and go.
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "wpm-v5".to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let router = rumqttd::RouterConfig {
        // Thousands of devices plus the registry's own clients.
        max_connections: 20_000,
        // Also bounds how many retained messages a QoS 0 subscription receives at once.
        max_outgoing_packet_count: 1_000,
        // A segment must hold at least one message of the largest size.
        max_segment_size: (4 * 1024 * 1024).max(max_payload * 2),
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    // The registry and the devices speak MQTT 5.
    let mut v5 = HashMap::new();
    v5.insert("1".to_string(), server);
    rumqttd::Config {
        id: 0,
        router,
        v5: Some(v5),
        ..Default::default()
    }
}

/// Starts rumqttd on `listen` (port 0: a free port is picked) and returns once it accepts
/// TCP connections.
fn start(listen: SocketAddr, max_payload: usize) -> anyhow::Result<SocketAddr> {
    // rumqttd only logs a failed bind from its listener thread; bind here first so a port
    // in use (say, by a system Mosquitto) is a clear startup error and not a registry
    // silently talking to some other broker. Port 0 is resolved the same way.
    let probe = TcpListener::bind(listen).with_context(|| {
        format!("embedded MQTT broker cannot listen on {listen} (port in use? pass --mqtt-listen or --broker)")
    })?;
    let addr = probe.local_addr()?;
    drop(probe);

    let mut broker = rumqttd::Broker::new(broker_config(addr, max_payload));
    let thread = std::thread::Builder::new()
        .name("wpm-rumqttd".to_string())
        .spawn(move || {
            // Blocks for as long as the listener runs.
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })?;

    let deadline = Instant::now() + Duration::from_secs(10);
    let connect_to = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    loop {
        if TcpStream::connect_timeout(&connect_to, Duration::from_millis(200)).is_ok() {
            break;
        }
        if thread.is_finished() {
            anyhow::bail!("embedded MQTT broker failed to start on {addr}");
        }
        if Instant::now() > deadline {
            anyhow::bail!("embedded MQTT broker did not come up on {addr} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(%addr, "embedded MQTT broker listening");
    Ok(connect_to)
}
