-- Agent runs and their steps. A run is checkpointed after every state change.
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    subject TEXT NOT NULL,
    -- The owner's roles (comma-separated), asserted to the router when the run executes.
    roles TEXT NOT NULL DEFAULT '',
    -- The agent document name; empty for an inline agent.
    agent TEXT NOT NULL DEFAULT '',
    -- The resolved agent spec the run executes.
    spec_json TEXT NOT NULL,
    status INTEGER NOT NULL,
    input TEXT NOT NULL,
    output TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    created_micros BIGINT NOT NULL,
    updated_micros BIGINT NOT NULL,
    idempotency_key TEXT NOT NULL DEFAULT ''
);

CREATE UNIQUE INDEX runs_tenant_idempotency_key
    ON runs (tenant, idempotency_key) WHERE idempotency_key <> '';

-- Runs to resume at start-up (PENDING = 1, RUNNING = 2).
CREATE INDEX runs_unfinished ON runs (created_micros) WHERE status IN (1, 2);

CREATE TABLE run_steps (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step_index INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    target TEXT NOT NULL,
    output TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    started_micros BIGINT NOT NULL,
    finished_micros BIGINT,
    PRIMARY KEY (run_id, step_index)
);
