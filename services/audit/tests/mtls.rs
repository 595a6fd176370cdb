//! The audit service over real mTLS: built on a loopback port with a per-run PKI and
//! an SQLite store, called as the gateway (and as identities that may not call).

use crewmesh_audit::event::{EventRecord, GENESIS_HASH, event_hash};
use crewmesh_audit::{Application, AuditConfig};
use crewmesh_kit::clients::{Peers, with_principal};
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::principal::{Principal, Role, TenantId};
use crewmesh_kit::settings::{CommonConfig, DatabaseConfig, ServerConfig, default_trust_domain};
use crewmesh_kit::tls::MeshTls;
use crewmesh_proto::audit::v1 as pb;
use crewmesh_proto::types::v1::{Outcome, PageRequest};
use crewmesh_testkit::TestPki;
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

/// The mesh as `workload` sees it, with audit at `addr`.
fn peers_as(pki: &TestPki, workload: &str, addr: std::net::SocketAddr) -> Peers {
    let mut config = common(pki, workload);
    config.peers.audit = Some(addr.to_string());
    let tls = MeshTls::load(config.tls.clone()).unwrap();
    Peers::new(&config.trust_domain, config.peers.clone(), tls)
}

fn principal(tenant: &str) -> Principal {
    Principal {
        tenant: TenantId::parse(tenant).unwrap(),
        subject: "key:k1".into(),
        roles: vec![Role::Auditor],
    }
}

fn event(n: u64, tenant: &str) -> pb::EventInput {
    pb::EventInput {
        id: format!("0190a5c4-0000-7000-8000-{n:012x}"),
        time: Some(crewmesh_proto::time::from_micros(
            1_700_000_000_000_000 + n as i64,
        )),
        tenant: tenant.into(),
        actor: Some(pb::Actor {
            subject: "key:k1".into(),
            service: "spiffe://crewmesh.local/gateway".into(),
        }),
        action: "config.put".into(),
        resource: Some(pb::Resource {
            kind: "model".into(),
            name: format!("m{n}"),
        }),
        outcome: Outcome::Success as i32,
        request_id: format!("req-{n}"),
        trace_id: String::new(),
        details_json: format!(r#"{{"n": {n}, "headers": {{"Authorization": "Bearer sk-live"}}}}"#),
    }
}

/// Rebuilds the stored record from what Query returned.
fn record_of(e: &pb::Event) -> EventRecord {
    let actor = e.actor.clone().unwrap_or_default();
    let resource = e.resource.clone().unwrap_or_default();
    EventRecord {
        id: e.id.clone(),
        chain: e.chain.clone(),
        sequence: e.sequence as i64,
        time_micros: crewmesh_proto::time::to_micros(e.time.as_ref().unwrap()),
        tenant: e.tenant.clone(),
        actor_subject: actor.subject,
        actor_service: actor.service,
        action: e.action.clone(),
        resource_kind: resource.kind,
        resource_name: resource.name,
        outcome: e.outcome,
        request_id: e.request_id.clone(),
        trace_id: e.trace_id.clone(),
        details_json: e.details_json.clone(),
        prev_hash: e.prev_hash.clone(),
        hash: e.hash.clone(),
    }
}

#[tokio::test]
async fn append_and_query_over_mtls() {
    crewmesh_testkit::init_crypto();
    crewmesh_testkit::init_test_logs();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        common: common(&pki, "audit"),
        database: DatabaseConfig {
            url: format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("audit.db").display()
            ),
            password_file: None,
            max_connections: 4,
        },
        checkpoints: crewmesh_audit::CheckpointConfig::with_key_file(dir.path().join("key.pk8")),
    };
    let app = Application::build(config, MetricsRegistry::new())
        .await
        .unwrap();
    let addr = app.grpc_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));

    let mut gateway = peers_as(&pki, "gateway", addr).audit().unwrap();

    // Append: two tenants in one batch, one event replayed.
    let batch = vec![
        event(1, "acme"),
        event(2, "other"),
        event(3, "acme"),
        event(1, "acme"),
    ];
    let appended = gateway
        .append(pb::AppendRequest { events: batch })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            appended.appended,
            appended.duplicates,
            appended.head_sequence
        ),
        (3, 1, 3)
    );

    // An invalid event refuses the whole batch, naming where.
    let mut bad = event(9, "acme");
    bad.action = "Not Valid".into();
    let err = gateway
        .append(pb::AppendRequest {
            events: vec![event(8, "acme"), bad],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("events[1].action:"),
        "{}",
        err.message()
    );
    let head = gateway
        .append(pb::AppendRequest { events: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (head.head_sequence, head.head_hash),
        (3, appended.head_hash.clone())
    );

    // Query: acme's events only, newest first, one page at a time.
    let query = |token: &str| pb::QueryRequest {
        filter: None,
        page: Some(PageRequest {
            page_size: 1,
            page_token: token.to_owned(),
        }),
    };
    let first = gateway
        .query(with_principal(query(""), &principal("acme")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.events.len(), 1);
    assert_eq!(first.events[0].sequence, 3);
    assert!(!first.next_page_token.is_empty());
    let second = gateway
        .query(with_principal(
            query(&first.next_page_token),
            &principal("acme"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.events.len(), 1);
    assert_eq!(second.events[0].sequence, 1);
    assert_eq!(second.next_page_token, "");

    let newest = &first.events[0];
    assert_eq!(newest.id, "0190a5c4-0000-7000-8000-000000000003");
    assert_eq!(newest.tenant, "acme");
    assert_eq!(newest.chain, "main");
    assert_eq!(
        newest.details_json,
        r#"{"headers":{"Authorization":"[REDACTED]"},"n":3}"#
    );
    assert_eq!(newest.hash, appended.head_hash);
    // The hash can be recomputed from what Query returns.
    assert_eq!(event_hash(&record_of(newest)), newest.hash);
    let oldest = &second.events[0];
    assert_eq!(oldest.prev_hash, GENESIS_HASH);
    assert_eq!(event_hash(&record_of(oldest)), oldest.hash);

    let other = gateway
        .query(with_principal(query(""), &principal("other")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.events.len(), 1);
    assert_eq!(other.events[0].sequence, 2);
    assert_eq!(other.events[0].prev_hash, oldest.hash);
    assert_eq!(newest.prev_hash, other.events[0].hash);

    // A malformed page token and a missing principal are refused.
    let err = gateway
        .query(with_principal(query("%%%"), &principal("acme")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = gateway.query(query("")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // The chain verifies, and the checkpoint key is served.
    let verified = gateway
        .verify(with_principal(
            pb::VerifyRequest::default(),
            &principal("acme"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (verified.ok, verified.events_verified, verified.first_broken),
        (true, 3, None)
    );
    assert_eq!(verified.head_hash, newest.hash);
    let checkpoints = gateway
        .checkpoints(pb::CheckpointsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(checkpoints.public_key.len(), 44, "{checkpoints:?}");
    let err = gateway
        .verify(pb::VerifyRequest {
            chain: "other".into(),
            from_sequence: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The router may append but not read the log.
    let mut router = peers_as(&pki, "router", addr).audit().unwrap();
    let err = router.query(query("")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = router
        .query(with_principal(query(""), &principal("acme")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let from_router = router
        .append(pb::AppendRequest {
            events: vec![event(4, "acme")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((from_router.appended, from_router.head_sequence), (1, 4));

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
