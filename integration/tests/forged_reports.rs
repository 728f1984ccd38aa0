//! A rollout whose devices are flooded with forged reports neither halts nor completes on
//! them. The attacker is an anonymous client of an open Mosquitto, the broker that
//! trusts nobody's identity: the registry alone must tell the devices' own sealed
//! reports from the rest, as security.md promises for any broker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wpm_integration::{unique, Backend, Env, Mqtt};
use wpm_manifests::{
    DeviceStatus, Event, EventKind, KeyPair, ModuleState, ModuleStatus, Report, ReportBody, Topic,
};

const CONVERGE: Duration = Duration::from_secs(90);

/// Publishes, every 100 ms until cancelled, reports for each of `devices` that a real
/// device would send if `version` ran (or failed): sealed with a key that is not theirs,
/// and unsealed as the pre-authentication format was.
fn flood(
    mut wire: Mqtt,
    devices: Vec<String>,
    group: String,
    version: &'static str,
    failing: bool,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<u64>> {
    tokio::spawn(async move {
        let stranger = KeyPair::from_seed(&[0x66; 32]);
        let mut counter = 1u64 << 60;
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            for d in &devices {
                counter += 1;
                let status = DeviceStatus {
                    device: d.clone(),
                    groups: vec![group.clone()],
                    sequence: u64::MAX / 2,
                    modules: vec![ModuleStatus {
                        name: "hello".into(),
                        version: version.into(),
                        sha256: [0; 32].into(),
                        state: ModuleState::Running,
                        last_error: None,
                    }],
                    slots_used: 1,
                    slots_total: 2,
                    flash_free: 0,
                    ram_free: 0,
                    last_error: None,
                    at_ms: u64::MAX / 2,
                    trust_epoch: None,
                };
                let kind = if failing {
                    EventKind::Trapped {
                        module: "hello".into(),
                        version: version.into(),
                        reason: "forged".into(),
                    }
                } else {
                    EventKind::Installed {
                        module: "hello".into(),
                        version: version.into(),
                    }
                };
                let event = Event {
                    device: d.clone(),
                    at_ms: u64::MAX / 2,
                    kind,
                };
                let sealed = |body| {
                    stranger.seal(&Report {
                        device: d.clone(),
                        counter,
                        body,
                    })
                };
                let forged = [
                    (Topic::Status(d), sealed(ReportBody::Status(status.clone()))),
                    (Topic::Events(d), sealed(ReportBody::Event(event.clone()))),
                    (Topic::Status(d), wpm_manifests::encode(&status)),
                    (Topic::Events(d), wpm_manifests::encode(&event)),
                ];
                for (topic, payload) in forged {
                    wire.publish(&topic.render(), payload, false).await?;
                    sent += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(sent)
    })
}

/// Rolls `version` out to `group` (canary 25 %, then all, no failure allowed) while
/// `devices` are flooded with forgeries about it, until the rollout is in `end`; the
/// forgeries sent.
async fn under_flood(
    env: &Env,
    devices: &[String],
    group: &str,
    version: &'static str,
    failing: bool,
    end: &str,
) -> anyhow::Result<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    let wire = Mqtt::connect(&env.mqtt_url).await?;
    let attack = flood(
        wire,
        devices.to_vec(),
        group.to_string(),
        version,
        failing,
        stop.clone(),
    );
    let id = env
        .api
        .create_rollout("hello", version, group, &[25, 100], 60)
        .await?;
    let r = env.api.wait_rollout(id, end, CONVERGE).await?;
    if end == "rolled_back" {
        assert!(
            r["reason"].as_str().unwrap_or_default().contains("halted"),
            "{r}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let sent = attack.await??;
    assert!(sent > 0);
    Ok(sent)
}

async fn refused(env: &Env) -> anyhow::Result<u64> {
    let h = env.api.get("/v1/health").await?.ok()?;
    Ok(["bad_signature", "not_a_sealed_report"]
        .iter()
        .map(|r| h["ingest"]["refused"][r].as_u64().unwrap_or(0))
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_reports_neither_complete_a_bad_rollout_nor_halt_a_good_one() -> anyhow::Result<()> {
    let env = Env::start(Backend::MosquittoPostgres).await?;
    let group = unique("forged");
    let (fleet, devices) = env.hello_fleet(4, &group, CONVERGE).await?;
    let before = refused(&env).await?;

    // A version that traps, while every device "reports" running it: the real canary's
    // failure halts the rollout anyway.
    let mut sent = under_flood(&env, &devices, &group, "3.0.0", false, "rolled_back").await?;
    env.api
        .wait_running(&devices, "hello", "1.0.0", CONVERGE)
        .await?;
    // A good version, while every device "reports" it trapping: it completes.
    sent += under_flood(&env, &devices, &group, "2.0.0", true, "completed").await?;
    env.api
        .wait_running(&devices, "hello", "2.0.0", CONVERGE)
        .await?;

    // Every forgery was seen and refused, none taken; the fleet view shows none of them.
    let status = env.api.fleet_status().await?;
    for d in &devices {
        let row = status["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["device"] == d.as_str())
            .unwrap();
        assert!(row["sequence"].as_u64().unwrap() < u64::MAX / 4, "{row}");
    }
    wpm_integration::wait_for("every forgery refused", CONVERGE, || async {
        Ok((refused(&env).await? - before >= sent).then_some(()))
    })
    .await?;

    fleet.stop().await?;
    env.registry.shutdown().await
}
