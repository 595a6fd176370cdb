-- Signed checkpoints: an Ed25519 signature over (chain, sequence, head hash, time),
-- taken every N events or T seconds. Append-only like the events.

CREATE TABLE audit_checkpoints (
    chain       TEXT   NOT NULL,
    sequence    BIGINT NOT NULL,
    head_hash   TEXT   NOT NULL,
    time_micros BIGINT NOT NULL,
    signature   TEXT   NOT NULL,
    key_id      TEXT   NOT NULL,
    PRIMARY KEY (chain, sequence)
);

CREATE TRIGGER audit_checkpoints_append_only
    BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();

CREATE TRIGGER audit_checkpoints_no_truncate
    BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
