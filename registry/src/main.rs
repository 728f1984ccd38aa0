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
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(wpm_registry::DEFAULT_LOG_FILTER)),
        )
        .init();
    wpm_registry::serve(Cli::parse().serve).await
}
