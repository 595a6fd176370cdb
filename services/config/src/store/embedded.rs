//! The embedded store: SQLite with etcd semantics, for `crewmesh up`. One table of
//! keys with their create and mod revisions, and a single-row revision counter that
//! every write increments inside the same transaction.

use std::path::Path;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

use super::{ConfigStore, ListPage, ListPlan, ListQuery, RawEntry, check_expected};
use crate::document::{DocKey, DocValue, StoredDoc};
use crate::error::{ConfigServiceError, Result};

/// SQLite-backed [`ConfigStore`].
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    pool: SqlitePool,
    prefix: String,
}

type Row = (String, Vec<u8>, i64, i64);

impl EmbeddedStore {
    /// Opens (creating if needed) the database file at `path` and migrates it.
    #[tracing::instrument(skip_all, fields(path = %path.display()))]
    pub async fn open(path: &Path, prefix: &str) -> Result<Self> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|source| ConfigServiceError::OpenEmbedded {
                path: path.display().to_string(),
                source,
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        tracing::info!(prefix, "embedded config store open");
        Ok(Self {
            pool,
            prefix: prefix.to_owned(),
        })
    }

    async fn get_impl(&self, key: &DocKey) -> Result<Option<StoredDoc>> {
        let path = key.path(&self.prefix);
        let row: Option<Row> = sqlx::query_as(
            "SELECT key, value, create_revision, mod_revision FROM kv WHERE key = $1",
        )
        .bind(&path)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| raw(r).decode(key.clone())).transpose()
    }

    async fn list_impl(&self, query: &ListQuery) -> Result<ListPage> {
        let mut plan = ListPlan::new(&self.prefix, query)?;
        // One read transaction: every batch and the revision come from one snapshot.
        let mut tx = self.pool.begin().await?;
        let revision: i64 = sqlx::query_scalar("SELECT revision FROM revision WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        let mut after = plan.start_after().to_owned();
        let end = plan.end().to_owned();
        let batch = plan.batch_size();
        'scan: loop {
            let rows: Vec<Row> = sqlx::query_as(
                "SELECT key, value, create_revision, mod_revision FROM kv \
                 WHERE key > $1 AND key < $2 ORDER BY key LIMIT $3",
            )
            .bind(&after)
            .bind(&end)
            .bind(i64::try_from(batch).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
            let n = rows.len();
            for row in rows {
                after.clone_from(&row.0);
                if plan.push(raw(row)) {
                    break 'scan;
                }
            }
            if n < batch {
                break;
            }
        }
        tx.commit().await?;
        Ok(plan.finish(revision))
    }

    async fn put_impl(
        &self,
        key: &DocKey,
        value: &DocValue,
        expected: Option<i64>,
    ) -> Result<StoredDoc> {
        check_expected(expected, false)?;
        let path = key.path(&self.prefix);
        // IMMEDIATE takes the write lock up front, so the check and the write are atomic.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let current: Option<(i64, i64)> =
            sqlx::query_as("SELECT create_revision, mod_revision FROM kv WHERE key = $1")
                .bind(&path)
                .fetch_optional(&mut *tx)
                .await?;
        match (expected, current) {
            (Some(0), Some((_, cur))) => {
                return Err(ConfigServiceError::conflict(key, 0, Some(cur)));
            }
            (Some(n), cur) if n != 0 && cur.map(|c| c.1) != Some(n) => {
                return Err(ConfigServiceError::conflict(key, n, cur.map(|c| c.1)));
            }
            _ => {}
        }
        let revision = bump(&mut tx).await?;
        let create_revision = current.map_or(revision, |c| c.0);
        sqlx::query(
            "INSERT INTO kv (key, value, create_revision, mod_revision) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, mod_revision = excluded.mod_revision",
        )
        .bind(&path)
        .bind(value.to_bytes())
        .bind(create_revision)
        .bind(revision)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(StoredDoc {
            key: key.clone(),
            value: value.clone(),
            version: revision,
            create_version: create_revision,
        })
    }

    async fn delete_impl(&self, key: &DocKey, expected: Option<i64>) -> Result<i64> {
        check_expected(expected, true)?;
        let path = key.path(&self.prefix);
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let current: Option<i64> = sqlx::query_scalar("SELECT mod_revision FROM kv WHERE key = $1")
            .bind(&path)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(current) = current else {
            return Err(ConfigServiceError::NotFound(key.to_string()));
        };
        if let Some(n) = expected
            && n != current
        {
            return Err(ConfigServiceError::conflict(key, n, Some(current)));
        }
        let revision = bump(&mut tx).await?;
        sqlx::query("DELETE FROM kv WHERE key = $1")
            .bind(&path)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(revision)
    }

    async fn current_revision_impl(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT revision FROM revision WHERE id = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }
}

/// Increments the global revision inside `tx` and returns the new value.
async fn bump(tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "UPDATE revision SET revision = revision + 1 WHERE id = 1 RETURNING revision",
    )
    .fetch_one(&mut **tx)
    .await?)
}

fn raw((key, value, create_revision, mod_revision): Row) -> RawEntry {
    RawEntry {
        key,
        value,
        create_revision,
        mod_revision,
    }
}

impl ConfigStore for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    fn get<'a>(&'a self, key: &'a DocKey) -> BoxFuture<'a, Result<Option<StoredDoc>>> {
        Box::pin(self.get_impl(key))
    }

    fn list<'a>(&'a self, query: &'a ListQuery) -> BoxFuture<'a, Result<ListPage>> {
        Box::pin(self.list_impl(query))
    }

    fn put<'a>(
        &'a self,
        key: &'a DocKey,
        value: &'a DocValue,
        expected_version: Option<i64>,
    ) -> BoxFuture<'a, Result<StoredDoc>> {
        Box::pin(self.put_impl(key, value, expected_version))
    }

    fn delete<'a>(
        &'a self,
        key: &'a DocKey,
        expected_version: Option<i64>,
    ) -> BoxFuture<'a, Result<i64>> {
        Box::pin(self.delete_impl(key, expected_version))
    }

    fn current_revision(&self) -> BoxFuture<'_, Result<i64>> {
        Box::pin(self.current_revision_impl())
    }
}
