//! Devices as they report themselves: ingest's set-based writes, and the fleet views
//! (summaries aggregated in SQL, filtered device lists, events).

use super::{list, placeholders, Db, ROWS_PER_STATEMENT};
use sqlx::any::AnyRow;
use sqlx::{Any, Row as _, Transaction};
use std::collections::HashSet;

/// One device's status, as the ingest hands it over.
#[derive(Clone, Debug)]
pub struct StatusWrite {
    pub device: String,
    pub groups: Vec<String>,
    pub sequence: i64,
    pub slots_used: i64,
    pub slots_total: i64,
    pub flash_free: i64,
    pub ram_free: i64,
    pub last_error: Option<String>,
    /// Digest of `groups` and of `modules` ([`rows_digest`]): where a half matches the
    /// stored one, that table's rows stay as they are.
    pub rows_digest: RowsDigest,
    pub status: Vec<u8>,
    /// The device's clock when it sent the status: shown, never used to order.
    pub status_at: i64,
    /// The report's counter: a status replaces the stored one only if higher.
    pub counter: i64,
    /// Registry clock when received live; for a retained replay the device's own clock,
    /// so a registry restart does not make every device look freshly seen.
    pub seen_at: i64,
    pub modules: Vec<DeviceModule>,
    /// The trust chain epoch the device says it reached (`crate::trust`).
    pub trust_epoch: Option<i64>,
}

/// A digest of a status's groups (first half) and of its modules (second half).
pub type RowsDigest = [u8; 16];

/// The rows a status stands for besides the device's own, each table with its half of
/// the [`RowsDigest`].
#[derive(Clone, Copy)]
enum DeviceRows {
    Groups,
    Modules,
}

impl DeviceRows {
    fn table(self) -> &'static str {
        match self {
            DeviceRows::Groups => "device_groups",
            DeviceRows::Modules => "device_modules",
        }
    }

    fn half(self) -> std::ops::Range<usize> {
        match self {
            DeviceRows::Groups => 0..8,
            DeviceRows::Modules => 8..16,
        }
    }
}

/// The [`RowsDigest`] of `groups` and `modules`. Two halves, so a status whose modules
/// changed (every step of an install) leaves the device's group rows alone: each rewritten
/// row costs index pages no other report of the batch shares in a large fleet.
pub fn rows_digest(groups: &[String], modules: &[wpm_manifests::ModuleStatus]) -> RowsDigest {
    let mut d = [0; 16];
    d[..8].copy_from_slice(&wpm_manifests::sha256(&wpm_manifests::encode(&groups))[..8]);
    d[8..].copy_from_slice(&wpm_manifests::sha256(&wpm_manifests::encode(&modules))[..8]);
    d
}

/// One module as a device reported it: what ingest writes and the fleet view reads.
#[derive(Clone, Debug)]
pub struct DeviceModule {
    pub name: String,
    pub version: String,
    pub sha256: Vec<u8>,
    pub state: String,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct PresenceWrite {
    pub device: String,
    pub online: bool,
    /// The report's counter: a presence replaces the stored one only if higher, except
    /// a last will, which ends the session it was announced for whatever its counter.
    pub counter: i64,
    pub will: bool,
    /// When the device was last known alive: now for a live message, 0 for a retained
    /// replay (which says nothing about when).
    pub seen_at: i64,
}

#[derive(Clone, Debug)]
pub struct EventWrite {
    pub device: String,
    pub at_ms: i64,
    pub kind: String,
    pub detail: String,
    /// The module and version the event is about and why, if it says (typed, for
    /// rollout decisions).
    pub module: Option<String>,
    pub version: Option<String>,
    pub reason: Option<String>,
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

/// Which devices a fleet view covers.
#[derive(Clone, Debug, Default)]
pub struct FleetFilter {
    pub group: Option<String>,
    pub module: Option<String>,
    /// `online`, `offline` or `failing`.
    pub state: Option<String>,
}

/// Devices reporting one module version, and how many of them run it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionCount {
    pub name: String,
    pub version: String,
    pub devices: i64,
    pub running: i64,
}

/// A fleet view's numbers, aggregated by the database.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetSummary {
    pub devices: i64,
    pub online: i64,
    pub failing: i64,
    pub versions: Vec<VersionCount>,
}

/// A device is failing when it reports an error or a module of it failed.
const FAILING: &str = "(d.last_error IS NOT NULL OR d.id IN \
    (SELECT device FROM device_modules WHERE state = 'failed'))";

