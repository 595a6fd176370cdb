//! The one test suite every [`UsageStore`] implementation passes, run against a
//! fresh PostgreSQL database and a fresh SQLite file per test.

use crewmesh_kit::settings::DatabaseConfig;
use crewmesh_proto::types::v1::Outcome;

use super::{
    Cursor, Grouping, MICROS_PER_DAY, PgUsageStore, SpendBucket, SqliteUsageStore, UsageFilter,
    UsageStore,
};
use crate::usage::UsageRow;

async fn postgres_store() -> PgUsageStore {
    crewmesh_testkit::init_test_logs();
    let url = crewmesh_testkit::postgres().create_database().await;
    PgUsageStore::connect(&DatabaseConfig {
        url,
        password_file: None,
        max_connections: 4,
    })
    .await
    .unwrap()
}

async fn sqlite_store() -> (SqliteUsageStore, tempfile::TempDir) {
    crewmesh_testkit::init_test_logs();
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("metrics.db").display()
    );
    let store = SqliteUsageStore::connect(&DatabaseConfig {
        url,
        password_file: None,
        max_connections: 4,
    })
    .await
    .unwrap();
    (store, dir)
}

macro_rules! store_suite {
    ($($test:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::postgres_store().await).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let (store, _dir) = super::sqlite_store().await;
                    super::$test(store).await;
                }
            )*
        }
    };
}

store_suite!(
    record_is_idempotent,
    spend_groups_with_exact_sums,
    query_pages_newest_first_and_filters,
    tenants_are_isolated,
);

/// 2023-11-14T22:13:20Z.
const T0: i64 = 1_700_000_000_000_000;

fn row(n: u64, tenant: &str) -> UsageRow {
    UsageRow {
        id: format!("0190a5c4-0000-7000-8000-{n:012x}"),
        time_micros: T0 + i64::try_from(n).unwrap() * 1_000_000,
        tenant: tenant.to_owned(),
        subject: format!("key:k{}", n % 2),
        model: "gpt".into(),
        deployment: "gpt-east".into(),
        provider: "openai".into(),
        agent: String::new(),
        run_id: String::new(),
        prompt_tokens: 10,
        completion_tokens: 5,
        total_tokens: 15,
        cost_usd: 0.25,
        latency_ms: 100.5,
        ttft_ms: 20.25,
        cache_hit: n % 3 == 1,
        retries: 1,
        fallbacks: 0,
        outcome: Outcome::Success as i32,
        request_id: format!("req-{n}"),
        simulated: true,
    }
}

async fn all<S: UsageStore>(store: &S, tenant: &str) -> Vec<UsageRow> {
    store
        .query(&UsageFilter::tenant(tenant), None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.row)
        .collect()
}

async fn record_is_idempotent<S: UsageStore>(store: S) {
    let batch: Vec<UsageRow> = (1..=3).map(|n| row(n, "acme")).collect();
    let first = store.record(batch.clone()).await.unwrap();
    assert_eq!(first.accepted, batch);
    assert_eq!(first.duplicates, 0);

    let replay = store.record(batch.clone()).await.unwrap();
    assert!(replay.accepted.is_empty());
    assert_eq!(replay.duplicates, 3);

    let mixed = vec![
        row(4, "acme"),
        row(2, "acme"),
        row(4, "acme"),
        row(5, "acme"),
    ];
    let outcome = store.record(mixed).await.unwrap();
    assert_eq!(outcome.accepted, vec![row(4, "acme"), row(5, "acme")]);
    assert_eq!(outcome.duplicates, 2);

    let stored = all(&store, "acme").await;
    assert_eq!(
        stored,
        (1..=5).rev().map(|n| row(n, "acme")).collect::<Vec<_>>()
    );
}

fn bucket(key: &str, requests: u64, tokens: (u64, u64), cost_usd: f64) -> SpendBucket {
    SpendBucket {
        key: key.to_owned(),
        requests,
        prompt_tokens: tokens.0,
        completion_tokens: tokens.1,
        total_tokens: tokens.0 + tokens.1,
        cost_usd,
    }
}

