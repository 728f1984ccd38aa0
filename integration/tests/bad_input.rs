//! Bad input is refused with a clear reason and loses nothing: the version that was
//! running keeps running. Every attack here goes through the real broker, as it would on
//! the wire.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wpm_integration::{device_runs, example, unique, wait_for, Backend, Env, Mqtt};
use wpm_manifests::{Deployment, KeyPair, Target, Topic};

const WAIT: Duration = Duration::from_secs(60);

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Checks that `device` still runs `version` of hello, a moment after an attack.
async fn still_runs(env: &Env, device: &str, version: &str) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = env.api.fleet_status().await?;
    anyhow::ensure!(
        device_runs(&status, device, "hello", version),
        "{device} no longer runs hello@{version}: {status}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_refuses_bad_manifests_and_chunks() -> anyhow::Result<()> {
    let env = Env::start(Backend::EmbeddedSqlite).await?;
    let group = unique("bad");
    let state = tempfile::tempdir()?;
    let mut config = env.fleet_config(1, &group);
    config.state_dir = Some(state.path().to_path_buf());
    let device = config.device_id(0);
    // Whoever can write the module topics: on the embedded broker only the registry's
    // own login can, so this plays a broker that lets anything through. The device's
    // own checks are what is under test.
    let mut wire = Mqtt::connect_as(&env.mqtt_url, env.registry.broker_login()).await?;

    let [_, v2] = env.api.publish_hello().await?;
    let fleet = env.api.start_fleet(config.clone()).await?;
    env.api.deploy("hello", "1.0.0", &group).await?.ok()?;
    env.api
        .wait_running(std::slice::from_ref(&device), "hello", "1.0.0", WAIT)
        .await?;

    let group_topic = Topic::Deployment(&Target::Group(group.clone())).render();
    let genuine_v1 = wire.retained(&group_topic).await?;

    // A manifest signed by a key the device does not trust, that would remove everything.
    let forged = Deployment {
        target: Target::Device(device.clone()),
        sequence: 1_000_000,
        issued_at: now_s(),
        expires_at: now_s() + 3600,
        modules: vec![],
        health: None,
    };
    let attacker = KeyPair::from_seed(&[0x66; 32]);
    let device_topic = Topic::Deployment(&Target::Device(device.clone())).render();
    wire.publish(&device_topic, attacker.seal(&forged), false)
        .await?;
    env.api
        .wait_event(&device, "manifest_rejected", "untrusted key", WAIT)
        .await?;
    still_runs(&env, &device, "1.0.0").await?;

    // The genuine manifest with its signature altered.
    let mut tampered = genuine_v1.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x40;
    wire.publish(&group_topic, tampered, false).await?;
    env.api
        .wait_event(
            &device,
            "manifest_rejected",
            "signature does not verify",
            WAIT,
        )
        .await?;
    still_runs(&env, &device, "1.0.0").await?;

    // A truncated CBOR message.
    wire.publish(
        &group_topic,
        genuine_v1[..genuine_v1.len() / 2].to_vec(),
        false,
    )
    .await?;
    env.api
        .wait_event(&device, "manifest_rejected", "malformed", WAIT)
        .await?;
    still_runs(&env, &device, "1.0.0").await?;

    // A chunk altered on the broker: the device is off while v2 is deployed, and one of
    // v2's retained chunks is replaced before it comes back. The registry puts its own
    // chunk back (counted), and the device installs v2 when it returns. (A chunk that
    // stays bad is refused by the device and fails the install: device-pm's
    // `chunk_that_stays_corrupt_fails_the_install`.)
    fleet.stop().await?;
    env.api.deploy("hello", "2.0.0", &group).await?.ok()?;
    let mut sha = [0u8; 32];
    hex::decode_to_slice(v2["sha256"].as_str().unwrap_or_default(), &mut sha)?;
    let chunk_topic = Topic::Chunk(&sha, 0).render();
    let genuine_chunk = wire.retained(&chunk_topic).await?;
    let mut chunk: wpm_manifests::Chunk = wpm_manifests::decode(&genuine_chunk)?;
    chunk.data[10] ^= 0xff;
    let repaired = || async {
        let h = env.api.get("/v1/health").await?.ok()?;
        anyhow::Ok(h["retained"]["repaired"].as_u64().unwrap_or_default())
    };
    let before = repaired().await?;
    wire.publish(&chunk_topic, wpm_manifests::encode(&chunk), true)
        .await?;
    wait_for("the registry to repair the chunk", WAIT, || async {
        Ok((repaired().await? > before).then_some(()))
    })
    .await?;
    // Queued before the count moved: a moment later the broker holds it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(wire.retained(&chunk_topic).await? == genuine_chunk);
    let fleet = env.api.start_fleet(config.clone()).await?;
    env.api
        .wait_running(std::slice::from_ref(&device), "hello", "2.0.0", WAIT)
        .await?;

    // The v1 manifest replayed: an attempt to roll the device back.
    wire.publish(&group_topic, genuine_v1, false).await?;
    env.api
        .wait_event(&device, "manifest_replayed", "\"accepted\"", WAIT)
        .await?;
    still_runs(&env, &device, "2.0.0").await?;

    fleet.stop().await?;
    env.registry.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_refuses_bad_uploads_and_tokens() -> anyhow::Result<()> {
    let env = Env::start(Backend::EmbeddedSqlite).await?;

    let not_wasm = env
        .api
        .publish("hello", "1.0.0", b"#!/bin/sh\necho not wasm\n".to_vec())
        .await?;
    assert_eq!(not_wasm.status, 400, "{not_wasm:?}");
    assert!(
        not_wasm.body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("WebAssembly"),
        "{not_wasm:?}"
    );

    let intruder = env.api.with_token("not-the-token");
    let refused = intruder
        .publish("hello", "1.0.0", example("hello/v1.wat"))
        .await?;
    assert_eq!(refused.status, 401, "{refused:?}");
    assert!(
        refused.body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("token"),
        "{refused:?}"
    );
    let refused = intruder.deploy("hello", "1.0.0", "any").await?;
    assert_eq!(refused.status, 401);

    // Nothing was stored by the refused calls.
    let listed = env
        .api
        .with_token(env.registry.token())
        .publish("hello", "1.0.0", example("hello/v1.wat"))
        .await?;
    assert_eq!(
        listed.status, 201,
        "the name was taken by a refused upload: {listed:?}"
    );
    env.registry.shutdown().await
}

/// Anyone on an open broker clears a module's manifest, replaces one of its chunks and
/// writes garbage where a group's deployment is retained: the registry puts each back,
/// and a device that joins the group afterwards installs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_state_damaged_on_an_open_broker_is_put_back() -> anyhow::Result<()> {
    let env = Env::start(Backend::MosquittoPostgres).await?;
    let group = unique("heal");
    let [v1, _] = env.api.publish_hello().await?;
    env.api.deploy("hello", "1.0.0", &group).await?.ok()?;
    let mut sha = [0u8; 32];
    hex::decode_to_slice(v1["sha256"].as_str().unwrap_or_default(), &mut sha)?;

    let repaired = || async {
        let h = env.api.get("/v1/health").await?.ok()?;
        anyhow::Ok(h["retained"]["repaired"].as_u64().unwrap_or_default())
    };
    let before = repaired().await?;
    let mut anyone = Mqtt::connect(&env.mqtt_url).await?;
    let damage = [
        (Topic::ModuleManifest(&sha).render(), Vec::new()),
        (Topic::Chunk(&sha, 0).render(), b"garbage".to_vec()),
        (
            Topic::Deployment(&Target::Group(group.clone())).render(),
            b"garbage".to_vec(),
        ),
    ];
    for (topic, payload) in &damage {
        anyone.publish(topic, payload.clone(), true).await?;
    }
    // The module's chunks and manifest are put back together: two repairs at least.
    wait_for(
        "the registry to repair the module and the deployment",
        WAIT,
        || async { Ok((repaired().await? >= before + 2).then_some(())) },
    )
    .await?;

    let fleet = env.api.start_fleet(env.fleet_config(1, &group)).await?;
    env.api
        .wait_running(fleet.device_ids(), "hello", "1.0.0", WAIT)
        .await?;
    fleet.stop().await?;
    env.registry.shutdown().await
}
