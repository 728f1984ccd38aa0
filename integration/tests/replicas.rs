//! Two registry replicas (child processes) on one PostgreSQL and one Mosquitto: status
//! ingest split through a shared subscription with nothing written twice, identical
//! retained publishes, and a rollout that survives the replica driving it being killed
//! (and restarted by its supervisor under the same name, draining what the broker queued
//! for it). A key rotation made by one replica is followed by the other, which also
//! guards what the first one published once it is gone.

use serde_json::json;
use std::time::Duration;
use wpm_integration::{
    example, identity_secret, mosquitto, postgres_database, shared_data_dir, unique, wait_for,
    Mqtt, OwnMosquitto, Replica,
};
use wpm_manifests::Topic;

const CONVERGE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_ingest_and_survive_a_kill() -> anyhow::Result<()> {
    let db = postgres_database().await?;
    // One signing key for both: written before either starts.
    let data = shared_data_dir()?;
    let broker = mosquitto()?;
    let token = unique("token");
    let share = unique("wpm-registry");
    let mut replicas = vec![
        Replica::start(
            data.path(),
            &db,
            &broker,
            &share,
            &token,
            &format!("{share}-a"),
        )?,
        Replica::start(
            data.path(),
            &db,
            &broker,
            &share,
            &token,
            &format!("{share}-b"),
        )?,
    ];
    for r in &replicas {
        r.wait_up().await?;
    }
    let key = replicas[0].api.public_key().await?;

    let group = unique("rep");
    let mut config = wpm_sim::FleetConfig::new(mosquitto()?, vec![key], identity_secret());
    config.devices = 6;
    config.groups = vec![group.clone()];
    config.id_prefix = unique("dev");
    config.tuning.turn_interval_ms = 200;
    let fleet = replicas[0].api.start_fleet(config).await?;
    let devices = fleet.device_ids().to_vec();

    let a = replicas[0].api.clone();
    let b = replicas[1].api.clone();
    a.publish("hello", "1.0.0", example("hello/v1.wat"))
        .await?
        .ok()?;
    b.publish("hello", "2.0.0", example("hello/v2.wat"))
        .await?
        .ok()?;
    let d = b.deploy("hello", "1.0.0", &group).await?.ok()?;
    a.wait_running(&devices, "hello", "1.0.0", CONVERGE).await?;

    // The shared subscription gave each message to one replica: both ingested some,
    // and no event was written twice.
    for r in [&a, &b] {
        let h = r.get("/v1/health").await?.ok()?;
        assert!(h["ingest"]["received"].as_u64().unwrap() > 0, "{h}");
    }
    for dev in &devices {
        let events = a.events(dev).await?;
        let installs = events
            .iter()
            .filter(|e| e["kind"] == "installed" && e["detail"]["version"] == "1.0.0")
            .count();
        assert_eq!(installs, 1, "{dev}: {events:?}");
    }

    // Both replicas republished at start and one deployed: the retained manifest is the
    // newest deployment's sealed bytes, whoever published last.
    let mut mqtt = Mqtt::connect(&mosquitto()?).await?;
    let retained = mqtt
        .retained(&format!("wpm/v1/deploy/group/{group}"))
        .await?;
    let sealed: wpm_manifests::Sealed = wpm_manifests::decode(&retained)?;
    let body: wpm_manifests::Deployment = wpm_manifests::decode(&sealed.body)?;
    assert_eq!(body.sequence, d["sequence"].as_u64().unwrap());

    // A rollout; the replica holding the controller lease is killed after the canary.
    let id = a
        .create_rollout("hello", "2.0.0", &group, &[20, 50, 100], 90)
        .await?;
    a.wait_stage(id, 1, CONVERGE).await?;
    let holder: String = {
        use sqlx::{Connection as _, Row as _};
        let mut c = sqlx::PgConnection::connect(&db).await?;
        sqlx::query("SELECT holder FROM leases WHERE name = 'rollout-controller'")
            .fetch_one(&mut c)
            .await?
            .try_get("holder")?
    };
    let victim = replicas
        .iter()
        .position(|r| holder.ends_with(&format!("-pid{}", r.process.0.id())))
        .unwrap_or_else(|| panic!("lease holder {holder} is neither replica"));
    replicas[victim].process.kill();
    let survivor = replicas.remove(1 - victim);
    // Its supervisor starts it again under its name. Meanwhile the survivor takes the
    // lease; the reports the broker queued for the killed replica's session reach the
    // database when it is back, so none is lost.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let names = [format!("{share}-a"), format!("{share}-b")];
    let restarted = Replica::start(data.path(), &db, &broker, &share, &token, &names[victim])?;
    restarted.wait_up().await?;

    let done = survivor.api.wait_rollout(id, "completed", CONVERGE).await?;
    assert_eq!(done["counts"]["succeeded"], 6, "{done}");
    survivor
        .api
        .wait_running(&devices, "hello", "2.0.0", CONVERGE)
        .await?;
    fleet.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_follows_the_others_rotation_and_guards_its_modules() -> anyhow::Result<()> {
    let db = postgres_database().await?;
    let data = shared_data_dir()?;
    // The trust chain is retained: not on the machine's shared broker.
    let broker = OwnMosquitto::start()?;
    let (token, share) = (unique("token"), unique("wpm-registry"));
    let start = |name: &str| {
        Replica::start(
            data.path(),
            &db,
            &broker.url(),
            &share,
            &token,
            &format!("{share}-{name}"),
        )
    };
    let (mut a, b) = (start("a")?, start("b")?);
    a.wait_up().await?;
    b.wait_up().await?;
    let old = a.api.public_key().await?;
    let group = unique("follow");
    let mut config = wpm_sim::FleetConfig::new(broker.url(), vec![old], identity_secret());
    config.devices = 3;
    config.groups = vec![group.clone()];
    config.id_prefix = unique("dev");
    config.tuning.turn_interval_ms = 200;
    let fleet = a.api.start_fleet(config).await?;
    let devices = fleet.device_ids().to_vec();
    let (a_api, b_api) = (a.api.clone(), b.api.clone());
    a_api.install_hello(&group, &devices, CONVERGE).await?;

    // A rotates; B signs with the new key within a few seconds, without a restart.
    let rotated = a_api.post("/v1/keys/rotate", json!({})).await?.ok()?;
    assert_eq!(rotated["epoch"], 1);
    let new = a_api.public_key().await?;
    assert_ne!(new, old);
    wait_for("replica b to sign with the new key", CONVERGE, || async {
        Ok((b_api.public_key().await? == new).then_some(()))
    })
    .await?;

    // A publishes and deploys v2, then dies. Garbage on v2's manifest: B puts A's bytes
    // back.
    let v2 = a_api
        .publish("hello", "2.0.0", example("hello/v2.wat"))
        .await?
        .ok()?;
    a_api.deploy("hello", "2.0.0", &group).await?.ok()?;
    a_api
        .wait_running(&devices, "hello", "2.0.0", CONVERGE)
        .await?;
    let mut digest = [0u8; 32];
    hex::decode_to_slice(v2["sha256"].as_str().unwrap_or_default(), &mut digest)?;
    let topic = Topic::ModuleManifest(&digest).render();
    let mut mqtt = Mqtt::connect(&broker.url()).await?;
    let published = mqtt.retained(&topic).await?;
    a.process.kill();
    mqtt.publish(&topic, b"garbage".to_vec(), true).await?;
    wait_for(
        "replica b to repair the manifest replica a published",
        CONVERGE,
        || async {
            let mut m = Mqtt::connect(&broker.url()).await?;
            Ok((m.retained(&topic).await? == published).then_some(()))
        },
    )
    .await?;
    let h = b_api.get("/v1/health").await?.ok()?;
    assert!(h["retained"]["repaired"].as_u64() >= Some(1), "{h}");
    // Its supervisor starts A again: the broker kept A's share of the reports for it.
    let a = start("a")?;
    a.wait_up().await?;

    // B retires the old key (not the new one it would have had it kept its own), and
    // what it signs after that installs.
    b_api.wait_trust_epoch(1, CONVERGE).await?;
    let retired = b_api.post("/v1/keys/retire", json!({})).await?.ok()?;
    assert_eq!(retired["epoch"], 2);
    assert_eq!(retired["trusted_keys"], json!([hex::encode(new)]));
    let v3 = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/v2.wat"),
    )?
    .replace("hello 2.0.0 started", "hello 3.0.0 started");
    b_api
        .publish("hello", "3.0.0", wat::parse_str(&v3)?)
        .await?
        .ok()?;
    b_api.deploy("hello", "3.0.0", &group).await?.ok()?;
    b_api
        .wait_running(&devices, "hello", "3.0.0", CONVERGE)
        .await?;
    fleet.stop().await?;
    Ok(())
}
