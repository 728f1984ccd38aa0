//! `wpm sim`: simulated devices (device-pm core under tokio, see device-pm/sim) on a real
//! MQTT broker. Kept in its own file because it is the one command that depends on the
//! simulator's API.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::client::{parse_key, Client};
use crate::config::Settings;
use crate::output::emit;
use crate::GlobalArgs;

#[derive(Debug, Args)]
pub struct SimArgs {
    /// How many devices to simulate
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub devices: usize,

    /// MQTT broker the devices connect to (the registry's embedded one listens on 1884 by
    /// default); mqtts://HOST:PORT for TLS, trusting --ca-file
    #[arg(
        long,
        env = "WPM_BROKER",
        value_name = "URL",
        default_value = "mqtt://127.0.0.1:1884"
    )]
    pub broker: String,

    /// Group every device joins; repeat for several groups
    #[arg(long = "group", value_name = "G")]
    pub groups: Vec<String>,

    /// Registry public key (hex ed25519) the devices trust; repeat for several. Without it the
    /// key is fetched from the registry's /v1/keys (see --registry)
    #[arg(long = "trust", value_name = "HEX")]
    pub trust: Vec<String>,

    /// Device ids are PREFIX-0000, PREFIX-0001, ...
    #[arg(long, value_name = "PREFIX", default_value = "sim")]
    pub id_prefix: String,

    /// Runtime slots per device (default: the simulator's)
    #[arg(long, value_name = "N")]
    pub slots: Option<usize>,

    /// Keep each device's simulated flash under this directory, so a restart resumes from it.
    /// The secret the devices' keys are derived from is kept here too (else in ./wpm-data)
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    // Registry the devices are registered with (and whose key they trust without --trust).
    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

async fn trusted_keys(args: &SimArgs) -> Result<Vec<[u8; 32]>> {
    if !args.trust.is_empty() {
        return args
            .trust
            .iter()
            .map(|k| parse_key(k).context("bad --trust"))
            .collect();
    }
    let settings = Settings::resolve(&args.conn)?;
    let client = Client::new(&settings)?;
    let key = client.public_key().await.with_context(|| {
        format!(
            "cannot fetch the registry key to trust from {} (or pass --trust HEX)",
            settings.registry
        )
    })?;
    tracing::info!("trusting registry key {}", hex::encode(key));
    Ok(vec![key])
}

/// The secret a simulated fleet's device keys are derived from, kept in `dir` (made on
/// first use, readable by its owner only), so devices started again keep their
/// identities.
pub fn identity_secret(dir: &Path) -> Result<[u8; 32]> {
    let path = dir.join("identity-secret");
    match std::fs::read_to_string(&path) {
        Ok(text) => hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .with_context(|| format!("{} is not 64 hex digits", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let secret = wpm_registry::keys::random_bytes()?;
            crate::commands::identity::write_secret(&path, &format!("{}\n", hex::encode(secret)))?;
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Registers a simulated fleet's devices with the registry, as `wpm device import`
/// registers real ones.
pub async fn register(client: &Client, cfg: &wpm_sim::FleetConfig) -> Result<()> {
    crate::commands::identity::register_simulated(client, &cfg.identities(), &cfg.groups)
        .await
        .map(drop)
}

/// The fleet configuration both `wpm sim` and `wpm demo` use.
#[allow(clippy::too_many_arguments)]
pub fn fleet_config(
    broker_url: String,
    trusted_keys: Vec<[u8; 32]>,
    identity_secret: [u8; 32],
    groups: Vec<String>,
    id_prefix: String,
    devices: usize,
    slots: Option<usize>,
    state_dir: Option<PathBuf>,
) -> wpm_sim::FleetConfig {
    let mut cfg = wpm_sim::FleetConfig::new(broker_url, trusted_keys, identity_secret);
    cfg.groups = groups;
    cfg.id_prefix = id_prefix;
    cfg.devices = devices;
    if let Some(slots) = slots {
        cfg.tuning.slots = slots;
    }
    cfg.state_dir = state_dir;
    cfg
}

pub async fn run(global: &GlobalArgs, args: SimArgs) -> Result<()> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    args.broker
        .parse::<wpm_transport::BrokerUrl>()
        .context("bad --broker (want mqtt://HOST:PORT or mqtts://HOST:PORT)")?;
    for g in &args.groups {
        super::check_name("group", g)?;
    }
    super::check_name("id prefix", &args.id_prefix)?;
    let keys = trusted_keys(&args).await?;
    let secret_dir = (args.state_dir.clone()).unwrap_or_else(|| PathBuf::from("wpm-data"));
    let mut cfg = fleet_config(
        args.broker.clone(),
        keys,
        identity_secret(&secret_dir)?,
        args.groups.clone(),
        args.id_prefix.clone(),
        args.devices,
        args.slots,
        args.state_dir.clone(),
    );
    let settings = Settings::resolve(&args.conn)?;
    // One CA for the registry's HTTPS and the broker's TLS: both are the registry's.
    cfg.broker_ca = settings.ca_file.clone();
    let client = Client::new(&settings)?;
    register(&client, &cfg).await?;
    let fleet = wpm_sim::Fleet::start(cfg)
        .await
        .with_context(|| format!("cannot start simulated devices on {}", args.broker))?;
    let ids = fleet.device_ids().to_vec();
    if global.json {
        crate::output::emit_json(&serde_json::json!({
            "broker": args.broker,
            "groups": args.groups,
            "devices": ids,
        }));
    } else if !global.quiet {
        emit(&format!(
            "{} simulated devices on {}{}: {}\nCtrl-C to stop.",
            ids.len(),
            args.broker,
            if args.groups.is_empty() {
                String::new()
            } else {
                format!(" in {}", args.groups.join(", "))
            },
            ids.join(", ")
        ));
    }
    super::shutdown_signal().await?;
    fleet
        .stop()
        .await
        .context("a simulated device failed while stopping")?;
    Ok(())
}
