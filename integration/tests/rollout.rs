//! Staged rollouts end to end: stages advance as devices confirm, pause and resume, an
//! operator's rollback of a completed rollout, and a bad version halted at the canary
//! and rolled back automatically. On SQLite + embedded broker and PostgreSQL + Mosquitto.

use serde_json::{json, Value};
use std::time::Duration;
use wpm_integration::{device_runs, unique, Backend, Env};

const CONVERGE: Duration = Duration::from_secs(90);

fn devices_by_stage(r: &Value) -> Vec<(String, i64, String)> {
    r["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap().to_string(),
                d["stage"].as_i64().unwrap(),
                d["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn staged_rollouts(backend: Backend) -> anyhow::Result<()> {
    // Only this registry writes the embedded broker's topics; the machine's Mosquitto is
    // shared with tests that damage retained state on purpose.
    let alone = matches!(backend, Backend::EmbeddedSqlite);
    let env = Env::start(backend).await?;
    let group = unique("ro");
    let (fleet, devices) = env.hello_fleet(4, &group, CONVERGE).await?;

    // 25 % (one device), 50 % (one more), then the group manifest for the rest.
    let body = json!({"module": "hello", "version": "2.0.0", "group": group,
                      "stages": [25, 50, 100], "max_failure_pct": 0, "stage_timeout_s": 60});
    let r = env.api.post("/v1/rollouts", body.clone()).await?.ok()?;
    let id = r["id"].as_i64().unwrap();
    assert_eq!(r["previous_version"], "1.0.0");
    // A second rollout of the same module to the same group is refused while it runs.
    assert_eq!(env.api.post("/v1/rollouts", body).await?.status, 409);

    // Paused right away: at most the canary stage may have started.
    env.api
        .post(&format!("/v1/rollouts/{id}/pause"), json!({}))
        .await?
        .ok()?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = env.api.get(&format!("/v1/rollouts/{id}")).await?.ok()?;
    assert_eq!(r["state"], "paused");
    assert!(r["stage"].as_i64().unwrap() <= 1, "{r}");
    assert!(r["counts"]["assigned"].as_i64().unwrap() <= 1, "{r}");
    let status = env.api.fleet_status().await?;
    let on_v2 = devices
        .iter()
        .filter(|d| device_runs(&status, d, "hello", "2.0.0"))
        .count();
    assert!(on_v2 <= 1, "a paused canary stage reached {on_v2} devices");
    assert_eq!(
        env.api
            .post(&format!("/v1/rollouts/{id}/pause"), json!({}))
            .await?
            .status,
        409
    );
    env.api
        .post(&format!("/v1/rollouts/{id}/resume"), json!({}))
        .await?
        .ok()?;

    let r = env.api.wait_rollout(id, "completed", CONVERGE).await?;
    let stages = devices_by_stage(&r);
    assert_eq!(stages.len(), 4, "{r}");
    let per_stage = |s| stages.iter().filter(|d| d.1 == s).count();
    assert_eq!((per_stage(1), per_stage(2), per_stage(3)), (1, 1, 2), "{r}");
    assert!(stages.iter().all(|d| d.2 == "succeeded"), "{r}");
    assert!(r["group_sequence"].as_i64().is_some(), "{r}");
    env.api
        .wait_running(&devices, "hello", "2.0.0", CONVERGE)
        .await?;

    // The operator rolls the completed rollout back: the group returns to 1.0.0.
    env.api
        .post(&format!("/v1/rollouts/{id}/rollback"), json!({}))
        .await?
        .ok()?;
    env.api.wait_rollout(id, "rolled_back", CONVERGE).await?;
    env.api
        .wait_running(&devices, "hello", "1.0.0", CONVERGE)
        .await?;

    // A version that traps: the canary fails its health check, the rollout halts
    // there and the canary gets a rollback manifest; no other device sees 3.0.0.
    let bad = env
        .api
        .create_rollout("hello", "3.0.0", &group, &[25, 100], 60)
        .await?;
    let r = env.api.wait_rollout(bad, "rolled_back", CONVERGE).await?;
    assert!(
        r["reason"].as_str().unwrap_or_default().contains("halted"),
        "{r}"
    );
    let stages = devices_by_stage(&r);
    assert_eq!(stages.len(), 1, "only the canary was updated: {r}");
    let canary = &stages[0].0;
    assert!(
        r["devices"][0]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("health check"),
        "{r}"
    );
    // The rollback manifest is the canary's newest, carries 1.0.0, and it accepts it.
    let deployments = env.api.get("/v1/deployments").await?.ok()?;
    let newest = deployments
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["target"]["kind"] == "device" && d["target"]["name"] == canary.as_str())
        .unwrap()
        .clone();
    assert_eq!(newest["modules"][0]["version"], "1.0.0", "{newest}");
    let seq = newest["sequence"].as_i64().unwrap();
    wpm_integration::wait_for("the canary to accept the rollback", CONVERGE, || async {
        let status = env.api.fleet_status().await?;
        let d = status["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == canary.as_str())
            .cloned()
            .unwrap_or_default();
        Ok((d["sequence"].as_i64() == Some(seq)).then_some(()))
    })
    .await?;
    env.api
        .wait_running(&devices, "hello", "1.0.0", CONVERGE)
        .await?;
    for d in devices.iter().filter(|d| *d != canary) {
        let events = env.api.events(d).await?;
        assert!(
            !events
                .iter()
                .any(|e| e["detail"].to_string().contains("3.0.0")),
            "{d} saw 3.0.0"
        );
    }

    // The fleet view: summary and filters.
    let s = env
        .api
        .get(&format!("/v1/fleet/status?group={group}&state=online"))
        .await?
        .ok()?;
    assert_eq!(s["summary"]["devices"], 4, "{s}");
    assert_eq!(s["summary"]["online"], 4, "{s}");
    assert_eq!(
        s["summary"]["versions"]["hello@1.0.0"],
        json!({"devices": 4, "running": 4}),
        "{s}"
    );
    let s = env
        .api
        .get(&format!(
            "/v1/fleet/status?group={group}&state=offline&summary_only=true"
        ))
        .await?
        .ok()?;
    assert_eq!(s["summary"]["devices"], 0, "{s}");
    assert!(s.get("devices").is_none(), "{s}");
    assert_eq!(
        env.api.get("/v1/fleet/status?state=sleepy").await?.status,
        400
    );
    // Three rollouts, one rolled back, changed many deployments quickly: the retained
    // guard took none of the registry's own messages for damage.
    if alone {
        let h = env.api.get("/v1/health").await?.ok()?;
        assert_eq!(h["retained"]["repaired"], 0, "{h}");
    }

    fleet.stop().await?;
    env.registry.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollouts_embedded_broker_and_sqlite() -> anyhow::Result<()> {
    staged_rollouts(Backend::EmbeddedSqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollouts_mosquitto_and_postgres() -> anyhow::Result<()> {
    staged_rollouts(Backend::MosquittoPostgres).await
}
