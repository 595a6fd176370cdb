//! The SQLite store (the embedded mode).

use sqlx::sqlite::SqlitePool;

use crewmesh_kit::settings::DatabaseConfig;
use crewmesh_kit::sql::SqlitePools;

use super::{MIGRATIONS_TABLE, UsageStore, sqlite_options};

super::sql::shared_sql!(sqlx::Sqlite);

#[derive(Debug, Clone)]
pub struct SqliteUsageStore {
    /// Reads.
    pool: SqlitePool,
    /// Writes, one at a time on one connection (see `crewmesh_kit::sql::SqlitePools`).
    writer: SqlitePool,
}

impl SqliteUsageStore {
    /// Opens (creating it if missing) the database file and migrates. An in-memory
    /// URL gets a single connection that is never recycled.
    pub async fn connect(db: &DatabaseConfig) -> Result<Self> {
        let SqlitePools { reader, writer } =
            SqlitePools::open(&db.url, db.max_connections, sqlite_options(db)?).await?;
        Self::migrated(reader, writer).await
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
