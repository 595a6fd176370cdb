//! Storage of the audit chain: the [`AuditStore`] trait and its PostgreSQL and SQLite
//! implementations, which share their SQL (see `sql.rs`) and one test suite.
//!
//! Both schemas refuse `UPDATE` and `DELETE` on the events table with a trigger: the
//! chain is append-only even for someone holding the application's credentials.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use crewmesh_kit::settings::{DatabaseConfig, read_secret_file};

use crate::checkpoint::CheckpointRecord;
use crate::error::{AuditError, Result};
use crate::event::{EventRecord, NewEvent};

mod postgres;
mod sql;
mod sqlite;
#[cfg(test)]
mod suite;

pub use postgres::PgAuditStore;
pub use sqlite::SqliteAuditStore;

/// The table sqlx records applied migrations in (not the default, so that several
/// services can share one database).
const MIGRATIONS_TABLE: &str = "_sqlx_migrations_audit";

/// Rows inserted per statement (16 parameters each, under both databases' limits).
const INSERT_CHUNK: usize = 500;

/// Ids looked up per statement.
const LOOKUP_CHUNK: usize = 1000;

/// The result of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    pub appended: u64,
    /// Events skipped because their id was already stored or repeated in the batch.
    pub duplicates: u64,
    /// Sequence of the chain head after the append (0 for an empty chain).
    pub head_sequence: i64,
    /// Hash of the chain head after the append (the genesis hash for an empty chain).
    pub head_hash: String,
}

/// A page of a tenant's events, newest (highest sequence) first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventQuery {
    pub chain: String,
    pub tenant: String,
    /// Inclusive lower bound on the event time, Unix microseconds.
    pub from_micros: Option<i64>,
    /// Exclusive upper bound on the event time, Unix microseconds.
    pub to_micros: Option<i64>,
    pub actor_subject: Option<String>,
    pub action: Option<String>,
    pub resource_kind: Option<String>,
    pub resource_name: Option<String>,
    pub outcome: Option<i32>,
    /// Only events with a lower sequence (the cursor of the previous page).
    pub before_sequence: Option<i64>,
    /// Only events with a higher sequence (the cursor of an ascending scan).
    pub after_sequence: Option<i64>,
    /// Lowest sequence first (exports) instead of newest first.
    pub ascending: bool,
    pub limit: u32,
}

impl EventQuery {
    /// Every event of `tenant` in `chain`, `limit` at a time.
    pub fn new(chain: &str, tenant: &str, limit: u32) -> Self {
        Self {
            chain: chain.to_owned(),
            tenant: tenant.to_owned(),
            from_micros: None,
            to_micros: None,
            actor_subject: None,
            action: None,
            resource_kind: None,
            resource_name: None,
            outcome: None,
            before_sequence: None,
            after_sequence: None,
            ascending: false,
            limit,
        }
    }
}

