-- A device's events are read through (device, received_at) alone: the (device, id)
-- index was a second random-position insert for every event, and at 10,000 devices
-- the events insert was the costliest statement of ingest (docs/broker.md).
DROP INDEX events_by_device;
