//! Signed lifecycle commands: the registry seals and sends them, the device carries them
//! out (or refuses) and says so in an event carrying the command's sequence.

use serde_json::{json, Value};
use std::time::Duration;
use wpm_integration::{unique, wait_for, Api, Backend, Env};

const CONVERGE: Duration = Duration::from_secs(60);

/// Sends a command; returns the device's answer event.
async fn command(api: &Api, device: &str, action: &str, module: &str) -> anyhow::Result<Value> {
    let sent = api
        .post(
            &format!("/v1/devices/{device}/commands"),
            json!({"action": action, "module": module}),
        )
        .await?
        .ok()?;
    let seq = sent["sequence"].as_u64().unwrap();
    wait_for(
        &format!("the answer to command {seq}"),
        CONVERGE,
        || async {
            Ok(api.events(device).await?.into_iter().find(|e| {
                ["command_applied", "command_rejected"].contains(&e["kind"].as_str().unwrap_or(""))
                    && e["detail"]["sequence"].as_u64() == Some(seq)
            }))
        },
    )
    .await
}

async fn module_state(api: &Api, device: &str) -> anyhow::Result<String> {
    let s = api.fleet_status().await?;
    Ok(s["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == device)
        .and_then(|d| d["modules"][0]["state"].as_str())
        .unwrap_or_default()
        .to_string())
}

async fn stop_and_start(backend: Backend) -> anyhow::Result<()> {
    let env = Env::start(backend).await?;
    let group = unique("cmd");
    let fleet = env.api.start_fleet(env.fleet_config(1, &group)).await?;
    let device = fleet.device_ids()[0].clone();
    env.api
        .install_hello(&group, std::slice::from_ref(&device), CONVERGE)
        .await?;

    let answer = command(&env.api, &device, "stop", "hello").await?;
    assert_eq!(answer["kind"], "command_applied", "{answer}");
    wait_for("hello to stop", CONVERGE, || async {
        Ok((module_state(&env.api, &device).await? == "stopped").then_some(()))
    })
    .await?;
    let answer = command(&env.api, &device, "start", "hello").await?;
    assert_eq!(answer["kind"], "command_applied", "{answer}");
    env.api
        .wait_running(std::slice::from_ref(&device), "hello", "1.0.0", CONVERGE)
        .await?;
    // A module the device does not have: refused, with a reason.
    let answer = command(&env.api, &device, "stop", "nosuch").await?;
    assert_eq!(answer["kind"], "command_rejected", "{answer}");

    let bad = env
        .api
        .post(
            &format!("/v1/devices/{device}/commands"),
            json!({"action": "reboot", "module": "hello"}),
        )
        .await?;
    assert_eq!(bad.status, 400, "{bad:?}");
    fleet.stop().await?;
    env.registry.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_embedded_broker_and_sqlite() -> anyhow::Result<()> {
    stop_and_start(Backend::EmbeddedSqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_mosquitto_and_postgres() -> anyhow::Result<()> {
    stop_and_start(Backend::MosquittoPostgres).await
}
