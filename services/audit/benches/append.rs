//! Sustained append into PostgreSQL (validation, redaction, hashing, one transaction
//! per batch) with a batch-size sweep, and the verify rate, on a PostgreSQL started
//! for the run. `cargo bench -p crewmesh-audit --bench append`; set
//! `AUDIT_BENCH_EVENTS` to change the events per configuration (default 100000), and
//! `AUDIT_BENCH_SKIP_APPEND` to measure verification only.

use std::time::{Duration, Instant};

use crewmesh_audit::checkpoint::{CheckpointRecord, Checkpointer, Signer};
use crewmesh_audit::event::{DEFAULT_CHAIN, NewEvent};
use crewmesh_audit::store::{AuditStore, PgAuditStore};
use crewmesh_audit::verify::{Verifier, verify_chain, verify_chain_reading};
use crewmesh_kit::settings::DatabaseConfig;
use crewmesh_proto::audit::v1 as pb;
use crewmesh_proto::types::v1::Outcome;

fn input(n: u64) -> pb::EventInput {
    pb::EventInput {
        id: uuid::Uuid::now_v7().to_string(),
        time: Some(crewmesh_proto::time::from_micros(
            1_700_000_000_000_000 + n as i64,
        )),
        tenant: format!("tenant-{}", n % 16),
        actor: Some(pb::Actor {
            subject: format!("key:k{}", n % 64),
            service: "spiffe://crewmesh.local/router".into(),
        }),
        action: "model.complete".into(),
        resource: Some(pb::Resource {
            kind: "model".into(),
            name: "sim-small".into(),
        }),
        outcome: Outcome::Success as i32,
        request_id: format!("req-{n}"),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        details_json: format!(
            r#"{{"deployment":"sim","prompt_tokens":{},"completion_tokens":12,"latency_ms":3,"api_key":"sk-x"}}"#,
            n % 1000
        ),
    }
}

/// The PostgreSQL store reading the chain as it did before: row decoding, pages
/// bounded by a LIMIT only; for the side-by-side verify measurement.
#[derive(Clone)]
struct RowsStore(PgAuditStore);

