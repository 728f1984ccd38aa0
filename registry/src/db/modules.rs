//! Modules: their metadata and bytes, as uploaded.

use super::{digest, Db};
use anyhow::Context as _;
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row as _};
use wpm_manifests::ModuleRef;

/// A stored module, without its bytes unless asked for.
#[derive(Clone, Debug)]
pub struct ModuleRow {
    pub name: String,
    pub version: String,
    pub sha256: [u8; 32],
    pub size: u32,
    pub chunk_size: u32,
    pub memory_limit: u32,
    pub fuel_per_turn: u64,
    pub priority: u8,
    pub pinned: bool,
    pub created_at: i64,
}

impl ModuleRow {
    pub fn module_ref(&self) -> ModuleRef {
        ModuleRef {
            name: self.name.clone(),
            version: self.version.clone(),
            sha256: self.sha256.into(),
            size: self.size,
            chunk_size: self.chunk_size,
            memory_limit: self.memory_limit,
            fuel_per_turn: self.fuel_per_turn,
            priority: self.priority,
            pinned: self.pinned,
        }
    }

    pub fn chunk_count(&self) -> u32 {
        self.module_ref().chunk_count()
    }
}

pub(super) const MODULE_COLUMNS: &str = "name, version, sha256, size, chunk_size, memory_limit, \
     fuel_per_turn, priority, pinned, created_at";

pub(super) fn module_from_row(r: &AnyRow) -> anyhow::Result<ModuleRow> {
    Ok(ModuleRow {
        name: r.try_get("name")?,
        version: r.try_get("version")?,
        sha256: digest(r.try_get("sha256")?)?,
        size: r.try_get::<i64, _>("size")?.try_into()?,
        chunk_size: r.try_get::<i64, _>("chunk_size")?.try_into()?,
        memory_limit: r.try_get::<i64, _>("memory_limit")?.try_into()?,
        fuel_per_turn: r.try_get::<i64, _>("fuel_per_turn")?.try_into()?,
        priority: r.try_get::<i64, _>("priority")?.try_into()?,
        pinned: r.try_get::<i64, _>("pinned")? != 0,
        created_at: r.try_get("created_at")?,
    })
}

/// What happened to an upload.
pub enum InsertOutcome {
    Created,
    /// The same bytes were already stored under that name and version.
    Unchanged(ModuleRow),
    /// Other bytes hold that name and version.
    Conflict(ModuleRow),
}

impl Db {
    pub async fn insert_module(&self, m: &ModuleRow, wasm: &[u8]) -> anyhow::Result<InsertOutcome> {
        if let Some(existing) = self.module(&m.name, &m.version).await? {
            return Ok(if existing.sha256 == m.sha256 {
                InsertOutcome::Unchanged(existing)
            } else {
                InsertOutcome::Conflict(existing)
            });
        }
        let r = sqlx::query(
            "INSERT INTO modules (name, version, sha256, size, chunk_size, memory_limit, \
             fuel_per_turn, priority, pinned, wasm, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (name, version) DO NOTHING",
        )
        .bind(&m.name)
        .bind(&m.version)
        .bind(m.sha256.to_vec())
        .bind(m.size as i64)
        .bind(m.chunk_size as i64)
        .bind(m.memory_limit as i64)
        .bind(m.fuel_per_turn as i64)
        .bind(m.priority as i64)
        .bind(m.pinned as i64)
        .bind(wasm.to_vec())
        .bind(m.created_at)
        .execute(self.writer())
        .await?;
        if r.rows_affected() == 1 {
            return Ok(InsertOutcome::Created);
        }
        // Lost a race with a concurrent upload of the same name@version.
        let existing = self
            .module(&m.name, &m.version)
            .await?
            .context("module vanished during upload")?;
        Ok(if existing.sha256 == m.sha256 {
            InsertOutcome::Unchanged(existing)
        } else {
            InsertOutcome::Conflict(existing)
        })
    }

    pub async fn module(&self, name: &str, version: &str) -> anyhow::Result<Option<ModuleRow>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MODULE_COLUMNS} FROM modules WHERE name = $1 AND version = $2"
        )))
        .bind(name)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(module_from_row).transpose()
    }

    pub async fn module_wasm(&self, name: &str, version: &str) -> anyhow::Result<Vec<u8>> {
        let row = sqlx::query("SELECT wasm FROM modules WHERE name = $1 AND version = $2")
            .bind(name)
            .bind(version)
            .fetch_one(&self.pool)
            .await
            .with_context(|| format!("reading the bytes of {name}@{version}"))?;
        Ok(row.try_get("wasm")?)
    }

    pub async fn modules(&self) -> anyhow::Result<Vec<ModuleRow>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MODULE_COLUMNS} FROM modules ORDER BY name, created_at, version"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(module_from_row).collect()
    }

    /// Every module in some target's desired set.
    pub async fn desired_modules(&self) -> anyhow::Result<Vec<ModuleRow>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MODULE_COLUMNS} FROM modules WHERE EXISTS (SELECT 1 FROM desired_modules d \
             WHERE d.module_name = modules.name AND d.version = modules.version) \
             ORDER BY name, version"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(module_from_row).collect()
    }
}
