//! One file per command family; `main.rs` only parses and dispatches.

pub mod bench;
pub mod broker;
pub mod command;
pub mod demo;
pub mod deploy;
pub mod fleet;
pub mod identity;
pub mod keys;
pub mod publish;
pub mod rollout;
pub mod sim;
pub mod token;

use anyhow::{bail, Result};

/// Device ids, groups and module names end up in MQTT topics; the shared rule in
/// wpm-manifests keeps them topic-safe. Checking here gives a clear message before any
/// network round trip.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    if !wpm_manifests::valid_name(name) {
        bail!("invalid {what} `{name}`: use 1 to 64 of A-Z a-z 0-9 _ - . (not starting with `.`)");
    }
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix (what `kill`, systemd and container runtimes send), so the
/// long-running commands stop cleanly: devices go offline and save their flash.
pub async fn shutdown_signal() -> Result<()> {
    #[cfg(unix)]
    {
        use anyhow::Context;
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        use anyhow::Context;
        tokio::signal::ctrl_c()
            .await
            .context("cannot listen for Ctrl-C")?;
    }
    Ok(())
}
