//! The PostgreSQL store: the chain head row is locked with `SELECT ... FOR UPDATE`,
//! so appends from any number of audit replicas serialize on it.

use sqlx::postgres::{PgPool, PgPoolOptions};

use crewmesh_kit::settings::DatabaseConfig;

use super::{AuditStore, MIGRATIONS_TABLE, pg_options};

super::sql::shared_sql!(sqlx::Postgres);

// Whole columns as arrays through UNNEST: 16 parameters per statement whatever the
// batch size, which PostgreSQL plans once and sqlx encodes cheaply.
pub(super) async fn existing_ids(conn: &mut Conn, events: &[NewEvent]) -> Result<HashSet<String>> {
    let mut found = HashSet::new();
    for chunk in events.chunks(LOOKUP_CHUNK) {
        let ids: Vec<&str> = chunk.iter().map(|e| e.id.as_str()).collect();
        for row in sqlx::query("SELECT id FROM audit_events WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(&mut *conn)
            .await?
        {
            found.insert(row.try_get::<String, _>(0)?);
        }
    }
    Ok(found)
}

pub(super) async fn insert_events(conn: &mut Conn, records: &[EventRecord]) -> Result<()> {
    let text = |f: fn(&EventRecord) -> &str| records.iter().map(f).collect::<Vec<&str>>();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO audit_events ({EVENT_COLUMNS}) SELECT * FROM UNNEST(\
         $1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::text[], $7::text[], \
         $8::text[], $9::text[], $10::text[], $11::int4[], $12::text[], $13::text[], \
         $14::text[], $15::text[], $16::text[])"
    )))
    .bind(text(|e| &e.id))
    .bind(text(|e| &e.chain))
    .bind(records.iter().map(|e| e.sequence).collect::<Vec<i64>>())
    .bind(records.iter().map(|e| e.time_micros).collect::<Vec<i64>>())
    .bind(text(|e| &e.tenant))
    .bind(text(|e| &e.actor_subject))
    .bind(text(|e| &e.actor_service))
    .bind(text(|e| &e.action))
    .bind(text(|e| &e.resource_kind))
    .bind(text(|e| &e.resource_name))
    .bind(records.iter().map(|e| e.outcome).collect::<Vec<i32>>())
    .bind(text(|e| &e.request_id))
    .bind(text(|e| &e.trace_id))
    .bind(text(|e| &e.details_json))
    .bind(text(|e| &e.prev_hash))
    .bind(text(|e| &e.hash))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

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

    async fn chain_events(&self, chain: &str, after: i64, limit: u32) -> Result<Vec<EventRecord>> {
        chain_events(&self.pool, chain, after, limit).await
    }

    async fn chain_head(&self, chain: &str) -> Result<Option<(i64, String)>> {
        chain_head(&self.pool, chain).await
    }

    async fn insert_checkpoint(&self, checkpoint: &CheckpointRecord) -> Result<bool> {
        insert_checkpoint(&self.pool, checkpoint).await
    }

    async fn checkpoints(
        &self,
        chain: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<CheckpointRecord>> {
        list_checkpoints(&self.pool, chain, after, limit).await
    }

    async fn last_checkpoint_sequence(&self, chain: &str) -> Result<i64> {
        last_checkpoint_sequence(&self.pool, chain).await
    }

    async fn checkpoint_before(
        &self,
        chain: &str,
        time_micros: i64,
    ) -> Result<Option<CheckpointRecord>> {
        checkpoint_before(&self.pool, chain, time_micros).await
    }

    async fn last_cut(&self, chain: &str) -> Result<Option<CheckpointRecord>> {
        last_cut(&self.pool, chain).await
    }

    async fn retention_cut(&self, cut: &CheckpointRecord) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let removed = retention_cut_in_tx(&mut tx, cut).await?;
        tx.commit().await?;
        Ok(removed)
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
