//! Storage of usage records: the [`UsageStore`] trait and its PostgreSQL and SQLite
//! implementations, which share their SQL (see `sql.rs`) and one test suite.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use crewmesh_kit::settings::{DatabaseConfig, read_secret_file};

use crate::error::{MetricsError, Result};
use crate::usage::UsageRow;

mod postgres;
mod sql;
mod sqlite;
#[cfg(test)]
mod suite;

pub use postgres::PgUsageStore;
pub use sqlite::SqliteUsageStore;

/// The table sqlx records applied migrations in (not the default, so that several
/// services can share one database).
const MIGRATIONS_TABLE: &str = "_sqlx_migrations_metrics";

/// Rows inserted per statement (21 parameters each, under both databases' limits).
const INSERT_CHUNK: usize = 500;

/// Microseconds in a UTC day.
pub const MICROS_PER_DAY: i64 = 86_400_000_000;

/// The result of a record call.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordOutcome {
    /// The rows that were new, in the order given.
    pub accepted: Vec<UsageRow>,
    /// Rows skipped because their id was already stored or repeated in the batch.
    pub duplicates: u64,
}

/// Which records of one tenant to look at.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageFilter {
    pub tenant: String,
    /// Inclusive lower bound on the record time, Unix microseconds.
    pub from_micros: Option<i64>,
    /// Exclusive upper bound on the record time, Unix microseconds.
    pub to_micros: Option<i64>,
    pub model: Option<String>,
    pub subject: Option<String>,
    pub agent: Option<String>,
}

impl UsageFilter {
    pub fn tenant(tenant: &str) -> Self {
        Self {
            tenant: tenant.to_owned(),
            ..Self::default()
        }
    }
}

/// The position of a record in the newest-first order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub time_micros: i64,
    /// The record's arrival number.
    pub seq: i64,
}

/// A stored record and its position.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredUsage {
    pub cursor: Cursor,
    pub row: UsageRow,
}

/// How spend is grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// One row, key `total`.
    Total,
    Model,
    Subject,
    Agent,
    /// Key `YYYY-MM-DD`, the UTC date.
    Day,
}

/// Usage summed over one group.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendBucket {
    pub key: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cost_usd: f64,
}

/// Where usage records are kept.
pub trait UsageStore: Clone + Send + Sync + 'static {
    /// Inserts `rows` in one transaction, skipping rows whose id is stored already
    /// or repeated earlier in the batch.
    fn record(&self, rows: Vec<UsageRow>) -> impl Future<Output = Result<RecordOutcome>> + Send;

    /// Records matching `filter` after `after` (exclusive), newest first (by time,
    /// then by arrival), at most `limit`.
    fn query(
        &self,
        filter: &UsageFilter,
        after: Option<Cursor>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<StoredUsage>>> + Send;

    /// Spend of the records matching `filter`, grouped, sorted by cost (highest
    /// first) then key. [`Grouping::Total`] always gives one row.
    fn spend(
        &self,
        filter: &UsageFilter,
        grouping: Grouping,
    ) -> impl Future<Output = Result<Vec<SpendBucket>>> + Send;

    /// Closes the connection pool.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// The store a database URL selects.
#[derive(Debug, Clone)]
pub enum Backend {
    Postgres(PgUsageStore),
    Sqlite(SqliteUsageStore),
}

impl Backend {
    /// Connects to `postgres://` or `sqlite:` URLs and runs the migrations.
    pub async fn connect(db: &DatabaseConfig) -> Result<Self> {
        if db.url.starts_with("sqlite:") {
            Ok(Self::Sqlite(SqliteUsageStore::connect(db).await?))
        } else {
            Ok(Self::Postgres(PgUsageStore::connect(db).await?))
        }
    }

    pub async fn close(&self) {
        match self {
            Backend::Postgres(s) => s.close().await,
            Backend::Sqlite(s) => s.close().await,
        }
    }
}

/// The UTC date (`YYYY-MM-DD`) of a day number since 1970-01-01.
pub fn day_key(day: i64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    day.checked_mul(86_400)
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .and_then(|t| t.date().format(&format).ok())
        .unwrap_or_else(|| format!("day-{day}"))
}

/// Sorts spend rows by cost, highest first, then by key.
pub(crate) fn sort_buckets(buckets: &mut [SpendBucket]) {
    buckets.sort_by(|a, b| {
        b.cost_usd
            .total_cmp(&a.cost_usd)
            .then_with(|| a.key.cmp(&b.key))
    });
}

pub(crate) fn pg_options(db: &DatabaseConfig) -> Result<sqlx::postgres::PgConnectOptions> {
    let mut options = sqlx::postgres::PgConnectOptions::from_str(&db.url)?;
    if let Some(path) = &db.password_file {
        let password = read_secret_file(path).map_err(|source| MetricsError::PasswordFile {
            path: path.clone(),
            source,
        })?;
        options = options.password(password.expose());
    }
    Ok(options.application_name("crewmesh-metrics"))
}

pub(crate) fn sqlite_options(db: &DatabaseConfig) -> Result<sqlx::sqlite::SqliteConnectOptions> {
    use sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
    Ok(sqlx::sqlite::SqliteConnectOptions::from_str(&db.url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_dates() {
        assert_eq!(day_key(0), "1970-01-01");
        assert_eq!(
            day_key(1_700_000_000_000_000 / MICROS_PER_DAY),
            "2023-11-14"
        );
        assert_eq!(day_key(2_932_896), "9999-12-31");
    }

    #[test]
    fn buckets_sort_by_cost_then_key() {
        let bucket = |key: &str, cost_usd| SpendBucket {
            key: key.into(),
            requests: 1,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            cost_usd,
        };
        let mut rows = vec![bucket("b", 1.0), bucket("c", 2.0), bucket("a", 1.0)];
        sort_buckets(&mut rows);
        let keys: Vec<_> = rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["c", "a", "b"]);
    }
}
