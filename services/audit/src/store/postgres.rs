//! The PostgreSQL store: the chain head row is locked with `SELECT ... FOR UPDATE`,
//! so appends from any number of audit replicas serialize on it.

use sqlx::postgres::{PgPool, PgPoolOptions};

use crewmesh_kit::settings::DatabaseConfig;

use super::{AuditStore, MIGRATIONS_TABLE, pg_options};

super::sql::shared_sql!(sqlx::Postgres);

const HEAD_FOR_UPDATE: &str =
    "SELECT sequence, hash FROM audit_chain_heads WHERE chain = $1 FOR UPDATE";

#[derive(Debug, Clone)]
pub struct PgAuditStore {
    pool: PgPool,
}

impl PgAuditStore {
    /// Connects (with the password from `password_file`, if set) and migrates.
    pub async fn connect(db: &DatabaseConfig) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(db.max_connections)
            .connect_with(pg_options(db)?)
            .await?;
        Self::from_pool(pool).await
    }

    /// Uses an existing pool; runs the migrations.
    pub async fn from_pool(pool: PgPool) -> Result<Self> {
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        migrator.run(&pool).await?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl AuditStore for PgAuditStore {
    #[tracing::instrument(skip_all, fields(chain = %chain, events = events.len()))]
    async fn append(&self, chain: &str, events: Vec<NewEvent>) -> Result<AppendOutcome> {
        let mut tx = self.pool.begin().await?;
        let outcome = append_in_tx(&mut tx, chain, events, HEAD_FOR_UPDATE).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    async fn query(&self, query: &EventQuery) -> Result<Vec<EventRecord>> {
        query_events(&self.pool, query).await
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
