//! The metrics service over real mTLS: built on a loopback port with a per-run PKI
//! and a PostgreSQL store, called as the gateway (and as identities that may not).

use crewmesh_kit::clients::{Peers, with_principal};
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::principal::{Principal, Role, TenantId};
use crewmesh_kit::settings::{CommonConfig, DatabaseConfig, ServerConfig, default_trust_domain};
use crewmesh_kit::tls::MeshTls;
use crewmesh_metrics::{Application, MetricsConfig};
use crewmesh_proto::metrics::v1 as pb;
use crewmesh_proto::types::v1::{Outcome, PageRequest, TokenUsage};
use crewmesh_testkit::TestPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

fn common(pki: &TestPki, workload: &str) -> CommonConfig {
    CommonConfig {
        trust_domain: default_trust_domain(),
        server: ServerConfig::loopback(),
        tls: pki.files(workload),
        telemetry: Default::default(),
        peers: Default::default(),
    }
}

/// The mesh as `workload` sees it, with metrics at `addr`.
fn peers_as(pki: &TestPki, workload: &str, addr: std::net::SocketAddr) -> Peers {
    let mut config = common(pki, workload);
    config.peers.metrics = Some(addr.to_string());
    let tls = MeshTls::load(config.tls.clone()).unwrap();
    Peers::new(&config.trust_domain, config.peers.clone(), tls)
}

fn principal(tenant: &str) -> Principal {
    Principal {
        tenant: TenantId::parse(tenant).unwrap(),
        subject: "key:k1".into(),
        roles: vec![Role::Viewer],
    }
}

fn record(n: u64, tenant: &str, model: &str, cost_usd: f64) -> pb::UsageRecord {
    pb::UsageRecord {
        id: format!("0190a5c4-0000-7000-8000-{n:012x}"),
        time: Some(crewmesh_proto::time::from_micros(
            1_700_000_000_000_000 + n as i64 * 1_000_000,
        )),
        tenant: tenant.into(),
        subject: "key:k1".into(),
        model: model.into(),
        deployment: format!("{model}-east"),
        provider: "openai".into(),
        agent: String::new(),
        run_id: String::new(),
        usage: Some(TokenUsage {
            prompt_tokens: 10,
            completion_tokens: 2,
            total_tokens: 12,
        }),
        cost_usd,
        latency_ms: 50.0,
        time_to_first_token_ms: 10.0,
        cache_hit: false,
        retries: 0,
        fallbacks: 0,
        outcome: Outcome::Success as i32,
        request_id: format!("req-{n}"),
        simulated: true,
    }
}

async fn admin_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

#[tokio::test]
async fn record_query_and_spend_over_mtls() {
    crewmesh_testkit::init_crypto();
    crewmesh_testkit::init_test_logs();
    let pki = TestPki::new();
    let url = crewmesh_testkit::postgres().create_database().await;
    let config = MetricsConfig {
        common: common(&pki, "metrics"),
        database: DatabaseConfig {
            url,
            password_file: None,
            max_connections: 4,
        },
    };
    let app = Application::build(config, MetricsRegistry::new())
        .await
        .unwrap();
    let (addr, admin) = (app.grpc_addr(), app.admin_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));

    let mut gateway = peers_as(&pki, "gateway", addr).metrics().unwrap();

    let batch = vec![
        record(1, "acme", "gpt", 0.5),
        record(2, "acme", "mini", 0.125),
        record(3, "globex", "gpt", 4.0),
        record(4, "acme", "gpt", 0.25),
    ];
    let recorded = gateway
        .record(pb::RecordRequest {
            records: batch.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((recorded.accepted, recorded.duplicates), (4, 0));
    let replayed = gateway
        .record(pb::RecordRequest { records: batch })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((replayed.accepted, replayed.duplicates), (0, 4));

    // One invalid record refuses the batch, naming where; nothing is written.
    let mut bad = record(6, "acme", "gpt", 1.0);
    bad.cost_usd = -1.0;
    let err = gateway
        .record(pb::RecordRequest {
            records: vec![record(5, "acme", "gpt", 1.0), bad],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("records[1].cost_usd:"),
        "{}",
        err.message()
    );

    // Query: acme's records only, newest first, two pages.
    let query = |token: &str| pb::QueryRequest {
        filter: None,
        page: Some(PageRequest {
            page_size: 2,
            page_token: token.to_owned(),
        }),
    };
    let first = gateway
        .query(with_principal(query(""), &principal("acme")))
        .await
        .unwrap()
        .into_inner();
    let ids = |records: &[pb::UsageRecord]| {
        records
            .iter()
            .map(|r| r.request_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&first.records), ["req-4", "req-2"]);
    assert_eq!(first.records[0], record(4, "acme", "gpt", 0.25));
    let second = gateway
        .query(with_principal(
            query(&first.next_page_token),
            &principal("acme"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&second.records), ["req-1"]);
    assert_eq!(second.next_page_token, "");

    let err = gateway
        .query(with_principal(query("garbage!"), &principal("acme")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = gateway.query(query("")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Spend by model, the caller's tenant only.
    let spend = gateway
        .spend(with_principal(
            pb::SpendRequest {
                filter: None,
                group_by: pb::GroupBy::Model as i32,
            },
            &principal("acme"),
        ))
        .await
        .unwrap()
        .into_inner();
    let rows: Vec<(String, u64, f64)> = spend
        .rows
        .iter()
        .map(|r| (r.key.clone(), r.requests, r.cost_usd))
        .collect();
    assert_eq!(
        rows,
        [("gpt".to_owned(), 2, 0.75), ("mini".to_owned(), 1, 0.125)]
    );
    assert_eq!(spend.total_cost_usd, 0.875);
    assert_eq!(
        spend.rows[0].usage,
        Some(TokenUsage {
            prompt_tokens: 20,
            completion_tokens: 4,
            total_tokens: 24
        })
    );

    // Identities off the allow-list are refused.
    let mut router = peers_as(&pki, "router", addr).metrics().unwrap();
    let err = router.query(query("")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut config = peers_as(&pki, "config", addr).metrics().unwrap();
    let err = config
        .record(pb::RecordRequest { records: vec![] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Accepted usage is counted once per record, by model.
    let exposition = admin_get(admin, "/metrics").await;
    assert!(
        exposition.contains("crewmesh_usage_tokens_total{model=\"gpt\"} 36"),
        "{exposition}"
    );
    assert!(
        exposition.contains("crewmesh_usage_cost_usd_total{model=\"mini\"} 0.125"),
        "{exposition}"
    );

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
