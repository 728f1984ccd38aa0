//! A typed client of the registry's HTTP API, as the tests use it.

use crate::{example, wait_for};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// A typed client of the registry's HTTP API.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// An HTTP answer: status code and JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    /// The body, if the status is a success; the registry's error message otherwise.
    pub fn ok(self) -> Result<Value> {
        if (200..300).contains(&self.status) {
            Ok(self.body)
        } else {
            bail!("HTTP {}: {}", self.status, self.body)
        }
    }
}

impl Api {
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.into(),
            token: token.into(),
        }
    }

    /// A client of an HTTPS registry whose certificate chains to `ca` (PEM).
    pub fn with_ca(base: impl Into<String>, token: impl Into<String>, ca: &Path) -> Result<Self> {
        let tls = wpm_transport::client_config(Some(ca))?;
        Ok(Self {
            http: reqwest::Client::builder()
                .tls_backend_preconfigured((*tls).clone())
                .build()?,
            base: base.into(),
            token: token.into(),
        })
    }

    pub fn with_token(&self, token: &str) -> Self {
        Self {
            token: token.into(),
            ..self.clone()
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Answer> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .context("registry unreachable")?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Answer { status, body })
    }

    pub async fn publish(&self, name: &str, version: &str, wasm: Vec<u8>) -> Result<Answer> {
        self.send(
            self.http
                .put(format!("{}/v1/modules/{name}/{version}", self.base))
                .body(wasm),
        )
        .await
    }

    /// Publishes the example module `hello` as 1.0.0 and 2.0.0 (`examples/hello/`), the
    /// pair most scenarios install and upgrade between; returns the registry's answers.
    pub async fn publish_hello(&self) -> Result<[Value; 2]> {
        let v1 = self
            .publish("hello", "1.0.0", example("hello/v1.wat"))
            .await?
            .ok()?;
        let v2 = self
            .publish("hello", "2.0.0", example("hello/v2.wat"))
            .await?
            .ok()?;
        Ok([v1, v2])
    }

    /// Deploys to a group, or to one device when `device` is true.
    pub async fn deploy(&self, module: &str, version: &str, group: &str) -> Result<Answer> {
        let body = json!({"module": module, "version": version, "group": group});
        self.send(
            self.http
                .post(format!("{}/v1/deployments", self.base))
                .json(&body),
        )
        .await
    }

    pub async fn deploy_to_device(
        &self,
        module: &str,
        version: &str,
        device: &str,
    ) -> Result<Answer> {
        let body = json!({"module": module, "version": version, "device": device});
        self.send(
            self.http
                .post(format!("{}/v1/deployments", self.base))
                .json(&body),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Result<Answer> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Answer> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    /// Registers the devices of a simulated fleet (ids, public keys, groups) as
    /// `wpm device import` does; registering them again is harmless.
    pub async fn register_fleet(&self, config: &wpm_sim::FleetConfig) -> Result<()> {
        let devices: Vec<Value> = config
            .identities()
            .into_iter()
            .map(|(id, key)| json!({"id": id, "public_key": hex::encode(key), "groups": config.groups}))
            .collect();
        self.post("/v1/devices", json!({ "devices": devices }))
            .await?
            .ok()?;
        Ok(())
    }

    /// Registers a simulated fleet, then boots it.
    pub async fn start_fleet(&self, config: wpm_sim::FleetConfig) -> Result<wpm_sim::Fleet> {
        self.register_fleet(&config).await?;
        wpm_sim::Fleet::start(config).await
    }

    /// Starts a rollout of `module@version` to `group` in `stages` (percentages) that
    /// halts on the first failure; returns its id.
    pub async fn create_rollout(
        &self,
        module: &str,
        version: &str,
        group: &str,
        stages: &[u32],
        stage_timeout_s: u64,
    ) -> Result<i64> {
        let body = json!({"module": module, "version": version, "group": group, "stages": stages,
                          "max_failure_pct": 0, "stage_timeout_s": stage_timeout_s});
        let r = self.post("/v1/rollouts", body).await?.ok()?;
        r["id"].as_i64().context("rollout answer without an id")
    }

    /// Waits until rollout `id` has started stage `stage` (0: the first) or a later one.
    pub async fn wait_stage(&self, id: i64, stage: i64, timeout: Duration) -> Result<()> {
        wait_for(&format!("rollout {id} stage {stage}"), timeout, || async {
            let r = self.get(&format!("/v1/rollouts/{id}")).await?.ok()?;
            Ok((r["stage"].as_i64() >= Some(stage)).then_some(()))
        })
        .await
    }

    /// The registry's public signing key, which devices trust.
    pub async fn public_key(&self) -> Result<[u8; 32]> {
        let k = self.get("/v1/keys").await?.ok()?;
        let hex_key = k["public_key"].as_str().context("no public_key")?;
        hex::decode(hex_key)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("public key is not 32 bytes"))
    }

    /// Waits until rollout `id` is in `state`; fails early if it ends in another one.
    pub async fn wait_rollout(&self, id: i64, state: &str, timeout: Duration) -> Result<Value> {
        wait_for(&format!("rollout {id} to be {state}"), timeout, || async {
            let r = self.get(&format!("/v1/rollouts/{id}")).await?.ok()?;
            let now = r["state"].as_str().unwrap_or_default().to_string();
            if now == state {
                return Ok(Some(r));
            }
            if ["completed", "rolled_back"].contains(&now.as_str()) {
                bail!("rollout {id} ended {now}, not {state}: {r}");
            }
            Ok(None)
        })
        .await
    }

    pub async fn fleet_status(&self) -> Result<Value> {
        self.send(self.http.get(format!("{}/v1/fleet/status", self.base)))
            .await?
            .ok()
    }

    pub async fn events(&self, device: &str) -> Result<Vec<Value>> {
        let v = self
            .send(self.http.get(format!(
                "{}/v1/devices/{device}/events?limit=500",
                self.base
            )))
            .await?
            .ok()?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Publishes the example hello 1.0.0, deploys it to `group` and waits until every one
    /// of `devices` runs it: where most scenarios begin.
    pub async fn install_hello(
        &self,
        group: &str,
        devices: &[String],
        timeout: Duration,
    ) -> Result<()> {
        self.publish("hello", "1.0.0", example("hello/v1.wat"))
            .await?
            .ok()?;
        self.deploy("hello", "1.0.0", group).await?.ok()?;
        self.wait_running(devices, "hello", "1.0.0", timeout).await
    }

    /// The version of `module` each of `devices` reports running, once all of them run
    /// `version`.
    pub async fn wait_running(
        &self,
        devices: &[String],
        module: &str,
        version: &str,
        timeout: Duration,
    ) -> Result<()> {
        wait_for(
            &format!("{} devices to run {module}@{version}", devices.len()),
            timeout,
            || async {
                let status = self.fleet_status().await?;
                let running = devices
                    .iter()
                    .all(|d| device_runs(&status, d, module, version));
                Ok(running.then_some(()))
            },
        )
        .await
    }

    /// Waits until `device` has recorded an event of `kind` whose detail mentions `needle`.
    pub async fn wait_event(
        &self,
        device: &str,
        kind: &str,
        needle: &str,
        timeout: Duration,
    ) -> Result<Value> {
        wait_for(
            &format!("a {kind} event mentioning {needle:?} from {device}"),
            timeout,
            || async {
                let events = self.events(device).await?;
                Ok(events
                    .into_iter()
                    .find(|e| e["kind"] == kind && e["detail"].to_string().contains(needle)))
            },
        )
        .await
    }

    /// Waits until the registry's newest trust epoch is `epoch` and no registered,
    /// unrevoked device reports an older one.
    pub async fn wait_trust_epoch(&self, epoch: u64, timeout: Duration) -> Result<()> {
        wait_for(
            &format!("every device to reach trust epoch {epoch}"),
            timeout,
            || async {
                let k = self.get("/v1/keys").await?.ok()?;
                Ok((k["epoch"] == epoch && k["devices_behind"] == 0).then_some(()))
            },
        )
        .await
    }
}

/// Whether the fleet status JSON shows `device` running `module@version`.
pub fn device_runs(status: &Value, device: &str, module: &str, version: &str) -> bool {
    status["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["device"] == device)
        .any(|d| {
            d["modules"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["name"] == module && m["version"] == version && m["state"] == "running")
        })
}
