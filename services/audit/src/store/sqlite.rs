//! The SQLite store (the embedded mode): one writer at a time, inside this process by
//! a pool of one connection for writes and across processes by `BEGIN IMMEDIATE`,
//! which takes the database's write lock before the chain head is read.

use sqlx::sqlite::SqlitePool;

use crewmesh_kit::settings::DatabaseConfig;
use crewmesh_kit::sql::{SqlitePools, power_of_two_chunks};

use super::{AuditStore, MIGRATIONS_TABLE, sqlite_options};

super::sql::shared_sql!(sqlx::Sqlite);

// Multi-row VALUES lists and IN lists (SQLite has no arrays), in chunks whose sizes
// are powers of two, so that their statements stay prepared.
pub(super) async fn existing_ids(conn: &mut Conn, events: &[NewEvent]) -> Result<HashSet<String>> {
    let mut found = HashSet::new();
    for chunk in power_of_two_chunks(events, LOOKUP_CHUNK) {
        let mut qb = QueryBuilder::<sqlx::Sqlite>::new("SELECT id FROM audit_events WHERE id IN (");
        let mut list = qb.separated(", ");
        for event in chunk {
            list.push_bind(event.id.as_str());
        }
        qb.push(")");
        for row in qb.build().fetch_all(&mut *conn).await? {
            found.insert(row.try_get::<String, _>(0)?);
        }
    }
    Ok(found)
}

pub(super) async fn insert_events(conn: &mut Conn, records: &[EventRecord]) -> Result<()> {
    for chunk in power_of_two_chunks(records, INSERT_CHUNK) {
        insert_chunk(conn, chunk).await?;
    }
    Ok(())
}

async fn insert_chunk(conn: &mut Conn, records: &[EventRecord]) -> Result<()> {
    let mut qb =
        QueryBuilder::<sqlx::Sqlite>::new(format!("INSERT INTO audit_events ({EVENT_COLUMNS}) "));
    qb.push_values(records, |mut row, e| {
        row.push_bind(e.id.as_str())
            .push_bind(e.chain.as_str())
            .push_bind(e.sequence)
            .push_bind(e.time_micros)
            .push_bind(e.tenant.as_str())
            .push_bind(e.actor_subject.as_str())
            .push_bind(e.actor_service.as_str())
            .push_bind(e.action.as_str())
            .push_bind(e.resource_kind.as_str())
            .push_bind(e.resource_name.as_str())
            .push_bind(e.outcome)
            .push_bind(e.request_id.as_str())
            .push_bind(e.trace_id.as_str())
            .push_bind(e.details_json.as_str())
            .push_bind(e.prev_hash.as_str())
            .push_bind(e.hash.as_str());
    });
    qb.build().execute(&mut *conn).await?;
    Ok(())
}

const HEAD_SELECT: &str = "SELECT sequence, hash FROM audit_chain_heads WHERE chain = $1";

#[derive(Debug, Clone)]
pub struct SqliteAuditStore {
    /// Reads.
    pool: SqlitePool,
    /// Writes, one at a time on one connection (see `crewmesh_kit::sql::SqlitePools`).
    writer: SqlitePool,
}

impl SqliteAuditStore {
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

impl AuditStore for SqliteAuditStore {
    #[tracing::instrument(skip_all, fields(chain = %chain, events = events.len()))]
    async fn append(&self, chain: &str, events: Vec<NewEvent>) -> Result<AppendOutcome> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let outcome = append_in_tx(&mut tx, chain, events, HEAD_SELECT).await?;
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
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let removed = retention_cut_in_tx(&mut tx, cut).await?;
        tx.commit().await?;
        Ok(removed)
    }

    async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }
}
