//! The first end-to-end path: publish → registry signs → MQTT → devices verify, stage,
//! run → fleet status; then an upgrade. Real broker over TCP, real database, real
//! signatures, real wasm.

use std::time::{Duration, Instant};
use wpm_integration::{unique, Backend, Env, Telemetry};

const CONVERGE: Duration = Duration::from_secs(90);

async fn publish_deploy_upgrade(backend: Backend) -> anyhow::Result<()> {
    let env = Env::start(backend).await?;
    let group = unique("e2e");
    let fleet = env.api.start_fleet(env.fleet_config(3, &group)).await?;
    let devices = fleet.device_ids().to_vec();
    let telemetry = Telemetry::watch(&env.mqtt_url, env.registry.broker_login(), "hello").await?;

    env.api.publish_hello().await?;

    // Install v1, then upgrade to v2: each time every device runs it and its telemetry
    // (which names the version) arrives at the broker.
    for (version, marker) in [("1.0.0", "\"hello\":1"), ("2.0.0", "\"hello\":2")] {
        let started = Instant::now();
        env.api.deploy("hello", version, &group).await?.ok()?;
        env.api
            .wait_running(&devices, "hello", version, CONVERGE)
            .await?;
        println!(
            "deploy → 3 devices run hello@{version}: {:?}",
            started.elapsed()
        );
        telemetry.wait_from_all(&devices, marker, CONVERGE).await?;
    }

    // v1 is gone from every device, not running beside v2.
    let status = env.api.fleet_status().await?;
    for d in &devices {
        assert!(
            !wpm_integration::device_runs(&status, d, "hello", "1.0.0"),
            "{d} still runs v1"
        );
    }
    fleet.stop().await?;
    env.registry.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_broker_and_sqlite() -> anyhow::Result<()> {
    publish_deploy_upgrade(Backend::EmbeddedSqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_and_postgres() -> anyhow::Result<()> {
    publish_deploy_upgrade(Backend::MosquittoPostgres).await
}
