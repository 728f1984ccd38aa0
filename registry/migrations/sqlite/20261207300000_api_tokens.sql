-- Scoped API tokens (registry/src/http/tokens.rs): only a hash of each secret is kept.
-- The bootstrap token in the data directory stays an admin token.
CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    -- read, publish, deploy or admin.
    scope       TEXT NOT NULL,
    -- sha256 of the token's secret part.
    secret_hash BLOB NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
