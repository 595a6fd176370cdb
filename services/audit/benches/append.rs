//! Sustained append into PostgreSQL (validation, redaction, hashing, one transaction
//! per batch) with a batch-size sweep, and the verify rate, on a PostgreSQL started
//! for the run. `cargo bench -p crewmesh-audit --bench append`; set
//! `AUDIT_BENCH_EVENTS` to change the events per configuration (default 100000).

use std::time::{Duration, Instant};

use crewmesh_audit::checkpoint::{Checkpointer, Signer};
use crewmesh_audit::event::{DEFAULT_CHAIN, NewEvent};
use crewmesh_audit::store::{AuditStore, PgAuditStore};
use crewmesh_audit::verify::{Verifier, verify_chain};
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
    for (batch, writers) in [
        (1, 1),
        (10, 1),
        (100, 1),
        (500, 1),
        (1000, 1),
        (5000, 1),
        (1000, 2),
        (1000, 4),
    ] {
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
    let mut runs = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let report = verify_chain(&store, DEFAULT_CHAIN, 0, Some(&key))
            .await
            .expect("verify");
        runs.push(t.elapsed());
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.events_verified, events);
    }
    runs.sort_unstable();
    let median = percentile(&runs, 0.5);
    println!(
        "\nverify from PostgreSQL: {events} events, {} checkpoints: median {:.0} ms = {:.0} events/s (5 runs, slowest {:.0} ms)",
        events / 1000,
        median.as_secs_f64() * 1e3,
        events as f64 / median.as_secs_f64(),
        runs[runs.len() - 1].as_secs_f64() * 1e3
    );

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
