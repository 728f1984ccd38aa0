//! Two registry replicas (child processes) on one PostgreSQL and one Mosquitto: status
//! ingest split through a shared subscription with nothing written twice, identical
//! retained publishes, and a rollout that survives the replica driving it being killed
//! (and restarted by its supervisor under the same name, draining what the broker queued
//! for it).

use std::time::Duration;
use wpm_integration::{
    example, identity_secret, mosquitto, postgres_database, shared_data_dir, unique, Mqtt, Replica,
};

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
