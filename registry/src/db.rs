//! The database: SQLite by default, PostgreSQL when given a postgres:// URL.
//!
//! Everything goes through sqlx's `AnyPool` with portable SQL. Placeholders are `$1`,
//! `$2`, ... and always appear in increasing order in the text: SQLite treats `$N` as a
//! named parameter numbered by first appearance, PostgreSQL by its digits, and keeping
//! them in order makes both agree.

use anyhow::Context as _;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row as _};
use wpm_manifests::{ModuleRef, Target};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
}

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

/// A stored deployment.
#[derive(Clone, Debug)]
pub struct DeploymentRow {
    pub sequence: u64,
    pub target: Target,
    pub sealed: Vec<u8>,
    pub created_at: i64,
    pub expires_at: i64,
}

/// How a target is stored: kind and name (empty for the fleet).
pub fn target_columns(t: &Target) -> (&'static str, &str) {
    match t {
        Target::Fleet => ("fleet", ""),
        Target::Group(g) => ("group", g),
        Target::Device(d) => ("device", d),
    }
}

pub fn target_from_columns(kind: &str, name: &str) -> anyhow::Result<Target> {
    Ok(match kind {
        "fleet" => Target::Fleet,
        "group" => Target::Group(name.to_string()),
        "device" => Target::Device(name.to_string()),
        other => anyhow::bail!("unknown target kind {other:?} in the database"),
    })
}

fn digest(bytes: Vec<u8>) -> anyhow::Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("stored sha256 is not 32 bytes"))
}

const MODULE_COLUMNS: &str = "name, version, sha256, size, chunk_size, memory_limit, \
     fuel_per_turn, priority, pinned, created_at";

