//! The one test suite every [`AuditStore`] implementation passes, run against a
//! fresh PostgreSQL database and a fresh SQLite file per test.

use std::collections::HashSet;

use crewmesh_kit::settings::DatabaseConfig;
use crewmesh_proto::audit::v1 as pb;
use crewmesh_proto::types::v1::Outcome;

use super::{AuditStore, EventQuery, PgAuditStore, SqliteAuditStore};
use crate::event::{DEFAULT_CHAIN, EventRecord, GENESIS_HASH, NewEvent, event_hash};

/// What the suite needs beyond the trait: raw SQL behind the store's back.
trait TestStore: AuditStore {
    async fn execute_raw(&self, sql: &'static str) -> Result<u64, sqlx::Error>;
    async fn count_events(&self) -> i64;
}

impl TestStore for PgAuditStore {
    async fn execute_raw(&self, sql: &'static str) -> Result<u64, sqlx::Error> {
        sqlx::query(sql)
            .execute(self.pool())
            .await
            .map(|r| r.rows_affected())
    }

    async fn count_events(&self) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_events")
            .fetch_one(self.pool())
            .await
            .unwrap()
    }
}

impl TestStore for SqliteAuditStore {
    async fn execute_raw(&self, sql: &'static str) -> Result<u64, sqlx::Error> {
        sqlx::query(sql)
            .execute(self.pool())
            .await
            .map(|r| r.rows_affected())
    }

    async fn count_events(&self) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_events")
            .fetch_one(self.pool())
            .await
            .unwrap()
    }
}

async fn postgres_store() -> PgAuditStore {
    crewmesh_testkit::init_test_logs();
    let url = crewmesh_testkit::postgres().create_database().await;
    PgAuditStore::connect(&DatabaseConfig {
        url,
        password_file: None,
        max_connections: 8,
    })
    .await
    .unwrap()
}

async fn sqlite_store() -> (SqliteAuditStore, tempfile::TempDir) {
    crewmesh_testkit::init_test_logs();
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("audit.db").display()
    );
    let store = SqliteAuditStore::connect(&DatabaseConfig {
        url,
        password_file: None,
        max_connections: 8,
    })
    .await
    .unwrap();
    (store, dir)
}

macro_rules! store_suite {
    ($($test:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::$test(super::postgres_store().await).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let (store, _dir) = super::sqlite_store().await;
                    super::$test(store).await;
                }
            )*
        }
    };
}

store_suite!(
    appends_link_a_gap_free_chain,
    replayed_events_are_duplicates,
    empty_batches_report_the_head,
    concurrent_appends_keep_one_linear_chain,
    query_filters_pages_and_isolates_tenants,
    events_cannot_be_updated_or_deleted,
);

fn uuid(n: u64) -> String {
    format!("0190a5c4-0000-7000-8000-{n:012x}")
}

fn input(n: u64, tenant: &str) -> pb::EventInput {
    pb::EventInput {
        id: uuid(n),
        time: Some(crewmesh_proto::time::from_micros(
            1_700_000_000_000_000 + i64::try_from(n).unwrap() * 1_000_000,
        )),
        tenant: tenant.to_owned(),
        actor: Some(pb::Actor {
            subject: format!("key:k{}", n % 2),
            service: "spiffe://crewmesh.local/gateway".into(),
        }),
        action: if n.is_multiple_of(3) {
            "config.put"
        } else {
            "model.call"
        }
        .to_owned(),
        resource: Some(pb::Resource {
            kind: "model".into(),
            name: format!("m{}", n % 4),
        }),
        outcome: if n.is_multiple_of(5) {
            Outcome::Denied
        } else {
            Outcome::Success
        } as i32,
        request_id: format!("req-{n}"),
        trace_id: format!("trace-{n}"),
        details_json: format!("{{\"n\":{n},\"token\":\"secret-{n}\"}}"),
    }
}

fn event(n: u64, tenant: &str) -> NewEvent {
    NewEvent::from_input(input(n, tenant)).unwrap()
}

async fn all_events<S: AuditStore>(store: &S, tenant: &str) -> Vec<EventRecord> {
    store
        .query(&EventQuery::new(DEFAULT_CHAIN, tenant, 10_000))
        .await
        .unwrap()
}

