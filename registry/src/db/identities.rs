//! Device identities: the ed25519 public key each device was provisioned with, and
//! whether it is revoked.

use super::{list, placeholders, Db, ROWS_PER_STATEMENT};
use sqlx::any::AnyRow;
use sqlx::Row as _;
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
        .execute(&self.pool)
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
}
