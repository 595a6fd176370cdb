-- Signed checkpoints: an Ed25519 signature over (chain, sequence, head hash, time),
-- taken every N events or T seconds. Append-only like the events.

CREATE TABLE audit_checkpoints (
    chain       TEXT    NOT NULL,
    sequence    INTEGER NOT NULL,
    head_hash   TEXT    NOT NULL,
    time_micros INTEGER NOT NULL,
    signature   TEXT    NOT NULL,
    key_id      TEXT    NOT NULL,
    PRIMARY KEY (chain, sequence)
);

CREATE TRIGGER audit_checkpoints_no_update
BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit checkpoints are append-only: UPDATE refused');
END;

CREATE TRIGGER audit_checkpoints_no_delete
BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit checkpoints are append-only: DELETE refused');
END;
