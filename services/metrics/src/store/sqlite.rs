//! The SQLite store (the embedded mode).

use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};

use crewmesh_kit::settings::DatabaseConfig;

use super::{MIGRATIONS_TABLE, UsageStore, is_sqlite_memory, single_connection, sqlite_options};

super::sql::shared_sql!(sqlx::Sqlite);

#[derive(Debug, Clone)]
pub struct SqliteUsageStore {
    /// Reads.
    pool: SqlitePool,
    /// Writes, on one connection (the same as `pool` for an in-memory database). In WAL
    /// mode a connection drops its page cache when another one wrote since its last
    /// transaction; with every write on one connection, its cache and its prepared
    /// statements stay warm.
    writer: SqlitePool,
}

impl SqliteUsageStore {
    /// Opens (creating it if missing) the database file and migrates. An in-memory
    /// URL gets a single connection that is never recycled.
    pub async fn connect(db: &DatabaseConfig) -> Result<Self> {
        let options = sqlite_options(db)?;
        if is_sqlite_memory(&db.url) {
            let pool = single_connection().connect_with(options).await?;
            return Self::migrated(pool.clone(), pool).await;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(db.max_connections)
            .connect_with(options.clone())
            .await?;
        // A local file cannot go stale like a network connection: no ping per use.
        let writer = single_connection()
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Self::migrated(pool, writer).await
    }

    async fn migrated(pool: SqlitePool, writer: SqlitePool) -> Result<Self> {
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        migrator.run(&writer).await?;
        Ok(Self { pool, writer })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

impl UsageStore for SqliteUsageStore {
    #[tracing::instrument(skip_all, fields(records = rows.len()))]
    async fn record(&self, rows: Vec<UsageRow>) -> Result<RecordOutcome> {
        record(&self.writer, rows).await
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
        self.writer.close().await;
    }
}
