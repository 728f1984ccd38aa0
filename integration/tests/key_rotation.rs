//! Key rotation end to end: the registry rotates its signing key, every simulated device
//! follows the trust chain and installs what the new key signs; once retired, the old
//! key speaks for the registry to no device.
//!
//! On the embedded broker and on a Mosquitto of the test's own: the trust chain is one
//! retained topic per broker, so on the machine's shared Mosquitto every other test's
//! devices would meet this chain.

use serde_json::json;
use std::time::Duration;
use wpm_integration::{example, unique, Backend, Env, Mqtt, OwnMosquitto};
use wpm_manifests::{Deployment, KeyPair, Target, Topic};

const CONVERGE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn rotation_and_retirement_on_the_embedded_broker() -> anyhow::Result<()> {
    rotate_then_retire(Backend::EmbeddedSqlite).await
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_and_retirement_on_mosquitto() -> anyhow::Result<()> {
    let broker = OwnMosquitto::start()?;
    rotate_then_retire(Backend::BrokerSqlite(broker.url())).await
}

async fn rotate_then_retire(backend: Backend) -> anyhow::Result<()> {
    let env = Env::start(backend).await?;
    let group = unique("keys");
    let fleet = env.api.start_fleet(env.fleet_config(3, &group)).await?;
    let devices = fleet.device_ids().to_vec();
    env.api.install_hello(&group, &devices, CONVERGE).await?;
    let old_seed = std::fs::read_to_string(env.data_dir().join("signing.key"))?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(old_seed.trim(), &mut seed)?;
    let old = KeyPair::from_seed(&seed);
    assert_eq!(env.api.public_key().await?, old.public());

    let nothing = env.api.post("/v1/keys/retire", json!({})).await?;
    assert_eq!(nothing.status, 409, "{:?}", nothing.body);
    let rotated = env.api.post("/v1/keys/rotate", json!({})).await?.ok()?;
    assert_eq!(rotated["epoch"], 1);
    let new = env.api.public_key().await?;
    assert_ne!(new, old.public());
    assert_eq!(
        rotated["trusted_keys"],
        json!([hex::encode(old.public()), hex::encode(new)])
    );
    env.api.wait_trust_epoch(1, CONVERGE).await?;

    // What the new key signs installs on devices provisioned with the old one.
    env.api
        .publish("hello", "2.0.0", example("hello/v2.wat"))
        .await?
        .ok()?;
    env.api.deploy("hello", "2.0.0", &group).await?.ok()?;
    env.api
        .wait_running(&devices, "hello", "2.0.0", CONVERGE)
        .await?;

    // A registered device that has not said it follows holds the retirement back, until
    // it is revoked (or the retirement is forced).
    let silent = unique("silent");
    let key = KeyPair::from_seed(&[0x51; 32]).public();
    let register = json!({"devices": [{"id": silent, "public_key": hex::encode(key)}]});
    env.api.post("/v1/devices", register).await?.ok()?;
    let held = env.api.post("/v1/keys/retire", json!({})).await?;
    assert_eq!(held.status, 409, "{:?}", held.body);
    assert!(
        held.body["error"].as_str().is_some_and(
            |e| e.starts_with("1 registered device(s) have not reported trust epoch 1")
        ),
        "{:?}",
        held.body
    );
    (env.api
        .post(&format!("/v1/devices/{silent}/revoke"), json!({}))
        .await?)
        .ok()?;

    let retired = env.api.post("/v1/keys/retire", json!({})).await?.ok()?;
    assert_eq!(retired["epoch"], 2);
    assert_eq!(retired["trusted_keys"], json!([hex::encode(new)]));
    env.api.wait_trust_epoch(2, CONVERGE).await?;

    // Whoever kept the old key cannot make a device run anything.
    let forged = Deployment {
        target: Target::Group(group.clone()),
        sequence: 1_000_000,
        issued_at: 1_790_000_000,
        expires_at: 4_000_000_000,
        modules: vec![],
        health: None,
    };
    let mut mqtt = Mqtt::connect_as(&env.mqtt_url, env.registry.broker_login()).await?;
    mqtt.publish(
        &Topic::Deployment(&forged.target).render(),
        old.seal(&forged),
        false,
    )
    .await?;
    for d in &devices {
        env.api
            .wait_event(d, "manifest_rejected", "untrusted key", CONVERGE)
            .await?;
    }
    env.api
        .wait_running(&devices, "hello", "2.0.0", CONVERGE)
        .await?;
    fleet.stop().await?;
    Ok(())
}
