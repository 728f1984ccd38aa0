-- Key rotation (registry/src/trust.rs): every trust update the registry issued, each
-- sealed by a key in force before it; published together, oldest first, as the chain
-- devices follow.
CREATE TABLE trust_chain (
    epoch      BIGINT PRIMARY KEY,
    sealed     BYTEA  NOT NULL,
    created_at BIGINT NOT NULL
);
-- The epoch of that chain each device last reported having reached (NULL: not said).
ALTER TABLE devices ADD COLUMN trust_epoch BIGINT;