async fn spend_groups_with_exact_sums<S: UsageStore>(store: S) {
    // Empty: one total row of zeros, no groups.
    let empty = store
        .spend(&UsageFilter::tenant("acme"), Grouping::Total)
        .await
        .unwrap();
    assert_eq!(empty, vec![bucket("total", 0, (0, 0), 0.0)]);
    assert!(
        store
            .spend(&UsageFilter::tenant("acme"), Grouping::Model)
            .await
            .unwrap()
            .is_empty()
    );

    // (model, subject, agent, day offset, prompt, completion, cost)
    let specs = [
        ("gpt", "key:a", "helper", 0, 100, 10, 1.5),
        ("gpt", "key:b", "", 0, 200, 20, 0.25),
        ("mistral-large", "key:a", "helper", 1, 50, 5, 0.75),
        ("mistral-large", "key:a", "writer", 1, 50, 5, 0.75),
        ("mini", "key:b", "writer", 2, 1, 1, 0.0),
        ("mini", "key:c", "", 2, 3, 4, 0.125),
    ];
    let rows: Vec<UsageRow> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut r = row(i as u64 + 1, "acme");
            r.model = s.0.into();
            r.subject = s.1.into();
            r.agent = s.2.into();
            r.time_micros = T0 + s.3 * MICROS_PER_DAY + i as i64;
            r.prompt_tokens = s.4;
            r.completion_tokens = s.5;
            r.total_tokens = s.4 + s.5;
            r.cost_usd = s.6;
            r
        })
        .collect();
    store.record(rows).await.unwrap();
    let spend = |grouping| {
        let store = store.clone();
        async move {
            store
                .spend(&UsageFilter::tenant("acme"), grouping)
                .await
                .unwrap()
        }
    };

    assert_eq!(
        spend(Grouping::Total).await,
        vec![bucket("total", 6, (404, 45), 3.375)]
    );
    assert_eq!(
        spend(Grouping::Model).await,
        vec![
            bucket("gpt", 2, (300, 30), 1.75),
            bucket("mistral-large", 2, (100, 10), 1.5),
            bucket("mini", 2, (4, 5), 0.125),
        ]
    );
    assert_eq!(
        spend(Grouping::Subject).await,
        vec![
            bucket("key:a", 3, (200, 20), 3.0),
            bucket("key:b", 2, (201, 21), 0.25),
            bucket("key:c", 1, (3, 4), 0.125),
        ]
    );
    assert_eq!(
        spend(Grouping::Agent).await,
        vec![
            bucket("helper", 2, (150, 15), 2.25),
            bucket("writer", 2, (51, 6), 0.75),
            bucket("", 2, (203, 24), 0.375),
        ]
    );
    // T0 is 2023-11-14T22:13:20Z.
    assert_eq!(
        spend(Grouping::Day).await,
        vec![
            bucket("2023-11-14", 2, (300, 30), 1.75),
            bucket("2023-11-15", 2, (100, 10), 1.5),
            bucket("2023-11-16", 2, (4, 5), 0.125),
        ]
    );

    // Filters apply to spend too.
    let mut filter = UsageFilter::tenant("acme");
    filter.from_micros = Some(T0 + MICROS_PER_DAY);
    filter.subject = Some("key:a".into());
    assert_eq!(
        store.spend(&filter, Grouping::Agent).await.unwrap(),
        vec![
            bucket("helper", 1, (50, 5), 0.75),
            bucket("writer", 1, (50, 5), 0.75)
        ]
    );
    let mut filter = UsageFilter::tenant("acme");
    filter.model = Some("gpt".into());
    filter.agent = Some("helper".into());
    assert_eq!(
        store.spend(&filter, Grouping::Total).await.unwrap(),
        vec![bucket("total", 1, (100, 10), 1.5)]
    );
}

