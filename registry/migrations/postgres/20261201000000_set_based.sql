-- Set-based ingest and rollouts (the registry's cost per device stays flat).

-- The groups each device reports, kept by ingest: group views and rollout stages read
-- members by index instead of parsing every device's groups_json.
CREATE TABLE device_groups (
    device     TEXT NOT NULL,
    group_name TEXT NOT NULL,
    PRIMARY KEY (device, group_name)
);
CREATE INDEX device_groups_by_group ON device_groups (group_name, device);
-- A digest of the groups and modules a device last reported: a status that repeats them
-- (the periodic republish, most statuses) does not rewrite its rows.
ALTER TABLE devices ADD COLUMN rows_digest BYTEA;
INSERT INTO device_groups (device, group_name)
    SELECT devices.id, g.value FROM devices, json_array_elements_text(devices.groups_json::json) g(value);

-- What an event is about, typed, so rollout decisions never parse its JSON detail.
ALTER TABLE events ADD COLUMN module TEXT;
ALTER TABLE events ADD COLUMN version TEXT;
ALTER TABLE events ADD COLUMN reason TEXT;
CREATE INDEX events_by_device_received ON events (device, received_at);

CREATE INDEX device_modules_by_version ON device_modules (name, version, state);
-- Rollout passes judge only the devices heard from since the last pass.
CREATE INDEX devices_by_last_seen ON devices (last_seen);
CREATE INDEX rollout_devices_by_state ON rollout_devices (rollout_id, state, assigned_at);

-- The health window the rollout's manifests ask of a new version (see docs/rollouts.md).
ALTER TABLE rollouts ADD COLUMN health_turns BIGINT NOT NULL DEFAULT 3;
ALTER TABLE rollouts ADD COLUMN health_seconds BIGINT NOT NULL DEFAULT 0;

-- The health window a deployment asked for (NULL: the device default); renewals keep it.
ALTER TABLE deployments ADD COLUMN health_turns BIGINT;
ALTER TABLE deployments ADD COLUMN health_seconds BIGINT;