impl AuditStore for RowsStore {
    async fn append(
        &self,
        chain: &str,
        events: Vec<NewEvent>,
    ) -> crewmesh_audit::Result<crewmesh_audit::store::AppendOutcome> {
        self.0.append(chain, events).await
    }
    async fn query(
        &self,
        query: &crewmesh_audit::store::EventQuery,
    ) -> crewmesh_audit::Result<Vec<crewmesh_audit::EventRecord>> {
        self.0.query(query).await
    }
    async fn chain_events(
        &self,
        chain: &str,
        after: i64,
        limit: u32,
    ) -> crewmesh_audit::Result<Vec<crewmesh_audit::EventRecord>> {
        self.0.chain_events(chain, after, limit).await
    }
    // `chain_range` is the trait's default: `chain_events` (rows, no upper bound).
    async fn chain_head(&self, chain: &str) -> crewmesh_audit::Result<Option<(i64, String)>> {
        self.0.chain_head(chain).await
    }
    async fn insert_checkpoint(&self, c: &CheckpointRecord) -> crewmesh_audit::Result<bool> {
        self.0.insert_checkpoint(c).await
    }
    async fn checkpoints(
        &self,
        chain: &str,
        after: i64,
        limit: u32,
    ) -> crewmesh_audit::Result<Vec<CheckpointRecord>> {
        self.0.checkpoints(chain, after, limit).await
    }
    async fn last_checkpoint_sequence(&self, chain: &str) -> crewmesh_audit::Result<i64> {
        self.0.last_checkpoint_sequence(chain).await
    }
    async fn checkpoint_before(
        &self,
        chain: &str,
        time_micros: i64,
    ) -> crewmesh_audit::Result<Option<CheckpointRecord>> {
        self.0.checkpoint_before(chain, time_micros).await
    }
    async fn last_cut(&self, chain: &str) -> crewmesh_audit::Result<Option<CheckpointRecord>> {
        self.0.last_cut(chain).await
    }
    async fn retention_cut(&self, cut: &CheckpointRecord) -> crewmesh_audit::Result<u64> {
        self.0.retention_cut(cut).await
    }
    async fn close(&self) {
        self.0.close().await
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn store(url: String) -> PgAuditStore {
    PgAuditStore::connect(&DatabaseConfig {
        url,
        password_file: None,
        max_connections: 8,
    })
    .await
    .expect("connect")
}

/// Appends `events` in batches of `batch` from `writers` concurrent tasks; returns
/// (events/s, median batch latency, p99 batch latency).
async fn append_run(
    store: &PgAuditStore,
    events: u64,
    batch: u64,
    writers: u64,
) -> (f64, Duration, Duration) {
    let per_writer = events / writers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = w * per_writer;
            let end = n + per_writer;
            while n < end {
                let inputs: Vec<pb::EventInput> = (n..(n + batch).min(end)).map(input).collect();
                n += inputs.len() as u64;
                let t = Instant::now();
                let events: Vec<NewEvent> = inputs
                    .into_iter()
                    .map(|i| NewEvent::from_input(i).expect("valid"))
                    .collect();
                store.append(DEFAULT_CHAIN, events).await.expect("append");
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("task"));
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    (
        (per_writer * writers) as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    crewmesh_testkit::init_crypto();
    let events: u64 = std::env::var("AUDIT_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let pg = crewmesh_testkit::postgres();
    println!(
        "audit append into PostgreSQL, {} CPUs, {events} events per configuration",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| batch | writers | events/s | batch p50 | batch p99 |");
    println!("|---:|---:|---:|---:|---:|");
    let sweep: &[(u64, u64)] = if std::env::var_os("AUDIT_BENCH_SKIP_APPEND").is_some() {
        &[]
    } else {
        &[
            (1, 1),
            (10, 1),
            (100, 1),
            (500, 1),
            (1000, 1),
            (5000, 1),
            (1000, 2),
            (1000, 4),
        ]
    };
    for &(batch, writers) in sweep {
        let store = store(pg.create_database().await).await;
        let n = if batch == 1 {
            events / 20
        } else if batch == 10 {
            events / 4
        } else {
            events
        };
        let (rate, p50, p99) = append_run(&store, n, batch, writers).await;
        println!(
            "| {batch} | {writers} | {rate:.0} | {:.2} ms | {:.2} ms |",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
        store.close().await;
    }

    // Verify: a chain of `events` with a checkpoint every 1000 events.
    let store = store(pg.create_database().await).await;
    let checkpointer = Checkpointer::new(store.clone(), Signer::ephemeral(), DEFAULT_CHAIN, 1000)
        .await
        .expect("checkpointer");
    let mut n = 0;
    while n < events {
        let batch: Vec<NewEvent> = (n..(n + 1000).min(events))
            .map(|i| NewEvent::from_input(input(i)).expect("valid"))
            .collect();
        n += batch.len() as u64;
        store.append(DEFAULT_CHAIN, batch).await.expect("append");
        checkpointer.checkpoint_now().await.expect("checkpoint");
    }
    let key = checkpointer.public_key();
    // End to end, side by side: the store as it reads now (binary COPY) and as it
    // read before (row decoding), alternating runs.
    let rows_store = RowsStore(store.clone());
    let (mut runs, mut row_runs) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let report = verify_chain(&store, DEFAULT_CHAIN, 0, Some(&key))
            .await
            .expect("verify");
        runs.push(t.elapsed());
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.events_verified, events);
        // As before: rows, the next page read while the current one is checked.
        let t = Instant::now();
        let report = verify_chain_reading(&rows_store, DEFAULT_CHAIN, 0, Some(&key), 1)
            .await
            .expect("verify");
        row_runs.push(t.elapsed());
        assert!(report.ok(), "{report:?}");
    }
    for (what, runs) in [
        ("now: binary COPY, 3 pages in flight", &mut runs),
        ("before: rows, 1 page in flight", &mut row_runs),
    ] {
        runs.sort_unstable();
        let median = percentile(runs, 0.5);
        println!(
            "\nverify from PostgreSQL ({what}): {events} events, {} checkpoints: median {:.0} ms = {:.0} events/s (5 runs, slowest {:.0} ms)",
            events / 1000,
            median.as_secs_f64() * 1e3,
            events as f64 / median.as_secs_f64(),
            runs[runs.len() - 1].as_secs_f64() * 1e3
        );
    }

    // Reading the chain alone, side by side, pages of 5000: rows through the driver
    // after a sequence with a LIMIT (how verify read before) and binary COPY of a
    // sequence range (how it reads now).
    async fn read_all<F, Fut>(read: F) -> u64
    where
        F: Fn(i64) -> Fut,
        Fut: std::future::Future<Output = Vec<crewmesh_audit::EventRecord>>,
    {
        let (mut after, mut n) = (0, 0);
        loop {
            let page = read(after).await;
            let Some(last) = page.last() else { break };
            after = last.sequence;
            n += page.len() as u64;
        }
        n
    }
    let by_rows = |after| {
        let store = store.clone();
        async move {
            store
                .chain_events(DEFAULT_CHAIN, after, 5000)
                .await
                .expect("read rows")
        }
    };
    let by_copy = |after| {
        let store = store.clone();
        async move {
            store
                .chain_range(DEFAULT_CHAIN, after, after + 5000)
                .await
                .expect("read copy")
        }
    };
    assert_eq!(by_rows(0).await, by_copy(0).await, "both reads agree");
    let (mut rows, mut copies) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(read_all(by_rows).await, events);
        rows.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(read_all(by_copy).await, events);
        copies.push(t.elapsed());
    }
    rows.sort_unstable();
    copies.sort_unstable();
    for (what, runs) in [
        ("before: rows, LIMIT pages", &rows),
        ("now: binary COPY, range pages", &copies),
    ] {
        let median = percentile(runs, 0.5);
        println!(
            "read the chain from PostgreSQL ({what}): median {:.0} ms = {:.0} events/s (5 runs, slowest {:.0} ms)",
            median.as_secs_f64() * 1e3,
            events as f64 / median.as_secs_f64(),
            runs[runs.len() - 1].as_secs_f64() * 1e3
        );
    }

    // The CPU part alone: re-hash and link events already in memory.
    let mut records = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .chain_events(DEFAULT_CHAIN, after, 10_000)
            .await
            .expect("read");
        let Some(last) = page.last() else { break };
        after = last.sequence;
        records.extend(page);
    }
    let checkpoints = store
        .checkpoints(DEFAULT_CHAIN, 0, 100_000)
        .await
        .expect("checkpoints");
    let mut runs = Vec::new();
    for _ in 0..5 {
        let map = checkpoints
            .iter()
            .map(|c| (c.sequence, c.clone()))
            .collect();
        let t = Instant::now();
        let mut v = Verifier::new(0, map, Some(&key));
        for r in &records {
            assert!(v.event(r));
        }
        runs.push(t.elapsed());
    }
    runs.sort_unstable();
    let median = percentile(&runs, 0.5);
    println!(
        "verify in memory (hash + link + signatures, one core): median {:.0} ms = {:.0} events/s",
        median.as_secs_f64() * 1e3,
        records.len() as f64 / median.as_secs_f64()
    );
    let mut runs = Vec::new();
    for _ in 0..5 {
        let map = checkpoints
            .iter()
            .map(|c| (c.sequence, c.clone()))
            .collect();
        let t = Instant::now();
        let mut v = Verifier::new(0, map, Some(&key));
        for page in records.chunks(5000) {
            assert!(v.events(page));
        }
        runs.push(t.elapsed());
    }
    runs.sort_unstable();
    let median = percentile(&runs, 0.5);
    println!(
        "verify in memory (hash + link + signatures, pages of 5000 hashed on every core): median {:.0} ms = {:.0} events/s",
        median.as_secs_f64() * 1e3,
        records.len() as f64 / median.as_secs_f64()
    );
    store.close().await;
}
