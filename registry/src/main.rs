//! `wpm-registry`: the registry as a standalone server (same as `wpm registry serve`).

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "wpm-registry", version, about = "The wpm registry server")]
struct Cli {
    #[command(flatten)]
    serve: wpm_registry::ServeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // rumqttd logs every device connection at info; that drowns the registry's own logs
    // with a fleet attached, so it is quieter unless RUST_LOG says otherwise.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn")),
        )
        .init();
    wpm_registry::serve(Cli::parse().serve).await
}
