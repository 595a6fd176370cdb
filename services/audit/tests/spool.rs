//! Nothing accepted is lost: the kit's spooling audit client against a real audit
//! service on PostgreSQL, through an audit outage in the middle of a load and
//! through a crash of the sender. Every accepted event ends up in the chain exactly
//! once, and the chain (with its checkpoints) verifies.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use crewmesh_audit::checkpoint::PublicKey;
use crewmesh_audit::event::DEFAULT_CHAIN;
use crewmesh_audit::store::{AuditStore, PgAuditStore};
use crewmesh_audit::verify::verify_chain;
use crewmesh_audit::{Application, AuditConfig, CheckpointConfig};
use crewmesh_kit::batch::BatchConfig;
use crewmesh_kit::clients::{AuditClient, Peers};
use crewmesh_kit::identity::SpiffeId;
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::settings::{CommonConfig, DatabaseConfig, ServerConfig, default_trust_domain};
use crewmesh_kit::spool::SpoolConfig;
use crewmesh_kit::tls::MeshTls;
use crewmesh_proto::audit::v1 as pb;
use crewmesh_proto::types::v1::Outcome;
use crewmesh_testkit::TestPki;

fn database(url: &str) -> DatabaseConfig {
    DatabaseConfig {
        url: url.to_owned(),
        password_file: None,
        max_connections: 4,
    }
}

fn audit_config(
    pki: &TestPki,
    url: &str,
    key: &std::path::Path,
    grpc: Option<SocketAddr>,
) -> AuditConfig {
    let mut server = ServerConfig::loopback();
    if let Some(addr) = grpc {
        server.grpc_addr = Some(addr);
    }
    let mut checkpoints = CheckpointConfig::with_key_file(key.to_owned());
    checkpoints.every_events = 250;
    AuditConfig {
        common: CommonConfig {
            trust_domain: default_trust_domain(),
            server,
            tls: pki.files("audit"),
            telemetry: Default::default(),
            peers: Default::default(),
        },
        database: database(url),
        checkpoints,
    }
}

/// A running audit service and the way to stop it.
struct Running {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<crewmesh_audit::Result<()>>,
}

async fn start_audit(config: AuditConfig) -> Running {
    let app = Application::build(config, MetricsRegistry::new())
        .await
        .unwrap();
    let addr = app.grpc_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    Running { addr, stop, task }
}

impl Running {
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// An audit client as the router would have it, spooling to `dir`.
fn client(
    pki: &TestPki,
    addr: SocketAddr,
    dir: &std::path::Path,
    metrics: &MetricsRegistry,
) -> AuditClient {
    let tls = MeshTls::load(pki.files("router")).unwrap();
    let peers_config = crewmesh_kit::settings::PeersConfig {
        audit: Some(addr.to_string()),
        ..Default::default()
    };
    let peers = Peers::new(&default_trust_domain(), peers_config, tls);
    AuditClient::with_spool(
        peers.audit().unwrap(),
        SpiffeId::new(&default_trust_domain(), "router").unwrap(),
        BatchConfig {
            capacity: 10_000,
            max_batch: 100,
            max_delay: Duration::from_millis(2),
        },
        SpoolConfig::new(dir),
        Some(metrics),
    )
    .unwrap()
}

fn event(n: u64) -> pb::EventInput {
    pb::EventInput {
        id: format!("0190a5c4-0000-7000-8000-{n:012x}"),
        time: None,
        tenant: "acme".into(),
        actor: Some(pb::Actor {
            subject: "key:k1".into(),
            service: String::new(),
        }),
        action: "model.complete".into(),
        resource: Some(pb::Resource {
            kind: "model".into(),
            name: "sim-small".into(),
        }),
        outcome: Outcome::Success as i32,
        request_id: format!("req-{n}"),
        trace_id: String::new(),
        details_json: String::new(),
    }
}

/// Every stored id, and the chain verified with the service's key.
async fn chain_holds(url: &str, key: &std::path::Path, expected: u64) {
    let store = PgAuditStore::connect(&database(url)).await.unwrap();
    let mut ids = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .chain_events(DEFAULT_CHAIN, after, 1000)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = last.sequence;
        ids.extend(page.into_iter().map(|e| e.id));
    }
    assert_eq!(ids.len() as u64, expected, "events in the chain");
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "an event is in the chain twice");
    let want: HashSet<String> = (0..expected).map(|n| event(n).id).collect();
    assert_eq!(ids.iter().cloned().collect::<HashSet<_>>(), want);

    let signer = crewmesh_audit::checkpoint::Signer::from_file(key, false).unwrap();
    let public: PublicKey = signer.public_key();
    let report = verify_chain(&store, DEFAULT_CHAIN, 0, Some(&public))
        .await
        .unwrap();
    assert_eq!(report.first_broken, None);
    assert_eq!(report.events_verified, expected);
    assert!(report.checkpoints_verified >= 1, "{report:?}");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_audit_outage_mid_load_loses_nothing() {
    crewmesh_testkit::init_crypto();
    crewmesh_testkit::init_test_logs();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit.pk8");
    let url = crewmesh_testkit::postgres().create_database().await;
    let metrics = MetricsRegistry::new();

    let audit = start_audit(audit_config(&pki, &url, &key, None)).await;
    let addr = audit.addr;
    let client = client(&pki, addr, &dir.path().join("spool"), &metrics);
    for n in 0..1000 {
        client.record(event(n));
        if n % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // Audit goes away in the middle of the load.
    audit.stop().await;
    for n in 1000..2000 {
        client.record(event(n));
    }
    assert!(!client.flush(Duration::from_millis(300)).await);
    assert!(client.spooled_bytes() > 0);
    assert!(
        metrics
            .encode()
            .contains("crewmesh_audit_spool_bytes{client=\"audit\"} "),
        "{}",
        metrics.encode()
    );

    // It comes back on the same address; the spool drains in order.
    let audit = start_audit(audit_config(&pki, &url, &key, Some(addr))).await;
    for n in 2000..3000 {
        client.record(event(n));
    }
    assert!(client.flush(Duration::from_secs(60)).await);
    assert_eq!(client.spooled_bytes(), 0);
    assert_eq!(
        client
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    audit.stop().await;
    chain_holds(&url, &key, 3000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_sender_replays_its_spool_on_restart() {
    crewmesh_testkit::init_crypto();
    crewmesh_testkit::init_test_logs();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit.pk8");
    let spool = dir.path().join("spool");
    let url = crewmesh_testkit::postgres().create_database().await;
    let metrics = MetricsRegistry::new();
    let audit = start_audit(audit_config(&pki, &url, &key, None)).await;

    // The sender runs in its own runtime; half its events were delivered when it
    // dies without flushing (its runtime is torn down, as a kill would).
    let (pki_files, addr) = (&pki, audit.addr);
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let c = client(pki_files, addr, &spool, &MetricsRegistry::new());
                for n in 0..500 {
                    c.record(event(n));
                }
                assert!(c.flush(Duration::from_secs(30)).await);
                for n in 500..1000 {
                    c.record(event(n));
                }
                std::mem::forget(c);
            });
            drop(rt);
        });
    });

    // The restarted sender replays what was left, and goes on.
    let c = client(&pki, audit.addr, &spool, &metrics);
    for n in 1000..1200 {
        c.record(event(n));
    }
    assert!(c.flush(Duration::from_secs(60)).await);
    audit.stop().await;
    chain_holds(&url, &key, 1200).await;
}
