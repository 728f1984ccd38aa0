//! Staged rollouts: a module version goes to a group in stages (say 1 %, 10 %, 100 %),
//! each stage advancing once its devices confirm, the whole rollout halting and rolling
//! back when too many fail. Design: docs/rollouts.md.
//!
//! Every piece of state lives in the database (`rollouts`, `rollout_devices`), and one
//! controller at a time drives it: the replica holding the `rollout-controller` lease.
//! A replica that dies stops renewing its lease; another takes it over when it expires
//! and carries on from the rows.

use crate::db::{now_ms, Db, DesiredChange, ModuleRow};
use crate::deploy::Deployer;
use anyhow::Context as _;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row as _;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use wpm_manifests::Target;

/// How long the controller lease lasts without renewal: how long a killed replica's
/// rollouts wait before another replica takes them over.
pub const LEASE_TTL_MS: i64 = 5_000;
/// How often the controller looks at the rollouts.
pub const TICK: Duration = Duration::from_millis(500);
const LEASE: &str = "rollout-controller";
/// Per-device manifests are issued in runs of this many between lease renewals, so a
/// large stage never outlives the lease.
const RENEW_EVERY: usize = 50;

/// Event kinds that fail a device's update of the rollout's module.
const FAILURE_KINDS: [&str; 4] = [
    "install_failed",
    "rolled_back",
    "trapped",
    "manifest_rejected",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Paused,
    /// Halted (automatically or on request); the controller is reverting the devices.
    RollingBack,
    RolledBack,
    Completed,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::RollingBack => "rolling_back",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Completed => "completed",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "running" => RolloutState::Running,
            "paused" => RolloutState::Paused,
            "rolling_back" => RolloutState::RollingBack,
            "rolled_back" => RolloutState::RolledBack,
            "completed" => RolloutState::Completed,
            other => anyhow::bail!("unknown rollout state {other:?} in the database"),
        })
    }
}

/// What an operator asks for.
#[derive(Clone, Debug)]
pub struct NewRollout {
    pub module: ModuleRow,
    pub group: String,
    /// Cumulative percentages of the group, strictly increasing, ending with 100.
    pub stages: Vec<u8>,
    /// Halt and roll back when more than this share of the devices updated so far failed.
    pub max_failure_pct: u8,
    /// A device that has not confirmed within this time counts as failed.
    pub stage_timeout: Duration,
}

/// Checks a stage list: 1 to 10 cumulative percentages, increasing, ending with 100.
pub fn check_stages(stages: &[u8]) -> Result<(), String> {
    if stages.is_empty() || stages.len() > 10 {
        return Err("give 1 to 10 stages".into());
    }
    if stages.windows(2).any(|w| w[0] >= w[1]) || stages[0] == 0 {
        return Err(format!(
            "stages must be increasing percentages above 0, not {stages:?}"
        ));
    }
    if stages.last() != Some(&100) {
        return Err(format!("the last stage must be 100 (%), not {stages:?}"));
    }
    Ok(())
}

#[derive(Clone, Debug, Serialize)]
pub struct Rollout {
    pub id: i64,
    pub module: String,
    pub version: String,
    pub previous_version: Option<String>,
    pub group: String,
    pub stages: Vec<u8>,
    /// How many stages have been started (0 until the first devices get the manifest).
    pub stage: usize,
    pub state: RolloutState,
    pub max_failure_pct: i64,
    pub stage_timeout_ms: i64,
    /// The group manifest issued by the 100 % stage, if reached.
    pub group_sequence: Option<i64>,
    /// Why it halted or was rolled back.
    pub reason: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Has the manifest; not confirmed yet.
    Updating,
    /// Reports the version running (after its health check).
    Succeeded,
    Failed,
    /// Sent back to the previous version.
    RolledBack,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Updating => "updating",
            DeviceState::Succeeded => "succeeded",
            DeviceState::Failed => "failed",
            DeviceState::RolledBack => "rolled_back",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "updating" => DeviceState::Updating,
            "succeeded" => DeviceState::Succeeded,
            "failed" => DeviceState::Failed,
            "rolled_back" => DeviceState::RolledBack,
            other => anyhow::bail!("unknown rollout device state {other:?} in the database"),
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RolloutDevice {
    pub device: String,
    /// 1-based stage that took the device in.
    pub stage: i64,
    pub state: DeviceState,
    /// Sequence of the manifest that carried the version to it.
    pub sequence: i64,
    pub assigned_at_ms: i64,
    pub updated_at_ms: i64,
    pub detail: Option<String>,
}

/// Devices per state.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub assigned: usize,
    pub updating: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub rolled_back: usize,
}

