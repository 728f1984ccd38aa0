//! Deploying: record a new deployment for a target, sign it, publish it. Also renews
//! deployments before they expire, so a device that joins late (or reboots without its
//! accepted sequence) never meets only an expired manifest (the "no freeze" rule makes
//! it refuse those).

use crate::db::{Db, DeploymentRow, ModuleRow};
use crate::keys;
use crate::publish::Publisher;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex};
use wpm_manifests::{Deployment, KeyPair, Target};

/// What deploying needs.
pub struct Deployer {
    pub db: Db,
    pub key: Arc<KeyPair>,
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
    /// Issues a new deployment for `target`: its desired set with `module` set to that
    /// version (`None`: the same set again, renewed). Publishes the modules' chunks and
    /// manifests, then the sealed deployment.
    pub async fn deploy(
        &self,
        target: &Target,
        module: Option<&ModuleRow>,
    ) -> anyhow::Result<(Deployment, DeploymentRow)> {
        let _guard = self.lock.lock().await;
        let now = unix_secs();
        let expires_at = now + self.manifest_ttl.as_secs().max(1);
        let mut built = None;
        let (row, desired) = self
            .db
            .create_deployment(target, module, |sequence, desired| {
                let d = Deployment {
                    target: target.clone(),
                    sequence,
                    issued_at: now,
                    expires_at,
                    modules: desired.iter().map(ModuleRow::module_ref).collect(),
                };
                let sealed = keys::seal_deployment(&self.key, &d);
                built = Some(d);
                (sealed, (expires_at as i64).saturating_mul(1000))
            })
            .await?;
        let deployment = built.expect("create_deployment calls seal");

        // Module bytes before the manifest that names them.
        for m in &desired {
            let wasm = self.db.module_wasm(&m.name, &m.version).await?;
            self.publisher.publish_module(m, &wasm).await?;
        }
        // Another replica may have deployed to this target meanwhile; never let an older
        // manifest overwrite a newer retained one.
        if self.db.latest_sequence(target).await? == Some(row.sequence) {
            self.publisher.publish_deployment(&row).await?;
        }
        Ok((deployment, row))
    }

    /// Renews every target's newest deployment that has less than half its lifetime left.
    pub async fn renew_expiring(&self) -> anyhow::Result<usize> {
        let now_ms = crate::db::now_ms();
        let half = i64::try_from(self.manifest_ttl.as_millis() / 2).unwrap_or(i64::MAX);
        let mut renewed = 0;
        for d in self.db.latest_deployments().await? {
            if d.expires_at - now_ms < half {
                let (new, _) = self.deploy(&d.target, None).await?;
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
