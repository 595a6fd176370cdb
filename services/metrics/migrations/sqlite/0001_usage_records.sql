-- Usage records, one per model call (or other accounted action).

CREATE TABLE usage_records (
    -- Arrival order; breaks ties between records with the same time.
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT    NOT NULL UNIQUE,
    time_micros       INTEGER NOT NULL,
    tenant            TEXT    NOT NULL,
    subject           TEXT    NOT NULL DEFAULT '',
    model             TEXT    NOT NULL DEFAULT '',
    deployment        TEXT    NOT NULL DEFAULT '',
    provider          TEXT    NOT NULL DEFAULT '',
    agent             TEXT    NOT NULL DEFAULT '',
    run_id            TEXT    NOT NULL DEFAULT '',
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens      INTEGER NOT NULL DEFAULT 0,
    cost_usd          REAL    NOT NULL DEFAULT 0,
    latency_ms        REAL    NOT NULL DEFAULT 0,
    ttft_ms           REAL    NOT NULL DEFAULT 0,
    cache_hit         BOOLEAN NOT NULL DEFAULT FALSE,
    retries           INTEGER NOT NULL DEFAULT 0,
    fallbacks         INTEGER NOT NULL DEFAULT 0,
    outcome           INTEGER NOT NULL DEFAULT 0,
    request_id        TEXT    NOT NULL DEFAULT '',
    simulated         BOOLEAN NOT NULL DEFAULT FALSE
);

-- Query and Spend: one tenant's records, newest first, over a time range.
CREATE INDEX usage_records_tenant_time ON usage_records (tenant, time_micros DESC, seq DESC);
