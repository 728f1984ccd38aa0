//! `wpm`: the operator's tool. Publish WebAssembly modules to the registry, deploy them to
//! devices, watch the fleet, and run a registry or a simulated fleet locally.

mod client;
mod commands;
mod config;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::commands::{
    bench, broker, command, demo, deploy, fleet, identity, keys, publish, rollout, sim, token,
};

const EXAMPLES: &str = "\
Examples:
  wpm demo                                      # registry + 5 simulated devices + hello module
  wpm publish hello.wat --name hello --version 1.0.0
  wpm deploy hello@1.0.0 --group eu
  wpm fleet status --group eu
  wpm --json fleet status | jq '.devices[].device'

The registry address and API token come from --registry/--token, then WPM_REGISTRY/WPM_TOKEN,
then the config file (`registry = \"...\"`, `token = \"...\"`), then ./wpm-data/api-token.";

#[derive(Debug, Parser)]
#[command(
    name = "wpm",
    version,
    about = "Publish, deploy and watch WebAssembly modules on a fleet of microcontrollers",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    // Also accepted before the subcommand (`wpm --registry URL fleet status`); a value
    // given after the subcommand wins.
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    command: Command,
}

// Flags every command accepts (before or after the subcommand). Plain comments, not doc
// comments: clap would take a doc comment on a flattened struct as the command's about.
//
// `--registry`, `--token` and `--config` are not global: `wpm registry serve` has its own
// `--token` (the token it accepts), so they live in `ConnArgs`, flattened into each
// command that talks to a registry, and into the top level for use before the command.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Print machine-readable JSON on stdout instead of tables
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,

    /// More log output on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides
    #[arg(short, long, global = true, action = ArgAction::Count, help_heading = "Global options")]
    pub verbose: u8,

    /// Only errors on stderr
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        help_heading = "Global options"
    )]
    pub quiet: bool,
}

// Where the registry is and how to authenticate; on every command that calls it.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// Registry HTTP address [default: http://127.0.0.1:8470]
    #[arg(
        long,
        env = "WPM_REGISTRY",
        value_name = "URL",
        help_heading = "Registry"
    )]
    pub registry: Option<String>,

    /// API token sent as `Authorization: Bearer` (the registry writes it to <data-dir>/api-token)
    #[arg(
        long,
        env = "WPM_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        help_heading = "Registry"
    )]
    pub token: Option<String>,

    /// PEM file of the CA (or self-signed certificate) that an https:// registry's and an
    /// mqtts:// broker's certificates must chain to [default: the system's roots]
    #[arg(
        long,
        env = "WPM_CA_FILE",
        value_name = "PATH",
        help_heading = "Registry"
    )]
    pub ca_file: Option<PathBuf>,

    /// Config file (TOML with `registry`, `token` and `ca_file`) [default: $XDG_CONFIG_HOME/wpm/config.toml]
    #[arg(long, value_name = "PATH", help_heading = "Registry")]
    pub config: Option<PathBuf>,
}

impl ConnArgs {
    /// Fills what the subcommand's flags left open from the flags before it.
    fn inherit(&mut self, top: &ConnArgs) {
        self.registry = self.registry.take().or_else(|| top.registry.clone());
        self.token = self.token.take().or_else(|| top.token.clone());
        self.config = self.config.take().or_else(|| top.config.clone());
        self.ca_file = self.ca_file.take().or_else(|| top.ca_file.clone());
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Upload a module (.wasm, or .wat converted on the fly) to the registry
    #[command(after_help = "Examples:
  wpm publish hello.wat --name hello --version 1.0.0
  wpm publish sensor.wasm --name sensor --version 2.1.0 --memory-limit 65536 --priority 10 --pinned")]
    Publish(publish::PublishArgs),

    /// Deploy a published module to a group, one device or the whole fleet
    #[command(after_help = "Examples:
  wpm deploy hello@1.0.0 --group eu
  wpm deploy hello@1.0.0 --device dev-17
  wpm deploy hello@1.0.0 --fleet")]
    Deploy(deploy::DeployArgs),

    /// Fleet-wide views
    #[command(subcommand)]
    Fleet(FleetCommand),

    /// Modules held by the registry
    #[command(subcommand)]
    Modules(ModulesCommand),

    /// One device: its events, and signed lifecycle commands (start, stop, pin, unpin, evict)
    #[command(subcommand)]
    Device(DeviceCommand),

    /// Staged rollouts to a group: canary first, halted and rolled back on failures
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),

    /// Scoped API tokens (read, publish, deploy, admin), kept hashed by the registry
    #[command(subcommand)]
    Token(token::TokenCommand),

