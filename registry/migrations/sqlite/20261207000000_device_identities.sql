-- Device identities: each device's ed25519 public key, registered at provisioning, for
-- authenticated reports (manifests/src/report.rs): a report is to be ingested only when
-- the key registered for its device verifies it and its counter is above report_counter.
CREATE TABLE device_identities (
    id             TEXT PRIMARY KEY,
    public_key     BLOB NOT NULL,
    -- The groups the device was provisioned with (its provisioning record carries them).
    groups_json    TEXT NOT NULL,
    registered_at  BIGINT NOT NULL,
    -- Set when the device is revoked.
    revoked_at     BIGINT,
    -- The highest report counter accepted from the device (0: none yet).
    report_counter BIGINT NOT NULL DEFAULT 0,
    -- The counter of the last will the device announced for its current session.
    will_counter   BIGINT
);