async fn query_pages_newest_first_and_filters<S: UsageStore>(store: S) {
    // 23 records over 12 distinct times: pairs share a time, so the arrival order
    // breaks ties. Recorded in two batches, the older times last.
    let mut rows: Vec<UsageRow> = (1..=23)
        .map(|n| {
            let mut r = row(n, "acme");
            r.time_micros = T0 + i64::try_from(n / 2).unwrap() * 1_000_000;
            r.agent = if n % 4 == 0 { "helper" } else { "" }.into();
            r.model = if n > 20 { "mini" } else { "gpt" }.into();
            r
        })
        .collect();
    let newer = rows.split_off(10);
    store.record(newer).await.unwrap();
    store.record(rows).await.unwrap();

    let everything = store
        .query(&UsageFilter::tenant("acme"), None, 100)
        .await
        .unwrap();
    assert_eq!(everything.len(), 23);
    for pair in everything.windows(2) {
        let (a, b) = (pair[0].cursor, pair[1].cursor);
        assert!(
            a.time_micros > b.time_micros || (a.time_micros == b.time_micros && a.seq > b.seq),
            "{a:?} before {b:?}"
        );
    }
    assert_eq!(everything[0].row.id, row(23, "acme").id);

    // Pages of 5 following the cursor: 5 pages, each record once, same order.
    let mut seen = Vec::new();
    let mut after: Option<Cursor> = None;
    let mut pages = 0;
    loop {
        let page = store
            .query(&UsageFilter::tenant("acme"), after, 5)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        pages += 1;
        after = page.last().map(|s| s.cursor);
        seen.extend(page);
    }
    assert_eq!(pages, 5);
    assert_eq!(seen, everything);

    let mut filter = UsageFilter::tenant("acme");
    filter.model = Some("mini".into());
    let ids: Vec<String> = store
        .query(&filter, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.row.id)
        .collect();
    assert_eq!(ids, [23, 22, 21].map(|n| row(n, "acme").id).to_vec());

    let mut filter = UsageFilter::tenant("acme");
    filter.agent = Some("helper".into());
    filter.subject = Some("key:k0".into());
    assert_eq!(store.query(&filter, None, 100).await.unwrap().len(), 5);

    // [from, to): times T0+3s .. T0+5s hold records 6..=9.
    let mut filter = UsageFilter::tenant("acme");
    filter.from_micros = Some(T0 + 3_000_000);
    filter.to_micros = Some(T0 + 5_000_000);
    let ids: Vec<String> = store
        .query(&filter, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.row.id)
        .collect();
    assert_eq!(ids, [9, 8, 7, 6].map(|n| row(n, "acme").id).to_vec());
}

async fn tenants_are_isolated<S: UsageStore>(store: S) {
    let mut batch: Vec<UsageRow> = (1..=4).map(|n| row(n, "acme")).collect();
    batch.extend((5..=7).map(|n| {
        let mut r = row(n, "globex");
        r.cost_usd = 2.0;
        r
    }));
    store.record(batch).await.unwrap();

    let acme = all(&store, "acme").await;
    assert_eq!(acme.len(), 4);
    assert!(acme.iter().all(|r| r.tenant == "acme"));
    let globex = all(&store, "globex").await;
    assert_eq!(globex.len(), 3);
    assert!(globex.iter().all(|r| r.tenant == "globex"));
    assert!(all(&store, "initech").await.is_empty());

    // A filter that matches the other tenant's records still sees only its own.
    let mut filter = UsageFilter::tenant("acme");
    filter.subject = Some("key:k1".into());
    let got = store.query(&filter, None, 100).await.unwrap();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|s| s.row.tenant == "acme"));

    assert_eq!(
        store
            .spend(&UsageFilter::tenant("acme"), Grouping::Total)
            .await
            .unwrap(),
        vec![bucket("total", 4, (40, 20), 1.0)]
    );
    assert_eq!(
        store
            .spend(&UsageFilter::tenant("globex"), Grouping::Model)
            .await
            .unwrap(),
        vec![bucket("gpt", 3, (30, 15), 6.0)]
    );
}
