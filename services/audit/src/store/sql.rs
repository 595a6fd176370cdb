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

        async fn existing_ids(conn: &mut Conn, events: &[NewEvent]) -> Result<HashSet<String>> {
            let mut found = HashSet::new();
            for chunk in events.chunks(LOOKUP_CHUNK) {
                let mut qb = QueryBuilder::<$db>::new("SELECT id FROM audit_events WHERE id IN (");
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

        async fn insert_events(conn: &mut Conn, records: &[EventRecord]) -> Result<()> {
            let mut qb =
                QueryBuilder::<$db>::new(format!("INSERT INTO audit_events ({EVENT_COLUMNS}) "));
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
            qb.push(" ORDER BY sequence DESC LIMIT ")
                .push_bind(i64::from(q.limit));
            let rows = qb.build().fetch_all(pool).await?;
            rows.iter().map(decode_event).collect()
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
