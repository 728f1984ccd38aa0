//! Rollouts and their devices. Judging devices, assigning a stage and reverting are one
//! statement each for the whole rollout, whatever its size.

use super::{now_ms, placeholders, Db, ROWS_PER_STATEMENT};
use crate::rollout::{
    Counts, DeviceState, Judged, NewRollout, Rollout, RolloutDevice, RolloutState, FAILURE_KINDS,
};
use anyhow::Context as _;
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row as _};

const ROLLOUT_COLUMNS: &str = "id, module_name, version, previous_version, group_name, \
    stages_json, stage, state, max_failure_pct, stage_timeout_ms, group_sequence, reason, \
    health_turns, health_seconds, created_at, updated_at";

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
        health: wpm_manifests::HealthWindow {
            turns: r.try_get::<i64, _>("health_turns")?.try_into()?,
            seconds: r.try_get::<i64, _>("health_seconds")?.try_into()?,
        },
        created_at_ms: r.try_get("created_at")?,
        updated_at_ms: r.try_get("updated_at")?,
    })
}

/// SQL list of the event kinds that fail a device's update.
fn failure_kinds() -> String {
    FAILURE_KINDS
        .iter()
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Db {
    /// Records a new rollout (state running, no stage started yet). Fails if a rollout of
    /// the same module to the same group is still running or paused.
    pub async fn create_rollout(
        &self,
        new: &NewRollout,
        previous_version: Option<&str>,
    ) -> anyhow::Result<Result<Rollout, String>> {
        let mut tx = self.begin_write().await?;
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
             reason, health_turns, health_seconds, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 0, 'running', $7, $8, NULL, NULL, $9, $10, $11, $12)",
        )
        .bind(id)
        .bind(&new.module.name)
        .bind(&new.module.version)
        .bind(previous_version)
        .bind(&new.group)
        .bind(serde_json::to_string(&new.stages)?)
        .bind(i64::from(new.max_failure_pct))
        .bind(i64::try_from(new.stage_timeout.as_millis())?)
        .bind(i64::from(new.health.turns))
        .bind(i64::from(new.health.seconds))
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(self.rollout(id).await?.context("rollout vanished")?))
    }

    pub async fn rollout(&self, id: i64) -> anyhow::Result<Option<Rollout>> {
        let row = sqlx::query(AssertSqlSafe(format!(
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
        let rows = sqlx::query(AssertSqlSafe(format!(
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

    /// Devices of a rollout per state.
    pub async fn rollout_counts(&self, id: i64) -> anyhow::Result<Counts> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM rollout_devices WHERE rollout_id = $1 \
             GROUP BY state",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let mut c = Counts::default();
        for r in &rows {
            let n = usize::try_from(r.try_get::<i64, _>("n")?)?;
            c.assigned += n;
            match DeviceState::parse(&r.try_get::<String, _>("state")?)? {
                DeviceState::Updating => c.updating += n,
                DeviceState::Succeeded => c.succeeded += n,
                DeviceState::Failed => c.failed += n,
                DeviceState::RolledBack => c.rolled_back += n,
            }
        }
        Ok(c)
    }

    /// Judges the updating devices of `r` that reported since `since` (registry clock;
    /// 0: all of them) by their reports, in one transaction of three statements for the
    /// whole rollout: failed if it reported a failure of the rollout's version (or
    /// rejected a manifest; a replayed one is its own kind of event) since it was assigned;
    /// succeeded if it reports the version running; failed if it did neither within the
    /// stage timeout. Returns what changed.
    ///
    /// Judging only the devices heard from keeps a pass's cost proportional to the
    /// reports that arrived, not to the size of the stage.
    pub async fn judge_updating(
        &self,
        r: &Rollout,
        now: i64,
        since: i64,
    ) -> anyhow::Result<Judged> {
        let failure = format!(
            "e.device = rollout_devices.device AND e.received_at >= rollout_devices.assigned_at \
             AND ((e.kind IN ({}) AND e.module = $2 AND e.version = $3) \
                  OR e.kind = 'manifest_rejected')",
            failure_kinds()
        );
        // Drive both statements from the devices heard from (the primary key's
        // (rollout_id, device)), not from every updating device of the stage: without
        // statistics SQLite prefers the (rollout_id, state) index, which made each pass
        // cost the size of the stage. `+state` keeps it off that index; PostgreSQL plans
        // from its statistics and does not accept `+` on text.
        let updating = if self.sqlite {
            "+state = 'updating'"
        } else {
            "state = 'updating'"
        };
        let mut tx = self.begin_write().await?;
        let failed = sqlx::query(AssertSqlSafe(format!(
            "UPDATE rollout_devices SET state = 'failed', updated_at = $1, \
             detail = (SELECT e.kind || ': ' || COALESCE(e.reason, '') FROM events e \
                       WHERE {failure} ORDER BY e.id LIMIT 1) \
             WHERE rollout_id = $4 AND {updating} \
             AND device IN (SELECT device FROM events WHERE received_at >= $5) \
             AND EXISTS (SELECT 1 FROM events e WHERE {failure})"
        )))
        .bind(now)
        .bind(&r.module)
        .bind(&r.version)
        .bind(r.id)
        .bind(since)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let succeeded = sqlx::query(AssertSqlSafe(format!(
            "UPDATE rollout_devices SET state = 'succeeded', updated_at = $1 \
             WHERE rollout_id = $2 AND {updating} \
             AND device IN (SELECT id FROM devices WHERE last_seen >= $3) AND EXISTS \
             (SELECT 1 FROM device_modules m WHERE m.device = rollout_devices.device \
              AND m.name = $4 AND m.version = $5 AND m.state = 'running')"
        )))
        .bind(now)
        .bind(r.id)
        .bind(since)
        .bind(&r.module)
        .bind(&r.version)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let timed_out = sqlx::query(
            "UPDATE rollout_devices SET state = 'failed', updated_at = $1, detail = $2 \
             WHERE rollout_id = $3 AND state = 'updating' AND assigned_at < $4",
        )
        .bind(now)
        .bind(format!(
            "not running {}@{} after {} s",
            r.module,
            r.version,
            r.stage_timeout_ms / 1000
        ))
        .bind(r.id)
        .bind(now - r.stage_timeout_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(Judged {
            failed: usize::try_from(failed + timed_out)?,
            succeeded: usize::try_from(succeeded)?,
        })
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
        let r = sqlx::query(AssertSqlSafe(format!(
            "UPDATE rollouts SET state = $1, reason = COALESCE($2, reason), updated_at = $3 \
             WHERE id = $4 AND state IN ({from})"
        )))
        .bind(to.as_str())
        .bind(reason)
        .bind(now_ms())
        .bind(id)
        .execute(self.writer())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn set_rollout_stage(
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
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// Takes `devices` (device, manifest sequence) into stage `stage`, updating.
    pub async fn assign_devices(
        &self,
        id: i64,
        devices: &[(String, u64)],
        stage: usize,
    ) -> anyhow::Result<()> {
        let now = now_ms();
        for chunk in devices.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO rollout_devices (rollout_id, device, stage, state, sequence, \
                 assigned_at, updated_at) VALUES {} ON CONFLICT (rollout_id, device) DO NOTHING",
                placeholders(chunk.len(), 7, 1)
            );
            let mut q = self.statement(sql);
            for (device, sequence) in chunk {
                q = q
                    .bind(id)
                    .bind(device)
                    .bind(i64::try_from(stage)?)
                    .bind("updating")
                    .bind(i64::try_from(*sequence)?)
                    .bind(now)
                    .bind(now);
            }
            q.execute(self.writer()).await?;
        }
        Ok(())
    }

    /// Takes every member of `group` not yet in the rollout into stage `stage`, carried
    /// by the group manifest `sequence`: one statement.
    pub async fn assign_rest_of_group(
        &self,
        id: i64,
        group: &str,
        stage: usize,
        sequence: i64,
    ) -> anyhow::Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO rollout_devices (rollout_id, device, stage, state, sequence, \
             assigned_at, updated_at) \
             SELECT $1, device, $2, 'updating', $3, $4, $5 FROM device_groups \
             WHERE group_name = $6 AND device NOT IN \
             (SELECT device FROM rollout_devices WHERE rollout_id = $7)",
        )
        .bind(id)
        .bind(i64::try_from(stage)?)
        .bind(sequence)
        .bind(now)
        .bind(now)
        .bind(group)
        .bind(id)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// Marks every device of the rollout not yet rolled back as rolled back.
    pub async fn mark_rolled_back(&self, id: i64) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE rollout_devices SET state = 'rolled_back', updated_at = $1 \
             WHERE rollout_id = $2 AND state <> 'rolled_back'",
        )
        .bind(now_ms())
        .bind(id)
        .execute(self.writer())
        .await?;
        Ok(())
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
        .execute(self.writer())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Stops renewing and republishing the per-device deployments a rollout issued (all
    /// of its devices' device deployments up to `up_to_sequence`): one statement.
    pub async fn retire_device_deployments(
        &self,
        id: i64,
        up_to_sequence: u64,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE deployments SET retired = 1 WHERE target_kind = 'device' \
             AND sequence <= $1 AND target_name IN \
             (SELECT device FROM rollout_devices WHERE rollout_id = $2)",
        )
        .bind(i64::try_from(up_to_sequence)?)
        .bind(id)
        .execute(self.writer())
        .await?;
        Ok(())
    }
}
