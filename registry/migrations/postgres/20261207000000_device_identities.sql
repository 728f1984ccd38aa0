-- Device identities: each device's ed25519 public key, registered at provisioning, for
-- authenticated reports (manifests/src/report.rs).
CREATE TABLE device_identities (
    id             TEXT PRIMARY KEY,
    public_key     BYTEA NOT NULL,
    -- The groups the device was provisioned with (its provisioning record carries them).
    groups_json    TEXT NOT NULL,
    registered_at  BIGINT NOT NULL,
    -- Set when the device is revoked.
    revoked_at     BIGINT
);
