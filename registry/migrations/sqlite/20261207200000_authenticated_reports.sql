-- Authenticated device reports (registry/src/ingest/admit.rs): per device, the highest
-- report counter accepted, which of the 64 below it were seen (a bit set), and the last
-- will its latest online presence announced.
ALTER TABLE device_identities ADD COLUMN report_counter BIGINT NOT NULL DEFAULT 0;
ALTER TABLE device_identities ADD COLUMN report_window BIGINT NOT NULL DEFAULT 0;
ALTER TABLE device_identities ADD COLUMN will_counter BIGINT NOT NULL DEFAULT 0;
ALTER TABLE device_identities ADD COLUMN will_spent BIGINT NOT NULL DEFAULT 0;
-- A device's status and presence are the ones with the highest counter, never the
-- newest by the device's own clock.
ALTER TABLE devices ADD COLUMN status_counter BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN presence_counter BIGINT NOT NULL DEFAULT 0;
