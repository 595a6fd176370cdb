//! The PostgreSQL store.

use sqlx::postgres::{PgPool, PgPoolOptions};

use crewmesh_kit::settings::DatabaseConfig;

use super::{MIGRATIONS_TABLE, UsageStore, pg_options};

super::sql::shared_sql!(sqlx::Postgres);

#[derive(Debug, Clone)]
pub struct PgUsageStore {
    pool: PgPool,
}

impl PgUsageStore {
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

impl UsageStore for PgUsageStore {
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
