//! `wpm broker config --mosquitto`: the configuration an external broker needs to serve
//! a registry without losing device reports (one definition, in the registry crate,
//! shared with the bench and the tests).

use std::path::PathBuf;

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
}

pub fn config(args: ConfigArgs) -> Result<()> {
    if !args.mosquitto {
        bail!("say which broker: --mosquitto (for EMQX and others see docs/broker.md)");
    }
    let mut o = wpm_registry::external_broker::MosquittoOptions::new(args.port);
    o.bind = args.bind;
    o.persistence_dir = (!args.no_persistence).then_some(args.persistence_dir);
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