/// Where audit events are kept.
pub trait AuditStore: Clone + Send + Sync + 'static {
    /// Appends `events` to `chain` in one transaction, holding the chain head's lock:
    /// events whose id is stored already, or repeated earlier in the batch, are
    /// skipped and counted as duplicates; the others get consecutive sequences after
    /// the head and are linked by their hashes.
    fn append(
        &self,
        chain: &str,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<AppendOutcome>> + Send;

    /// Events matching `query`, highest sequence first, at most `query.limit`.
    fn query(&self, query: &EventQuery) -> impl Future<Output = Result<Vec<EventRecord>>> + Send;

    /// Events of `chain` (every tenant) with a sequence above `after`, lowest first.
    fn chain_events(
        &self,
        chain: &str,
        after: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<EventRecord>>> + Send;

    /// Events of `chain` with a sequence in (`after`, `upto`], lowest first.
    /// Verification reads the chain in such ranges: a bounded range keeps the
    /// database from scanning and sorting everything after `after` when it plans
    /// without fresh statistics (right after bulk appends).
    fn chain_range(
        &self,
        chain: &str,
        after: i64,
        upto: i64,
    ) -> impl Future<Output = Result<Vec<EventRecord>>> + Send {
        async move {
            let limit = u32::try_from(upto.saturating_sub(after).max(0)).unwrap_or(u32::MAX);
            let mut events = self.chain_events(chain, after, limit).await?;
            events.retain(|e| e.sequence <= upto);
            Ok(events)
        }
    }

    /// The sequence and hash of the chain head row, if the chain exists.
    fn chain_head(&self, chain: &str)
    -> impl Future<Output = Result<Option<(i64, String)>>> + Send;

    /// Stores a signed checkpoint; false when one exists at that sequence already
    /// (another replica signed it first).
    fn insert_checkpoint(
        &self,
        checkpoint: &CheckpointRecord,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Checkpoints of `chain` above sequence `after`, lowest first.
    fn checkpoints(
        &self,
        chain: &str,
        after: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<CheckpointRecord>>> + Send;

    /// The highest checkpointed sequence of `chain` (0 when none).
    fn last_checkpoint_sequence(&self, chain: &str) -> impl Future<Output = Result<i64>> + Send;

    /// The newest checkpoint of `chain` taken before `time_micros`.
    fn checkpoint_before(
        &self,
        chain: &str,
        time_micros: i64,
    ) -> impl Future<Output = Result<Option<CheckpointRecord>>> + Send;

    /// The retention cut of `chain` with the highest sequence.
    fn last_cut(
        &self,
        chain: &str,
    ) -> impl Future<Output = Result<Option<CheckpointRecord>>> + Send;

    /// Records the signed `cut` and deletes the events it covers, in one
    /// transaction; returns how many events were deleted.
    fn retention_cut(&self, cut: &CheckpointRecord) -> impl Future<Output = Result<u64>> + Send;

    /// Closes the connection pool.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// The store a database URL selects.
#[derive(Debug, Clone)]
pub enum Backend {
    Postgres(PgAuditStore),
    Sqlite(SqliteAuditStore),
}

impl Backend {
    /// Connects to `postgres://` or `sqlite:` URLs and runs the migrations.
    pub async fn connect(db: &DatabaseConfig) -> Result<Self> {
        if db.url.starts_with("sqlite:") {
            Ok(Self::Sqlite(SqliteAuditStore::connect(db).await?))
        } else {
            Ok(Self::Postgres(PgAuditStore::connect(db).await?))
        }
    }

    pub async fn close(&self) {
        match self {
            Backend::Postgres(s) => s.close().await,
            Backend::Sqlite(s) => s.close().await,
        }
    }
}

pub(crate) fn pg_options(db: &DatabaseConfig) -> Result<sqlx::postgres::PgConnectOptions> {
    let mut options = sqlx::postgres::PgConnectOptions::from_str(&db.url)?;
    if let Some(path) = &db.password_file {
        let password = read_secret_file(path).map_err(|source| AuditError::PasswordFile {
            path: path.clone(),
            source,
        })?;
        options = options.password(password.expose());
    }
    // Plan each statement for the table as it is: a generic plan cached while the
    // table was small (or not yet analyzed) looks ids up with a full scan.
    Ok(options
        .application_name("crewmesh-audit")
        .options([("plan_cache_mode", "force_custom_plan")]))
}

pub(crate) fn sqlite_options(db: &DatabaseConfig) -> Result<sqlx::sqlite::SqliteConnectOptions> {
    use sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
    Ok(sqlx::sqlite::SqliteConnectOptions::from_str(&db.url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::DEFAULT_CHAIN;
    use crewmesh_proto::audit::v1 as pb;

    #[tokio::test]
    async fn in_memory_sqlite_keeps_its_data_across_calls() {
        let db = DatabaseConfig {
            url: "sqlite::memory:".into(),
            password_file: None,
            max_connections: 8,
        };
        let Backend::Sqlite(store) = Backend::connect(&db).await.unwrap() else {
            panic!("a sqlite URL selects the sqlite store");
        };
        let event = NewEvent::from_input(pb::EventInput {
            id: "0190a5c4-0000-7000-8000-000000000001".into(),
            time: Some(crewmesh_proto::time::from_micros(1)),
            tenant: "acme".into(),
            action: "x".into(),
            ..Default::default()
        })
        .unwrap();
        let outcome = store.append(DEFAULT_CHAIN, vec![event]).await.unwrap();
        assert_eq!(outcome.appended, 1);
        let events = store
            .query(&EventQuery::new(DEFAULT_CHAIN, "acme", 10))
            .await
            .unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].hash, outcome.head_hash);
    }
}
