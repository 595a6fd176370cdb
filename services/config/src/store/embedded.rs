//! The embedded store: SQLite with etcd semantics, for `crewmesh up`. One table of
//! keys with their create and mod revisions, and a single-row revision counter that
//! every write increments inside the same transaction.

use std::path::Path;
use std::time::Duration;

use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

use super::{
    ApplyOp, ApplyOutcome, Change, ChangeBatch, ChangeStream, ConfigStore, ListPage, ListPlan,
    ListQuery, RawEntry, check_apply, check_expected,
};
use crate::document::{DocKey, DocValue, StoredDoc};
use crate::error::{ConfigServiceError, Result};

/// SQLite-backed [`ConfigStore`].
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    pool: SqlitePool,
    prefix: String,
    /// The latest committed revision, for watchers to wake on.
    latest: Arc<tokio::sync::watch::Sender<i64>>,
}

/// Most revisions one watch batch covers.
const WATCH_BATCH_REVISIONS: i64 = 256;

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
        let revision: i64 = sqlx::query_scalar("SELECT revision FROM revision WHERE id = 1")
            .fetch_one(&pool)
            .await?;
        tracing::info!(prefix, revision, "embedded config store open");
        Ok(Self {
            pool,
            prefix: prefix.to_owned(),
            latest: Arc::new(tokio::sync::watch::channel(revision).0),
        })
    }

    /// Tells watchers about a committed revision.
    fn committed(&self, revision: i64) {
        self.latest.send_if_modified(|cur| {
            if revision > *cur {
                *cur = revision;
                true
            } else {
                false
            }
        });
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
        log_change(
            &mut tx,
            revision,
            &path,
            Some(value.to_bytes()),
            create_revision,
        )
        .await?;
        tx.commit().await?;
        self.committed(revision);
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
        let current: Option<(i64, i64)> =
            sqlx::query_as("SELECT mod_revision, create_revision FROM kv WHERE key = $1")
                .bind(&path)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((current, created)) = current else {
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
        log_change(&mut tx, revision, &path, None, created).await?;
        tx.commit().await?;
        self.committed(revision);
        Ok(revision)
    }

    async fn history_impl(
        &self,
        key: &DocKey,
        before: i64,
        limit: usize,
    ) -> Result<Vec<StoredDoc>> {
        let path = key.path(&self.prefix);
        let before = if before <= 0 { i64::MAX } else { before };
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT revision, value FROM changes \
             WHERE key = $1 AND value IS NOT NULL AND revision < $2 \
             ORDER BY revision DESC LIMIT $3",
        )
        .bind(&path)
        .bind(before)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(revision, value)| {
                // History entries carry no create version (the etcd store cannot
                // know it once the document was deleted and created again).
                RawEntry {
                    key: path.clone(),
                    value,
                    create_revision: 0,
                    mod_revision: revision,
                }
                .decode(key.clone())
            })
            .collect()
    }

    async fn apply_impl(&self, ops: &[ApplyOp]) -> Result<ApplyOutcome> {
        check_apply(ops)?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // Every condition first: nothing is written unless all hold.
        let mut created = Vec::with_capacity(ops.len());
        for op in ops {
            let key = op.key();
            let current: Option<(i64, i64)> =
                sqlx::query_as("SELECT create_revision, mod_revision FROM kv WHERE key = $1")
                    .bind(key.path(&self.prefix))
                    .fetch_optional(&mut *tx)
                    .await?;
            match op {
                ApplyOp::Put {
                    expected_version, ..
                } => match (*expected_version, current) {
                    (Some(0), Some((_, cur))) => {
                        return Err(ConfigServiceError::conflict(key, 0, Some(cur)));
                    }
                    (Some(n), cur) if n != 0 && cur.map(|c| c.1) != Some(n) => {
                        return Err(ConfigServiceError::conflict(key, n, cur.map(|c| c.1)));
                    }
                    _ => {}
                },
                ApplyOp::Delete {
                    expected_version, ..
                } => match (current, *expected_version) {
                    (None, _) => return Err(ConfigServiceError::NotFound(key.to_string())),
                    (Some((_, cur)), Some(n)) if n != cur => {
                        return Err(ConfigServiceError::conflict(key, n, Some(cur)));
                    }
                    _ => {}
                },
            }
            created.push(current.map(|c| c.0));
        }
        let revision = bump(&mut tx).await?;
        let mut documents = Vec::new();
        for (op, created) in ops.iter().zip(created) {
            let path = op.key().path(&self.prefix);
            match op {
                ApplyOp::Put { key, value, .. } => {
                    let create_revision = created.unwrap_or(revision);
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
                    log_change(
                        &mut tx,
                        revision,
                        &path,
                        Some(value.to_bytes()),
                        create_revision,
                    )
                    .await?;
                    documents.push(StoredDoc {
                        key: key.clone(),
                        value: value.clone(),
                        version: revision,
                        create_version: create_revision,
                    });
                }
                ApplyOp::Delete { .. } => {
                    sqlx::query("DELETE FROM kv WHERE key = $1")
                        .bind(&path)
                        .execute(&mut *tx)
                        .await?;
                    log_change(&mut tx, revision, &path, None, created.unwrap_or(revision)).await?;
                }
            }
        }
        tx.commit().await?;
        self.committed(revision);
        Ok(ApplyOutcome {
            revision,
            documents,
        })
    }

    async fn watch_impl(&self, after: i64) -> Result<ChangeStream> {
        let log_start: i64 =
            sqlx::query_scalar("SELECT revision FROM change_log_start WHERE id = 1")
                .fetch_one(&self.pool)
                .await?;
        if after < log_start {
            return Err(ConfigServiceError::Compacted {
                requested: after,
                compacted: log_start,
            });
        }
        let state = WatchState {
            pool: self.pool.clone(),
            prefix: self.prefix.clone(),
            latest: self.latest.subscribe(),
            after,
            failed: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            state,
            |mut st| async move {
                if st.failed {
                    return None;
                }
                match st.next_batch().await {
                    Ok(Some(batch)) => Some((Ok(batch), st)),
                    Ok(None) => None,
                    Err(e) => {
                        st.failed = true;
                        Some((Err(e), st))
                    }
                }
            },
        )))
    }

    async fn current_revision_impl(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT revision FROM revision WHERE id = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }
}