impl Counts {
    pub fn of(devices: &[RolloutDevice]) -> Counts {
        let mut c = Counts {
            assigned: devices.len(),
            ..Counts::default()
        };
        for d in devices {
            match d.state {
                DeviceState::Updating => c.updating += 1,
                DeviceState::Succeeded => c.succeeded += 1,
                DeviceState::Failed => c.failed += 1,
                DeviceState::RolledBack => c.rolled_back += 1,
            }
        }
        c
    }

    /// Whether the failures so far pass the threshold (a share of the devices assigned).
    pub fn over_threshold(&self, max_failure_pct: i64) -> bool {
        self.failed > 0 && self.failed * 100 > max_failure_pct.max(0) as usize * self.assigned
    }
}

const ROLLOUT_COLUMNS: &str = "id, module_name, version, previous_version, group_name, \
    stages_json, stage, state, max_failure_pct, stage_timeout_ms, group_sequence, reason, \
    created_at, updated_at";

fn rollout_from_row(r: &AnyRow) -> anyhow::Result<Rollout> {
    let stages: String = r.try_get("stages_json")?;
    Ok(Rollout {
        id: r.try_get("id")?,
        module: r.try_get("module_name")?,
        version: r.try_get("version")?,
        previous_version: r.try_get("previous_version")?,
        group: r.try_get("group_name")?,
        stages: serde_json::from_str(&stages).context("stored stages")?,
        stage: r.try_get::<i64, _>("stage")?.try_into()?,
        state: RolloutState::parse(&r.try_get::<String, _>("state")?)?,
        max_failure_pct: r.try_get("max_failure_pct")?,
        stage_timeout_ms: r.try_get("stage_timeout_ms")?,
        group_sequence: r.try_get("group_sequence")?,
        reason: r.try_get("reason")?,
        created_at_ms: r.try_get("created_at")?,
        updated_at_ms: r.try_get("updated_at")?,
    })
}

