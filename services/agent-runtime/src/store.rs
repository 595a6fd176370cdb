//! Durable run state: the [`RunStore`] trait and its PostgreSQL and SQLite
//! implementations. Both run the same portable SQL (sqlx accepts `$n` placeholders on
//! SQLite too) and are checked by one shared test suite.
//!
//! Every read is scoped to a tenant except [`RunStore::unfinished_runs`], which the
//! runtime uses at start-up to resume runs a previous process left behind.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crewmesh_kit::principal::{Principal, TenantId};
use crewmesh_kit::settings::{DatabaseConfig, read_secret_file};
use futures::future::BoxFuture;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::error::{AgentRuntimeError, Result};
use crate::run::{
    AgentSpec, Run, RunId, RunStatus, Step, StepKind, TokenUsage, roles_from_text, roles_to_text,
};

/// The table that records this crate's applied migrations, so that the agent runtime
/// can share a database with other services without mixing up their migrations.
const MIGRATIONS_TABLE: &str = "_agent_runtime_migrations";

/// What [`RunStore::create_run`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// The run was written.
    New,
    /// The tenant already has a run with this idempotency key; nothing was written.
    Existing(Box<Run>),
}

/// Where runs are kept.
pub trait RunStore: Send + Sync + 'static {
    /// Writes a new run with its steps. When the run's tenant already used its
    /// (non-empty) idempotency key, writes nothing and returns the existing run.
    fn create_run<'a>(&'a self, run: &'a Run) -> BoxFuture<'a, Result<Created>>;

    /// The run with its steps, if it belongs to `tenant`.
    fn get_run<'a>(&'a self, tenant: &'a TenantId, id: RunId)
    -> BoxFuture<'a, Result<Option<Run>>>;

    /// The tenant's run started with `key` (which must not be empty).
    fn find_by_idempotency_key<'a>(
        &'a self,
        tenant: &'a TenantId,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Run>>>;

    /// Persists the run's progress atomically: status, output, error, usage, cost,
    /// update time and the complete list of steps (steps past its end are removed).
    fn checkpoint<'a>(&'a self, run: &'a Run) -> BoxFuture<'a, Result<()>>;

    /// Every run still PENDING or RUNNING, of every tenant, oldest first.
    fn unfinished_runs(&self) -> BoxFuture<'_, Result<Vec<Run>>>;

    /// Closes the connections.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Connects to the database of `config` (Postgres or SQLite, by URL scheme) and runs
/// the migrations.
pub async fn connect(config: &DatabaseConfig) -> Result<Arc<dyn RunStore>> {
    if config.url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteRunStore::connect(config).await?))
    } else {
        Ok(Arc::new(PgRunStore::connect(config).await?))
    }
}

/// The columns of `runs`, as read.
struct RunColumns {
    id: String,
    tenant: String,
    subject: String,
    roles: String,
    agent: String,
    spec_json: String,
    status: i32,
    input: String,
    output: String,
    error: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost_usd: f64,
    created_micros: i64,
    updated_micros: i64,
    idempotency_key: String,
}

/// The columns of `run_steps`, as read.
struct StepColumns {
    index: i32,
    kind: i32,
    target: String,
    output: String,
    error: String,
    started_micros: i64,
    finished_micros: Option<i64>,
}

fn corrupt(id: &str, problem: impl Into<String>) -> AgentRuntimeError {
    AgentRuntimeError::Corrupt {
        id: id.to_owned(),
        problem: problem.into(),
    }
}

impl RunColumns {
    fn into_run(self) -> Result<Run> {
        let id = RunId::parse(&self.id).ok_or_else(|| corrupt(&self.id, "the id is not a UUID"))?;
        let tenant = TenantId::parse(&self.tenant).map_err(|e| corrupt(&self.id, e.to_string()))?;
        let roles = roles_from_text(&self.roles).map_err(|e| corrupt(&self.id, e))?;
        let spec = AgentSpec::from_json(&self.spec_json)
            .map_err(|e| corrupt(&self.id, format!("spec_json: {e}")))?;
        let status = RunStatus::from_code(self.status)
            .ok_or_else(|| corrupt(&self.id, format!("unknown status {}", self.status)))?;
        let tokens = |n: i64| {
            u64::try_from(n).map_err(|_| corrupt(&self.id, format!("negative token count {n}")))
        };
        Ok(Run {
            id,
            owner: Principal {
                tenant,
                subject: self.subject.clone(),
                roles,
            },
            agent: self.agent.clone(),
            spec,
            status,
            input: self.input.clone(),
            output: self.output.clone(),
            error: self.error.clone(),
            usage: TokenUsage {
                prompt_tokens: tokens(self.prompt_tokens)?,
                completion_tokens: tokens(self.completion_tokens)?,
            },
            cost_usd: self.cost_usd,
            created_micros: self.created_micros,
            updated_micros: self.updated_micros,
            idempotency_key: self.idempotency_key.clone(),
            steps: Vec::new(),
        })
    }
}

