-- Times are unix milliseconds (BIGINT); booleans are 0/1 BIGINT so the same Rust code
-- reads them through sqlx's Any driver on SQLite and PostgreSQL alike.

CREATE TABLE modules (
    name          TEXT   NOT NULL,
    version       TEXT   NOT NULL,
    sha256        BYTEA   NOT NULL,
    size          BIGINT NOT NULL,
    chunk_size    BIGINT NOT NULL,
    memory_limit  BIGINT NOT NULL,
    fuel_per_turn BIGINT NOT NULL,
    priority      BIGINT NOT NULL,
    pinned        BIGINT NOT NULL,
    wasm          BYTEA   NOT NULL,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);

-- Registry-wide counters. The deployment sequence is allocated with
-- UPDATE ... RETURNING inside the deploy transaction, so it is strictly increasing
-- even with several registry replicas on one database.
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('deployment_sequence', 0);

CREATE TABLE deployments (
    sequence     BIGINT PRIMARY KEY,
    target_kind  TEXT   NOT NULL,
    target_name  TEXT   NOT NULL,
    sealed       BYTEA   NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL
);
CREATE INDEX deployments_by_target ON deployments (target_kind, target_name, sequence);

CREATE TABLE desired_modules (
    target_kind TEXT NOT NULL,
    target_name TEXT NOT NULL,
    module_name TEXT NOT NULL,
    version     TEXT NOT NULL,
    PRIMARY KEY (target_kind, target_name, module_name)
);

CREATE TABLE devices (
    id          TEXT   PRIMARY KEY,
    groups_json TEXT   NOT NULL,
    online      BIGINT NOT NULL,
    last_seen   BIGINT NOT NULL,
    sequence    BIGINT NOT NULL,
    slots_used  BIGINT NOT NULL,
    slots_total BIGINT NOT NULL,
    flash_free  BIGINT NOT NULL,
    ram_free    BIGINT NOT NULL,
    last_error  TEXT,
    status      BYTEA,
    status_at   BIGINT
);

CREATE TABLE device_modules (
    device     TEXT NOT NULL,
    name       TEXT NOT NULL,
    version    TEXT NOT NULL,
    sha256     BYTEA NOT NULL,
    state      TEXT NOT NULL,
    last_error TEXT,
    PRIMARY KEY (device, name, version)
);

CREATE TABLE events (
    id          BIGSERIAL PRIMARY KEY,
    device      TEXT   NOT NULL,
    at_ms       BIGINT NOT NULL,
    kind        TEXT   NOT NULL,
    detail      TEXT   NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE INDEX events_by_device ON events (device, id);
