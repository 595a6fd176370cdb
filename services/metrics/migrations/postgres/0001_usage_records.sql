-- Usage records, one per model call (or other accounted action).

CREATE TABLE usage_records (
    -- Arrival order; breaks ties between records with the same time.
    seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                TEXT             NOT NULL UNIQUE,
    time_micros       BIGINT           NOT NULL,
    tenant            TEXT             NOT NULL,
    subject           TEXT             NOT NULL DEFAULT '',
    model             TEXT             NOT NULL DEFAULT '',
    deployment        TEXT             NOT NULL DEFAULT '',
    provider          TEXT             NOT NULL DEFAULT '',
    agent             TEXT             NOT NULL DEFAULT '',
    run_id            TEXT             NOT NULL DEFAULT '',
    prompt_tokens     BIGINT           NOT NULL DEFAULT 0,
    completion_tokens BIGINT           NOT NULL DEFAULT 0,
    total_tokens      BIGINT           NOT NULL DEFAULT 0,
    cost_usd          DOUBLE PRECISION NOT NULL DEFAULT 0,
    latency_ms        DOUBLE PRECISION NOT NULL DEFAULT 0,
    ttft_ms           DOUBLE PRECISION NOT NULL DEFAULT 0,
    cache_hit         BOOLEAN          NOT NULL DEFAULT FALSE,
    retries           BIGINT           NOT NULL DEFAULT 0,
    fallbacks         BIGINT           NOT NULL DEFAULT 0,
    outcome           INTEGER          NOT NULL DEFAULT 0,
    request_id        TEXT             NOT NULL DEFAULT '',
    simulated         BOOLEAN          NOT NULL DEFAULT FALSE
);

-- Query and Spend: one tenant's records, newest first, over a time range.
CREATE INDEX usage_records_tenant_time ON usage_records (tenant, time_micros DESC, seq DESC);
