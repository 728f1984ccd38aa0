//! Deployments: each target's desired module set and the signed manifests issued for it,
//! numbered by one registry-wide sequence.

use super::modules::{module_from_row, MODULE_COLUMNS};
use super::{
    list, now_ms, placeholders, target_columns, target_from_columns, Db, ModuleRow,
    ROWS_PER_STATEMENT,
};
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row as _};
use wpm_manifests::{HealthWindow, Target};

/// A stored deployment.
#[derive(Clone, Debug)]
pub struct DeploymentRow {
    pub sequence: u64,
    pub target: Target,
    pub sealed: Vec<u8>,
    pub created_at: i64,
    pub expires_at: i64,
    /// The health window it asked of new versions (`None`: the device default).
    pub health: Option<HealthWindow>,
}

const DEPLOYMENT_COLUMNS: &str =
    "sequence, target_kind, target_name, sealed, created_at, expires_at, health_turns, \
     health_seconds";

fn deployment_from_row(r: &AnyRow) -> anyhow::Result<DeploymentRow> {
    let kind: String = r.try_get("target_kind")?;
    let name: String = r.try_get("target_name")?;
    Ok(DeploymentRow {
        sequence: r.try_get::<i64, _>("sequence")?.try_into()?,
        target: target_from_columns(&kind, &name)?,
        sealed: r.try_get("sealed")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        health: match (
            r.try_get::<Option<i64>, _>("health_turns")?,
            r.try_get::<Option<i64>, _>("health_seconds")?,
        ) {
            (Some(turns), Some(seconds)) => Some(HealthWindow {
                turns: turns.try_into()?,
                seconds: seconds.try_into()?,
            }),
            _ => None,
        },
    })
}

/// How a deployment changes its target's desired set.
pub enum DesiredChange {
    /// The same set again (a renewal).
    Keep,
    /// This module at this version, the rest unchanged.
    Set(ModuleRow),
    /// Exactly these modules (a rollout's per-device manifests, a rollback).
    Replace(Vec<ModuleRow>),
}

