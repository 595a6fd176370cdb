//! The SQL both stores share. The statements are portable between PostgreSQL and
//! SQLite (`$n` placeholders, `ON CONFLICT ... DO NOTHING`, `IN (...)` lists); the
//! stores differ only in how they begin the transaction and lock the chain head.
//!
//! `shared_sql!(Db)` expands to functions over that database's concrete types, so
//! the SQL is written once without a generic bound on every sqlx trait.

/// Columns of `audit_events`, in the order `decode_event` reads them.
pub(super) const EVENT_COLUMNS: &str = "id, chain, sequence, time_micros, tenant, actor_subject, \
     actor_service, action, resource_kind, resource_name, outcome, request_id, trace_id, \
     details_json, prev_hash, hash";

macro_rules! shared_sql {
    ($db:ty) => {
        use std::collections::HashSet;

        use sqlx::{QueryBuilder, Row};

        use crate::checkpoint::CheckpointRecord;
        use crate::error::{AuditError, Result};
        use crate::event::{EventRecord, GENESIS_HASH, NewEvent};
        use crate::store::sql::EVENT_COLUMNS;
        use crate::store::{AppendOutcome, EventQuery, INSERT_CHUNK, LOOKUP_CHUNK};

        type Conn = <$db as sqlx::Database>::Connection;

        /// Runs inside the caller's transaction, which the caller commits. Takes the
        /// chain head's lock with `head_select` (a `SELECT sequence, hash FROM
        /// audit_chain_heads WHERE chain = $1`, with `FOR UPDATE` where supported).
        pub(super) async fn append_in_tx(
            conn: &mut Conn,
            chain: &str,
            events: Vec<NewEvent>,
            head_select: &'static str,
        ) -> Result<AppendOutcome> {
            sqlx::query(
                "INSERT INTO audit_chain_heads (chain, sequence, hash) VALUES ($1, 0, $2) \
                 ON CONFLICT (chain) DO NOTHING",
            )
            .bind(chain)
            .bind(GENESIS_HASH)
            .execute(&mut *conn)
            .await?;
            let head = sqlx::query(head_select)
                .bind(chain)
                .fetch_one(&mut *conn)
                .await?;
            let mut sequence: i64 = head.try_get(0)?;
            let mut hash: String = head.try_get(1)?;
            if sequence < 0 || hash.len() != 64 {
                return Err(AuditError::CorruptHead {
                    chain: chain.to_owned(),
                    problem: format!("sequence {sequence}, hash of {} characters", hash.len()),
                });
            }

            let total = events.len();
            let mut seen = HashSet::with_capacity(total);
            let unique: Vec<NewEvent> = events
                .into_iter()
                .filter(|e| seen.insert(e.id.clone()))
                .collect();
            let stored = existing_ids(conn, &unique).await?;
            let mut records = Vec::with_capacity(unique.len());
            for event in unique {
                if stored.contains(&event.id) {
                    continue;
                }
                sequence += 1;
                let record = event.seal(chain, sequence, &hash);
                hash.clone_from(&record.hash);
                records.push(record);
            }
            for chunk in records.chunks(INSERT_CHUNK) {
                insert_events(conn, chunk).await?;
            }
            if !records.is_empty() {
                sqlx::query(
                    "UPDATE audit_chain_heads SET sequence = $1, hash = $2 WHERE chain = $3",
                )
                .bind(sequence)
                .bind(&hash)
                .bind(chain)
                .execute(&mut *conn)
                .await?;
            }
            let appended = records.len() as u64;
            Ok(AppendOutcome {
                appended,
                duplicates: total as u64 - appended,
                head_sequence: sequence,
                head_hash: hash,
            })
        }

        pub(super) async fn query_events(
            pool: &sqlx::Pool<$db>,
            q: &EventQuery,
        ) -> Result<Vec<EventRecord>> {
            let mut qb = QueryBuilder::<$db>::new(format!(
                "SELECT {EVENT_COLUMNS} FROM audit_events WHERE chain = "
            ));
            qb.push_bind(q.chain.as_str());
            qb.push(" AND tenant = ").push_bind(q.tenant.as_str());
            if let Some(before) = q.before_sequence {
                qb.push(" AND sequence < ").push_bind(before);
            }
            if let Some(after) = q.after_sequence {
                qb.push(" AND sequence > ").push_bind(after);
            }
            if let Some(from) = q.from_micros {
                qb.push(" AND time_micros >= ").push_bind(from);
            }
            if let Some(to) = q.to_micros {
                qb.push(" AND time_micros < ").push_bind(to);
            }
            for (column, value) in [
                ("actor_subject", &q.actor_subject),
                ("action", &q.action),
                ("resource_kind", &q.resource_kind),
                ("resource_name", &q.resource_name),
            ] {
                if let Some(value) = value {
                    qb.push(format_args!(" AND {column} = "))
                        .push_bind(value.as_str());
                }
            }
            if let Some(outcome) = q.outcome {
                qb.push(" AND outcome = ").push_bind(outcome);
            }
            qb.push(if q.ascending {
                " ORDER BY sequence ASC LIMIT "
            } else {
                " ORDER BY sequence DESC LIMIT "
            })
            .push_bind(i64::from(q.limit));
            let rows = qb.build().fetch_all(pool).await?;
            rows.iter().map(decode_event).collect()
        }

        /// Events of `chain` with a sequence above `after`, in sequence order.
        pub(super) async fn chain_events(
            pool: &sqlx::Pool<$db>,
            chain: &str,
            after: i64,
            limit: u32,
        ) -> Result<Vec<EventRecord>> {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {EVENT_COLUMNS} FROM audit_events WHERE chain = $1 AND sequence > $2 \
                 ORDER BY sequence ASC LIMIT $3"
            )))
            .bind(chain)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
            rows.iter().map(decode_event).collect()
        }

        /// The sequence and hash of the chain head, if the chain exists.
        pub(super) async fn chain_head(
            pool: &sqlx::Pool<$db>,
            chain: &str,
        ) -> Result<Option<(i64, String)>> {
            let row = sqlx::query("SELECT sequence, hash FROM audit_chain_heads WHERE chain = $1")
                .bind(chain)
                .fetch_optional(pool)
                .await?;
            Ok(match row {
                Some(row) => Some((row.try_get(0)?, row.try_get(1)?)),
                None => None,
            })
        }

        /// Stores a checkpoint; false when one exists at that sequence already.
        pub(super) async fn insert_checkpoint(
            pool: &sqlx::Pool<$db>,
            cp: &CheckpointRecord,
        ) -> Result<bool> {
            let done = sqlx::query(
                "INSERT INTO audit_checkpoints \
                 (chain, sequence, head_hash, time_micros, signature, key_id) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (chain, sequence) DO NOTHING",
            )
            .bind(cp.chain.as_str())
            .bind(cp.sequence)
            .bind(cp.head_hash.as_str())
            .bind(cp.time_micros)
            .bind(cp.signature.as_str())
            .bind(cp.key_id.as_str())
            .execute(pool)
            .await?;
            Ok(done.rows_affected() == 1)
        }

        /// Checkpoints of `chain` above sequence `after`, in sequence order.
        pub(super) async fn list_checkpoints(
            pool: &sqlx::Pool<$db>,
            chain: &str,
            after: i64,
            limit: u32,
        ) -> Result<Vec<CheckpointRecord>> {
            let rows = sqlx::query(
                "SELECT chain, sequence, head_hash, time_micros, signature, key_id \
                 FROM audit_checkpoints WHERE chain = $1 AND sequence > $2 \
                 ORDER BY sequence ASC LIMIT $3",
            )
            .bind(chain)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
            rows.iter().map(decode_signed).collect()
        }

        /// The checkpoint with the highest sequence of `chain`.
        pub(super) async fn last_checkpoint_sequence(
            pool: &sqlx::Pool<$db>,
            chain: &str,
        ) -> Result<i64> {
            let max: Option<i64> =
                sqlx::query_scalar("SELECT MAX(sequence) FROM audit_checkpoints WHERE chain = $1")
                    .bind(chain)
                    .fetch_one(pool)
                    .await?;
            Ok(max.unwrap_or(0))
        }

        fn decode_signed(row: &<$db as sqlx::Database>::Row) -> Result<CheckpointRecord> {
            Ok(CheckpointRecord {
                chain: row.try_get(0)?,
                sequence: row.try_get(1)?,
                head_hash: row.try_get(2)?,
                time_micros: row.try_get(3)?,
                signature: row.try_get(4)?,
                key_id: row.try_get(5)?,
            })
        }

        pub(super) async fn checkpoint_before(
            pool: &sqlx::Pool<$db>,
            chain: &str,
            time_micros: i64,
        ) -> Result<Option<CheckpointRecord>> {
            let row = sqlx::query(
                "SELECT chain, sequence, head_hash, time_micros, signature, key_id \
                 FROM audit_checkpoints WHERE chain = $1 AND time_micros < $2 \
                 ORDER BY sequence DESC LIMIT 1",
            )
            .bind(chain)
            .bind(time_micros)
            .fetch_optional(pool)
            .await?;
            row.as_ref().map(decode_signed).transpose()
        }

        pub(super) async fn last_cut(
            pool: &sqlx::Pool<$db>,
            chain: &str,
        ) -> Result<Option<CheckpointRecord>> {
            let row = sqlx::query(
                "SELECT chain, sequence, head_hash, time_micros, signature, key_id \
                 FROM audit_retention_cuts WHERE chain = $1 ORDER BY sequence DESC LIMIT 1",
            )
            .bind(chain)
            .fetch_optional(pool)
            .await?;
            row.as_ref().map(decode_signed).transpose()
        }

        pub(super) async fn retention_cut_in_tx(
            conn: &mut Conn,
            cut: &CheckpointRecord,
        ) -> Result<u64> {
            sqlx::query(
                "INSERT INTO audit_retention_cuts \
                 (chain, sequence, head_hash, time_micros, signature, key_id) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(cut.chain.as_str())
            .bind(cut.sequence)
            .bind(cut.head_hash.as_str())
            .bind(cut.time_micros)
            .bind(cut.signature.as_str())
            .bind(cut.key_id.as_str())
            .execute(&mut *conn)
            .await?;
            let done = sqlx::query("DELETE FROM audit_events WHERE chain = $1 AND sequence <= $2")
                .bind(cut.chain.as_str())
                .bind(cut.sequence)
                .execute(&mut *conn)
                .await?;
            Ok(done.rows_affected())
        }

        fn decode_event(row: &<$db as sqlx::Database>::Row) -> Result<EventRecord> {
            Ok(EventRecord {
                id: row.try_get(0)?,
                chain: row.try_get(1)?,
                sequence: row.try_get(2)?,
                time_micros: row.try_get(3)?,
                tenant: row.try_get(4)?,
                actor_subject: row.try_get(5)?,
                actor_service: row.try_get(6)?,
                action: row.try_get(7)?,
                resource_kind: row.try_get(8)?,
                resource_name: row.try_get(9)?,
                outcome: row.try_get(10)?,
                request_id: row.try_get(11)?,
                trace_id: row.try_get(12)?,
                details_json: row.try_get(13)?,
                prev_hash: row.try_get(14)?,
                hash: row.try_get(15)?,
            })
        }
    };
}

pub(super) use shared_sql;
