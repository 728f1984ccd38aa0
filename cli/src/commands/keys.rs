//! `wpm keys show|rotate|retire`: the registry's signing key and the trust chain devices
//! follow (registry/src/trust.rs). Rotating and retiring need an admin token.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client::Client;
use crate::commands::token::ConnOnly;
use crate::config::Settings;
use crate::output::{emit, emit_json};
use crate::GlobalArgs;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// The signing key, the keys devices trust, and how many devices are behind
    Show(ConnOnly),
    /// Add a new signing key: devices learn it through an update signed by the current
    /// one, and everything retained is signed again with it
    Rotate(ConnOnly),
    /// Drop every key but the signing key, once all devices report the newest epoch
    #[command(after_help = "Examples:
  wpm keys retire            # refused while devices have not followed the rotation
  wpm keys rotate && wpm keys retire --force   # distrust a compromised signing key now")]
    Retire(RetireArgs),
}

impl KeysCommand {
    pub fn conn_mut(&mut self) -> &mut crate::ConnArgs {
        match self {
            KeysCommand::Show(a) | KeysCommand::Rotate(a) => &mut a.conn,
            KeysCommand::Retire(a) => &mut a.conn,
        }
    }
}

#[derive(Debug, Args)]
pub struct RetireArgs {
    /// Retire even though devices have not reported the newest epoch: they are left
    /// trusting no key the registry signs with (for a compromised key)
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

fn render(v: &Value) -> String {
    let keys: Vec<&str> = (v["trusted_keys"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    format!(
        "signing key     {}\ntrust epoch     {}\ntrusted keys    {}\ndevices behind  {}",
        v["public_key"].as_str().unwrap_or("?"),
        v["epoch"],
        keys.join("\n                "),
        v["devices_behind"],
    )
}

pub async fn run(global: &GlobalArgs, cmd: KeysCommand) -> Result<()> {
    let answer = match cmd {
        KeysCommand::Show(a) => {
            let client = Client::new(&Settings::resolve(&a.conn)?)?;
            client.get_query("/v1/keys", &[]).await?
        }
        KeysCommand::Rotate(a) => {
            let client = Client::new(&Settings::resolve(&a.conn)?)?;
            client.post_json("/v1/keys/rotate", &json!({})).await?
        }
        KeysCommand::Retire(a) => {
            let client = Client::new(&Settings::resolve(&a.conn)?)?;
            (client.post_json("/v1/keys/retire", &json!({"force": a.force}))).await?
        }
    };
    if global.json {
        emit_json(&answer);
    } else {
        emit(&render(&answer));
    }
    Ok(())
}
