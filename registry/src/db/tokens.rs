//! Scoped API tokens: a public id, a scope and the sha256 of the secret, never the
//! secret itself.

use super::{now_ms, Db};
use sqlx::any::AnyRow;
use sqlx::Row as _;

/// A token as listed (no secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub name: String,
    pub scope: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

fn token_from_row(r: &AnyRow) -> anyhow::Result<TokenRow> {
    Ok(TokenRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        scope: r.try_get("scope")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

impl Db {
    pub async fn insert_token(
        &self,
        id: &str,
        name: &str,
        scope: &str,
        secret_hash: &[u8; 32],
    ) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO api_tokens (id, name, scope, secret_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(name)
        .bind(scope)
        .bind(secret_hash.to_vec())
        .bind(now_ms())
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// The scope and secret hash of an unrevoked token.
    pub async fn live_token(&self, id: &str) -> anyhow::Result<Option<(String, Vec<u8>)>> {
        let row = sqlx::query(
            "SELECT scope, secret_hash FROM api_tokens WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get("scope")?, r.try_get("secret_hash")?)))
            .transpose()
    }

    pub async fn tokens(&self) -> anyhow::Result<Vec<TokenRow>> {
        let rows = sqlx::query(
            "SELECT id, name, scope, created_at, revoked_at FROM api_tokens ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    /// Revokes a token; false if there is no such unrevoked token.
    pub async fn revoke_token(&self, id: &str) -> anyhow::Result<bool> {
        let r = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(id)
        .execute(self.writer())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Unrevoked admin tokens other than `id`.
    pub async fn other_live_admins(&self, id: &str) -> anyhow::Result<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM api_tokens \
             WHERE scope = 'admin' AND revoked_at IS NULL AND id <> $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }

    /// Records the bootstrap token (the data directory's, or `--token`) under `id`, so it
    /// is listed and can be revoked like any other; a row already there (perhaps
    /// revoked) is left as it is.
    pub async fn ensure_bootstrap_token(&self, id: &str, secret_hash: &[u8]) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO api_tokens (id, name, scope, secret_hash, created_at) \
             VALUES ($1, 'bootstrap (data directory or --token)', 'admin', $2, $3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(secret_hash.to_vec())
        .bind(now_ms())
        .execute(self.writer())
        .await?;
        Ok(())
    }
}
