//! Device identities: the ed25519 public key each device was provisioned with, and
//! whether it is revoked.

use super::{list, placeholders, Db, RowsDigest, ROWS_PER_STATEMENT};
use crate::ingest::Counters;
use sqlx::any::AnyRow;
use sqlx::{Any, Row as _, Transaction};
use std::collections::HashMap;

/// A registered device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    pub public_key: [u8; 32],
    pub groups: Vec<String>,
    pub registered_at: i64,
    /// When it was revoked.
    pub revoked_at: Option<i64>,
}

/// A device to register.
#[derive(Clone, Debug)]
pub struct NewIdentity {
    pub id: String,
    pub public_key: [u8; 32],
    pub groups: Vec<String>,
}

/// Where a device stands for the reports of one ingest batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Standing {
    pub counters: Counters,
    pub revoked: bool,
    /// The digest of the group and module rows stored for its last status, if any: a
    /// status with the same digest leaves those rows alone.
    pub rows_digest: Option<RowsDigest>,
}

const COLUMNS: &str = "id, public_key, groups_json, registered_at, revoked_at";

fn identity_from_row(r: &AnyRow) -> anyhow::Result<Identity> {
    let key: Vec<u8> = r.try_get("public_key")?;
    Ok(Identity {
        id: r.try_get("id")?,
        public_key: key
            .try_into()
            .map_err(|_| anyhow::anyhow!("stored device key is not 32 bytes"))?,
        groups: serde_json::from_str(&r.try_get::<String, _>("groups_json")?)?,
        registered_at: r.try_get("registered_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

impl Db {
    /// Registers `devices`, all or none. A device already registered with the same key
    /// is left as it is (provisioning can be repeated); one registered with another key
    /// is a conflict: its id is returned in `Err` and nothing is written. Giving a device
    /// a new key takes an explicit [`Db::remove_device`] first.
    pub async fn register_devices(
        &self,
        devices: &[NewIdentity],
        now: i64,
    ) -> anyhow::Result<Result<usize, Vec<String>>> {
        let mut tx = self.begin_write().await?;
        let mut stored: HashMap<String, Vec<u8>> = HashMap::new();
        for chunk in devices.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT id, public_key FROM device_identities WHERE id IN ({})",
                list(chunk.len(), 1)
            );
            let mut q = self.statement(sql);
            for d in chunk {
                q = q.bind(&d.id);
            }
            for r in q.fetch_all(&mut *tx).await? {
                stored.insert(r.try_get("id")?, r.try_get("public_key")?);
            }
        }
        let conflicts: Vec<String> = devices
            .iter()
            .filter(|d| stored.get(&d.id).is_some_and(|k| k[..] != d.public_key[..]))
            .map(|d| d.id.clone())
            .collect();
        if !conflicts.is_empty() {
            return Ok(Err(conflicts));
        }
        let new: Vec<&NewIdentity> = devices
            .iter()
            .filter(|d| !stored.contains_key(&d.id))
            .collect();
        for chunk in new.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO device_identities (id, public_key, groups_json, registered_at) \
                 VALUES {} ON CONFLICT (id) DO NOTHING",
                placeholders(chunk.len(), 4, 1)
            );
            let mut q = self.statement(sql);
            for d in chunk {
                q = q
                    .bind(&d.id)
                    .bind(d.public_key.to_vec())
                    .bind(serde_json::to_string(&d.groups)?)
                    .bind(now);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Ok(new.len()))
    }

    /// Every registered device, by id.
    pub async fn identities(&self) -> anyhow::Result<Vec<Identity>> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM device_identities ORDER BY id"
        )))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(identity_from_row)
        .collect()
    }

    /// Revokes a device. False if it is not registered; revoking twice keeps the first
    /// time.
    pub async fn revoke_device(&self, id: &str, now: i64) -> anyhow::Result<bool> {
        let r = sqlx::query(
            "UPDATE device_identities \
             SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2",
        )
        .bind(now)
        .bind(id)
        .execute(self.writer())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Forgets a device: its identity and everything the fleet view holds of it (status,
    /// modules, groups, events). False if it was neither registered nor known.
    pub async fn remove_device(&self, id: &str) -> anyhow::Result<bool> {
        let mut tx = self.begin_write().await?;
        let mut removed = 0;
        for table in [
            "device_identities WHERE id",
            "devices WHERE id",
            "device_modules WHERE device",
            "device_groups WHERE device",
            "events WHERE device",
        ] {
            removed += sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} = $1")))
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(removed > 0)
    }

    /// The key `id` logs in to the broker with: registered and not revoked.
    pub async fn login_key(&self, id: &str) -> anyhow::Result<Option<[u8; 32]>> {
        let row = sqlx::query(
            "SELECT public_key FROM device_identities WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let key: Vec<u8> = r.try_get("public_key")?;
            key.try_into()
                .map_err(|_| anyhow::anyhow!("stored device key is not 32 bytes"))
        })
        .transpose()
    }

    /// The public keys of those of `ids` that are registered (revoked or not).
    pub async fn public_keys(&self, ids: &[&str]) -> anyhow::Result<Vec<(String, [u8; 32])>> {
        let mut keys = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT id, public_key FROM device_identities WHERE id IN ({})",
                list(chunk.len(), 1)
            );
            let mut q = self.statement(sql);
            for id in chunk {
                q = q.bind(*id);
            }
            for r in q.fetch_all(&self.pool).await? {
                let key: Vec<u8> = r.try_get("public_key")?;
                let key = key
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("stored device key is not 32 bytes"))?;
                keys.push((r.try_get("id")?, key));
            }
        }
        Ok(keys)
    }

    /// The standing of those of `ids` that are registered, read in the ingest's write
    /// transaction; [`Db::save_counters`] stores what a batch made of it only if no
    /// one changed it since.
    pub async fn standings(
        &self,
        tx: &mut Transaction<'static, Any>,
        ids: &[&str],
    ) -> anyhow::Result<HashMap<String, Standing>> {
        let mut standings = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                // A correlated lookup rather than a join: PostgreSQL hashes the whole
                // devices table for a join, whatever the size of the list.
                "SELECT i.id, i.report_counter, i.report_window, i.will_counter, \
                 i.will_spent, i.revoked_at, \
                 (SELECT d.rows_digest FROM devices d WHERE d.id = i.id) AS rows_digest \
                 FROM device_identities i WHERE i.id IN ({})",
                list(chunk.len(), 1)
            );
            let mut q = self.statement(sql);
            for id in chunk {
                q = q.bind(*id);
            }
            for r in q.fetch_all(&mut **tx).await? {
                // Counters are u64 on the wire and BIGINT here; the window is a bit set.
                let counters = Counters {
                    highest: r.try_get::<i64, _>("report_counter")? as u64,
                    window: r.try_get::<i64, _>("report_window")? as u64,
                    will: r.try_get::<i64, _>("will_counter")? as u64,
                    will_spent: r.try_get::<i64, _>("will_spent")? != 0,
                };
                let revoked = r.try_get::<Option<i64>, _>("revoked_at")?.is_some();
                let rows_digest = (r.try_get::<Option<Vec<u8>>, _>("rows_digest")?)
                    .and_then(|d| d.try_into().ok());
                let standing = Standing {
                    counters,
                    revoked,
                    rows_digest,
                };
                standings.insert(r.try_get("id")?, standing);
            }
        }
        Ok(standings)
    }

    /// Stores the counters an ingest batch moved from `read` (the standing it judged
    /// on) to `now`, one statement per chunk of devices. `Ok(false)`: a row was not as
    /// read (another registry replica moved its counters, the device was revoked or
    /// removed); the caller rolls back and judges again. Optimistic rather than `SELECT
    /// … FOR UPDATE`, which made PostgreSQL write every row twice per batch and which
    /// would need a read before every batch.
    pub async fn save_counters(
        &self,
        tx: &mut Transaction<'static, Any>,
        counters: &[(&str, Counters, Counters)],
    ) -> anyhow::Result<bool> {
        for chunk in counters.chunks(ROWS_PER_STATEMENT) {
            // Both databases name the columns of a VALUES list column1, column2, …
            let sql = format!(
                "UPDATE device_identities SET report_counter = v.column2, \
                 report_window = v.column3, will_counter = v.column4, will_spent = v.column5 \
                 FROM (VALUES {}) AS v WHERE device_identities.id = v.column1 \
                 AND report_counter = v.column6 AND report_window = v.column7 \
                 AND will_counter = v.column8 AND will_spent = v.column9 \
                 AND revoked_at IS NULL",
                placeholders(chunk.len(), 9, 1)
            );
            let mut q = self.statement(sql);
            for (id, read, now) in chunk {
                q = q.bind(*id);
                for c in [now, read] {
                    q = q
                        .bind(c.highest as i64)
                        .bind(c.window as i64)
                        .bind(c.will as i64)
                        .bind(i64::from(c.will_spent));
                }
            }
            if q.execute(&mut **tx).await?.rows_affected() != chunk.len() as u64 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Per device, the sequence of the newest deployment that addresses it now (fleet,
    /// one of its groups, or the device itself; 0 if none): its provisioning record's
    /// floor, below which it accepts no deployment.
    pub async fn sequence_floors(
        &self,
        devices: &[NewIdentity],
    ) -> anyhow::Result<HashMap<String, u64>> {
        let mut groups: Vec<&str> = (devices.iter())
            .flat_map(|d| d.groups.iter().map(String::as_str))
            .collect();
        groups.sort_unstable();
        groups.dedup();
        let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
        let fleet = self.newest_sequences("fleet", &[""]).await?;
        let by_group = self.newest_sequences("group", &groups).await?;
        let by_device = self.newest_sequences("device", &ids).await?;
        Ok(devices
            .iter()
            .map(|d| {
                let floor = (d.groups.iter().filter_map(|g| by_group.get(g)))
                    .chain(by_device.get(&d.id))
                    .chain(fleet.get(""))
                    .copied()
                    .max()
                    .unwrap_or(0);
                (d.id.clone(), floor)
            })
            .collect())
    }

    /// The newest deployment sequence per target name of one kind, for `names`.
    async fn newest_sequences(
        &self,
        kind: &str,
        names: &[&str],
    ) -> anyhow::Result<HashMap<String, u64>> {
        let mut newest = HashMap::new();
        for chunk in names.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT target_name, MAX(sequence) AS newest FROM deployments \
                 WHERE target_kind = $1 AND target_name IN ({}) GROUP BY target_name",
                list(chunk.len(), 2)
            );
            let mut q = self.statement(sql).bind(kind);
            for name in chunk {
                q = q.bind(*name);
            }
            for r in q.fetch_all(&self.pool).await? {
                let n: i64 = r.try_get("newest")?;
                newest.insert(r.try_get("target_name")?, u64::try_from(n)?);
            }
        }
        Ok(newest)
    }
}

/// The embedded broker's gate asks the database who a device is.
#[async_trait::async_trait]
impl wpm_broker::Directory for Db {
    async fn login_key(&self, device: &str) -> Option<[u8; 32]> {
        match Db::login_key(self, device).await {
            Ok(key) => key,
            Err(e) => {
                // Refusing is the safe answer; the device retries with back-off.
                tracing::error!(
                    error = format!("{e:#}"),
                    device,
                    "cannot look up a device's login key"
                );
                None
            }
        }
    }
}
