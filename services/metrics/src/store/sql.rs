//! The SQL both stores share. The statements are portable between PostgreSQL and
//! SQLite (`$n` placeholders, `ON CONFLICT (id) DO NOTHING RETURNING`, `CAST`,
//! `COALESCE`, integer division for days); only connecting differs.
//!
//! `shared_sql!(Db)` expands to functions over that database's concrete types, so
//! the SQL is written once without a generic bound on every sqlx trait.

/// Columns of `usage_records` a record has, in the order `decode_row` reads them
/// (after `seq`).
pub(super) const USAGE_COLUMNS: &str = "id, time_micros, tenant, subject, model, deployment, \
     provider, agent, run_id, prompt_tokens, completion_tokens, total_tokens, cost_usd, \
     latency_ms, ttft_ms, cache_hit, retries, fallbacks, outcome, request_id, simulated";

macro_rules! shared_sql {
    ($db:ty) => {
        use std::collections::HashSet;

        use sqlx::{QueryBuilder, Row};

        use crate::error::Result;
        use crate::store::sql::USAGE_COLUMNS;
        use crate::store::{
            Cursor, Grouping, INSERT_CHUNK, MICROS_PER_DAY, RecordOutcome, SpendBucket,
            StoredUsage, UsageFilter, day_key, sort_buckets,
        };
        use crate::usage::UsageRow;

        pub(super) async fn record(
            pool: &sqlx::Pool<$db>,
            rows: Vec<UsageRow>,
        ) -> Result<RecordOutcome> {
            let total = rows.len();
            let mut seen = HashSet::with_capacity(total);
            let unique: Vec<UsageRow> = rows
                .into_iter()
                .filter(|r| seen.insert(r.id.clone()))
                .collect();
            let mut inserted = HashSet::with_capacity(unique.len());
            let mut tx = pool.begin().await?;
            // Chunks of power-of-two sizes: their statements stay prepared.
            for chunk in crewmesh_kit::sql::power_of_two_chunks(&unique, INSERT_CHUNK) {
                let mut qb = QueryBuilder::<$db>::new(format!(
                    "INSERT INTO usage_records ({USAGE_COLUMNS}) "
                ));
                qb.push_values(chunk, |mut b, r| {
                    b.push_bind(r.id.as_str())
                        .push_bind(r.time_micros)
                        .push_bind(r.tenant.as_str())
                        .push_bind(r.subject.as_str())
                        .push_bind(r.model.as_str())
                        .push_bind(r.deployment.as_str())
                        .push_bind(r.provider.as_str())
                        .push_bind(r.agent.as_str())
                        .push_bind(r.run_id.as_str())
                        .push_bind(r.prompt_tokens)
                        .push_bind(r.completion_tokens)
                        .push_bind(r.total_tokens)
                        .push_bind(r.cost_usd)
                        .push_bind(r.latency_ms)
                        .push_bind(r.ttft_ms)
                        .push_bind(r.cache_hit)
                        .push_bind(r.retries)
                        .push_bind(r.fallbacks)
                        .push_bind(r.outcome)
                        .push_bind(r.request_id.as_str())
                        .push_bind(r.simulated);
                });
                qb.push(" ON CONFLICT (id) DO NOTHING RETURNING id");
                for row in qb.build().fetch_all(&mut *tx).await? {
                    inserted.insert(row.try_get::<String, _>(0)?);
                }
            }
            tx.commit().await?;
            let accepted: Vec<UsageRow> = unique
                .into_iter()
                .filter(|r| inserted.contains(&r.id))
                .collect();
            let duplicates = (total - accepted.len()) as u64;
            Ok(RecordOutcome {
                accepted,
                duplicates,
            })
        }

        fn push_filter(qb: &mut QueryBuilder<$db>, f: &UsageFilter) {
            qb.push(" WHERE tenant = ").push_bind(f.tenant.clone());
            if let Some(from) = f.from_micros {
                qb.push(" AND time_micros >= ").push_bind(from);
            }
            if let Some(to) = f.to_micros {
                qb.push(" AND time_micros < ").push_bind(to);
            }
            for (column, value) in [
                ("model", &f.model),
                ("subject", &f.subject),
                ("agent", &f.agent),
            ] {
                if let Some(value) = value {
                    qb.push(format_args!(" AND {column} = "))
                        .push_bind(value.clone());
                }
            }
        }

        pub(super) async fn query(
            pool: &sqlx::Pool<$db>,
            filter: &UsageFilter,
            after: Option<Cursor>,
            limit: u32,
        ) -> Result<Vec<StoredUsage>> {
            let mut qb =
                QueryBuilder::<$db>::new(format!("SELECT seq, {USAGE_COLUMNS} FROM usage_records"));
            push_filter(&mut qb, filter);
            if let Some(after) = after {
                qb.push(" AND (time_micros < ")
                    .push_bind(after.time_micros)
                    .push(" OR (time_micros = ")
                    .push_bind(after.time_micros)
                    .push(" AND seq < ")
                    .push_bind(after.seq)
                    .push("))");
            }
            qb.push(" ORDER BY time_micros DESC, seq DESC LIMIT ")
                .push_bind(i64::from(limit));
            let rows = qb.build().fetch_all(pool).await?;
            rows.iter().map(decode_row).collect()
        }

        fn decode_row(row: &<$db as sqlx::Database>::Row) -> Result<StoredUsage> {
            let usage = UsageRow {
                id: row.try_get(1)?,
                time_micros: row.try_get(2)?,
                tenant: row.try_get(3)?,
                subject: row.try_get(4)?,
                model: row.try_get(5)?,
                deployment: row.try_get(6)?,
                provider: row.try_get(7)?,
                agent: row.try_get(8)?,
                run_id: row.try_get(9)?,
                prompt_tokens: row.try_get(10)?,
                completion_tokens: row.try_get(11)?,
                total_tokens: row.try_get(12)?,
                cost_usd: row.try_get(13)?,
                latency_ms: row.try_get(14)?,
                ttft_ms: row.try_get(15)?,
                cache_hit: row.try_get(16)?,
                retries: row.try_get(17)?,
                fallbacks: row.try_get(18)?,
                outcome: row.try_get(19)?,
                request_id: row.try_get(20)?,
                simulated: row.try_get(21)?,
            };
            Ok(StoredUsage {
                cursor: Cursor {
                    time_micros: usage.time_micros,
                    seq: row.try_get(0)?,
                },
                row: usage,
            })
        }

        pub(super) async fn spend(
            pool: &sqlx::Pool<$db>,
            filter: &UsageFilter,
            grouping: Grouping,
        ) -> Result<Vec<SpendBucket>> {
            let key = match grouping {
                Grouping::Total => "0",
                Grouping::Model => "model",
                Grouping::Subject => "subject",
                Grouping::Agent => "agent",
                Grouping::Day => "time_micros / $day",
            };
            let mut qb = QueryBuilder::<$db>::new(format!(
                "SELECT {}, COUNT(*), \
                 CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT), \
                 COALESCE(SUM(cost_usd), 0.0) \
                 FROM usage_records",
                key.replace("$day", &MICROS_PER_DAY.to_string())
            ));
            push_filter(&mut qb, filter);
            if grouping != Grouping::Total {
                qb.push(" GROUP BY 1");
            }
            let rows = qb.build().fetch_all(pool).await?;
            let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
            let mut buckets = Vec::with_capacity(rows.len());
            for row in &rows {
                let key = match grouping {
                    Grouping::Total => "total".to_owned(),
                    Grouping::Day => day_key(row.try_get::<i64, _>(0)?),
                    _ => row.try_get::<String, _>(0)?,
                };
                buckets.push(SpendBucket {
                    key,
                    requests: unsigned(row.try_get(1)?),
                    prompt_tokens: unsigned(row.try_get(2)?),
                    completion_tokens: unsigned(row.try_get(3)?),
                    total_tokens: unsigned(row.try_get(4)?),
                    cost_usd: row.try_get(5)?,
                });
            }
            sort_buckets(&mut buckets);
            Ok(buckets)
        }
    };
}

pub(super) use shared_sql;