fn module_from_row(r: &AnyRow) -> anyhow::Result<ModuleRow> {
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

fn deployment_from_row(r: &AnyRow) -> anyhow::Result<DeploymentRow> {
    let kind: String = r.try_get("target_kind")?;
    let name: String = r.try_get("target_name")?;
    Ok(DeploymentRow {
        sequence: r.try_get::<i64, _>("sequence")?.try_into()?,
        target: target_from_columns(&kind, &name)?,
        sealed: r.try_get("sealed")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
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

/// Rows per multi-row statement: 5 columns × 200 stays far below SQLite's and
/// PostgreSQL's parameter limits.
const ROWS_PER_INSERT: usize = 200;

/// `($first, …), (…), …`: `rows` groups of `columns` numbered placeholders, in order.
fn placeholders(rows: usize, columns: usize, first: usize) -> String {
    (0..rows)
        .map(|r| {
            let cols = (0..columns)
                .map(|c| format!("${}", first + r * columns + c))
                .collect::<Vec<_>>()
                .join(", ");
            format!("({cols})")
        })
        .collect::<Vec<_>>()
        .join(", ")
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

/// What happened to an upload.
pub enum InsertOutcome {
    Created,
    /// The same bytes were already stored under that name and version.
    Unchanged(ModuleRow),
    /// Other bytes hold that name and version.
    Conflict(ModuleRow),
}

/// One device's status, as the ingest hands it over.
pub struct StatusWrite {
    pub device: String,
    pub groups_json: String,
    pub sequence: i64,
    pub slots_used: i64,
    pub slots_total: i64,
    pub flash_free: i64,
    pub ram_free: i64,
    pub last_error: Option<String>,
    pub status: Vec<u8>,
    pub status_at: i64,
    /// Registry clock when received live; for a retained replay the device's own clock,
    /// so a registry restart does not make every device look freshly seen.
    pub seen_at: i64,
    pub live: bool,
    pub modules: Vec<DeviceModule>,
}

/// One module as a device reported it: what ingest writes and the fleet view reads.
pub struct DeviceModule {
    pub name: String,
    pub version: String,
    pub sha256: Vec<u8>,
    pub state: String,
    pub last_error: Option<String>,
}

pub struct PresenceWrite {
    pub device: String,
    pub online: bool,
    pub seen_at: i64,
    pub live: bool,
}

pub struct EventWrite {
    pub device: String,
    pub at_ms: i64,
    pub kind: String,
    pub detail: String,
    pub received_at: i64,
}

/// A device as the fleet view shows it.
pub struct DeviceView {
    pub id: String,
    pub groups: Vec<String>,
    pub online: bool,
    pub last_seen: i64,
    pub sequence: i64,
    pub slots_used: i64,
    pub slots_total: i64,
    pub flash_free: i64,
    pub ram_free: i64,
    pub last_error: Option<String>,
    pub modules: Vec<DeviceModule>,
}

pub struct EventView {
    pub at_ms: i64,
    pub kind: String,
    pub detail: String,
}

impl Db {
    /// Connects and runs the migrations for the URL's database.
    pub async fn connect(url: &str) -> anyhow::Result<Db> {
        sqlx::any::install_default_drivers();
        let is_sqlite = url.starts_with("sqlite:");
        let is_pg = url.starts_with("postgres:") || url.starts_with("postgresql:");
        anyhow::ensure!(
            is_sqlite || is_pg,
            "unsupported database URL {url:?}: use sqlite://path or postgres://..."
        );
        let url = if is_sqlite && !url.contains("mode=") {
            // Create the file on first start.
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}mode=rwc")
        } else {
            url.to_string()
        };
        let pool = AnyPoolOptions::new()
            // SQLite serialises writers anyway; a small pool avoids lock contention.
            .max_connections(if is_sqlite { 4 } else { 16 })
            .connect(&url)
            .await
            .with_context(|| format!("connecting to the database {}", redact(&url)))?;
        if is_sqlite {
            // WAL lets the HTTP API read while the ingest writes; it persists in the file.
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await
                .context("enabling WAL")?;
            SQLITE_MIGRATIONS.run(&pool).await.context("migrations")?;
        } else {
            POSTGRES_MIGRATIONS.run(&pool).await.context("migrations")?;
        }
        Ok(Db { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

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
        .execute(&self.pool)
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

    /// Records a deployment in one transaction: changes the target's desired set as
    /// `change` says, allocates the next registry-wide sequence and stores what `seal`
    /// makes of (sequence, desired set). Returns the row and the desired set.
    ///
    /// The sequence counter is updated first: on PostgreSQL its row lock serialises
    /// concurrent deployments (also across replicas) until commit, so each one reads the
    /// desired set the previous one left.
    pub async fn create_deployment(
        &self,
        target: &Target,
        change: &DesiredChange,
        seal: impl FnOnce(u64, &[ModuleRow]) -> (Vec<u8>, i64),
    ) -> anyhow::Result<(DeploymentRow, Vec<ModuleRow>)> {
        let (kind, name) = target_columns(target);
        let mut tx = self.pool.begin().await?;
        let seq: i64 =
            sqlx::query("UPDATE counters SET value = value + 1 WHERE name = $1 RETURNING value")
                .bind("deployment_sequence")
                .fetch_one(&mut *tx)
                .await?
                .try_get("value")?;
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
        let sequence = u64::try_from(seq)?;
        let (sealed, expires_at) = seal(sequence, &desired);
        let created_at = now_ms();
        sqlx::query(
            "INSERT INTO deployments (sequence, target_kind, target_name, sealed, created_at, \
             expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(seq)
        .bind(kind)
        .bind(name)
        .bind(sealed.clone())
        .bind(created_at)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((
            DeploymentRow {
                sequence,
                target: target.clone(),
                sealed,
                created_at,
                expires_at,
            },
            desired,
        ))
    }

    /// Takes the next registry-wide sequence (shared by deployments and commands, so a
    /// device can order everything the registry signs for it).
    pub async fn next_sequence(&self) -> anyhow::Result<u64> {
        let seq: i64 =
            sqlx::query("UPDATE counters SET value = value + 1 WHERE name = $1 RETURNING value")
                .bind("deployment_sequence")
                .fetch_one(&self.pool)
                .await?
                .try_get("value")?;
        Ok(u64::try_from(seq)?)
    }

    /// All deployments, newest first.
    pub async fn deployments(&self, limit: i64) -> anyhow::Result<Vec<DeploymentRow>> {
        let rows = sqlx::query(
            "SELECT sequence, target_kind, target_name, sealed, created_at, expires_at \
             FROM deployments ORDER BY sequence DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(deployment_from_row).collect()
    }

    /// The newest deployment of every target not retired: what the broker must hold
    /// retained and what renewal keeps alive.
    pub async fn latest_deployments(&self) -> anyhow::Result<Vec<DeploymentRow>> {
        let rows = sqlx::query(
            "SELECT d.sequence, d.target_kind, d.target_name, d.sealed, d.created_at, \
             d.expires_at FROM deployments d \
             JOIN (SELECT target_kind, target_name, MAX(sequence) AS seq FROM deployments \
                   WHERE retired = 0 GROUP BY target_kind, target_name) latest \
             ON d.sequence = latest.seq ORDER BY d.sequence",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(deployment_from_row).collect()
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

    /// Writes one ingest batch in one transaction; the `seen` devices' last_seen moves
    /// to `seen_at`.
    pub async fn write_batch(
        &self,
        statuses: &[StatusWrite],
        presences: &[PresenceWrite],
        events: &[EventWrite],
        seen: &[String],
        seen_at: i64,
    ) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        for s in statuses {
            // A status older than the stored one (a late retained replay) changes nothing.
            let r = sqlx::query(
                "INSERT INTO devices (id, groups_json, online, last_seen, sequence, slots_used, \
                 slots_total, flash_free, ram_free, last_error, status, status_at) \
                 VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                 ON CONFLICT (id) DO UPDATE SET groups_json = excluded.groups_json, \
                 last_seen = CASE WHEN $12 = 1 THEN excluded.last_seen \
                   ELSE devices.last_seen END, \
                 sequence = excluded.sequence, slots_used = excluded.slots_used, \
                 slots_total = excluded.slots_total, flash_free = excluded.flash_free, \
                 ram_free = excluded.ram_free, last_error = excluded.last_error, \
                 status = excluded.status, status_at = excluded.status_at \
                 WHERE devices.status_at IS NULL OR devices.status_at <= excluded.status_at",
            )
            .bind(&s.device)
            .bind(&s.groups_json)
            .bind(s.seen_at)
            .bind(s.sequence)
            .bind(s.slots_used)
            .bind(s.slots_total)
            .bind(s.flash_free)
            .bind(s.ram_free)
            .bind(&s.last_error)
            .bind(s.status.clone())
            .bind(s.status_at)
            .bind(s.live as i64)
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() == 0 {
                continue;
            }
            sqlx::query("DELETE FROM device_modules WHERE device = $1")
                .bind(&s.device)
                .execute(&mut *tx)
                .await?;
            for m in &s.modules {
                sqlx::query(
                    "INSERT INTO device_modules (device, name, version, sha256, state, \
                     last_error) VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (device, name, version) DO UPDATE SET \
                     sha256 = excluded.sha256, state = excluded.state, \
                     last_error = excluded.last_error",
                )
                .bind(&s.device)
                .bind(&m.name)
                .bind(&m.version)
                .bind(m.sha256.clone())
                .bind(&m.state)
                .bind(&m.last_error)
                .execute(&mut *tx)
                .await?;
            }
        }
        for p in presences {
            sqlx::query(
                "INSERT INTO devices (id, groups_json, online, last_seen, sequence, slots_used, \
                 slots_total, flash_free, ram_free) VALUES ($1, '[]', $2, $3, 0, 0, 0, 0, 0) \
                 ON CONFLICT (id) DO UPDATE SET online = excluded.online, \
                 last_seen = CASE WHEN $4 = 1 THEN excluded.last_seen \
                   ELSE devices.last_seen END",
            )
            .bind(&p.device)
            .bind(p.online as i64)
            .bind(p.seen_at)
            .bind(p.live as i64)
            .execute(&mut *tx)
            .await?;
        }
        // Many rows per statement: a fleet installing at once sends events in bursts.
        for rows in events.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO events (device, at_ms, kind, detail, received_at) VALUES {}",
                placeholders(rows.len(), 5, 1)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for e in rows {
                q = q
                    .bind(&e.device)
                    .bind(e.at_ms)
                    .bind(&e.kind)
                    .bind(&e.detail)
                    .bind(e.received_at);
            }
            q.execute(&mut *tx).await?;
        }
        for ids in seen.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "UPDATE devices SET last_seen = $1 WHERE last_seen < $2 AND id IN ({})",
                (3..3 + ids.len())
                    .map(|i| format!("${i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(seen_at).bind(seen_at);
            for id in ids {
                q = q.bind(id);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn fleet(&self) -> anyhow::Result<Vec<DeviceView>> {
        let rows = sqlx::query(
            "SELECT id, groups_json, online, last_seen, sequence, slots_used, slots_total, \
             flash_free, ram_free, last_error FROM devices ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut devices = Vec::with_capacity(rows.len());
        let mut index = std::collections::HashMap::new();
        for r in &rows {
            let id: String = r.try_get("id")?;
            let groups_json: String = r.try_get("groups_json")?;
            index.insert(id.clone(), devices.len());
            devices.push(DeviceView {
                id,
                groups: serde_json::from_str(&groups_json).unwrap_or_default(),
                online: r.try_get::<i64, _>("online")? != 0,
                last_seen: r.try_get("last_seen")?,
                sequence: r.try_get("sequence")?,
                slots_used: r.try_get("slots_used")?,
                slots_total: r.try_get("slots_total")?,
                flash_free: r.try_get("flash_free")?,
                ram_free: r.try_get("ram_free")?,
                last_error: r.try_get("last_error")?,
                modules: Vec::new(),
            });
        }
        let rows = sqlx::query(
            "SELECT device, name, version, sha256, state, last_error FROM device_modules \
             ORDER BY device, name, version",
        )
        .fetch_all(&self.pool)
        .await?;
        for r in &rows {
            let device: String = r.try_get("device")?;
            if let Some(&i) = index.get(&device) {
                devices[i].modules.push(DeviceModule {
                    name: r.try_get("name")?,
                    version: r.try_get("version")?,
                    sha256: r.try_get("sha256")?,
                    state: r.try_get("state")?,
                    last_error: r.try_get("last_error")?,
                });
            }
        }
        Ok(devices)
    }

    /// A device's events, newest first.
    pub async fn events(&self, device: &str, limit: i64) -> anyhow::Result<Vec<EventView>> {
        let rows = sqlx::query(
            "SELECT at_ms, kind, detail FROM events WHERE device = $1 \
             ORDER BY id DESC LIMIT $2",
        )
        .bind(device)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EventView {
                    at_ms: r.try_get("at_ms")?,
                    kind: r.try_get("kind")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }
}

/// A database URL with any password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_placeholders_in_order() {
        assert_eq!(placeholders(2, 3, 1), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(placeholders(1, 2, 5), "($5, $6)");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h/db"),
            "postgres://u:***@h/db".to_string()
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:///x.db"), "sqlite:///x.db");
    }
}
