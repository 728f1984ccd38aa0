//! What an external broker must be told to serve a wpm registry without losing device
//! reports: the Mosquitto configuration `wpm broker config --mosquitto` writes (the bench
//! and the tests start Mosquitto with exactly this text).
//!
//! The registry's ingest is a persistent MQTT 5 session that acknowledges a report only
//! after it is in the database. A broker serving it must therefore queue enough for it
//! while it restarts or catches up (Mosquitto's default is 1,000 messages per client, far
//! below one fleet-wide install), keep its session, and honour its receive maximum.
//!
//! Locked down ([`MosquittoAccess`]), it refuses anonymous clients: devices log in on
//! their listener with their id as username and client id and their login password
//! ([`wpm_manifests::report::login_password`], known only to whoever holds the device
//! key, so written into the password file when the device is provisioned), and may touch
//! only the topics of [`DEVICE_PUBLISHES`] and [`DEVICE_RECEIVES`]; the registry logs in
//! as [`REGISTRY_USER`] on a listener of its own. The reports stay sealed either way: the
//! ACL is defence in depth, never the proof of who spoke.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use std::fmt::Write as _;
use std::path::PathBuf;
use wpm_manifests::topic::{DEVICE_PUBLISHES, DEVICE_RECEIVES};

/// The registry's username on a locked-down broker (the embedded one's too).
pub const REGISTRY_USER: &str = wpm_broker::REGISTRY_USER;

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
    /// Who may connect and what they may touch; `None`: anyone, anything (a test broker
    /// on loopback).
    pub access: Option<MosquittoAccess>,
}

/// A locked-down broker: its password and ACL files, and the registry's own listener.
#[derive(Clone, Debug)]
pub struct MosquittoAccess {
    /// `user:hash` lines: the registry's, and each device's, added when it is provisioned.
    pub password_file: PathBuf,
    /// The text of [`mosquitto_acl`].
    pub acl_file: PathBuf,
    /// The listener registries connect to; keep it off the devices' network. The devices'
    /// listener takes each client's username as its client id, which the registry's
    /// several clients (publisher, ingest, replicas) cannot share.
    pub registry_bind: String,
    pub registry_port: u16,
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
            access: None,
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
         {listeners}\n\
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
        listeners = listeners(o),
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

fn listeners(o: &MosquittoOptions) -> String {
    let Some(a) = &o.access else {
        return format!(
            "per_listener_settings false\nlistener {} {}\nallow_anonymous true",
            o.port, o.bind
        );
    };
    let files = format!(
        "allow_anonymous false\npassword_file {}\nacl_file {}",
        a.password_file.display(),
        a.acl_file.display()
    );
    format!(
        "per_listener_settings true\n\
         # Devices: each logs in with its id as username, which is also its client id, so\n\
         # that no client can take over another device's session.\n\
         listener {} {}\n\
         use_username_as_clientid true\n\
         {files}\n\
         # Registries ({REGISTRY_USER}): several clients each.\n\
         listener {} {}\n\
         {files}",
        o.port, o.bind, a.registry_port, a.registry_bind
    )
}

/// The text of the ACL file of a locked-down broker: the registry may do anything; a
/// device publishes its own reports and receives deployments, modules and its commands.
pub fn mosquitto_acl() -> String {
    let mut c = String::from(
        "# Mosquitto ACL for a wpm registry: written by `wpm broker config --mosquitto`.\n\
         # %u is the username, which is the device id.\n",
    );
    for p in DEVICE_PUBLISHES {
        let _ = writeln!(c, "pattern write {p}");
    }
    for p in DEVICE_RECEIVES {
        let _ = writeln!(c, "pattern read {p}");
    }
    let _ = writeln!(c, "\nuser {REGISTRY_USER}\ntopic readwrite #");
    c
}

/// PBKDF2-SHA512 rounds of a password line (what `mosquitto_passwd` uses).
const PASSWORD_ROUNDS: u32 = 101;

/// One line of a Mosquitto 2 password file, `user:$7$rounds$salt$hash` (PBKDF2-SHA512,
/// as `mosquitto_passwd` writes it), salted with `salt`.
pub fn mosquitto_password_line(user: &str, password: &str, salt: [u8; 12]) -> String {
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), &salt, PASSWORD_ROUNDS, &mut hash);
    format!(
        "{user}:$7${PASSWORD_ROUNDS}${}${}",
        B64.encode(salt),
        B64.encode(hash)
    )
}

/// Adds (or replaces) each user's line in a Mosquitto password file, creating it
/// owner-only; the broker reads it again on SIGHUP.
///
/// # Errors
/// When the file cannot be read or written, or no randomness is available for a salt.
pub fn set_mosquitto_passwords(
    file: &std::path::Path,
    logins: &[(String, String)],
) -> anyhow::Result<()> {
    let users: Vec<&str> = logins.iter().map(|(u, _)| u.as_str()).collect();
    rewrite_password_file(file, &users, logins)
}

/// Removes users' lines from a Mosquitto password file (a revoked or removed device);
/// the broker forgets them on SIGHUP.
///
/// # Errors
/// When the file cannot be read or written.
pub fn remove_mosquitto_users(file: &std::path::Path, users: &[&str]) -> anyhow::Result<()> {
    rewrite_password_file(file, users, &[])
}

/// The file without the lines of `drop`, then `add`'s lines, written whole or not at all,
/// keeping the file's mode (Mosquitto's user must read it).
fn rewrite_password_file(
    file: &std::path::Path,
    drop: &[&str],
    add: &[(String, String)],
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let old = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let drop: std::collections::HashSet<&str> = drop.iter().copied().collect();
    let mut text: String = (old.lines())
        .filter(|l| l.split_once(':').is_none_or(|(u, _)| !drop.contains(u)))
        .flat_map(|l| [l, "\n"])
        .collect();
    for (user, password) in add {
        let salt: [u8; 12] = crate::keys::random_bytes()?[..12].try_into()?;
        text.push_str(&mosquitto_password_line(user, password, salt));
        text.push('\n');
    }
    let tmp = file.with_extension("wpm-new");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(file).map_or(0o600, |m| m.permissions().mode());
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    }
    std::fs::rename(&tmp, file).with_context(|| format!("replacing {}", file.display()))
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

    #[test]
    fn a_password_line_is_what_mosquitto_passwd_writes() {
        // Written by `mosquitto_passwd -b` (Mosquitto 2.0.11), its salt taken over.
        let line = "dev-1:$7$101$P/Bzr5zPLx0Wofo7$XLLcf4zfZY3gc2MTNXTxN5gB4NC3QdsDffIo+gf90kQ7Snl9KZKVIsrO0JH9fKr3QEqpX4J2699iefOvdk/ejg==";
        let salt: [u8; 12] = B64.decode("P/Bzr5zPLx0Wofo7").unwrap().try_into().unwrap();
        let ours = mosquitto_password_line("dev-1", "s3cret", salt);
        assert_eq!(ours, line);
    }

    #[test]
    fn logins_are_added_replaced_and_removed_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("passwd");
        let login = |u: &str, p: &str| (u.to_string(), p.to_string());
        set_mosquitto_passwords(&file, &[login("a", "1"), login("b", "2")]).unwrap();
        set_mosquitto_passwords(&file, &[login("a", "3")]).unwrap();
        remove_mosquitto_users(&file, &["b"]).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        let users: Vec<&str> = text.lines().filter_map(|l| l.split(':').next()).collect();
        assert_eq!(users, ["a"]);
    }
}