/// A watcher's position in the change log.
struct WatchState {
    pool: SqlitePool,
    prefix: String,
    latest: tokio::sync::watch::Receiver<i64>,
    after: i64,
    failed: bool,
}

impl WatchState {
    /// The next non-empty batch of changes; `None` when the store is closed.
    async fn next_batch(&mut self) -> Result<Option<ChangeBatch>> {
        loop {
            let latest = *self.latest.borrow_and_update();
            if latest <= self.after {
                if self.latest.changed().await.is_err() {
                    return Ok(None);
                }
                continue;
            }
            let upto = latest.min(self.after + WATCH_BATCH_REVISIONS);
            let rows: Vec<(i64, String, Option<Vec<u8>>, i64)> = sqlx::query_as(
                "SELECT revision, key, value, create_revision FROM changes \
                 WHERE revision > $1 AND revision <= $2 ORDER BY revision, key",
            )
            .bind(self.after)
            .bind(upto)
            .fetch_all(&self.pool)
            .await?;
            self.after = upto;
            let mut changes = Vec::with_capacity(rows.len());
            for (revision, path, value, create_revision) in rows {
                let Some(key) = crate::document::DocKey::from_path(&self.prefix, &path) else {
                    continue;
                };
                match value {
                    None => changes.push(Change::Delete(key)),
                    Some(value) => {
                        let entry = RawEntry {
                            key: path,
                            value,
                            create_revision,
                            mod_revision: revision,
                        };
                        changes.push(Change::Put(entry.decode(key)?));
                    }
                }
            }
            return Ok(Some(ChangeBatch {
                revision: upto,
                changes,
            }));
        }
    }
}

/// Appends one change to the change log inside `tx`.
async fn log_change(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    revision: i64,
    path: &str,
    value: Option<Vec<u8>>,
    create_revision: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO changes (revision, key, value, create_revision) VALUES ($1, $2, $3, $4)",
    )
    .bind(revision)
    .bind(path)
    .bind(value)
    .bind(create_revision)
    .execute(&mut **tx)
    .await?;
    Ok(())
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

    fn watch(&self, after_revision: i64) -> BoxFuture<'_, Result<ChangeStream>> {
        Box::pin(self.watch_impl(after_revision))
    }

    fn history<'a>(
        &'a self,
        key: &'a DocKey,
        before: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredDoc>>> {
        Box::pin(self.history_impl(key, before, limit))
    }

    fn apply<'a>(&'a self, ops: &'a [ApplyOp]) -> BoxFuture<'a, Result<ApplyOutcome>> {
        Box::pin(self.apply_impl(ops))
    }
}