    /// The registry's signing key: rotate it, retire old keys, distrust a compromised one
    #[command(subcommand)]
    Keys(keys::KeysCommand),

    /// Measure a rollout to simulated devices against the raw broker fan-out
    #[command(subcommand)]
    Bench(bench::BenchCommand),

    /// Run the registry (HTTP API, signing, embedded MQTT broker, database)
    #[command(subcommand)]
    Registry(RegistryCommand),

    /// wpm's MQTT broker on its own, or what an external broker needs to serve the registry
    #[command(subcommand)]
    Broker(BrokerCommand),

    /// Run simulated devices (the real device-pm core under tokio) until Ctrl-C
    #[command(after_help = "Examples:
  wpm sim --devices 10 --group eu                  # trust the key from the registry's /v1/keys
  wpm sim --devices 3 --broker mqtt://10.0.0.5:1883 --trust 3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29")]
    Sim(sim::SimArgs),

    /// Everything at once on this machine: registry, simulated devices, a deployed module
    #[command(after_help = "Examples:
  wpm demo
  wpm demo --devices 20 --data-dir /tmp/wpm-demo")]
    Demo(demo::DemoArgs),
}

#[derive(Debug, Subcommand)]
enum FleetCommand {
    /// Table of devices: online, manifest sequence, modules and their state, slots, errors
    #[command(after_help = "Examples:
  wpm fleet status
  wpm fleet status --group eu --module hello
  wpm fleet status --json")]
    Status(fleet::StatusArgs),
}

#[derive(Debug, Subcommand)]
enum ModulesCommand {
    /// List every published module version
    #[command(after_help = "Examples:
  wpm modules list
  wpm modules list --json")]
    List(fleet::ListArgs),
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Register a device: make its key pair, register the public half with the registry
    /// and print (or write) its provisioning record
    #[command(after_help = "Examples:
  wpm device add dev-17 --group eu --out dev-17.json
  wpm device add dev-18 --group eu --group canary > dev-18.json")]
    Add(identity::AddArgs),
    /// Register many devices from a CSV file (`id,group;group`), one provisioning record
    /// per device
    #[command(after_help = "Examples:
  wpm device import batch-7.csv --out-dir batch-7/")]
    Import(identity::ImportArgs),
    /// The registered devices and whether they are revoked
    List(fleet::ListArgs),
    /// Mark a device revoked (a stolen or retired device): everything it reports is
    /// dropped from then on, and the embedded broker no longer lets it log in
    Revoke(identity::IdArgs),
    /// Forget a device: its identity and everything the registry holds about it
    Remove(identity::IdArgs),
    /// A device's recent events (installs, traps, evictions...), newest first
    #[command(after_help = "Examples:
  wpm device events dev-17
  wpm device events dev-17 --limit 100 --json")]
    Events(fleet::EventsArgs),
    /// Start a stopped or evicted module (a signed command; waits for the device's answer).
    /// An evicted module continues exactly where it was; a stopped one starts afresh
    #[command(after_help = "Examples:
  wpm device start dev-17 hello
  wpm device start dev-17 hello --no-wait")]
    Start(command::CommandArgs),
    /// Stop a module; it stays installed
    Stop(command::CommandArgs),
    /// Pin a module: never evicted from its runtime slot
    Pin(command::CommandArgs),
    /// Unpin a module
    Unpin(command::CommandArgs),
    /// Snapshot a module out of its runtime slot, freeing the slot's RAM. It stays
    /// evicted, its state kept, until `wpm device start` restores it
    Evict(command::CommandArgs),
}

#[derive(Debug, Subcommand)]
enum BrokerCommand {
    /// Print (or write) the broker configuration: deep queues for the registry's
    /// persistent ingest session, persistence, packet size
    #[command(after_help = "Examples:
  wpm broker config --mosquitto > /etc/mosquitto/conf.d/wpm.conf
  wpm broker config --mosquitto --port 8883 --out wpm.conf")]
    Config(broker::ConfigArgs),

    /// Run wpm's MQTT broker on its own (the one `wpm registry serve` embeds), alone or
    /// as one node of a cluster, until Ctrl-C
    #[command(after_help = "Examples:
  wpm broker serve --listen 0.0.0.0:1883 --registry-listen 10.0.0.1:1884
  wpm broker serve --node-id 1 --cluster-listen 10.0.0.1:5364 \\
      --node 1@10.0.0.1:5364 --node 2@10.0.0.2:5364 --node 3@10.0.0.3:5364")]
    Serve(broker::ServeArgs),
}

