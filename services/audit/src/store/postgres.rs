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
            // During a database outage, answer Unavailable soon (senders retry) rather
            // than hold their batches for the default 30 s.
            .acquire_timeout(std::time::Duration::from_secs(5))
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

    async fn chain_range(&self, chain: &str, after: i64, upto: i64) -> Result<Vec<EventRecord>> {
        chain_range_copy(&self.pool, chain, after, upto).await
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

/// Events of `chain` with a sequence in (`after`, `upto`], lowest first, read with
/// `COPY ... TO STDOUT (FORMAT binary)` and decoded here: verification reads the
/// whole chain, and decoding rows through the driver costs more than hashing them.
/// `COPY` takes no parameters, so `chain` is quoted as a literal.
async fn chain_range_copy(
    pool: &PgPool,
    chain: &str,
    after: i64,
    upto: i64,
) -> Result<Vec<EventRecord>> {
    use futures::TryStreamExt;
    use sqlx::postgres::PgPoolCopyExt;
    let statement = format!(
        "COPY (SELECT {EVENT_COLUMNS} FROM audit_events WHERE chain = {} AND sequence > {after} \
         AND sequence <= {upto} ORDER BY sequence ASC) TO STDOUT (FORMAT binary)",
        quote_literal(chain)
    );
    let mut stream = pool.copy_out_raw(&statement).await?;
    let mut data = Vec::new();
    while let Some(chunk) = stream.try_next().await? {
        data.extend_from_slice(&chunk);
    }
    decode_binary_copy(&data).map_err(|problem| {
        crate::error::AuditError::Database(sqlx::Error::Protocol(format!(
            "binary COPY of audit_events: {problem}"
        )))
    })
}

/// `s` as an SQL string literal (standard_conforming_strings: only `'` is special).
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The PostgreSQL binary COPY signature.
const COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Reads [`EVENT_COLUMNS`] tuples of a binary COPY (TEXT as UTF-8, BIGINT and
/// INTEGER big-endian).
fn decode_binary_copy(data: &[u8]) -> std::result::Result<Vec<EventRecord>, String> {
    struct Cursor<'a>(&'a [u8]);
    impl<'a> Cursor<'a> {
        fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err("truncated".to_owned());
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn i16(&mut self) -> std::result::Result<i16, String> {
            Ok(i16::from_be_bytes(
                self.take(2)?.try_into().map_err(|_| "i16")?,
            ))
        }
        fn i32(&mut self) -> std::result::Result<i32, String> {
            Ok(i32::from_be_bytes(
                self.take(4)?.try_into().map_err(|_| "i32")?,
            ))
        }
        fn field(&mut self) -> std::result::Result<&'a [u8], String> {
            let len = self.i32()?;
            let len = usize::try_from(len).map_err(|_| "unexpected NULL".to_owned())?;
            self.take(len)
        }
        fn text(&mut self) -> std::result::Result<String, String> {
            String::from_utf8(self.field()?.to_vec()).map_err(|_| "text is not UTF-8".to_owned())
        }
        fn bigint(&mut self) -> std::result::Result<i64, String> {
            let f = self.field()?;
            Ok(i64::from_be_bytes(
                f.try_into().map_err(|_| "bigint of the wrong size")?,
            ))
        }
        fn integer(&mut self) -> std::result::Result<i32, String> {
            let f = self.field()?;
            Ok(i32::from_be_bytes(
                f.try_into().map_err(|_| "integer of the wrong size")?,
            ))
        }
    }
    let mut c = Cursor(data);
    if c.take(COPY_SIGNATURE.len())? != COPY_SIGNATURE {
        return Err("no PGCOPY signature".to_owned());
    }
    let _flags = c.i32()?;
    let extension = usize::try_from(c.i32()?).map_err(|_| "bad header extension")?;
    c.take(extension)?;
    let mut events = Vec::new();
    loop {
        let fields = c.i16()?;
        if fields == -1 {
            return Ok(events);
        }
        if fields != 16 {
            return Err(format!("{fields} fields in a tuple, expected 16"));
        }
        events.push(EventRecord {
            id: c.text()?,
            chain: c.text()?,
            sequence: c.bigint()?,
            time_micros: c.bigint()?,
            tenant: c.text()?,
            actor_subject: c.text()?,
            actor_service: c.text()?,
            action: c.text()?,
            resource_kind: c.text()?,
            resource_name: c.text()?,
            outcome: c.integer()?,
            request_id: c.text()?,
            trace_id: c.text()?,
            details_json: c.text()?,
            prev_hash: c.text()?,
            hash: c.text()?,
        });
    }
}

#[cfg(test)]
mod copy_tests {
    use super::*;

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("main"), "'main'");
        assert_eq!(quote_literal("o'neil"), "'o''neil'");
    }

    #[test]
    fn truncated_or_foreign_copies_are_errors() {
        assert_eq!(decode_binary_copy(b"PGCOPY").unwrap_err(), "truncated");
        assert_eq!(
            decode_binary_copy(b"NOTCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0").unwrap_err(),
            "no PGCOPY signature"
        );
        let mut empty = COPY_SIGNATURE.to_vec();
        empty.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(decode_binary_copy(&empty).unwrap(), vec![]);
        let mut short = COPY_SIGNATURE.to_vec();
        short.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(
            decode_binary_copy(&short).unwrap_err(),
            "2 fields in a tuple, expected 16"
        );
    }
}
