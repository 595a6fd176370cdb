-- The hash-chained audit log. Rows are only ever inserted: the triggers at the end
-- refuse UPDATE, DELETE and TRUNCATE, whoever asks.

CREATE TABLE audit_events (
    id            TEXT    NOT NULL PRIMARY KEY,
    chain         TEXT    NOT NULL DEFAULT 'main',
    sequence      BIGINT  NOT NULL,
    time_micros   BIGINT  NOT NULL,
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

-- The head of each chain; appends lock its row (SELECT ... FOR UPDATE).
CREATE TABLE audit_chain_heads (
    chain    TEXT   NOT NULL PRIMARY KEY,
    sequence BIGINT NOT NULL,
    hash     TEXT   NOT NULL
);

CREATE FUNCTION audit_events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only: % refused', TG_OP;
END
$$;

CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();

CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
