//! The SQLite store (the embedded mode): one writer at a time, inside this process by
//! a mutex and across processes by `BEGIN IMMEDIATE`, which takes the database's
//! write lock before the chain head is read.

use std::sync::Arc;

use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};

use crewmesh_kit::settings::DatabaseConfig;

use super::{AuditStore, MIGRATIONS_TABLE, is_sqlite_memory, sqlite_options};

super::sql::shared_sql!(sqlx::Sqlite);

const HEAD_SELECT: &str = "SELECT sequence, hash FROM audit_chain_heads WHERE chain = $1";

#[derive(Debug, Clone)]
pub struct SqliteAuditStore {
    pool: SqlitePool,
    writer: Arc<tokio::sync::Mutex<()>>,
}

impl SqliteAuditStore {
    /// Opens (creating it if missing) the database file and migrates. An in-memory
    /// URL gets a single connection that is never recycled.
    pub async fn connect(db: &DatabaseConfig) -> Result<Self> {
        let mut options = SqlitePoolOptions::new().max_connections(db.max_connections);
        if is_sqlite_memory(&db.url) {
            options = options
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        }
        let pool = options.connect_with(sqlite_options(db)?).await?;
        Self::from_pool(pool).await
    }

    /// Uses an existing pool; runs the migrations.
    pub async fn from_pool(pool: SqlitePool) -> Result<Self> {
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        migrator.run(&pool).await?;
        Ok(Self {
            pool,
            writer: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

impl AuditStore for SqliteAuditStore {
    #[tracing::instrument(skip_all, fields(chain = %chain, events = events.len()))]
    async fn append(&self, chain: &str, events: Vec<NewEvent>) -> Result<AppendOutcome> {
        let _writer = self.writer.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let outcome = append_in_tx(&mut tx, chain, events, HEAD_SELECT).await?;
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