/// The modules of one target's desired set (`$1` kind, `$2` name).
fn desired_set_sql() -> String {
    format!(
        "SELECT {} FROM modules m JOIN desired_modules d \
         ON m.name = d.module_name AND m.version = d.version \
         WHERE d.target_kind = $1 AND d.target_name = $2 ORDER BY m.name",
        MODULE_COLUMNS
            .split(", ")
            .map(|c| format!("m.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Takes `n` consecutive sequences inside `tx`; returns the first. The counter row's lock
/// serialises concurrent deployments (also across replicas on PostgreSQL) until commit.
async fn take_sequences(tx: &mut sqlx::AnyConnection, n: usize) -> anyhow::Result<u64> {
    let last: i64 =
        sqlx::query("UPDATE counters SET value = value + $1 WHERE name = $2 RETURNING value")
            .bind(i64::try_from(n)?)
            .bind("deployment_sequence")
            .fetch_one(&mut *tx)
            .await?
            .try_get("value")?;
    Ok(u64::try_from(last)? + 1 - n as u64)
}

impl Db {
    /// Records a deployment in one transaction: changes the target's desired set as
    /// `change` says, allocates the next registry-wide sequence and stores what `seal`
    /// makes of (sequence, desired set). Returns the row and the desired set.
    ///
    /// The sequence counter is updated first, so each of several concurrent deployments
    /// reads the desired set the previous one left.
    pub async fn create_deployment(
        &self,
        target: &Target,
        change: &DesiredChange,
        health: Option<HealthWindow>,
        seal: impl FnOnce(u64, &[ModuleRow]) -> (Vec<u8>, i64),
    ) -> anyhow::Result<(DeploymentRow, Vec<ModuleRow>)> {
        let (kind, name) = target_columns(target);
        let mut tx = self.begin_write().await?;
        let sequence = take_sequences(&mut tx, 1).await?;
        if matches!(change, DesiredChange::Replace(_)) {
            sqlx::query("DELETE FROM desired_modules WHERE target_kind = $1 AND target_name = $2")
                .bind(kind)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        let upserts: &[ModuleRow] = match change {
            DesiredChange::Keep => &[],
            DesiredChange::Set(m) => std::slice::from_ref(m),
            DesiredChange::Replace(set) => set,
        };
        for module in upserts {
            sqlx::query(
                "INSERT INTO desired_modules (target_kind, target_name, module_name, version) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (target_kind, target_name, module_name) \
                 DO UPDATE SET version = excluded.version",
            )
            .bind(kind)
            .bind(name)
            .bind(&module.name)
            .bind(&module.version)
            .execute(&mut *tx)
            .await?;
        }
        let rows = sqlx::query(AssertSqlSafe(desired_set_sql()))
            .bind(kind)
            .bind(name)
            .fetch_all(&mut *tx)
            .await?;
        let desired = rows
            .iter()
            .map(module_from_row)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (sealed, expires_at) = seal(sequence, &desired);
        let row = DeploymentRow {
            sequence,
            target: target.clone(),
            sealed,
            created_at: now_ms(),
            expires_at,
            health,
        };
        self.insert_deployments(&mut tx, std::slice::from_ref(&row))
            .await?;
        tx.commit().await?;
        Ok((row, desired))
    }

    /// Gives each of `devices` its own deployment of exactly `set`, in one transaction
    /// and a few multi-row statements: consecutive sequences, one desired set per
    /// device, one sealed manifest per device (`seal(device, sequence)`).
    pub async fn create_device_deployments(
        &self,
        devices: &[String],
        set: &[ModuleRow],
        health: Option<HealthWindow>,
        mut seal: impl FnMut(&str, u64) -> (Vec<u8>, i64),
    ) -> anyhow::Result<Vec<DeploymentRow>> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_write().await?;
        let first = take_sequences(&mut tx, devices.len()).await?;
        let created_at = now_ms();
        let rows: Vec<DeploymentRow> = devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let sequence = first + i as u64;
                let (sealed, expires_at) = seal(d, sequence);
                DeploymentRow {
                    sequence,
                    target: Target::Device(d.clone()),
                    sealed,
                    created_at,
                    expires_at,
                    health,
                }
            })
            .collect();
        for ids in devices.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "DELETE FROM desired_modules WHERE target_kind = 'device' AND target_name IN ({})",
                list(ids.len(), 1)
            );
            let mut q = self.statement(sql);
            for id in ids {
                q = q.bind(id);
            }
            q.execute(&mut *tx).await?;
        }
        let pairs: Vec<(&String, &ModuleRow)> = devices
            .iter()
            .flat_map(|d| set.iter().map(move |m| (d, m)))
            .collect();
        for chunk in pairs.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO desired_modules (target_kind, target_name, module_name, version) \
                 VALUES {}",
                placeholders(chunk.len(), 4, 1)
            );
            let mut q = self.statement(sql);
            for (d, m) in chunk {
                q = q.bind("device").bind(*d).bind(&m.name).bind(&m.version);
            }
            q.execute(&mut *tx).await?;
        }
        self.insert_deployments(&mut tx, &rows).await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Takes the next registry-wide sequence (shared by deployments and commands, so a
    /// device can order everything the registry signs for it).
    pub async fn next_sequence(&self) -> anyhow::Result<u64> {
        let mut conn = self.writer().acquire().await?;
        take_sequences(&mut conn, 1).await
    }

    /// The last sequence taken so far.
    pub async fn current_sequence(&self) -> anyhow::Result<u64> {
        let v: i64 = sqlx::query("SELECT value FROM counters WHERE name = $1")
            .bind("deployment_sequence")
            .fetch_one(&self.pool)
            .await?
            .try_get("value")?;
        Ok(u64::try_from(v)?)
    }

    /// All deployments, newest first.
    pub async fn deployments(&self, limit: i64) -> anyhow::Result<Vec<DeploymentRow>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments ORDER BY sequence DESC LIMIT $1"
        )))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(deployment_from_row).collect()
    }

    /// The newest deployment of every target not retired: what the broker must hold
    /// retained and what renewal keeps alive.
    pub async fn latest_deployments(&self) -> anyhow::Result<Vec<DeploymentRow>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {} FROM deployments d \
             JOIN (SELECT target_kind, target_name, MAX(sequence) AS seq FROM deployments \
                   WHERE retired = 0 GROUP BY target_kind, target_name) latest \
             ON d.sequence = latest.seq ORDER BY d.sequence",
            DEPLOYMENT_COLUMNS
                .split(", ")
                .map(|c| format!("d.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(deployment_from_row).collect()
    }

    /// The newest deployment of one target, unless retired: what the broker must hold
    /// retained on its topic.
    pub async fn latest_deployment(
        &self,
        target: &Target,
    ) -> anyhow::Result<Option<DeploymentRow>> {
        let (kind, name) = target_columns(target);
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE target_kind = $1 \
             AND target_name = $2 AND sequence = (SELECT MAX(sequence) FROM deployments \
             WHERE target_kind = $1 AND target_name = $2 AND retired = 0)"
        )))
        .bind(kind)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(deployment_from_row).transpose()
    }

    /// The newest sequence of one target, if any.
    pub async fn latest_sequence(&self, target: &Target) -> anyhow::Result<Option<u64>> {
        let (kind, name) = target_columns(target);
        let row = sqlx::query(
            "SELECT MAX(sequence) AS seq FROM deployments \
             WHERE target_kind = $1 AND target_name = $2",
        )
        .bind(kind)
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        let seq: Option<i64> = row.try_get("seq")?;
        Ok(seq.map(|s| s as u64))
    }

    /// One target's desired set, by module name.
    pub async fn desired_set(&self, target: &Target) -> anyhow::Result<Vec<ModuleRow>> {
        let (kind, name) = target_columns(target);
        let rows = sqlx::query(AssertSqlSafe(desired_set_sql()))
            .bind(kind)
            .bind(name)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(module_from_row).collect()
    }
}

impl Db {
    async fn insert_deployments(
        &self,
        tx: &mut sqlx::AnyConnection,
        rows: &[DeploymentRow],
    ) -> anyhow::Result<()> {
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO deployments ({DEPLOYMENT_COLUMNS}) VALUES {}",
                placeholders(chunk.len(), 8, 1)
            );
            let mut q = self.statement(sql);
            for r in chunk {
                let (kind, name) = target_columns(&r.target);
                q = q
                    .bind(i64::try_from(r.sequence)?)
                    .bind(kind)
                    .bind(name.to_string())
                    .bind(r.sealed.clone())
                    .bind(r.created_at)
                    .bind(r.expires_at)
                    .bind(r.health.map(|h| i64::from(h.turns)))
                    .bind(r.health.map(|h| i64::from(h.seconds)));
            }
            q.execute(&mut *tx).await?;
        }
        Ok(())
    }
}