#[derive(Debug, Subcommand)]
enum RegistryCommand {
    /// Serve the registry HTTP API and MQTT side until Ctrl-C
    Serve(#[command(flatten)] wpm_registry::ServeArgs),
}

impl Command {
    /// Servers are worth hearing from at info level; client commands should stay quiet.
    fn default_log_level(&self) -> &'static str {
        match self {
            Command::Registry(_) => wpm_registry::DEFAULT_LOG_FILTER,
            // The embedded broker logs every device disconnect; that is noise for a
            // first-time user (-v or RUST_LOG bring it back).
            Command::Bench(_) | Command::Demo(_) => "warn,rmqtt=error,rmqtt_net=error",
            _ => "warn",
        }
    }
}

fn init_logging(global: &GlobalArgs, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let level = if global.quiet {
        "error"
    } else {
        match global.verbose {
            0 => default_level,
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    // RUST_LOG wins when set so one can aim at a single crate (RUST_LOG=wpm_registry=debug).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // try_init: a library started in-process may already have installed a subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

impl Command {
    fn conn_mut(&mut self) -> Option<&mut ConnArgs> {
        Some(match self {
            Command::Publish(a) => &mut a.conn,
            Command::Deploy(a) => &mut a.conn,
            Command::Fleet(FleetCommand::Status(a)) => &mut a.conn,
            Command::Modules(ModulesCommand::List(a)) => &mut a.conn,
            Command::Device(DeviceCommand::Events(a)) => &mut a.conn,
            Command::Device(DeviceCommand::Add(a)) => &mut a.conn,
            Command::Device(DeviceCommand::Import(a)) => &mut a.conn,
            Command::Device(DeviceCommand::List(a)) => &mut a.conn,
            Command::Device(DeviceCommand::Revoke(a) | DeviceCommand::Remove(a)) => &mut a.conn,
            Command::Device(
                DeviceCommand::Start(a)
                | DeviceCommand::Stop(a)
                | DeviceCommand::Pin(a)
                | DeviceCommand::Unpin(a)
                | DeviceCommand::Evict(a),
            ) => &mut a.conn,
            Command::Rollout(r) => r.conn_mut(),
            Command::Token(t) => t.conn_mut(),
            Command::Keys(k) => k.conn_mut(),
            Command::Sim(a) => &mut a.conn,
            Command::Bench(_) | Command::Registry(_) | Command::Broker(_) | Command::Demo(_) => {
                return None
            }
        })
    }
}

async fn run(mut cli: Cli) -> anyhow::Result<()> {
    if let Some(conn) = cli.command.conn_mut() {
        conn.inherit(&cli.conn);
    }
    let g = &cli.global;
    match cli.command {
        Command::Publish(args) => publish::run(g, args).await,
        Command::Deploy(args) => deploy::run(g, args).await,
        Command::Fleet(FleetCommand::Status(args)) => fleet::status(g, args).await,
        Command::Modules(ModulesCommand::List(args)) => fleet::modules_list(g, args).await,
        Command::Device(DeviceCommand::Events(args)) => fleet::device_events(g, args).await,
        Command::Device(DeviceCommand::Add(args)) => identity::add(g, args).await,
        Command::Device(DeviceCommand::Import(args)) => identity::import(g, args).await,
        Command::Device(DeviceCommand::List(args)) => identity::list(g, args).await,
        Command::Device(DeviceCommand::Revoke(args)) => identity::revoke(g, args).await,
        Command::Device(DeviceCommand::Remove(args)) => identity::remove(g, args).await,
        Command::Device(DeviceCommand::Start(args)) => command::run(g, "start", args).await,
        Command::Device(DeviceCommand::Stop(args)) => command::run(g, "stop", args).await,
        Command::Device(DeviceCommand::Pin(args)) => command::run(g, "pin", args).await,
        Command::Device(DeviceCommand::Unpin(args)) => command::run(g, "unpin", args).await,
        Command::Device(DeviceCommand::Evict(args)) => command::run(g, "evict", args).await,
        Command::Rollout(cmd) => rollout::run(g, cmd).await,
        Command::Token(cmd) => token::run(g, cmd).await,
        Command::Keys(cmd) => keys::run(g, cmd).await,
        Command::Bench(cmd) => bench::run(g, cmd).await,
        Command::Registry(RegistryCommand::Serve(args)) => wpm_registry::serve(args).await,
        Command::Broker(BrokerCommand::Config(args)) => broker::config(args),
        Command::Broker(BrokerCommand::Serve(args)) => broker::serve(args).await,
        Command::Sim(args) => sim::run(g, args).await,
        Command::Demo(args) => demo::run(g, args).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // Clap exits with code 2 and its own message on bad arguments.
    let cli = Cli::parse();
    init_logging(&cli.global, cli.command.default_log_level());
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            output::print_error(&err);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
