//! The database: SQLite by default, PostgreSQL when given a postgres:// URL.
//!
//! Everything goes through sqlx's `AnyPool` with portable SQL. Placeholders are `$1`,
//! `$2`, ... and always appear in increasing order in the text: SQLite treats `$N` as a
//! named parameter numbered by first appearance, PostgreSQL by its digits, and keeping
//! them in order makes both agree.
//!
//! Writes that concern many rows (a batch of device reports, a rollout stage) are
//! set-based: one multi-row statement per [`ROWS_PER_STATEMENT`] rows, never one
//! statement per device, so the registry's cost per device stays flat as the fleet grows.
//!
//! One file per resource: [`modules`], [`deployments`], [`devices`] (reports and fleet
//! views), [`identities`] (device keys), [`rollouts`].

mod deployments;
mod devices;
mod identities;
mod modules;
mod rollouts;
mod tokens;
mod trust;

pub use deployments::{DeploymentRow, DesiredChange};
pub use devices::{
    rows_digest, DeviceModule, DeviceView, EventView, EventWrite, FleetFilter, FleetSummary,
    PresenceWrite, RowsDigest, StatusWrite, VersionCount,
};
pub use identities::{Identity, NewIdentity, Standing};
pub use modules::{InsertOutcome, ModuleRow};
pub use tokens::TokenRow;

use anyhow::Context as _;
use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;
use wpm_manifests::Target;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The registry's database. On SQLite every write goes through one connection of its own
/// ([`Db::writer`]): SQLite empties a connection's page cache whenever another connection
/// has written, so writes spread over a pool re-read (and re-allocate) every page they
/// touch, a cost per report that grew with the fleet (2.3× per device from 1,000 to
/// 10,000 devices in `wpm bench rollout`). Alone, the writer keeps its cache, sized to
/// hold the hot pages of a large fleet ([`WRITER_CACHE_KIB`]). SQLite admits one writer
/// at a time anyway; readers keep a pool.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    /// SQLite's writing connection; PostgreSQL writes through `pool`.
    writer: Option<AnyPool>,
    sqlite: bool,
}

/// Page cache of SQLite's writing connection, KiB.
const WRITER_CACHE_KIB: u32 = 64 * 1024;

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
/// Rows per multi-row statement: at most 14 columns × 1000 rows, below SQLite's
/// 32,766 and PostgreSQL's 65,535 parameters. Fewer, larger statements: PostgreSQL
/// plans an `UPDATE … FROM (VALUES …)` as a scan of the whole table, once per statement.
const ROWS_PER_STATEMENT: usize = 1000;

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

/// `sql` with its `$1, $2, …` placeholders turned into anonymous `?`s, if they appear in
/// exactly that order, each once; else `None`.
fn positional(sql: &str) -> Option<String> {
    let mut out = String::with_capacity(sql.len());
    let mut next = 1u32;
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let digits = rest[at + 1..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        let n: u32 = rest[at + 1..at + 1 + digits].parse().ok()?;
        if n != next {
            return None;
        }
        next += 1;
        out.push('?');
        rest = &rest[at + 1 + digits..];
    }
    out.push_str(rest);
    Some(out)
}

/// `$first, …, $(first + n - 1)`: a list for `IN (…)`.
fn list(n: usize, first: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
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
        let writer = if is_sqlite {
            let writer = AnyPoolOptions::new()
                .max_connections(1)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "PRAGMA cache_size = -{WRITER_CACHE_KIB}"
                        )))
                        .execute(conn)
                        .await
                        .map(|_| ())
                    })
                })
                .connect(&url)
                .await
                .with_context(|| format!("connecting to the database {}", redact(&url)))?;
            Some(writer)
        } else {
            None
        };
        Ok(Db {
            pool,
            writer,
            sqlite: is_sqlite,
        })
    }

    /// Where statements that write go: SQLite's one writing connection, or the pool.
    fn writer(&self) -> &AnyPool {
        self.writer.as_ref().unwrap_or(&self.pool)
    }

    /// A statement with many placeholders (a multi-row insert, an `IN` list). On SQLite
    /// its `$N` become anonymous `?`: binding a named parameter costs a scan of all the
    /// statement's parameter names, which made a 200-row upsert quadratic.
    fn statement(
        &self,
        sql: String,
    ) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
        let sql = match self.sqlite.then(|| positional(&sql)).flatten() {
            Some(p) => p,
            None => sql,
        };
        sqlx::query(sqlx::AssertSqlSafe(sql))
    }

    /// Begins a transaction that will write. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`): a transaction that reads first and writes later fails with
    /// SQLITE_BUSY_SNAPSHOT when another writer committed in between, which no busy
    /// timeout can wait out.
    pub async fn begin_write(&self) -> anyhow::Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(if self.sqlite {
            self.writer().begin_with("BEGIN IMMEDIATE").await?
        } else {
            self.pool.begin().await?
        })
    }

    pub async fn close(&self) {
        if let Some(w) = &self.writer {
            w.close().await;
        }
        self.pool.close().await;
    }

    /// Whether the database answers at all (a failed write may be the data's fault).
    pub async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
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
        assert_eq!(list(3, 2), "$2, $3, $4");
    }

    #[test]
    fn placeholders_in_order_become_anonymous() {
        assert_eq!(
            positional("INSERT INTO t VALUES ($1, $2), ($3, $4)").as_deref(),
            Some("INSERT INTO t VALUES (?, ?), (?, ?)")
        );
        // Reused or out of order: left as they are.
        assert_eq!(positional("SELECT $1 WHERE a = $1"), None);
        assert_eq!(positional("SELECT $2, $1"), None);
        assert_eq!(positional("SELECT 1").as_deref(), Some("SELECT 1"));
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
