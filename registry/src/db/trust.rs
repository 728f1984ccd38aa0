//! The trust chain the registry issued (key rotation, `crate::trust`), and how far the
//! fleet has followed it.

use super::{now_ms, Db};
use sqlx::Row as _;

impl Db {
    /// Every trust update issued, oldest first: (epoch, sealed update).
    pub async fn trust_chain(&self) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
        let rows = sqlx::query("SELECT epoch, sealed FROM trust_chain ORDER BY epoch")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<i64, _>("epoch")? as u64, r.try_get("sealed")?)))
            .collect()
    }

    /// Records the update to `epoch`. `Ok(false)`: that epoch is taken (another
    /// replica rotated at the same time), and nothing was written.
    pub async fn add_trust_link(&self, epoch: u64, sealed: &[u8]) -> anyhow::Result<bool> {
        let written = sqlx::query(
            "INSERT INTO trust_chain (epoch, sealed, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (epoch) DO NOTHING",
        )
        .bind(epoch as i64)
        .bind(sealed.to_vec())
        .bind(now_ms())
        .execute(self.writer())
        .await?
        .rows_affected();
        Ok(written == 1)
    }

    /// Registered, unrevoked devices that have not reported reaching `epoch` (those
    /// that never said count as behind).
    pub async fn devices_behind(&self, epoch: u64) -> anyhow::Result<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM device_identities i \
             LEFT JOIN devices d ON d.id = i.id \
             WHERE i.revoked_at IS NULL AND (d.trust_epoch IS NULL OR d.trust_epoch < $1)",
        )
        .bind(epoch as i64)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }
}
