-- Staged rollouts (see docs/rollouts.md). All of a rollout's state lives here so that
-- any registry replica can carry it on.
CREATE TABLE rollouts (
    id               BIGINT PRIMARY KEY,
    module_name      TEXT   NOT NULL,
    version          TEXT   NOT NULL,
    -- The version the group ran before (NULL: the module was not in its set).
    previous_version TEXT,
    group_name       TEXT   NOT NULL,
    -- JSON array of cumulative percentages, ending with 100.
    stages_json      TEXT   NOT NULL,
    stage            BIGINT NOT NULL,
    -- running, paused, rolling_back, rolled_back, completed
    state            TEXT   NOT NULL,
    max_failure_pct  BIGINT NOT NULL,
    stage_timeout_ms BIGINT NOT NULL,
    -- Sequence of the group manifest issued by the final stage.
    group_sequence   BIGINT,
    reason           TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('rollout_id', 0);

CREATE TABLE rollout_devices (
    rollout_id  BIGINT NOT NULL,
    device      TEXT   NOT NULL,
    stage       BIGINT NOT NULL,
    -- updating, succeeded, failed, rolled_back
    state       TEXT   NOT NULL,
    sequence    BIGINT NOT NULL,
    assigned_at BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    detail      TEXT,
    PRIMARY KEY (rollout_id, device)
);

-- Which replica runs the rollout controller: taken when free or expired, renewed by
-- the holder on every pass.
CREATE TABLE leases (
    name       TEXT   PRIMARY KEY,
    holder     TEXT   NOT NULL,
    expires_at BIGINT NOT NULL
);
INSERT INTO leases (name, holder, expires_at) VALUES ('rollout-controller', '', 0);

CREATE INDEX events_by_received ON events (received_at);

-- A rollout's per-device deployments are retired when it ends (the group manifest, or
-- the group's unchanged set, takes over): they are no longer renewed or republished,
-- so a renewal can never bring an old per-device set back above a newer group one.
ALTER TABLE deployments ADD COLUMN retired BIGINT NOT NULL DEFAULT 0;