impl Db {
    /// Records a new rollout (state running, no stage started yet). Fails if a rollout of
    /// the same module to the same group is still running or paused.
    pub async fn create_rollout(
        &self,
        new: &NewRollout,
        previous_version: Option<&str>,
    ) -> anyhow::Result<Result<Rollout, String>> {
        let mut tx = self.pool.begin().await?;
        // The counter row lock serialises concurrent creations (also across replicas on
        // PostgreSQL), so the check below cannot race with another insert.
        let id: i64 =
            sqlx::query("UPDATE counters SET value = value + 1 WHERE name = $1 RETURNING value")
                .bind("rollout_id")
                .fetch_one(&mut *tx)
                .await?
                .try_get("value")?;
        let busy: Option<i64> = sqlx::query(
            "SELECT MIN(id) AS id FROM rollouts WHERE group_name = $1 AND module_name = $2 \
             AND state IN ('running', 'paused', 'rolling_back')",
        )
        .bind(&new.group)
        .bind(&new.module.name)
        .fetch_one(&mut *tx)
        .await?
        .try_get("id")?;
        if let Some(other) = busy {
            return Ok(Err(format!(
                "rollout {other} of {} to group {} is still active; pause it, roll it back or wait",
                new.module.name, new.group
            )));
        }
        let now = now_ms();
        sqlx::query(
            "INSERT INTO rollouts (id, module_name, version, previous_version, group_name, \
             stages_json, stage, state, max_failure_pct, stage_timeout_ms, group_sequence, \
             reason, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 0, 'running', $7, $8, NULL, NULL, $9, $10)",
        )
        .bind(id)
        .bind(&new.module.name)
        .bind(&new.module.version)
        .bind(previous_version)
        .bind(&new.group)
        .bind(serde_json::to_string(&new.stages)?)
        .bind(i64::from(new.max_failure_pct))
        .bind(i64::try_from(new.stage_timeout.as_millis())?)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(self.rollout(id).await?.context("rollout vanished")?))
    }

    pub async fn rollout(&self, id: i64) -> anyhow::Result<Option<Rollout>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rollout_from_row).transpose()
    }

    /// Rollouts, newest first; only those the controller must act on if `active`.
    pub async fn rollouts(&self, active: bool) -> anyhow::Result<Vec<Rollout>> {
        let filter = if active {
            "WHERE state IN ('running', 'rolling_back')"
        } else {
            ""
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts {filter} ORDER BY id DESC"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rollout_from_row).collect()
    }

    pub async fn rollout_devices(&self, id: i64) -> anyhow::Result<Vec<RolloutDevice>> {
        let rows = sqlx::query(
            "SELECT device, stage, state, sequence, assigned_at, updated_at, detail \
             FROM rollout_devices WHERE rollout_id = $1 ORDER BY device",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RolloutDevice {
                    device: r.try_get("device")?,
                    stage: r.try_get("stage")?,
                    state: DeviceState::parse(&r.try_get::<String, _>("state")?)?,
                    sequence: r.try_get("sequence")?,
                    assigned_at_ms: r.try_get("assigned_at")?,
                    updated_at_ms: r.try_get("updated_at")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    /// Moves a rollout from one of `from` to `to`; false if it was in none of them.
    pub async fn set_rollout_state(
        &self,
        id: i64,
        from: &[RolloutState],
        to: RolloutState,
        reason: Option<&str>,
    ) -> anyhow::Result<bool> {
        let from = from
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE rollouts SET state = $1, reason = COALESCE($2, reason), updated_at = $3 \
             WHERE id = $4 AND state IN ({from})"
        )))
        .bind(to.as_str())
        .bind(reason)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn set_rollout_stage(
        &self,
        id: i64,
        stage: usize,
        group_sequence: Option<i64>,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE rollouts SET stage = $1, group_sequence = COALESCE($2, group_sequence), \
             updated_at = $3 WHERE id = $4",
        )
        .bind(i64::try_from(stage)?)
        .bind(group_sequence)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn assign_device(
        &self,
        id: i64,
        device: &str,
        stage: usize,
        sequence: i64,
    ) -> anyhow::Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO rollout_devices (rollout_id, device, stage, state, sequence, \
             assigned_at, updated_at) VALUES ($1, $2, $3, 'updating', $4, $5, $6) \
             ON CONFLICT (rollout_id, device) DO NOTHING",
        )
        .bind(id)
        .bind(device)
        .bind(i64::try_from(stage)?)
        .bind(sequence)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn set_device_states(
        &self,
        id: i64,
        changes: &[(String, DeviceState, Option<String>)],
    ) -> anyhow::Result<()> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        for (device, state, detail) in changes {
            sqlx::query(
                "UPDATE rollout_devices SET state = $1, detail = COALESCE($2, detail), \
                 updated_at = $3 WHERE rollout_id = $4 AND device = $5",
            )
            .bind(state.as_str())
            .bind(detail.as_deref())
            .bind(now)
            .bind(id)
            .bind(device)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Members of a group, by the groups their status records report, sorted by id.
    pub async fn group_members(&self, group: &str) -> anyhow::Result<Vec<String>> {
        let rows = sqlx::query("SELECT id, groups_json FROM devices ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::new();
        for r in &rows {
            let groups: Vec<String> =
                serde_json::from_str(&r.try_get::<String, _>("groups_json")?).unwrap_or_default();
            if groups.iter().any(|g| g == group) {
                out.push(r.try_get("id")?);
            }
        }
        Ok(out)
    }

    /// (version, state) of `module` on every device that reports it.
    async fn module_states(
        &self,
        module: &str,
    ) -> anyhow::Result<HashMap<String, Vec<(String, String)>>> {
        let rows = sqlx::query("SELECT device, version, state FROM device_modules WHERE name = $1")
            .bind(module)
            .fetch_all(&self.pool)
            .await?;
        let mut out: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for r in &rows {
            out.entry(r.try_get("device")?)
                .or_default()
                .push((r.try_get("version")?, r.try_get("state")?));
        }
        Ok(out)
    }

    /// Failure events received since `since_ms`: (device, kind, detail, received_at).
    async fn failure_events(
        &self,
        since_ms: i64,
    ) -> anyhow::Result<Vec<(String, String, serde_json::Value, i64)>> {
        let kinds = FAILURE_KINDS
            .iter()
            .map(|k| format!("'{k}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT device, kind, detail, received_at FROM events \
             WHERE received_at >= $1 AND kind IN ({kinds})"
        )))
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let detail: String = r.try_get("detail")?;
                Ok((
                    r.try_get("device")?,
                    r.try_get("kind")?,
                    serde_json::from_str(&detail).unwrap_or_default(),
                    r.try_get("received_at")?,
                ))
            })
            .collect()
    }

    /// Takes or renews a lease for `ttl_ms`; true if `holder` holds it now. One UPDATE
    /// that only matches a free, expired or own lease: atomic on SQLite and PostgreSQL.
    pub async fn take_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> anyhow::Result<bool> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE leases SET holder = $1, expires_at = $2 \
             WHERE name = $3 AND (holder = $4 OR expires_at < $5)",
        )
        .bind(holder)
        .bind(now + ttl_ms)
        .bind(name)
        .bind(holder)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Stops renewing and republishing the per-device deployments a rollout issued.
    async fn retire_device_deployments(&self, devices: &[RolloutDevice]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        for d in devices {
            sqlx::query(
                "UPDATE deployments SET retired = 1 \
                 WHERE target_kind = 'device' AND target_name = $1 AND sequence <= $2",
            )
            .bind(&d.device)
            .bind(d.sequence)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// What a device's reports say about its update to `module@version`, if anything yet.
fn judge(
    r: &Rollout,
    d: &RolloutDevice,
    reported: Option<&Vec<(String, String)>>,
    failures: &[&(String, String, serde_json::Value, i64)],
    now: i64,
) -> Option<(DeviceState, Option<String>)> {
    for (_, kind, detail, received_at) in failures {
        if *received_at < d.assigned_at_ms {
            continue;
        }
        let about_us = detail["module"] == r.module.as_str()
            && (detail["version"] == r.version.as_str()
                || detail["from_version"] == r.version.as_str());
        // A replayed older manifest (a retained one seen again) says nothing about ours.
        let rejected_ours = kind == "manifest_rejected"
            && !detail["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("replayed manifest");
        if about_us || rejected_ours {
            let reason = detail["reason"].as_str().unwrap_or_default();
            return Some((DeviceState::Failed, Some(format!("{kind}: {reason}"))));
        }
    }
    let running = reported
        .into_iter()
        .flatten()
        .any(|(v, s)| *v == r.version && s == "running");
    if running {
        return Some((DeviceState::Succeeded, None));
    }
    if now - d.assigned_at_ms > r.stage_timeout_ms {
        return Some((
            DeviceState::Failed,
            Some(format!(
                "not running {}@{} after {} s",
                r.module,
                r.version,
                r.stage_timeout_ms / 1000
            )),
        ));
    }
    None
}

/// How many devices of `members` a stage of `pct` % covers (at least one).
pub fn stage_size(members: usize, pct: u8) -> usize {
    (members * usize::from(pct))
        .div_ceil(100)
        .max(1)
        .min(members)
}

/// Drives the rollouts. Only the lease holder acts.
pub struct Controller {
    pub deployer: Arc<Deployer>,
    /// This replica's lease holder name.
    pub holder: String,
}

impl Controller {
    fn db(&self) -> &Db {
        &self.deployer.db
    }

    async fn hold_lease(&self) -> anyhow::Result<bool> {
        self.db()
            .take_lease(LEASE, &self.holder, LEASE_TTL_MS)
            .await
    }

    /// One pass over the active rollouts, if this replica holds the lease.
    pub async fn tick(&self) -> anyhow::Result<()> {
        if !self.hold_lease().await? {
            return Ok(());
        }
        for r in self.db().rollouts(true).await? {
            let result = match r.state {
                RolloutState::Running => self.advance(&r).await,
                RolloutState::RollingBack => self.roll_back(&r).await,
                _ => Ok(()),
            };
            result.with_context(|| format!("rollout {}", r.id))?;
        }
        Ok(())
    }

    /// Judges the updating devices, then halts, waits, starts the next stage or
    /// completes.
    async fn advance(&self, r: &Rollout) -> anyhow::Result<()> {
        let devices = self.db().rollout_devices(r.id).await?;
        let updating: Vec<&RolloutDevice> = devices
            .iter()
            .filter(|d| d.state == DeviceState::Updating)
            .collect();
        let mut counts = Counts::of(&devices);
        if !updating.is_empty() {
            let since = updating.iter().map(|d| d.assigned_at_ms).min().unwrap_or(0);
            let reported = self.db().module_states(&r.module).await?;
            let events = self.db().failure_events(since).await?;
            let mut by_device: HashMap<&str, Vec<_>> = HashMap::new();
            for e in &events {
                by_device.entry(e.0.as_str()).or_default().push(e);
            }
            let now = now_ms();
            let mut changes = Vec::new();
            for d in updating {
                let failures = by_device.get(d.device.as_str()).map_or(&[][..], |v| v);
                if let Some((state, detail)) = judge(r, d, reported.get(&d.device), failures, now) {
                    counts.updating -= 1;
                    match state {
                        DeviceState::Succeeded => counts.succeeded += 1,
                        _ => counts.failed += 1,
                    }
                    changes.push((d.device.clone(), state, detail));
                }
            }
            self.db().set_device_states(r.id, &changes).await?;
        }
        if counts.over_threshold(r.max_failure_pct) {
            let reason = format!(
                "halted: {} of {} devices failed (threshold {} %)",
                counts.failed, counts.assigned, r.max_failure_pct
            );
            tracing::warn!(rollout = r.id, %reason, "rolling back");
            self.db()
                .set_rollout_state(
                    r.id,
                    &[RolloutState::Running],
                    RolloutState::RollingBack,
                    Some(&reason),
                )
                .await?;
            return Ok(());
        }
        if counts.updating > 0 {
            return Ok(());
        }
        if r.stage >= r.stages.len() {
            self.db().retire_device_deployments(&devices).await?;
            self.db()
                .set_rollout_state(
                    r.id,
                    &[RolloutState::Running],
                    RolloutState::Completed,
                    None,
                )
                .await?;
            tracing::info!(rollout = r.id, "rollout completed");
            return Ok(());
        }
        self.start_stage(r, &devices).await
    }

    /// Gives the next stage's devices the new version: per-device manifests, or the
    /// group manifest for the 100 % stage.
    async fn start_stage(&self, r: &Rollout, devices: &[RolloutDevice]) -> anyhow::Result<()> {
        let stage = r.stage + 1;
        let pct = r.stages[r.stage];
        let module = self
            .db()
            .module(&r.module, &r.version)
            .await?
            .context("the rollout's module was deleted")?;
        let members = self.db().group_members(&r.group).await?;
        let assigned: std::collections::HashSet<&str> =
            devices.iter().map(|d| d.device.as_str()).collect();
        let group = Target::Group(r.group.clone());
        if pct == 100 {
            // Everyone left, and devices that join the group later, through one manifest.
            let (d, _) = self
                .deployer
                .deploy(&group, &DesiredChange::Set(module))
                .await?;
            let seq = i64::try_from(d.sequence)?;
            for m in members.iter().filter(|m| !assigned.contains(m.as_str())) {
                self.db().assign_device(r.id, m, stage, seq).await?;
            }
            self.db().set_rollout_stage(r.id, stage, Some(seq)).await?;
        } else {
            let mut set = self.db().desired_set(&group).await?;
            set.retain(|m| m.name != module.name);
            set.push(module);
            let fresh = members
                .iter()
                .take(stage_size(members.len(), pct))
                .filter(|m| !assigned.contains(m.as_str()));
            for (i, m) in fresh.enumerate() {
                if i % RENEW_EVERY == RENEW_EVERY - 1 && !self.hold_lease().await? {
                    anyhow::bail!("lost the controller lease during stage {stage}");
                }
                let (d, _) = self
                    .deployer
                    .deploy(
                        &Target::Device(m.clone()),
                        &DesiredChange::Replace(set.clone()),
                    )
                    .await?;
                self.db()
                    .assign_device(r.id, m, stage, i64::try_from(d.sequence)?)
                    .await?;
            }
            self.db().set_rollout_stage(r.id, stage, None).await?;
        }
        tracing::info!(rollout = r.id, stage, pct, "rollout stage started");
        Ok(())
    }

    /// Sends the devices already given the new version back to the previous one, with
    /// new manifests (new sequences: devices never accept an older one).
    async fn roll_back(&self, r: &Rollout) -> anyhow::Result<()> {
        let devices = self.db().rollout_devices(r.id).await?;
        let group = Target::Group(r.group.clone());
        let mut set = self.db().desired_set(&group).await?;
        if r.group_sequence.is_some() {
            // The group manifest carried the new version: revert the group's set.
            set.retain(|m| m.name != r.module);
            if let Some(prev) = &r.previous_version {
                set.push(
                    self.db()
                        .module(&r.module, prev)
                        .await?
                        .context("the previous version was deleted")?,
                );
            }
            self.deployer
                .deploy(&group, &DesiredChange::Replace(set))
                .await?;
            let changes: Vec<_> = devices
                .iter()
                .filter(|d| d.state != DeviceState::RolledBack)
                .map(|d| (d.device.clone(), DeviceState::RolledBack, None))
                .collect();
            self.db().set_device_states(r.id, &changes).await?;
        } else {
            // The group's set still holds the previous version: that is each device's.
            for (i, d) in devices
                .iter()
                .filter(|d| d.state != DeviceState::RolledBack)
                .enumerate()
            {
                if i % RENEW_EVERY == RENEW_EVERY - 1 && !self.hold_lease().await? {
                    anyhow::bail!("lost the controller lease during a rollback");
                }
                self.deployer
                    .deploy(
                        &Target::Device(d.device.clone()),
                        &DesiredChange::Replace(set.clone()),
                    )
                    .await?;
                self.db()
                    .set_device_states(r.id, &[(d.device.clone(), DeviceState::RolledBack, None)])
                    .await?;
            }
        }
        // Re-read: the per-device rollback manifests are retired too.
        self.db()
            .retire_device_deployments(&self.db().rollout_devices(r.id).await?)
            .await?;
        self.db()
            .set_rollout_state(
                r.id,
                &[RolloutState::RollingBack],
                RolloutState::RolledBack,
                None,
            )
            .await?;
        tracing::info!(
            rollout = r.id,
            devices = devices.len(),
            "rollout rolled back"
        );
        Ok(())
    }
}

/// Runs the controller every [`TICK`] until `stop`.
pub async fn controller_loop(ctl: Arc<Controller>, mut stop: watch::Receiver<bool>) {
    loop {
        if let Err(e) = ctl.tick().await {
            tracing::error!(error = format!("{e:#}"), "rollout controller");
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_checked_and_sized() {
        assert!(check_stages(&[1, 10, 100]).is_ok());
        assert!(check_stages(&[100]).is_ok());
        assert!(check_stages(&[10, 10, 100]).is_err());
        assert!(check_stages(&[1, 50]).is_err());
        assert!(check_stages(&[0, 100]).is_err());
        assert!(check_stages(&[]).is_err());
        assert_eq!(stage_size(1000, 1), 10);
        assert_eq!(stage_size(3, 1), 1);
        assert_eq!(stage_size(3, 10), 1);
        assert_eq!(stage_size(3, 50), 2);
        assert_eq!(stage_size(0, 10), 0);
    }

    #[test]
    fn threshold() {
        let c = |assigned, failed| Counts {
            assigned,
            failed,
            ..Counts::default()
        };
        assert!(!c(10, 1).over_threshold(10));
        assert!(c(10, 2).over_threshold(10));
        assert!(c(1, 1).over_threshold(50));
        assert!(!c(1, 0).over_threshold(0));
    }

    fn rollout() -> Rollout {
        Rollout {
            id: 1,
            module: "hello".into(),
            version: "2.0.0".into(),
            previous_version: Some("1.0.0".into()),
            group: "g".into(),
            stages: vec![1, 100],
            stage: 1,
            state: RolloutState::Running,
            max_failure_pct: 10,
            stage_timeout_ms: 60_000,
            group_sequence: None,
            reason: None,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn device() -> RolloutDevice {
        RolloutDevice {
            device: "d".into(),
            stage: 1,
            state: DeviceState::Updating,
            sequence: 5,
            assigned_at_ms: 1_000,
            updated_at_ms: 1_000,
            detail: None,
        }
    }

    #[test]
    fn judges_devices_by_their_reports() {
        let (r, d) = (rollout(), device());
        let old_running = vec![("1.0.0".to_string(), "running".to_string())];
        assert_eq!(judge(&r, &d, Some(&old_running), &[], 2_000), None);
        let new_running = vec![("2.0.0".to_string(), "running".to_string())];
        assert_eq!(
            judge(&r, &d, Some(&new_running), &[], 2_000).map(|x| x.0),
            Some(DeviceState::Succeeded)
        );
        let rolled = (
            "d".to_string(),
            "rolled_back".to_string(),
            serde_json::json!({"module":"hello","from_version":"2.0.0","to_version":"1.0.0","reason":"init returned 7"}),
            1_500,
        );
        let (state, why) = judge(&r, &d, Some(&old_running), &[&rolled], 2_000).unwrap();
        assert_eq!(state, DeviceState::Failed);
        assert!(why.unwrap().contains("init returned 7"));
        // Events from before the device got the manifest, and replays, do not count.
        let early = (rolled.0.clone(), rolled.1.clone(), rolled.2.clone(), 500);
        let replay = (
            "d".to_string(),
            "manifest_rejected".to_string(),
            serde_json::json!({"reason":"replayed manifest: sequence 3 is older than accepted 5"}),
            1_500,
        );
        assert_eq!(judge(&r, &d, None, &[&early, &replay], 2_000), None);
        assert_eq!(
            judge(&r, &d, None, &[], 70_000).map(|x| x.0),
            Some(DeviceState::Failed)
        );
    }
}
