//! The embedded MQTT broker (rumqttd).
//!
//! rumqttd runs its router and listeners on threads of its own and offers no way to stop
//! them: once started, the embedded broker lives until the process exits.
//! rumqttd keeps retained messages in memory only; the registry republishes everything
//! deployed on every start (see [`crate::publish::republish_all`]).

use anyhow::Context as _;
use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// A running embedded broker.
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
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
        name: "wpm-v4".to_string(),
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
    let mut v4 = HashMap::new();
    v4.insert("1".to_string(), server);
    rumqttd::Config {
        id: 0,
        router,
        v4: Some(v4),
        ..Default::default()
    }
}

/// Starts rumqttd on `listen` (port 0: a free port is picked) and returns once it accepts
/// TCP connections.
pub fn start(listen: SocketAddr, max_payload: usize) -> anyhow::Result<EmbeddedBroker> {
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
        if mqtt_handshake(connect_to).is_ok() {
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
    Ok(EmbeddedBroker { addr: connect_to })
}

/// One MQTT 3.1.1 CONNECT / CONNACK exchange: proves the broker serves MQTT
/// (a bare TCP connect would too, but rumqttd logs an error for every connection that
/// never sends CONNECT).
fn mqtt_handshake(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let id = b"wpm-registry-probe";
    let mut packet = vec![0x10, (10 + 2 + id.len()) as u8];
    // Protocol name "MQTT", level 4, clean session, keep-alive 10 s.
    packet.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10]);
    packet.extend_from_slice(&[0, id.len() as u8]);
    packet.extend_from_slice(id);
    s.write_all(&packet)?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(std::io::Error::other("broker refused the probe connection"));
    }
    Ok(())
}
