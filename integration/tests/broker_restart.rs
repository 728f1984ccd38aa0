//! The broker is killed (no persistence: every retained manifest and chunk is lost) in
//! the middle of a rollout and started again on the same port: the registry republishes
//! on reconnect, devices reconnect and resume, and every device ends running the new
//! version and nothing else.

use std::time::Duration;
use wpm_integration::{unique, Backend, Env, OwnMosquitto};

const CONVERGE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_survives_a_broker_restart() -> anyhow::Result<()> {
    let mut broker = OwnMosquitto::start()?;
    let env = Env::start(Backend::BrokerSqlite(broker.url())).await?;
    let group = unique("restart");
    let fleet = env.api.start_fleet(env.fleet_config(8, &group)).await?;
    let devices = fleet.device_ids().to_vec();
    env.api.publish_hello().await?;
    env.api.deploy("hello", "1.0.0", &group).await?.ok()?;
    env.api
        .wait_running(&devices, "hello", "1.0.0", CONVERGE)
        .await?;

    let id = env
        .api
        .create_rollout("hello", "2.0.0", &group, &[25, 100], 120)
        .await?;
    // Kill it once the canary stage has gone out, before the rollout is done.
    wpm_integration::wait_for("the canary stage", CONVERGE, || async {
        let r = env.api.get(&format!("/v1/rollouts/{id}")).await?.ok()?;
        Ok((r["stage"].as_i64() >= Some(1)).then_some(()))
    })
    .await?;
    let before = env.api.get(&format!("/v1/rollouts/{id}")).await?.ok()?;
    broker.kill();
    assert_eq!(
        before["state"], "running",
        "the restart must fall mid-rollout: {before}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart()?;

    env.api.wait_rollout(id, "completed", CONVERGE).await?;
    env.api
        .wait_running(&devices, "hello", "2.0.0", CONVERGE)
        .await?;
    // Nothing half-installed: once the new version is confirmed (the old one stays in
    // flash until then) each device holds exactly hello@2.0.0, running, and is online.
    wpm_integration::wait_for(
        "every device to hold only hello@2.0.0",
        CONVERGE,
        || async {
            let status = env.api.fleet_status().await?;
            let settled = status["devices"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| devices.iter().any(|x| d["device"] == x.as_str()))
                .all(|d| {
                    let m = d["modules"].as_array().unwrap();
                    d["online"] == true
                        && m.len() == 1
                        && m[0]["version"] == "2.0.0"
                        && m[0]["state"] == "running"
                });
            Ok(settled.then_some(()))
        },
    )
    .await?;
    // The registry republished after the restart: the group manifest is retained again.
    let mut mqtt = wpm_integration::Mqtt::connect(&broker.url()).await?;
    let retained = mqtt
        .retained(&format!("wpm/v1/deploy/group/{group}"))
        .await?;
    assert!(!retained.is_empty());

    fleet.stop().await?;
    env.registry.shutdown().await
}