impl FleetFilter {
    /// `WHERE …` over `devices d` with its parameters, numbered from `$1`.
    fn sql(&self) -> anyhow::Result<(String, Vec<String>)> {
        let mut clauses = Vec::new();
        let mut binds = Vec::new();
        if let Some(g) = &self.group {
            binds.push(g.clone());
            clauses.push(format!(
                "d.id IN (SELECT device FROM device_groups WHERE group_name = ${})",
                binds.len()
            ));
        }
        if let Some(m) = &self.module {
            binds.push(m.clone());
            clauses.push(format!(
                "d.id IN (SELECT device FROM device_modules WHERE name = ${})",
                binds.len()
            ));
        }
        match self.state.as_deref() {
            None => {}
            Some("online") => clauses.push("d.online = 1".into()),
            Some("offline") => clauses.push("d.online = 0".into()),
            Some("failing") => clauses.push(FAILING.into()),
            Some(other) => anyhow::bail!("unknown device state {other:?}"),
        }
        let sql = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        Ok((sql, binds))
    }
}

fn device_module(r: &AnyRow) -> anyhow::Result<DeviceModule> {
    Ok(DeviceModule {
        name: r.try_get("name")?,
        version: r.try_get("version")?,
        sha256: r.try_get("sha256")?,
        state: r.try_get("state")?,
        last_error: r.try_get("last_error")?,
    })
}

