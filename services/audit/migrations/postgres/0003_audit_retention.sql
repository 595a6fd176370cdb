-- Retention cuts: a signed statement that the events up to `sequence` were removed
-- on purpose. Events may be deleted only when a recorded cut covers them; every
-- other UPDATE, DELETE or TRUNCATE is still refused.

CREATE TABLE audit_retention_cuts (
    chain       TEXT   NOT NULL,
    sequence    BIGINT NOT NULL,
    head_hash   TEXT   NOT NULL,
    time_micros BIGINT NOT NULL,
    signature   TEXT   NOT NULL,
    key_id      TEXT   NOT NULL,
    PRIMARY KEY (chain, sequence)
);

CREATE OR REPLACE FUNCTION audit_events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_events' AND EXISTS (
        SELECT 1 FROM audit_retention_cuts c
        WHERE c.chain = OLD.chain AND OLD.sequence <= c.sequence
    ) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit events are append-only: % refused', TG_OP;
END
$$;

CREATE TRIGGER audit_retention_cuts_append_only
    BEFORE UPDATE OR DELETE ON audit_retention_cuts
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();

CREATE TRIGGER audit_retention_cuts_no_truncate
    BEFORE TRUNCATE ON audit_retention_cuts
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