/// Checks that `newest_first` is the whole chain 1..=n, each event's hash is right
/// and each links to the one before.
fn assert_linear_chain(newest_first: &[EventRecord]) {
    let mut chain: Vec<&EventRecord> = newest_first.iter().collect();
    chain.reverse();
    let mut prev = GENESIS_HASH.to_owned();
    for (i, e) in chain.iter().enumerate() {
        assert_eq!(e.sequence, i64::try_from(i).unwrap() + 1, "gap at {i}");
        assert_eq!(e.prev_hash, prev, "broken link at sequence {}", e.sequence);
        assert_eq!(
            e.hash,
            event_hash(e),
            "wrong hash at sequence {}",
            e.sequence
        );
        prev.clone_from(&e.hash);
    }
}

async fn appends_link_a_gap_free_chain<S: TestStore>(store: S) {
    let first = store
        .append(DEFAULT_CHAIN, (1..=3).map(|n| event(n, "acme")).collect())
        .await
        .unwrap();
    assert_eq!(
        (first.appended, first.duplicates, first.head_sequence),
        (3, 0, 3)
    );
    let second = store
        .append(DEFAULT_CHAIN, (4..=5).map(|n| event(n, "acme")).collect())
        .await
        .unwrap();
    assert_eq!(
        (second.appended, second.duplicates, second.head_sequence),
        (2, 0, 5)
    );

    let events = all_events(&store, "acme").await;
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        vec![5, 4, 3, 2, 1]
    );
    assert_linear_chain(&events);
    assert_eq!(events[0].hash, second.head_hash);
    assert_eq!(events[2].hash, first.head_hash);
    // The batch boundary is linked like any other pair.
    assert_eq!(events[1].prev_hash, events[2].hash);

    // What was stored is exactly what was sealed, secrets redacted.
    let mut expected = event(2, "acme").seal(DEFAULT_CHAIN, 2, &events[4].hash);
    expected.details_json = r#"{"n":2,"token":"[REDACTED]"}"#.to_owned();
    expected.hash = event_hash(&expected);
    assert_eq!(events[3], expected);
}

async fn replayed_events_are_duplicates<S: TestStore>(store: S) {
    let batch: Vec<NewEvent> = (1..=4).map(|n| event(n, "acme")).collect();
    let first = store.append(DEFAULT_CHAIN, batch.clone()).await.unwrap();
    assert_eq!((first.appended, first.duplicates), (4, 0));

    let replay = store.append(DEFAULT_CHAIN, batch).await.unwrap();
    assert_eq!((replay.appended, replay.duplicates), (0, 4));
    assert_eq!(replay.head_sequence, 4);
    assert_eq!(replay.head_hash, first.head_hash);
    assert_eq!(store.count_events().await, 4);

    // Repeats inside one batch, and a mix of old and new ids.
    let mixed = vec![
        event(5, "acme"),
        event(2, "acme"),
        event(5, "acme"),
        event(6, "acme"),
    ];
    let outcome = store.append(DEFAULT_CHAIN, mixed).await.unwrap();
    assert_eq!(
        (outcome.appended, outcome.duplicates, outcome.head_sequence),
        (2, 2, 6)
    );
    assert_eq!(store.count_events().await, 6);
    assert_linear_chain(&all_events(&store, "acme").await);
}

async fn empty_batches_report_the_head<S: TestStore>(store: S) {
    let empty = store.append(DEFAULT_CHAIN, Vec::new()).await.unwrap();
    assert_eq!(
        (
            empty.appended,
            empty.duplicates,
            empty.head_sequence,
            empty.head_hash.as_str()
        ),
        (0, 0, 0, GENESIS_HASH)
    );
    let one = store
        .append(DEFAULT_CHAIN, vec![event(1, "acme")])
        .await
        .unwrap();
    let again = store.append(DEFAULT_CHAIN, Vec::new()).await.unwrap();
    assert_eq!((again.head_sequence, again.head_hash), (1, one.head_hash));
}