impl Db {
    /// Writes one ingest batch's reports in the caller's transaction, a few multi-row
    /// statements per kind of record. A status or presence with a lower counter than
    /// the stored one (a late report) changes nothing; the `seen` devices' last_seen
    /// moves to `seen_at`. `stored_digest` says what digest of its group and module
    /// rows a device has stored: a stored status with another replaces those rows.
    ///
    /// Returns the devices whose status was stored.
    #[allow(clippy::too_many_arguments)]
    pub async fn write_reports(
        &self,
        tx: &mut Transaction<'static, Any>,
        statuses: &[&StatusWrite],
        presences: &[&PresenceWrite],
        events: &[EventWrite],
        seen: &[&String],
        seen_at: i64,
        stored_digest: impl Fn(&str) -> Option<RowsDigest>,
    ) -> anyhow::Result<HashSet<String>> {
        let mut stored = HashSet::new();
        for chunk in statuses.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO devices (id, groups_json, online, last_seen, sequence, slots_used, \
                 slots_total, flash_free, ram_free, last_error, rows_digest, status, status_at, \
                 status_counter, trust_epoch) \
                 VALUES {} \
                 ON CONFLICT (id) DO UPDATE SET groups_json = excluded.groups_json, \
                 last_seen = CASE WHEN excluded.last_seen > devices.last_seen \
                   THEN excluded.last_seen ELSE devices.last_seen END, \
                 sequence = excluded.sequence, slots_used = excluded.slots_used, \
                 slots_total = excluded.slots_total, flash_free = excluded.flash_free, \
                 ram_free = excluded.ram_free, last_error = excluded.last_error, \
                 rows_digest = excluded.rows_digest, \
                 status = excluded.status, status_at = excluded.status_at, \
                 status_counter = excluded.status_counter, trust_epoch = excluded.trust_epoch \
                 WHERE devices.status_counter < excluded.status_counter \
                 RETURNING id",
                placeholders(chunk.len(), 15, 1)
            );
            let mut q = self.statement(sql);
            for s in chunk {
                q = q
                    .bind(&s.device)
                    .bind(serde_json::to_string(&s.groups)?)
                    .bind(1i64)
                    .bind(s.seen_at)
                    .bind(s.sequence)
                    .bind(s.slots_used)
                    .bind(s.slots_total)
                    .bind(s.flash_free)
                    .bind(s.ram_free)
                    .bind(&s.last_error)
                    .bind(s.rows_digest.to_vec())
                    .bind(s.status.clone())
                    .bind(s.status_at)
                    .bind(s.counter)
                    .bind(s.trust_epoch);
            }
            let written: HashSet<String> = q
                .fetch_all(&mut **tx)
                .await?
                .iter()
                .map(|r| r.try_get("id"))
                .collect::<Result<_, _>>()?;
            // Stored, and with other groups or modules than before.
            for rows in [DeviceRows::Groups, DeviceRows::Modules] {
                let changed: Vec<&StatusWrite> = (chunk.iter())
                    .filter(|s| written.contains(&s.device))
                    .filter(|s| {
                        stored_digest(&s.device)
                            .is_none_or(|d| d[rows.half()] != s.rows_digest[rows.half()])
                    })
                    .copied()
                    .collect();
                self.replace_device_rows(tx, rows, &changed).await?;
            }
            stored.extend(written);
        }
        let (wills, presences): (Vec<&PresenceWrite>, Vec<&PresenceWrite>) =
            presences.iter().partition(|p| p.will);
        for chunk in presences.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO devices (id, groups_json, online, last_seen, sequence, slots_used, \
                 slots_total, flash_free, ram_free, presence_counter) VALUES {} \
                 ON CONFLICT (id) DO UPDATE SET online = CASE \
                   WHEN excluded.presence_counter > devices.presence_counter \
                   THEN excluded.online ELSE devices.online END, \
                 presence_counter = CASE \
                   WHEN excluded.presence_counter > devices.presence_counter \
                   THEN excluded.presence_counter ELSE devices.presence_counter END, \
                 last_seen = CASE WHEN excluded.last_seen > devices.last_seen \
                   THEN excluded.last_seen ELSE devices.last_seen END",
                placeholders(chunk.len(), 10, 1)
            );
            let mut q = self.statement(sql);
            for p in chunk {
                q = q
                    .bind(&p.device)
                    .bind("[]")
                    .bind(p.online as i64)
                    .bind(p.seen_at)
                    .bind(0i64)
                    .bind(0i64)
                    .bind(0i64)
                    .bind(0i64)
                    .bind(0i64)
                    .bind(p.counter);
            }
            q.execute(&mut **tx).await?;
        }
        for chunk in wills.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "UPDATE devices SET online = 0 WHERE id IN ({})",
                list(chunk.len(), 1)
            );
            let mut q = self.statement(sql);
            for p in chunk {
                q = q.bind(&p.device);
            }
            q.execute(&mut **tx).await?;
        }
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO events (device, at_ms, kind, detail, module, version, reason, \
                 received_at) VALUES {}",
                placeholders(chunk.len(), 8, 1)
            );
            let mut q = self.statement(sql);
            for e in chunk {
                q = q
                    .bind(&e.device)
                    .bind(e.at_ms)
                    .bind(&e.kind)
                    .bind(&e.detail)
                    .bind(&e.module)
                    .bind(&e.version)
                    .bind(&e.reason)
                    .bind(e.received_at);
            }
            q.execute(&mut **tx).await?;
        }
        for ids in seen.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "UPDATE devices SET last_seen = $1 WHERE last_seen < $2 AND id IN ({})",
                list(ids.len(), 3)
            );
            let mut q = self.statement(sql).bind(seen_at).bind(seen_at);
            for id in ids {
                q = q.bind(*id);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(stored)
    }

    /// The numbers of a fleet view: devices, online, failing, and per module version.
    pub async fn fleet_summary(&self, filter: &FleetFilter) -> anyhow::Result<FleetSummary> {
        let (filter_sql, binds) = filter.sql()?;
        let sql = format!(
            "SELECT COUNT(*) AS devices, CAST(COALESCE(SUM(d.online), 0) AS BIGINT) AS online, \
             CAST(COALESCE(SUM(CASE WHEN {FAILING} THEN 1 ELSE 0 END), 0) AS BIGINT) AS failing \
             FROM devices d {filter_sql}"
        );
        let mut q = self.statement(sql);
        for b in &binds {
            q = q.bind(b);
        }
        let row = q.fetch_one(&self.pool).await?;
        let sql = format!(
            "SELECT m.name, m.version, COUNT(*) AS devices, \
             CAST(SUM(CASE WHEN m.state = 'running' THEN 1 ELSE 0 END) AS BIGINT) AS running \
             FROM device_modules m JOIN devices d ON d.id = m.device {filter_sql} \
             GROUP BY m.name, m.version ORDER BY m.name, m.version"
        );
        let mut q = self.statement(sql);
        for b in &binds {
            q = q.bind(b);
        }
        let versions = q
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(VersionCount {
                    name: r.try_get("name")?,
                    version: r.try_get("version")?,
                    devices: r.try_get("devices")?,
                    running: r.try_get("running")?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(FleetSummary {
            devices: row.try_get("devices")?,
            online: row.try_get("online")?,
            failing: row.try_get("failing")?,
            versions,
        })
    }

    /// The devices of a fleet view with their modules, by id.
    pub async fn fleet(&self, filter: &FleetFilter) -> anyhow::Result<Vec<DeviceView>> {
        let (filter_sql, binds) = filter.sql()?;
        let sql = format!(
            "SELECT id, groups_json, online, last_seen, sequence, slots_used, slots_total, \
             flash_free, ram_free, last_error FROM devices d {filter_sql} ORDER BY id"
        );
        let mut q = self.statement(sql);
        for b in &binds {
            q = q.bind(b);
        }
        let rows = q.fetch_all(&self.pool).await?;
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
        let sql = format!(
            "SELECT device, name, version, sha256, state, last_error FROM device_modules \
             WHERE device IN (SELECT d.id FROM devices d {filter_sql}) \
             ORDER BY device, name, version"
        );
        let mut q = self.statement(sql);
        for b in &binds {
            q = q.bind(b);
        }
        for r in &q.fetch_all(&self.pool).await? {
            let device: String = r.try_get("device")?;
            if let Some(&i) = index.get(&device) {
                devices[i].modules.push(device_module(r)?);
            }
        }
        Ok(devices)
    }

    /// Members of a group, by the groups their status records report, sorted by id.
    pub async fn group_members(&self, group: &str) -> anyhow::Result<Vec<String>> {
        let rows =
            sqlx::query("SELECT device FROM device_groups WHERE group_name = $1 ORDER BY device")
                .bind(group)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|r| Ok(r.try_get("device")?)).collect()
    }

    /// A device's events, newest first.
    pub async fn events(&self, device: &str, limit: i64) -> anyhow::Result<Vec<EventView>> {
        let rows = sqlx::query(
            // (device, received_at) is the index; id orders events received in one batch.
            "SELECT at_ms, kind, detail FROM events WHERE device = $1 \
             ORDER BY received_at DESC, id DESC LIMIT $2",
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

impl Db {
    /// Replaces the `rows` of devices whose status was just stored.
    async fn replace_device_rows(
        &self,
        tx: &mut sqlx::AnyConnection,
        rows: DeviceRows,
        statuses: &[&StatusWrite],
    ) -> anyhow::Result<()> {
        if statuses.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "DELETE FROM {} WHERE device IN ({})",
            rows.table(),
            list(statuses.len(), 1)
        );
        let mut q = self.statement(sql);
        for s in statuses {
            q = q.bind(&s.device);
        }
        q.execute(&mut *tx).await?;
        match rows {
            DeviceRows::Groups => self.insert_groups(tx, statuses).await,
            DeviceRows::Modules => self.insert_modules(tx, statuses).await,
        }
    }

    /// Inserts the module rows of `statuses`' devices.
    async fn insert_modules(
        &self,
        tx: &mut sqlx::AnyConnection,
        statuses: &[&StatusWrite],
    ) -> anyhow::Result<()> {
        let mut modules: Vec<(&str, &DeviceModule)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for s in statuses {
            for m in &s.modules {
                // The key of the table; a device listing one version twice is stored once.
                if seen.insert((&s.device, &m.name, &m.version)) {
                    modules.push((&s.device, m));
                }
            }
        }
        for chunk in modules.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO device_modules (device, name, version, sha256, state, last_error) \
             VALUES {}",
                placeholders(chunk.len(), 6, 1)
            );
            let mut q = self.statement(sql);
            for (d, m) in chunk {
                q = q
                    .bind(*d)
                    .bind(&m.name)
                    .bind(&m.version)
                    .bind(m.sha256.clone())
                    .bind(&m.state)
                    .bind(&m.last_error);
            }
            q.execute(&mut *tx).await?;
        }
        Ok(())
    }

    /// Inserts the group rows of `statuses`' devices.
    async fn insert_groups(
        &self,
        tx: &mut sqlx::AnyConnection,
        statuses: &[&StatusWrite],
    ) -> anyhow::Result<()> {
        let groups: std::collections::BTreeSet<(&str, &str)> = statuses
            .iter()
            .flat_map(|s| s.groups.iter().map(|g| (s.device.as_str(), g.as_str())))
            .collect();
        let groups: Vec<_> = groups.into_iter().collect();
        for chunk in groups.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO device_groups (device, group_name) VALUES {}",
                placeholders(chunk.len(), 2, 1)
            );
            let mut q = self.statement(sql);
            for (d, g) in chunk {
                q = q.bind(*d).bind(*g);
            }
            q.execute(&mut *tx).await?;
        }
        Ok(())
    }
}
