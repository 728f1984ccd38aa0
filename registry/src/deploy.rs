//! Deploying: record a new deployment for a target, sign it, publish it. Also renews
//! deployments before they expire, so a device that joins late (or reboots without its
//! accepted sequence) never meets only an expired manifest (the "no freeze" rule makes
//! it refuse those).

use crate::db::{Db, DeploymentRow, DesiredChange, ModuleRow};
use crate::keys;
use crate::publish::Publisher;
use crate::signer::Signer;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex};
use wpm_manifests::{Deployment, HealthWindow, Target};

/// What deploying needs.
pub struct Deployer {
    pub db: Db,
    pub signer: Arc<Signer>,
    pub publisher: Arc<Publisher>,
    pub manifest_ttl: Duration,
    /// Deployments are recorded and published one at a time, so the retained deployment
    /// of a target is always the newest: two racing deploys cannot publish out of order.
    pub lock: Mutex<()>,
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Deployer {
    /// Issues a new deployment for `target` with its desired set changed as `change`
    /// says, asking `health` of new versions. Publishes the modules' chunks and
    /// manifests, then the sealed deployment.
    pub async fn deploy(
        &self,
        target: &Target,
        change: &DesiredChange,
        health: Option<HealthWindow>,
    ) -> anyhow::Result<(Deployment, DeploymentRow)> {
        let _guard = self.lock.lock().await;
        let (issued_at, expires_at) = self.validity();
        let mut built = None;
        let (row, desired) = self
            .db
            .create_deployment(target, change, health, |sequence, desired| {
                let d = Deployment {
                    target: target.clone(),
                    sequence,
                    issued_at,
                    expires_at,
                    modules: desired.iter().map(ModuleRow::module_ref).collect(),
                    health,
                };
                let sealed = keys::seal_deployment(&self.signer.key(), &d);
                built = Some(d);
                (sealed, (expires_at as i64).saturating_mul(1000))
            })
            .await?;
        let deployment = built.expect("create_deployment calls seal");
        self.publish_modules(&desired).await?;
        // Another replica may have deployed to this target meanwhile; never let an older
        // manifest overwrite a newer retained one.
        if self.db.latest_sequence(target).await? == Some(row.sequence) {
            self.publisher.publish_deployment(&row).await?;
        }
        Ok((deployment, row))
    }

    /// Gives each of `devices` its own deployment of exactly `set` (a rollout stage, a
    /// rollback): recorded set-based in one transaction, then published.
    pub async fn deploy_devices(
        &self,
        devices: &[String],
        set: &[ModuleRow],
        health: Option<HealthWindow>,
    ) -> anyhow::Result<Vec<DeploymentRow>> {
        let _guard = self.lock.lock().await;
        let (issued_at, expires_at) = self.validity();
        let modules: Vec<_> = set.iter().map(ModuleRow::module_ref).collect();
        let rows = self
            .db
            .create_device_deployments(devices, set, health, |device, sequence| {
                let d = Deployment {
                    target: Target::Device(device.to_string()),
                    sequence,
                    issued_at,
                    expires_at,
                    modules: modules.clone(),
                    health,
                };
                (
                    keys::seal_deployment(&self.signer.key(), &d),
                    (expires_at as i64).saturating_mul(1000),
                )
            })
            .await?;
        self.publish_modules(set).await?;
        for row in &rows {
            self.publisher.publish_deployment(row).await?;
        }
        Ok(rows)
    }

    /// (issued_at, expires_at) of a deployment signed now, unix seconds.
    fn validity(&self) -> (u64, u64) {
        let now = unix_secs();
        (now, now + self.manifest_ttl.as_secs().max(1))
    }

    /// Module bytes go out before the manifest that names them.
    async fn publish_modules(&self, modules: &[ModuleRow]) -> anyhow::Result<()> {
        let mut done = HashSet::new();
        for m in modules {
            if !done.insert(m.sha256) || self.publisher.has_published(&m.sha256).await {
                continue;
            }
            let wasm = self.db.module_wasm(&m.name, &m.version).await?;
            self.publisher.publish_module(m, &wasm).await?;
        }
        Ok(())
    }

    /// Publishes every module and newest deployment again, after the broker lost its
    /// retained messages. Under the deploy lock, so a deployment made meanwhile is never
    /// overwritten by the older one read before it.
    pub async fn republish(&self) -> anyhow::Result<()> {
        let _guard = self.lock.lock().await;
        self.publisher.forget_published().await;
        crate::publish::republish_all(&self.db, &self.publisher).await
    }

    /// Renews every target's newest deployment that has less than half its lifetime left.
    pub async fn renew_expiring(&self) -> anyhow::Result<usize> {
        let now_ms = crate::db::now_ms();
        let half = i64::try_from(self.manifest_ttl.as_millis() / 2).unwrap_or(i64::MAX);
        self.renew(|d| d.expires_at - now_ms < half).await
    }

    /// Issues every target's newest deployment again, sealed by the current key (after
    /// a key rotation).
    pub async fn reissue_all(&self) -> anyhow::Result<usize> {
        self.renew(|_| true).await
    }

    /// Issues again, unchanged, the newest deployments `due` picks.
    async fn renew(&self, due: impl Fn(&DeploymentRow) -> bool) -> anyhow::Result<usize> {
        let mut renewed = 0;
        for d in self.db.latest_deployments().await? {
            if due(&d) {
                let (new, _) = self
                    .deploy(&d.target, &DesiredChange::Keep, d.health)
                    .await?;
                tracing::info!(
                    target = ?d.target, old = d.sequence, new = new.sequence,
                    "renewed an expiring deployment"
                );
                renewed += 1;
            }
        }
        Ok(renewed)
    }
}

/// Republishes everything at every reconnect of the publisher after the first (the
/// first is covered by the start-up republish), until `stop`.
pub async fn republish_on_reconnect(deployer: Arc<Deployer>, mut stop: watch::Receiver<bool>) {
    let mut connection = deployer.publisher.connection();
    // The start-up connection is already marked seen.
    connection.borrow_and_update();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            changed = connection.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
        if !*connection.borrow_and_update() {
            continue;
        }
        tracing::info!("reconnected to the MQTT broker; republishing retained state");
        if let Err(e) = deployer.republish().await {
            tracing::error!(
                error = format!("{e:#}"),
                "republishing after a reconnect failed"
            );
        }
    }
}

/// Checks for expiring deployments at a quarter of the TTL (at most hourly) until `stop`.
pub async fn renew_loop(deployer: Arc<Deployer>, mut stop: watch::Receiver<bool>) {
    let period =
        (deployer.manifest_ttl / 4).clamp(Duration::from_millis(500), Duration::from_secs(3600));
    loop {
        if let Err(e) = deployer.renew_expiring().await {
            tracing::error!(error = format!("{e:#}"), "renewing deployments failed");
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(period) => {}
        }
    }
}