async fn concurrent_appends_keep_one_linear_chain<S: TestStore>(store: S) {
    const TASKS: u64 = 4;
    const BATCHES: u64 = 10;
    const PER_BATCH: u64 = 5;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for b in 0..BATCHES {
                let base = 1 + (t * BATCHES + b) * PER_BATCH;
                let batch = (base..base + PER_BATCH).map(|n| event(n, "acme")).collect();
                let outcome = store.append(DEFAULT_CHAIN, batch).await.unwrap();
                assert_eq!(outcome.appended, PER_BATCH);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let events = all_events(&store, "acme").await;
    assert_eq!(events.len() as u64, TASKS * BATCHES * PER_BATCH);
    assert_linear_chain(&events);
    let ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), events.len());
    // Each batch stayed contiguous: its events have consecutive sequences.
    for e in &events {
        let n = u64::from_str_radix(&e.id[24..], 16).unwrap();
        let first_of_batch = events
            .iter()
            .find(|o| o.id == uuid(n - (n - 1) % PER_BATCH))
            .unwrap();
        assert_eq!(
            e.sequence - first_of_batch.sequence,
            i64::try_from((n - 1) % PER_BATCH).unwrap()
        );
    }
}

async fn query_filters_pages_and_isolates_tenants<S: TestStore>(store: S) {
    // Tenant acme gets 1..=30, tenant other gets 31..=40, interleaved in the chain.
    let mut batch: Vec<NewEvent> = Vec::new();
    for n in 1..=30 {
        batch.push(event(n, "acme"));
        if n.is_multiple_of(3) {
            batch.push(event(30 + n / 3, "other"));
        }
    }
    store.append(DEFAULT_CHAIN, batch).await.unwrap();

    let acme = all_events(&store, "acme").await;
    assert_eq!(acme.len(), 30);
    assert!(acme.iter().all(|e| e.tenant == "acme"));
    assert!(acme.windows(2).all(|w| w[0].sequence > w[1].sequence));
    let other = all_events(&store, "other").await;
    assert_eq!(other.len(), 10);
    assert!(other.iter().all(|e| e.tenant == "other"));
    assert!(all_events(&store, "nobody").await.is_empty());

    // Pages of 7, following the cursor, see every event once, newest first.
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let mut q = EventQuery::new(DEFAULT_CHAIN, "acme", 7);
        q.before_sequence = before;
        let page = store.query(&q).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 7);
        before = page.last().map(|e| e.sequence);
        seen.extend(page);
    }
    assert_eq!(seen, acme);

    let count = |q: EventQuery| {
        let store = store.clone();
        async move { store.query(&q).await.unwrap() }
    };
    let base = || EventQuery::new(DEFAULT_CHAIN, "acme", 100);

    let mut q = base();
    q.action = Some("config.put".into());
    let got = count(q).await;
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|e| e.action == "config.put"));

    let mut q = base();
    q.actor_subject = Some("key:k1".into());
    assert_eq!(count(q).await.len(), 15);

    let mut q = base();
    q.resource_kind = Some("model".into());
    q.resource_name = Some("m1".into());
    let got = count(q).await;
    assert_eq!(
        got.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        [29, 25, 21, 17, 13, 9, 5, 1].map(uuid).to_vec()
    );

    let mut q = base();
    q.outcome = Some(Outcome::Denied as i32);
    assert_eq!(count(q).await.len(), 6);

    // Time range: [from, to) over events 11..=20.
    let mut q = base();
    q.from_micros = Some(1_700_000_000_000_000 + 11 * 1_000_000);
    q.to_micros = Some(1_700_000_000_000_000 + 21 * 1_000_000);
    let got = count(q).await;
    assert_eq!(
        got.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        (11..=20).rev().map(uuid).collect::<Vec<_>>()
    );
}

async fn events_cannot_be_updated_or_deleted<S: TestStore>(store: S) {
    let outcome = store
        .append(DEFAULT_CHAIN, (1..=2).map(|n| event(n, "acme")).collect())
        .await
        .unwrap();
    let update = store
        .execute_raw("UPDATE audit_events SET action = 'forged' WHERE sequence = 1")
        .await;
    let err = update.expect_err("the trigger refuses updates").to_string();
    assert!(err.contains("append-only"), "{err}");
    let delete = store.execute_raw("DELETE FROM audit_events").await;
    let err = delete.expect_err("the trigger refuses deletes").to_string();
    assert!(err.contains("append-only"), "{err}");

    let events = all_events(&store, "acme").await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].action, "model.call");
    assert_eq!(events[0].hash, outcome.head_hash);
    assert_linear_chain(&events);
}
