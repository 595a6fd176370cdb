-- The hash-chained audit log. Rows are only ever inserted: the triggers at the end
-- refuse UPDATE and DELETE, whoever asks.

CREATE TABLE audit_events (
    id            TEXT    NOT NULL PRIMARY KEY,
    chain         TEXT    NOT NULL DEFAULT 'main',
    sequence      INTEGER NOT NULL,
    time_micros   INTEGER NOT NULL,
    tenant        TEXT    NOT NULL,
    actor_subject TEXT    NOT NULL DEFAULT '',
    actor_service TEXT    NOT NULL DEFAULT '',
    action        TEXT    NOT NULL,
    resource_kind TEXT    NOT NULL DEFAULT '',
    resource_name TEXT    NOT NULL DEFAULT '',
    outcome       INTEGER NOT NULL DEFAULT 0,
    request_id    TEXT    NOT NULL DEFAULT '',
    trace_id      TEXT    NOT NULL DEFAULT '',
    details_json  TEXT    NOT NULL DEFAULT '',
    prev_hash     TEXT    NOT NULL,
    hash          TEXT    NOT NULL,
    CONSTRAINT audit_events_chain_sequence UNIQUE (chain, sequence)
);

-- Query: one tenant's events, newest first.
CREATE INDEX audit_events_tenant_sequence ON audit_events (chain, tenant, sequence DESC);

-- The head of each chain; appends run under BEGIN IMMEDIATE (one writer).
CREATE TABLE audit_chain_heads (
    chain    TEXT    NOT NULL PRIMARY KEY,
    sequence INTEGER NOT NULL,
    hash     TEXT    NOT NULL
);

CREATE TRIGGER audit_events_no_update
BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only: UPDATE refused');
END;

CREATE TRIGGER audit_events_no_delete
BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only: DELETE refused');
END;
