//! Nothing accepted is lost, nothing is stored twice: the audit trail across a
//! PostgreSQL restart in the middle of a load, and across a `kill -9` of a
//! `crewmesh up` process in the middle of a load and its restart with the same data
//! directory. "Accepted" is every request that got a 2xx answer; each must end up in
//! the chain exactly once, and the chain must verify.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crewmesh::up::{self, DatabaseChoice, UpOptions};
use crewmesh_audit::EventRecord;
use crewmesh_audit::store::{AuditStore, Backend, EventQuery};
use crewmesh_kit::settings::DatabaseConfig;

use crate::harness::{eventually, stop_with_ctrl_c, up_process};

fn chat(http: &reqwest::Client, gateway: &str, key: &str, id: &str) -> reqwest::RequestBuilder {
    http.post(format!("{gateway}/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-request-id", id)
        .timeout(Duration::from_secs(30))
        .json(&serde_json::json!({"model": "sim-small", "messages": [{"role": "user", "content": "durable"}]}))
}

/// The gateway's model-call events of tenant `default` in the audit database at
/// `url`, or `None` while it cannot be read.
async fn gateway_events(url: &str) -> Option<Vec<EventRecord>> {
    let db = DatabaseConfig {
        url: url.to_owned(),
        password_file: None,
        max_connections: 1,
    };
    let store = Backend::connect(&db).await.ok()?;
    let mut query = EventQuery::new("main", "default", 100_000);
    query.action = Some("http.models.invoke".to_owned());
    let events = match &store {
        Backend::Postgres(s) => s.query(&query).await,
        Backend::Sqlite(s) => s.query(&query).await,
    };
    store.close().await;
    events.ok()
}

/// How often each request id occurs among `events`.
fn occurrences(events: &[EventRecord]) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for e in events {
        *n.entry(e.request_id.clone()).or_insert(0) += 1;
    }
    n
}

/// Waits until every accepted request id is in the chain, then checks none is there
/// twice.
async fn every_accepted_request_is_stored_once(url: &str, accepted: &[String]) {
    let counts = eventually(
        "every accepted request in the chain",
        Duration::from_secs(60),
        || async {
            let counts = occurrences(&gateway_events(url).await?);
            accepted
                .iter()
                .all(|id| counts.contains_key(id))
                .then_some(counts)
        },
    )
    .await;
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
}

async fn verify(http: &reqwest::Client, gateway: &str, key: &str) -> serde_json::Value {
    let resp = http
        .get(format!("{gateway}/v1/audit/verify"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_load_loses_nothing_and_stores_nothing_twice() {
    crewmesh_testkit::init_crypto();
    crewmesh_testkit::init_test_logs();
    let pg = Arc::new(
        tokio::task::spawn_blocking(crewmesh_testkit::Postgres::dedicated)
            .await
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut opts =
        UpOptions::embedded(dir.path().to_owned(), SocketAddr::from(([127, 0, 0, 1], 0)));
    opts.refresh_interval = Duration::from_millis(100);
    let audit_db = pg.create_database().await;
    opts.databases = DatabaseChoice::Postgres {
        audit: audit_db.clone(),
        metrics: pg.create_database().await,
        agent_runtime: pg.create_database().await,
    };
    let mesh = up::start(opts).await.expect("the mesh starts");
    let gateway = mesh.state.gateway_url.clone();
    let key = mesh.state.admin_api_key.clone();
    let http = reqwest::Client::new();

    let mut accepted = Vec::new();
    for i in 0..150 {
        if i == 50 {
            let pg = pg.clone();
            tokio::task::spawn_blocking(move || pg.stop())
                .await
                .unwrap();
        }
        if i == 100 {
            let pg = pg.clone();
            tokio::task::spawn_blocking(move || pg.start())
                .await
                .unwrap();
        }
        let id = format!("req-pg-{i}");
        let resp = chat(&http, &gateway, &key, &id).send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        accepted.push(id);
    }
    every_accepted_request_is_stored_once(&audit_db, &accepted).await;
    let events = gateway_events(&audit_db).await.unwrap();
    assert_eq!(events.len(), 150);
    let v = verify(&http, &gateway, &key).await;
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["events_verified"].as_u64().unwrap() >= 150, "{v}");
    mesh.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sender_replays_every_accepted_event_exactly_once_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, gateway, key) = up_process(dir.path(), &[], &[]).await;
    let http = reqwest::Client::new();

    // Four clients in parallel; the process is killed while they are sending.
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (http, gateway, key) = (http.clone(), gateway.clone(), key.clone());
        let (accepted, stop) = (accepted.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("req-kill-{c}-{i}");
                i += 1;
                match chat(&http, &gateway, &key, &id).send().await {
                    Ok(resp) if resp.status().is_success() => {
                        accepted.lock().unwrap().push(id);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }));
    }
    eventually(
        "a hundred accepted requests",
        Duration::from_secs(60),
        || async { (accepted.lock().unwrap().len() >= 100).then_some(()) },
    )
    .await;
    child.kill().unwrap();
    let _ = child.wait();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() >= 100, "{}", accepted.len());

    // The same data directory: the spools replay what was not acknowledged.
    let (child, gateway, key) = up_process(dir.path(), &[], &[]).await;
    let audit_db = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("audit.db").display()
    );
    every_accepted_request_is_stored_once(&audit_db, &accepted).await;
    let v = verify(&http, &gateway, &key).await;
    assert_eq!(v["ok"], true, "{v}");

    stop_with_ctrl_c(child).await;
}
