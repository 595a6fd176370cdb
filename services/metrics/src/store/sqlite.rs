//! The SQLite store (the embedded mode).

use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};

use crewmesh_kit::settings::DatabaseConfig;

use super::{MIGRATIONS_TABLE, UsageStore, is_sqlite_memory, sqlite_options};

super::sql::shared_sql!(sqlx::Sqlite);

#[derive(Debug, Clone)]
pub struct SqliteUsageStore {
    pool: SqlitePool,
}

impl SqliteUsageStore {
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
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

impl UsageStore for SqliteUsageStore {
    #[tracing::instrument(skip_all, fields(records = rows.len()))]
    async fn record(&self, rows: Vec<UsageRow>) -> Result<RecordOutcome> {
        record(&self.pool, rows).await
    }

    async fn query(
        &self,
        filter: &UsageFilter,
        after: Option<Cursor>,
        limit: u32,
    ) -> Result<Vec<StoredUsage>> {
        query(&self.pool, filter, after, limit).await
    }

    async fn spend(&self, filter: &UsageFilter, grouping: Grouping) -> Result<Vec<SpendBucket>> {
        spend(&self.pool, filter, grouping).await
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
