//! Time from `deploy` until every simulated device runs the new version, on the
//! single-machine setup (embedded broker + SQLite), for growing fleets.
//!
//! `cargo bench -p wpm-integration --bench converge [-- 3 100 …]`
//!
//! The machine is shared and noisy: compare the figures of one run with each other
//! (per-device cost as the fleet grows), not across runs.

use std::time::{Duration, Instant};
use wpm_integration::{unique, Backend, Env};

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![3, 100]
    } else {
        sizes
    };
    let env = Env::start(Backend::EmbeddedSqlite).await?;
    let [v1, _] = env.api.publish_hello().await?;
    let size = v1["size"].as_u64().unwrap_or_default();

    println!("module size {size} bytes; embedded broker + SQLite; one process");
    println!(
        "{:>8}  {:>14}  {:>14}  {:>16}",
        "devices", "install v1", "upgrade to v2", "upgrade/device"
    );
    for n in sizes {
        let group = unique("bench");
        let mut config = env.fleet_config(n, &group);
        config.tuning.turn_interval_ms = 1000;
        let fleet = wpm_sim::Fleet::start(config).await?;
        let devices = fleet.device_ids().to_vec();
        let timeout = Duration::from_secs(120 + n as u64);

        let t = Instant::now();
        env.api.deploy("hello", "1.0.0", &group).await?.ok()?;
        env.api
            .wait_running(&devices, "hello", "1.0.0", timeout)
            .await?;
        let install = t.elapsed();

        let t = Instant::now();
        env.api.deploy("hello", "2.0.0", &group).await?.ok()?;
        env.api
            .wait_running(&devices, "hello", "2.0.0", timeout)
            .await?;
        let upgrade = t.elapsed();

        println!(
            "{n:>8}  {:>12.0}ms  {:>12.0}ms  {:>14.2}ms",
            install.as_secs_f64() * 1e3,
            upgrade.as_secs_f64() * 1e3,
            upgrade.as_secs_f64() * 1e3 / n as f64
        );
        fleet.stop().await?;
    }
    env.registry.shutdown().await
}
