-- Retention cuts: a signed statement that the events up to `sequence` were removed
-- on purpose. Events may be deleted only when a recorded cut covers them.

CREATE TABLE audit_retention_cuts (
    chain       TEXT    NOT NULL,
    sequence    INTEGER NOT NULL,
    head_hash   TEXT    NOT NULL,
    time_micros INTEGER NOT NULL,
    signature   TEXT    NOT NULL,
    key_id      TEXT    NOT NULL,
    PRIMARY KEY (chain, sequence)
);

DROP TRIGGER audit_events_no_delete;

CREATE TRIGGER audit_events_no_delete
BEFORE DELETE ON audit_events
WHEN NOT EXISTS (
    SELECT 1 FROM audit_retention_cuts c
    WHERE c.chain = OLD.chain AND OLD.sequence <= c.sequence
)
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only: DELETE refused');
END;

CREATE TRIGGER audit_retention_cuts_no_update
BEFORE UPDATE ON audit_retention_cuts
BEGIN
    SELECT RAISE(ABORT, 'audit retention cuts are append-only: UPDATE refused');
END;

CREATE TRIGGER audit_retention_cuts_no_delete
BEFORE DELETE ON audit_retention_cuts
BEGIN
    SELECT RAISE(ABORT, 'audit retention cuts are append-only: DELETE refused');
END;
