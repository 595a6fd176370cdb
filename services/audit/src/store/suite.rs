//! The one test suite every [`AuditStore`] implementation passes, run against a
//! fresh PostgreSQL database and a fresh SQLite file per test.

use std::collections::HashSet;

use crewmesh_kit::settings::DatabaseConfig;
use crewmesh_proto::audit::v1 as pb;
use crewmesh_proto::types::v1::Outcome;

use super::{AuditStore, EventQuery, PgAuditStore, SqliteAuditStore};
use crate::checkpoint::{Checkpointer, PublicKey, Signer};
use crate::event::{DEFAULT_CHAIN, EventRecord, GENESIS_HASH, NewEvent, event_hash};
use crate::verify::{VerifyReport, verify_chain};

/// What the suite needs beyond the trait: raw SQL behind the store's back.
trait TestStore: AuditStore {
    async fn execute_raw(&self, sql: &'static str) -> Result<u64, sqlx::Error>;
    async fn count_events(&self) -> i64;
    /// Runs `statements` in one transaction with the append-only triggers out of
    /// the way, as an attacker with database superuser rights could.
    async fn tamper(&self, statements: &[String]);
}

impl TestStore for PgAuditStore {
    async fn tamper(&self, statements: &[String]) {
        let mut tx = self.pool().begin().await.unwrap();
        // Superuser only: replica mode skips ordinary triggers.
        sqlx::query("SET LOCAL session_replication_role = replica")
            .execute(&mut *tx)
            .await
            .unwrap();
        for sql in statements {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }

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
    async fn tamper(&self, statements: &[String]) {
        let mut tx = self.pool().begin().await.unwrap();
        for drop in [
            "DROP TRIGGER IF EXISTS audit_events_no_update",
            "DROP TRIGGER IF EXISTS audit_events_no_delete",
            "DROP TRIGGER IF EXISTS audit_checkpoints_no_update",
            "DROP TRIGGER IF EXISTS audit_checkpoints_no_delete",
        ] {
            sqlx::query(drop).execute(&mut *tx).await.unwrap();
        }
        for sql in statements {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }

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
    checkpoints_are_signed_and_verified,
    verify_finds_an_edited_field,
    verify_finds_a_deleted_event,
    verify_finds_swapped_events,
    verify_finds_an_inserted_event,
    verify_finds_events_appended_behind_its_back,
    verify_finds_a_truncated_tail,
    verify_finds_a_forged_checkpoint,
    export_streams_every_matching_event_in_order,
    retention_cut_removes_old_events_and_still_verifies,
    verify_holds_while_appends_continue,
    verify_reads_long_chains_in_concurrent_pages,
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

/// 15 events of tenant `acme` with a checkpoint at 10 and one at 15.
async fn checkpointed_chain<S: TestStore>(store: &S) -> PublicKey {
    let checkpointer = Checkpointer::new(store.clone(), Signer::ephemeral(), DEFAULT_CHAIN, 5)
        .await
        .unwrap();
    store
        .append(DEFAULT_CHAIN, (1..=10).map(|n| event(n, "acme")).collect())
        .await
        .unwrap();
    assert_eq!(
        checkpointer
            .checkpoint_now()
            .await
            .unwrap()
            .unwrap()
            .sequence,
        10
    );
    store
        .append(DEFAULT_CHAIN, (11..=15).map(|n| event(n, "acme")).collect())
        .await
        .unwrap();
    assert_eq!(
        checkpointer
            .checkpoint_now()
            .await
            .unwrap()
            .unwrap()
            .sequence,
        15
    );
    checkpointer.public_key()
}

async fn verify<S: TestStore>(store: &S, key: &PublicKey) -> VerifyReport {
    verify_chain(store, DEFAULT_CHAIN, 0, Some(key))
        .await
        .unwrap()
}

/// Asserts the first broken link is at `sequence`, names `event_id` and gives a
/// reason containing `reason`.
fn assert_broken(report: &VerifyReport, sequence: i64, event_id: &str, reason: &str) {
    let broken = report
        .first_broken
        .as_ref()
        .unwrap_or_else(|| panic!("tampering not detected: {report:?}"));
    assert_eq!(broken.sequence, sequence, "{broken:?}");
    assert_eq!(broken.event_id, event_id, "{broken:?}");
    assert!(broken.reason.contains(reason), "{broken:?}");
    assert!(!report.ok());
}

async fn checkpoints_are_signed_and_verified<S: TestStore>(store: S) {
    // An empty chain verifies.
    let empty = Signer::ephemeral().public_key();
    let report = verify(&store, &empty).await;
    assert_eq!((report.ok(), report.events_verified), (true, 0));
    assert_eq!(report.head_hash, GENESIS_HASH);

    let key = checkpointed_chain(&store).await;
    let checkpoints = store.checkpoints(DEFAULT_CHAIN, 0, 10).await.unwrap();
    assert_eq!(
        checkpoints.iter().map(|c| c.sequence).collect::<Vec<_>>(),
        vec![10, 15]
    );
    for c in &checkpoints {
        assert_eq!(key.check(c), Ok(()));
    }
    let head = all_events(&store, "acme").await[0].clone();
    assert_eq!(checkpoints[1].head_hash, head.hash);
    assert_eq!(
        store.last_checkpoint_sequence(DEFAULT_CHAIN).await.unwrap(),
        15
    );
    // A second signature at a checkpointed sequence is discarded.
    assert!(!store.insert_checkpoint(&checkpoints[0]).await.unwrap());

    let report = verify(&store, &key).await;
    assert_eq!(report.first_broken, None);
    assert_eq!(
        (report.events_verified, report.checkpoints_verified),
        (15, 2)
    );
    assert_eq!(report.head_hash, head.hash);

    // From the middle, anchored on checkpoint 10.
    let report = verify_chain(&store, DEFAULT_CHAIN, 11, Some(&key))
        .await
        .unwrap();
    assert_eq!(
        (
            report.ok(),
            report.events_verified,
            report.checkpoints_verified
        ),
        (true, 5, 1)
    );

    // A verifier holding another key refuses the checkpoints.
    let report = verify(&store, &empty).await;
    assert_broken(&report, 10, &uuid(10), "signed by key");
    // Checkpoints are append-only.
    assert!(
        store
            .execute_raw("DELETE FROM audit_checkpoints")
            .await
            .is_err()
    );
    assert!(
        store
            .execute_raw("UPDATE audit_checkpoints SET sequence = 1")
            .await
            .is_err()
    );
}

async fn verify_finds_an_edited_field<S: TestStore>(store: S) {
    let key = checkpointed_chain(&store).await;
    store
        .tamper(&["UPDATE audit_events SET resource_name = 'tampered' WHERE sequence = 5".into()])
        .await;
    assert_broken(
        &verify(&store, &key).await,
        5,
        &uuid(5),
        "not the hash of its fields",
    );
}

async fn verify_finds_a_deleted_event<S: TestStore>(store: S) {
    let key = checkpointed_chain(&store).await;
    store
        .tamper(&["DELETE FROM audit_events WHERE sequence = 7".into()])
        .await;
    assert_broken(
        &verify(&store, &key).await,
        7,
        &uuid(8),
        "event 7 is missing: the next stored event has sequence 8",
    );
}

async fn verify_finds_swapped_events<S: TestStore>(store: S) {
    let key = checkpointed_chain(&store).await;
    store
        .tamper(&[
            "UPDATE audit_events SET sequence = -3 WHERE sequence = 3".into(),
            "UPDATE audit_events SET sequence = 3 WHERE sequence = 4".into(),
            "UPDATE audit_events SET sequence = 4 WHERE sequence = -3".into(),
        ])
        .await;
    assert_broken(
        &verify(&store, &key).await,
        3,
        &uuid(4),
        "not the hash of its fields",
    );
}

fn insert_sql(e: &EventRecord) -> String {
    format!(
        "INSERT INTO audit_events ({}) VALUES ('{}', '{}', {}, {}, '{}', '{}', '{}', '{}', '{}', '{}', {}, '{}', '{}', '{}', '{}', '{}')",
        super::sql::EVENT_COLUMNS,
        e.id,
        e.chain,
        e.sequence,
        e.time_micros,
        e.tenant,
        e.actor_subject,
        e.actor_service,
        e.action,
        e.resource_kind,
        e.resource_name,
        e.outcome,
        e.request_id,
        e.trace_id,
        e.details_json,
        e.prev_hash,
        e.hash
    )
}

async fn verify_finds_an_inserted_event<S: TestStore>(store: S) {
    let key = checkpointed_chain(&store).await;
    // The attacker makes room after event 5 and inserts a correctly hashed event
    // linked to it: the event after it (the old 6, now at 7) no longer holds.
    let fifth = all_events(&store, "acme")
        .await
        .into_iter()
        .find(|e| e.sequence == 5)
        .unwrap();
    let forged = event(99, "acme").seal(DEFAULT_CHAIN, 6, &fifth.hash);
    store
        .tamper(&[
            "UPDATE audit_events SET sequence = sequence + 1000 WHERE sequence >= 6".into(),
            "UPDATE audit_events SET sequence = sequence - 999 WHERE sequence >= 1006".into(),
            insert_sql(&forged),
        ])
        .await;
    assert_broken(
        &verify(&store, &key).await,
        7,
        &uuid(6),
        "not the hash of its fields",
    );
}

async fn verify_finds_events_appended_behind_its_back<S: TestStore>(store: S) {
    let key = checkpointed_chain(&store).await;
    let head = all_events(&store, "acme").await[0].clone();
    let forged = event(99, "acme").seal(DEFAULT_CHAIN, 16, &head.hash);
    store.tamper(&[insert_sql(&forged)]).await;
    assert_broken(
        &verify(&store, &key).await,
        16,
        &uuid(99),
        "event 16 lies beyond the chain head (15): it was inserted outside an append",
    );
}

async fn verify_finds_a_truncated_tail<S: TestStore>(store: S) {
    let key = checkpointed_chain(&store).await;
    store
        .tamper(&["DELETE FROM audit_events WHERE sequence >= 14".into()])
        .await;
    assert_broken(
        &verify(&store, &key).await,
        14,
        "",
        "event 14 is missing: checkpoint 15 was signed over it, but the chain ends at 13",
    );
}

async fn verify_finds_a_forged_checkpoint<S: TestStore>(store: S) {
    let key = checkpointed_chain(&store).await;
    store
        .tamper(&[
            "UPDATE audit_checkpoints SET time_micros = time_micros + 1 WHERE sequence = 10".into(),
        ])
        .await;
    assert_broken(
        &verify(&store, &key).await,
        10,
        &uuid(10),
        "invalid signature",
    );
}

async fn export_streams_every_matching_event_in_order<S: TestStore>(store: S) {
    use futures::StreamExt;

    use crate::export::{ExportFormat, export_stream};
    store
        .append(
            DEFAULT_CHAIN,
            (1..=2500)
                .map(|n| event(n, if n % 2 == 0 { "acme" } else { "other" }))
                .collect(),
        )
        .await
        .unwrap();
    let mut query = EventQuery::new(DEFAULT_CHAIN, "acme", 1000);
    query.ascending = true;
    let chunks: Vec<Vec<u8>> = export_stream(store.clone(), query.clone(), ExportFormat::Jsonl)
        .map(|c| c.unwrap())
        .collect()
        .await;
    let text = String::from_utf8(chunks.concat()).unwrap();
    let ids: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids, (1..=1250).map(|n| uuid(2 * n)).collect::<Vec<_>>());

    query.action = Some("config.put".into());
    let csv: Vec<Vec<u8>> = export_stream(store.clone(), query, ExportFormat::Csv)
        .map(|c| c.unwrap())
        .collect()
        .await;
    let csv = String::from_utf8(csv.concat()).unwrap();
    let lines: Vec<&str> = csv.split_terminator("\r\n").collect();
    assert_eq!(lines[0], crate::export::CSV_COLUMNS.join(","));
    // Even n divisible by 3: multiples of 6 up to 2500.
    assert_eq!(lines.len() - 1, 2500 / 6);
    assert!(
        lines[1].starts_with(&format!("{},main,", uuid(6))),
        "{}",
        lines[1]
    );
}

async fn retention_cut_removes_old_events_and_still_verifies<S: TestStore>(store: S) {
    let checkpointer = Checkpointer::new(store.clone(), Signer::ephemeral(), DEFAULT_CHAIN, 5)
        .await
        .unwrap();
    let key = checkpointer.public_key();
    store
        .append(DEFAULT_CHAIN, (1..=10).map(|n| event(n, "acme")).collect())
        .await
        .unwrap();
    let at_10 = checkpointer.checkpoint_now().await.unwrap().unwrap();
    store
        .append(DEFAULT_CHAIN, (11..=15).map(|n| event(n, "acme")).collect())
        .await
        .unwrap();
    let at_15 = checkpointer.checkpoint_now().await.unwrap().unwrap();
    assert!(at_15.time_micros > at_10.time_micros);
    // Nothing is old enough yet.
    assert_eq!(
        checkpointer.retention_cut(at_10.time_micros).await.unwrap(),
        None
    );

    // Keep what came after checkpoint 10.
    let cut = checkpointer
        .retention_cut(at_10.time_micros + 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (cut.sequence, cut.head_hash.as_str()),
        (10, at_10.head_hash.as_str())
    );
    assert_eq!(store.count_events().await, 5);
    // The same cut again does nothing.
    assert_eq!(
        checkpointer
            .retention_cut(at_10.time_micros + 1)
            .await
            .unwrap(),
        None
    );

    let report = verify(&store, &key).await;
    assert_eq!(report.first_broken, None);
    assert_eq!(
        (report.events_verified, report.checkpoints_verified),
        (5, 2)
    );
    // Events after the cut still cannot be deleted.
    assert!(
        store
            .execute_raw("DELETE FROM audit_events WHERE sequence = 11")
            .await
            .is_err()
    );

    // A cut nobody signed, used to remove two more events, is found.
    let mut forged = cut.clone();
    forged.sequence = 12;
    store
        .tamper(&[
            format!(
                "INSERT INTO audit_retention_cuts (chain, sequence, head_hash, time_micros, signature, key_id) \
                 VALUES ('main', 12, '{}', 1, '{}', '{}')",
                forged.head_hash, forged.signature, forged.key_id
            ),
            "DELETE FROM audit_events WHERE sequence <= 12".into(),
        ])
        .await;
    assert_broken(
        &verify(&store, &key).await,
        13,
        "",
        "retention cut 12 has an invalid signature",
    );
}

async fn verify_holds_while_appends_continue<S: TestStore>(store: S) {
    let checkpointer = std::sync::Arc::new(
        Checkpointer::new(store.clone(), Signer::ephemeral(), DEFAULT_CHAIN, 5)
            .await
            .unwrap(),
    );
    let key = checkpointer.public_key();
    let writer = {
        let (store, checkpointer) = (store.clone(), checkpointer.clone());
        tokio::spawn(async move {
            for b in 0..40u64 {
                store
                    .append(
                        DEFAULT_CHAIN,
                        (b * 25 + 1..=b * 25 + 25)
                            .map(|n| event(n, "acme"))
                            .collect(),
                    )
                    .await
                    .unwrap();
                checkpointer.checkpoint_now().await.unwrap();
            }
        })
    };
    let mut verified = Vec::new();
    while !writer.is_finished() {
        let report = verify(&store, &key).await;
        assert_eq!(report.first_broken, None, "{report:?}");
        verified.push(report.events_verified);
    }
    writer.await.unwrap();
    let report = verify(&store, &key).await;
    assert_eq!((report.first_broken, report.events_verified), (None, 1000));
    assert!(verified.windows(2).all(|w| w[0] <= w[1]), "{verified:?}");
}

/// Three and a half pages of events, verified with several pages in flight; then
/// the last event of the first page and the first of the third are deleted: the
/// first gap is reported, wherever the page boundaries fall.
async fn verify_reads_long_chains_in_concurrent_pages<S: TestStore>(store: S) {
    let n = 3 * u64::from(crate::verify::VERIFY_PAGE) + 2500;
    for start in (1..=n).step_by(2500) {
        store
            .append(
                DEFAULT_CHAIN,
                (start..start + 2500).map(|i| event(i, "acme")).collect(),
            )
            .await
            .unwrap();
    }
    let key = Signer::ephemeral().public_key();
    let report = verify(&store, &key).await;
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.events_verified, n);
    let page = i64::from(crate::verify::VERIFY_PAGE);
    store
        .tamper(&[
            format!("DELETE FROM audit_events WHERE sequence = {page}"),
            format!("DELETE FROM audit_events WHERE sequence = {}", 2 * page + 1),
        ])
        .await;
    let (first, next) = (page, u64::try_from(page + 1).unwrap());
    assert_broken(
        &verify(&store, &key).await,
        first,
        &uuid(next),
        &format!("event {first} is missing: the next stored event has sequence {next}"),
    );
}
