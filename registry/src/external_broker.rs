//! What an external broker must be told to serve a wpm registry without losing device
//! reports: the Mosquitto configuration `wpm broker config --mosquitto` writes (the bench
//! and the tests start Mosquitto with exactly this text).
//!
//! The registry's ingest is a persistent MQTT 5 session that acknowledges a report only
//! after it is in the database. A broker serving it must therefore queue enough for it
//! while it restarts or catches up (Mosquitto's default is 1,000 messages per client, far
//! below one fleet-wide install), keep its session, and honour its receive maximum.

use std::fmt::Write as _;
use std::path::PathBuf;

/// Knobs of the generated Mosquitto configuration.
#[derive(Clone, Debug)]
pub struct MosquittoOptions {
    /// Listener address, e.g. `0.0.0.0` (or `127.0.0.1` for a test broker).
    pub bind: String,
    pub port: u16,
    /// Where Mosquitto saves retained messages and sessions across its restarts; `None`
    /// keeps them in memory only (the registry republishes its retained state after it
    /// sees the broker come back, but queued device reports are then lost with it).
    pub persistence_dir: Option<PathBuf>,
    /// Largest packet: a module chunk or manifest plus headers.
    pub max_packet_size: usize,
    /// Messages Mosquitto may queue for one client (the registry's ingest session).
    pub max_queued_messages: u64,
    /// Publish `$SYS` counters every this many seconds (the bench reads them); 0: never.
    pub sys_interval_s: u32,
}

impl MosquittoOptions {
    pub fn new(port: u16) -> Self {
        Self {
            bind: "0.0.0.0".into(),
            port,
            persistence_dir: Some(PathBuf::from("/var/lib/mosquitto")),
            max_packet_size: 1024 * 1024,
            // Ten thousand devices reporting an install (some ten messages each) twice.
            max_queued_messages: 200_000,
            sys_interval_s: 10,
        }
    }
}

/// The text of a `mosquitto.conf` (Mosquitto 2.0) for a broker serving a registry.
pub fn mosquitto_conf(o: &MosquittoOptions) -> String {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# Mosquitto for a wpm registry: written by `wpm broker config --mosquitto`.\n\
         # Every setting below is one the registry's lossless ingest depends on.\n\
         per_listener_settings false\n\
         listener {port} {bind}\n\
         allow_anonymous true\n\
         \n\
         # The registry's ingest session is persistent and acknowledges a report only once\n\
         # it is in the database: queue deeply for it while it restarts or catches up. The\n\
         # default (1000) drops most of one fleet-wide install. Devices subscribe at QoS 0\n\
         # with clean sessions, so nothing queues for them.\n\
         max_queued_messages {queue}\n\
         max_queued_bytes 0\n\
         # MQTT 5 clients (the registry, the devices) set their own receive maximum; this\n\
         # only limits MQTT 3.1.1 clients.\n\
         max_inflight_messages 100\n\
         # Sessions of clients that do not state an expiry (MQTT 3.1.1) end after a day.\n\
         persistent_client_expiration 1d\n\
         max_packet_size {packet}\n\
         set_tcp_nodelay true\n\
         retain_available true\n\
         sys_interval {sys}",
        port = o.port,
        bind = o.bind,
        queue = o.max_queued_messages,
        packet = o.max_packet_size,
        sys = o.sys_interval_s,
    );
    match &o.persistence_dir {
        Some(dir) => {
            let _ = writeln!(
                c,
                "\n# Retained manifests, chunks and queued reports survive a broker restart.\n\
                 persistence true\n\
                 persistence_location {}/\n\
                 autosave_interval 30",
                dir.display().to_string().trim_end_matches('/')
            );
        }
        None => {
            let _ = writeln!(
                c,
                "\n# In memory only: a restart loses retained state (the registry republishes)\n\
                 # and the reports queued for the registry.\n\
                 persistence false"
            );
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_config_raises_the_limits_ingest_depends_on() {
        let c = mosquitto_conf(&MosquittoOptions::new(1883));
        assert!(c.contains("listener 1883 0.0.0.0"));
        assert!(c.contains("max_queued_messages 200000"));
        assert!(c.contains("persistence true"));
        let mut o = MosquittoOptions::new(4000);
        o.persistence_dir = None;
        assert!(mosquitto_conf(&o).contains("persistence false"));
    }
}