impl StepColumns {
    fn into_step(self, run_id: &str) -> Result<Step> {
        Ok(Step {
            index: u32::try_from(self.index)
                .map_err(|_| corrupt(run_id, format!("negative step index {}", self.index)))?,
            kind: StepKind::from_code(self.kind)
                .ok_or_else(|| corrupt(run_id, format!("unknown step kind {}", self.kind)))?,
            target: self.target,
            output: self.output,
            error: self.error,
            started_micros: self.started_micros,
            finished_micros: self.finished_micros,
        })
    }
}

/// Folds joined (run, step) rows, ordered by run then step, into runs.
fn assemble(rows: Vec<(RunColumns, Option<StepColumns>)>) -> Result<Vec<Run>> {
    let mut runs: Vec<Run> = Vec::new();
    let mut current_id: Option<String> = None;
    for (run_cols, step_cols) in rows {
        if current_id.as_deref() != Some(run_cols.id.as_str()) {
            current_id = Some(run_cols.id.clone());
            runs.push(run_cols.into_run()?);
        }
        if let (Some(step), Some(run)) = (step_cols, runs.last_mut()) {
            let id = run.id.to_string();
            run.steps.push(step.into_step(&id)?);
        }
    }
    Ok(runs)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The columns every run read selects: a run joined with its steps.
macro_rules! select_runs {
    () => {
        "SELECT r.id, r.tenant, r.subject, r.roles, r.agent, r.spec_json, r.status, r.input, \
         r.output, r.error, r.prompt_tokens, r.completion_tokens, r.cost_usd, r.created_micros, \
         r.updated_micros, r.idempotency_key, s.step_index, s.kind, s.target, \
         s.output AS step_output, s.error AS step_error, s.started_micros, s.finished_micros \
         FROM runs r LEFT JOIN run_steps s ON s.run_id = r.id"
    };
}

const INSERT_RUN: &str = "INSERT INTO runs (id, tenant, subject, roles, agent, spec_json, \
     status, input, output, error, prompt_tokens, completion_tokens, cost_usd, created_micros, \
     updated_micros, idempotency_key) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
     ON CONFLICT DO NOTHING";

const UPDATE_RUN: &str = "UPDATE runs SET status = $3, output = $4, error = $5, \
     prompt_tokens = $6, completion_tokens = $7, cost_usd = $8, updated_micros = $9 \
     WHERE id = $1 AND tenant = $2";

const UPSERT_STEP: &str = "INSERT INTO run_steps (run_id, step_index, kind, target, output, \
     error, started_micros, finished_micros) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
     ON CONFLICT (run_id, step_index) DO UPDATE SET kind = excluded.kind, \
     target = excluded.target, output = excluded.output, error = excluded.error, \
     started_micros = excluded.started_micros, finished_micros = excluded.finished_micros";

const DELETE_STEPS_FROM: &str = "DELETE FROM run_steps WHERE run_id = $1 AND step_index >= $2";

const SELECT_RUN: &str = concat!(
    select_runs!(),
    " WHERE r.tenant = $1 AND r.id = $2 ORDER BY s.step_index"
);

const SELECT_BY_KEY: &str = concat!(
    select_runs!(),
    " WHERE r.tenant = $1 AND r.idempotency_key = $2 AND r.idempotency_key <> '' \
     ORDER BY s.step_index"
);

// PENDING = 1, RUNNING = 2, written as literals so the partial index applies.
const SELECT_UNFINISHED: &str = concat!(
    select_runs!(),
    " WHERE r.status IN (1, 2) ORDER BY r.created_micros, r.id, s.step_index"
);

/// Implements [`RunStore`] for one sqlx database; the SQL is shared.
macro_rules! sql_run_store {
    ($name:ident, $db:ty) => {
        impl $name {
            /// The connection pool (for tests and tools).
            pub fn pool(&self) -> &sqlx::Pool<$db> {
                &self.pool
            }

            fn read_row(
                row: &<$db as sqlx::Database>::Row,
            ) -> std::result::Result<(RunColumns, Option<StepColumns>), sqlx::Error> {
                use sqlx::Row as _;
                let run = RunColumns {
                    id: row.try_get("id")?,
                    tenant: row.try_get("tenant")?,
                    subject: row.try_get("subject")?,
                    roles: row.try_get("roles")?,
                    agent: row.try_get("agent")?,
                    spec_json: row.try_get("spec_json")?,
                    status: row.try_get("status")?,
                    input: row.try_get("input")?,
                    output: row.try_get("output")?,
                    error: row.try_get("error")?,
                    prompt_tokens: row.try_get("prompt_tokens")?,
                    completion_tokens: row.try_get("completion_tokens")?,
                    cost_usd: row.try_get("cost_usd")?,
                    created_micros: row.try_get("created_micros")?,
                    updated_micros: row.try_get("updated_micros")?,
                    idempotency_key: row.try_get("idempotency_key")?,
                };
                let step = match row.try_get::<Option<i32>, _>("step_index")? {
                    None => None,
                    Some(index) => Some(StepColumns {
                        index,
                        kind: row.try_get("kind")?,
                        target: row.try_get("target")?,
                        output: row.try_get("step_output")?,
                        error: row.try_get("step_error")?,
                        started_micros: row.try_get("started_micros")?,
                        finished_micros: row.try_get("finished_micros")?,
                    }),
                };
                Ok((run, step))
            }

            fn decode(rows: Vec<<$db as sqlx::Database>::Row>) -> Result<Vec<Run>> {
                let cols = rows
                    .iter()
                    .map(Self::read_row)
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                assemble(cols)
            }

            async fn write_steps(
                tx: &mut sqlx::Transaction<'static, $db>,
                run: &Run,
            ) -> std::result::Result<(), sqlx::Error> {
                let id = run.id.to_string();
                for step in &run.steps {
                    sqlx::query(UPSERT_STEP)
                        .bind(&id)
                        .bind(to_i32(step.index))
                        .bind(step.kind.code())
                        .bind(&step.target)
                        .bind(&step.output)
                        .bind(&step.error)
                        .bind(step.started_micros)
                        .bind(step.finished_micros)
                        .execute(&mut **tx)
                        .await?;
                }
                Ok(())
            }

            async fn create(&self, run: &Run) -> Result<Created> {
                let id = run.id.to_string();
                let mut tx = self.pool.begin().await?;
                let inserted = sqlx::query(INSERT_RUN)
                    .bind(&id)
                    .bind(run.owner.tenant.as_str())
                    .bind(&run.owner.subject)
                    .bind(roles_to_text(&run.owner.roles))
                    .bind(&run.agent)
                    .bind(run.spec.to_json())
                    .bind(run.status.code())
                    .bind(&run.input)
                    .bind(&run.output)
                    .bind(&run.error)
                    .bind(to_i64(run.usage.prompt_tokens))
                    .bind(to_i64(run.usage.completion_tokens))
                    .bind(run.cost_usd)
                    .bind(run.created_micros)
                    .bind(run.updated_micros)
                    .bind(&run.idempotency_key)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if inserted == 0 {
                    tx.rollback().await?;
                    if !run.idempotency_key.is_empty()
                        && let Some(existing) =
                            self.by_key(&run.owner.tenant, &run.idempotency_key).await?
                    {
                        return Ok(Created::Existing(Box::new(existing)));
                    }
                    return Err(AgentRuntimeError::Store(sqlx::Error::Protocol(format!(
                        "run {id} was not inserted: its id is already taken"
                    ))));
                }
                Self::write_steps(&mut tx, run).await?;
                tx.commit().await?;
                Ok(Created::New)
            }

            async fn by_id(&self, tenant: &TenantId, id: RunId) -> Result<Option<Run>> {
                let rows = sqlx::query(SELECT_RUN)
                    .bind(tenant.as_str())
                    .bind(id.to_string())
                    .fetch_all(&self.pool)
                    .await?;
                Ok(Self::decode(rows)?.into_iter().next())
            }

            async fn by_key(&self, tenant: &TenantId, key: &str) -> Result<Option<Run>> {
                let rows = sqlx::query(SELECT_BY_KEY)
                    .bind(tenant.as_str())
                    .bind(key)
                    .fetch_all(&self.pool)
                    .await?;
                Ok(Self::decode(rows)?.into_iter().next())
            }

            async fn save(&self, run: &Run) -> Result<()> {
                let id = run.id.to_string();
                let mut tx = self.pool.begin().await?;
                let updated = sqlx::query(UPDATE_RUN)
                    .bind(&id)
                    .bind(run.owner.tenant.as_str())
                    .bind(run.status.code())
                    .bind(&run.output)
                    .bind(&run.error)
                    .bind(to_i64(run.usage.prompt_tokens))
                    .bind(to_i64(run.usage.completion_tokens))
                    .bind(run.cost_usd)
                    .bind(run.updated_micros)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if updated == 0 {
                    tx.rollback().await?;
                    return Err(AgentRuntimeError::RunVanished(id));
                }
                sqlx::query(DELETE_STEPS_FROM)
                    .bind(&id)
                    .bind(i32::try_from(run.steps.len()).unwrap_or(i32::MAX))
                    .execute(&mut *tx)
                    .await?;
                Self::write_steps(&mut tx, run).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn unfinished(&self) -> Result<Vec<Run>> {
                let rows = sqlx::query(SELECT_UNFINISHED).fetch_all(&self.pool).await?;
                Self::decode(rows)
            }
        }

        impl RunStore for $name {
            fn create_run<'a>(&'a self, run: &'a Run) -> BoxFuture<'a, Result<Created>> {
                Box::pin(self.create(run))
            }

            fn get_run<'a>(
                &'a self,
                tenant: &'a TenantId,
                id: RunId,
            ) -> BoxFuture<'a, Result<Option<Run>>> {
                Box::pin(self.by_id(tenant, id))
            }

            fn find_by_idempotency_key<'a>(
                &'a self,
                tenant: &'a TenantId,
                key: &'a str,
            ) -> BoxFuture<'a, Result<Option<Run>>> {
                Box::pin(async move {
                    if key.is_empty() {
                        return Ok(None);
                    }
                    self.by_key(tenant, key).await
                })
            }

            fn checkpoint<'a>(&'a self, run: &'a Run) -> BoxFuture<'a, Result<()>> {
                Box::pin(self.save(run))
            }

            fn unfinished_runs(&self) -> BoxFuture<'_, Result<Vec<Run>>> {
                Box::pin(self.unfinished())
            }

            fn close(&self) -> BoxFuture<'_, ()> {
                Box::pin(self.pool.close())
            }
        }
    };
}

