//! SQL the stores share: the pools of an embedded SQLite database, and multi-row
//! statements whose text repeats.
//!
//! **Pools.** [`SqlitePools`] gives reads a pool and writes one connection of their
//! own. In WAL mode a connection drops its page cache when another connection wrote
//! since its last transaction; with every write on one connection its cache and its
//! prepared statements stay warm, and writers queue for it inside the process instead
//! of waiting on the database's lock.
//!
//! **Statements.** A statement with one `VALUES` row or `IN` item per record has a
//! different text for every batch size, and a database prepares (parses and plans)
//! each new text again: sqlx caches prepared statements by their text, per
//! connection. [`power_of_two_chunks`] cuts a batch into chunks whose sizes are powers
//! of two, which bounds the distinct texts to one per power (9 for chunks of at most
//! 500 rows: 1 to 256), all of which stay in the cache, for one more statement per
//! set bit of the batch size.

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

/// An embedded SQLite database's connections.
#[derive(Debug, Clone)]
pub struct SqlitePools {
    /// Reads.
    pub reader: SqlitePool,
    /// Writes, one at a time on one connection.
    pub writer: SqlitePool,
}

impl SqlitePools {
    /// Opens the database of `url` with `options` (the caller's journal mode,
    /// synchronous level and the like): a reader pool of up to `max_connections` and
    /// the writer. An in-memory database lives only as long as its one connection,
    /// which then serves both.
    pub async fn open(
        url: &str,
        max_connections: u32,
        options: SqliteConnectOptions,
    ) -> Result<Self, sqlx::Error> {
        if is_sqlite_memory(url) {
            let only = single_connection().connect_with(options).await?;
            return Ok(Self {
                reader: only.clone(),
                writer: only,
            });
        }
        let reader = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options.clone())
            .await?;
        // A local file does not go stale like a network connection: no ping per use.
        let writer = single_connection()
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(Self { reader, writer })
    }

    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}

/// A pool of one connection that is never recycled.
fn single_connection() -> SqlitePoolOptions {
    SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
}

/// True for SQLite URLs of an in-memory database.
pub fn is_sqlite_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

/// `items` in chunks of at most `max` (at least 1), each as long as the largest power
/// of two that fits in what is left, in order.
pub fn power_of_two_chunks<T>(items: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    let max = prev_power_of_two(max.max(1));
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (chunk, tail) = rest.split_at(prev_power_of_two(rest.len()).min(max));
        rest = tail;
        Some(chunk)
    })
}

/// The largest power of two not above `n` (n >= 1).
fn prev_power_of_two(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(n: usize, max: usize) -> Vec<usize> {
        let items: Vec<usize> = (0..n).collect();
        let chunks: Vec<&[usize]> = power_of_two_chunks(&items, max).collect();
        // Every item once, in order.
        assert_eq!(chunks.concat(), items);
        chunks.iter().map(|c| c.len()).collect()
    }

    #[test]
    fn memory_urls_are_recognised() {
        assert!(is_sqlite_memory("sqlite::memory:"));
        assert!(is_sqlite_memory("sqlite:file:x?mode=memory&cache=shared"));
        assert!(!is_sqlite_memory("sqlite:///var/lib/crewmesh/audit.db"));
    }

    #[tokio::test]
    async fn a_file_database_writes_on_one_connection_and_reads_on_a_pool() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let options = url
            .parse::<SqliteConnectOptions>()
            .unwrap()
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
        let pools = SqlitePools::open(&url, 4, options).await.unwrap();
        assert_eq!(pools.writer.options().get_max_connections(), 1);
        assert_eq!(pools.reader.options().get_max_connections(), 4);
        sqlx::query("CREATE TABLE t (n INTEGER)")
            .execute(&pools.writer)
            .await
            .unwrap();
        sqlx::query("INSERT INTO t VALUES (7)")
            .execute(&pools.writer)
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar("SELECT n FROM t")
            .fetch_one(&pools.reader)
            .await
            .unwrap();
        assert_eq!(n, 7);
        pools.close().await;
    }

    #[tokio::test]
    async fn an_in_memory_database_is_one_connection_for_both() {
        let url = "sqlite::memory:";
        let pools = SqlitePools::open(url, 4, url.parse().unwrap())
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (n INTEGER)")
            .execute(&pools.writer)
            .await
            .unwrap();
        // The reader sees the writer's table: the same database, the same connection.
        sqlx::query("SELECT n FROM t")
            .fetch_all(&pools.reader)
            .await
            .unwrap();
        assert_eq!(pools.reader.options().get_max_connections(), 1);
    }

    #[test]
    fn chunks_are_powers_of_two_in_order() {
        assert_eq!(sizes(0, 500), Vec::<usize>::new());
        assert_eq!(sizes(1, 500), [1]);
        assert_eq!(sizes(50, 500), [32, 16, 2]);
        assert_eq!(sizes(64, 500), [64]);
        assert_eq!(sizes(1_000, 500), [256, 256, 256, 128, 64, 32, 8]);
        // The cap is rounded down to a power of two; zero counts as one.
        assert_eq!(sizes(7, 3), [2, 2, 2, 1]);
        assert_eq!(sizes(3, 0), [1, 1, 1]);
    }
}