/// Runs in PostgreSQL (production).
#[derive(Clone, Debug)]
pub struct PgRunStore {
    pool: sqlx::PgPool,
}

impl PgRunStore {
    /// Connects (reading the password from `password_file` when set) and migrates.
    pub async fn connect(config: &DatabaseConfig) -> Result<Self> {
        let mut options = PgConnectOptions::from_str(&config.url)?;
        if let Some(path) = &config.password_file {
            let secret =
                read_secret_file(path).map_err(|source| AgentRuntimeError::PasswordFile {
                    path: path.clone(),
                    source,
                })?;
            options = options.password(secret.expose());
        }
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        let mut migrator: Migrator = sqlx::migrate!("./migrations/postgres");
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        migrator.run(&pool).await?;
        Ok(Self { pool })
    }
}

sql_run_store!(PgRunStore, sqlx::Postgres);

/// Runs in SQLite (the embedded mode).
#[derive(Clone, Debug)]
pub struct SqliteRunStore {
    pool: sqlx::SqlitePool,
}

impl SqliteRunStore {
    /// Opens (creating the file and its directory if needed) and migrates.
    pub async fn connect(config: &DatabaseConfig) -> Result<Self> {
        let in_memory = config.url.contains(":memory:") || config.url.contains("mode=memory");
        let options = SqliteConnectOptions::from_str(&config.url)?
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let options = if in_memory {
            options
        } else {
            options
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
        };
        if !in_memory
            && let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| AgentRuntimeError::Store(sqlx::Error::Io(e)))?;
        }
        let mut pool = SqlitePoolOptions::new().acquire_timeout(Duration::from_secs(10));
        pool = if in_memory {
            // Every connection to `:memory:` is a database of its own: keep exactly one.
            pool.max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            pool.max_connections(config.max_connections)
        };
        let pool = pool.connect_with(options).await?;
        let mut migrator: Migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        migrator.run(&pool).await?;
        Ok(Self { pool })
    }
}

sql_run_store!(SqliteRunStore, sqlx::Sqlite);
