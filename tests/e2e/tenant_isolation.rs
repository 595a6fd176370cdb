//! Tenant isolation in every service, not only at the gateway's edge: each test talks
//! gRPC over mTLS as the gateway identity, asserting tenant `acme`'s principal, and
//! proves that another tenant's (`globex`'s) data is invisible and untouchable.

use std::time::Duration;

use crewmesh_kit::clients::with_principal;
use crewmesh_kit::mesh::Service;
use crewmesh_kit::principal::{Principal, Role, TenantId};
use crewmesh_kit::transport::PeerChannel as Channel;
use crewmesh_proto::agent::v1 as agent;
use crewmesh_proto::agent::v1::agent_service_client::AgentServiceClient;
use crewmesh_proto::audit::v1 as audit;
use crewmesh_proto::audit::v1::audit_service_client::AuditServiceClient;
use crewmesh_proto::config::v1 as cfg;
use crewmesh_proto::config::v1::config_service_client::ConfigServiceClient;
use crewmesh_proto::metrics::v1 as metrics;
use crewmesh_proto::metrics::v1::metrics_service_client::MetricsServiceClient;
use crewmesh_proto::router::v1 as router;
use crewmesh_proto::router::v1::router_service_client::RouterServiceClient;
use tonic::Code;

use crate::harness::{TestMesh, eventually};

fn principal(tenant: &str, role: Role) -> Principal {
    Principal {
        tenant: TenantId::parse(tenant).unwrap(),
        subject: format!("key:{tenant}-tester"),
        roles: vec![role],
    }
}

fn acme() -> Principal {
    principal("acme", Role::Admin)
}

fn globex() -> Principal {
    principal("globex", Role::Admin)
}

/// A channel to `service` as the gateway (which may assert any tenant's principal).
fn as_gateway(mesh: &TestMesh, service: Service) -> Channel {
    mesh.channel_as(service, mesh.tls_files("gateway"))
}

fn model_spec() -> String {
    serde_json::json!({"deployments": [{"provider": "simulated", "model": "sim-small"}]})
        .to_string()
}

async fn put_tenant_model(mesh: &TestMesh, p: &Principal, name: &str) -> cfg::Document {
    ConfigServiceClient::new(as_gateway(mesh, Service::Config))
        .put(with_principal(
            cfg::PutRequest {
                scope: cfg::Scope::Tenant as i32,
                kind: cfg::Kind::Model as i32,
                name: name.into(),
                spec_json: model_spec(),
                expected_version: None,
            },
            p,
        ))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_lists_only_global_and_own_models_and_never_shares_cache_entries() {
    let mesh = TestMesh::start().await;
    put_tenant_model(&mesh, &globex(), "globex-model").await;
    let mut r = RouterServiceClient::new(as_gateway(&mesh, Service::Router));
    let models = |p: Principal| {
        let mut r = r.clone();
        async move {
            let mut ids: Vec<String> = r
                .list_models(with_principal(router::ListModelsRequest {}, &p))
                .await
                .unwrap()
                .into_inner()
                .models
                .into_iter()
                .map(|m| m.id)
                .collect();
            ids.sort();
            ids
        }
    };
    eventually(
        "globex's model in the router",
        Duration::from_secs(10),
        || async {
            models(globex())
                .await
                .contains(&"globex-model".to_owned())
                .then_some(())
        },
    )
    .await;
    let acme_models = models(acme()).await;
    assert!(
        acme_models.contains(&"sim-small".to_owned()),
        "{acme_models:?}"
    );
    assert!(
        !acme_models.contains(&"globex-model".to_owned()),
        "{acme_models:?}"
    );

    let request = |model: &str| router::CompleteRequest {
        model: model.into(),
        messages: vec![router::ChatMessage {
            role: router::Role::User as i32,
            content: Some("the same question".into()),
            ..Default::default()
        }],
        routing: Some(router::RoutingOptions {
            cache: router::CacheMode::Use as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    // Another tenant's model cannot be called.
    let err = r
        .complete(with_principal(request("globex-model"), &acme()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // A cached answer of one tenant is never served to another.
    let hit = |p: Principal| {
        let mut r = r.clone();
        async move {
            r.complete(with_principal(request("sim-small"), &p))
                .await
                .unwrap()
                .into_inner()
                .call
                .unwrap()
                .cache_hit
        }
    };
    assert!(!hit(globex()).await, "globex's first call");
    assert!(hit(globex()).await, "globex's second call is cached");
    assert!(
        !hit(acme()).await,
        "acme does not get globex's cached answer"
    );
    assert!(hit(acme()).await, "acme's own second call is cached");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runtime_does_not_find_another_tenants_run() {
    let mesh = TestMesh::start().await;
    let mut a = AgentServiceClient::new(as_gateway(&mesh, Service::AgentRuntime));
    let run = a
        .start_run(with_principal(
            agent::StartRunRequest {
                agent_ref: Some(agent::start_run_request::AgentRef::Inline(
                    agent::AgentSpec {
                        model: "sim-small".into(),
                        ..Default::default()
                    },
                )),
                input: "hi".into(),
                idempotency_key: "globex-run-1".into(),
            },
            &globex(),
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let get = |p: Principal| {
        let mut a = a.clone();
        let id = run.id.clone();
        async move {
            a.get_run(with_principal(agent::GetRunRequest { run_id: id }, &p))
                .await
        }
    };
    assert_eq!(
        get(globex()).await.unwrap().into_inner().run.unwrap().id,
        run.id
    );
    let err = get(acme()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // The same idempotency key in another tenant is another run.
    let other = a
        .start_run(with_principal(
            agent::StartRunRequest {
                agent_ref: Some(agent::start_run_request::AgentRef::Inline(
                    agent::AgentSpec {
                        model: "sim-small".into(),
                        ..Default::default()
                    },
                )),
                input: "hi".into(),
                idempotency_key: "globex-run-1".into(),
            },
            &acme(),
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_ne!(other.id, run.id);
    mesh.shutdown().await;
}

fn usage_record(tenant: &str, id: &str) -> metrics::UsageRecord {
    metrics::UsageRecord {
        id: id.into(),
        time: Some(crewmesh_proto::time::to_timestamp(
            std::time::SystemTime::now(),
        )),
        tenant: tenant.into(),
        subject: format!("key:{tenant}-tester"),
        model: "sim-small".into(),
        cost_usd: 1.25,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_shows_a_tenant_only_its_own_usage_and_spend() {
    let mesh = TestMesh::start().await;
    let mut m = MetricsServiceClient::new(as_gateway(&mesh, Service::Metrics));
    let acme_id = uuid::Uuid::new_v4().to_string();
    let globex_id = uuid::Uuid::new_v4().to_string();
    m.record(metrics::RecordRequest {
        records: vec![
            usage_record("acme", &acme_id),
            usage_record("globex", &globex_id),
        ],
    })
    .await
    .unwrap();
    let query = |p: Principal, subject: &str| {
        let mut m = m.clone();
        let filter = metrics::UsageFilter {
            subject: subject.into(),
            ..Default::default()
        };
        async move {
            m.query(with_principal(
                metrics::QueryRequest {
                    filter: Some(filter),
                    page: None,
                },
                &p,
            ))
            .await
            .unwrap()
            .into_inner()
            .records
            .into_iter()
            .map(|r| (r.tenant, r.id))
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(query(acme(), "").await, vec![("acme".to_owned(), acme_id)]);
    assert_eq!(
        query(globex(), "").await,
        vec![("globex".to_owned(), globex_id)]
    );
    // Filtering by another tenant's subject finds nothing.
    assert_eq!(query(acme(), "key:globex-tester").await, vec![]);
    let spend = m
        .spend(with_principal(
            metrics::SpendRequest {
                filter: None,
                group_by: metrics::GroupBy::Unspecified as i32,
            },
            &acme(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spend.total_cost_usd, 1.25);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_shows_an_auditor_only_its_own_tenants_events() {
    let mesh = TestMesh::start().await;
    let mut au = AuditServiceClient::new(as_gateway(&mesh, Service::Audit));
    let event = |tenant: &str, id: &str| audit::EventInput {
        id: id.into(),
        time: Some(crewmesh_proto::time::to_timestamp(
            std::time::SystemTime::now(),
        )),
        tenant: tenant.into(),
        actor: Some(audit::Actor {
            subject: format!("key:{tenant}-tester"),
            service: String::new(),
        }),
        action: "isolation.probe".into(),
        resource: Some(audit::Resource {
            kind: "probe".into(),
            name: format!("{tenant}-secret"),
        }),
        outcome: crewmesh_proto::types::v1::Outcome::Success as i32,
        details_json: "{}".into(),
        ..Default::default()
    };
    let acme_id = uuid::Uuid::new_v4().to_string();
    let globex_id = uuid::Uuid::new_v4().to_string();
    au.append(audit::AppendRequest {
        events: vec![event("acme", &acme_id), event("globex", &globex_id)],
    })
    .await
    .unwrap();
    let probes = |p: Principal, resource_name: &str| {
        let mut au = au.clone();
        let filter = audit::EventFilter {
            action: "isolation.probe".into(),
            resource_name: resource_name.into(),
            ..Default::default()
        };
        async move {
            au.query(with_principal(
                audit::QueryRequest {
                    filter: Some(filter),
                    page: None,
                },
                &p,
            ))
            .await
            .unwrap()
            .into_inner()
            .events
            .into_iter()
            .map(|e| (e.tenant, e.id))
            .collect::<Vec<_>>()
        }
    };
    let auditor = principal("acme", Role::Auditor);
    assert_eq!(
        probes(auditor.clone(), "").await,
        vec![("acme".to_owned(), acme_id)]
    );
    assert_eq!(probes(auditor, "globex-secret").await, vec![]);
    assert_eq!(
        probes(principal("globex", Role::Auditor), "").await,
        vec![("globex".to_owned(), globex_id)]
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_hides_another_tenants_documents_and_keeps_them_unwritable() {
    let mesh = TestMesh::start().await;
    let theirs = put_tenant_model(&mesh, &globex(), "secret-model").await;
    let client = ConfigServiceClient::new(as_gateway(&mesh, Service::Config));
    let mut c = client.clone();
    let get = |p: Principal| {
        let mut c = client.clone();
        async move {
            c.get(with_principal(
                cfg::GetRequest {
                    scope: cfg::Scope::Tenant as i32,
                    kind: cfg::Kind::Model as i32,
                    name: "secret-model".into(),
                },
                &p,
            ))
            .await
        }
    };
    let err = get(acme()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let listed: Vec<(String, String)> = c
        .list(with_principal(
            cfg::ListRequest {
                scope: cfg::Scope::Tenant as i32,
                kind: cfg::Kind::Unspecified as i32,
                page: None,
            },
            &acme(),
        ))
        .await
        .unwrap()
        .into_inner()
        .documents
        .into_iter()
        .map(|d| (d.tenant, d.name))
        .collect();
    assert!(
        listed.iter().all(|(t, _)| t == "acme"),
        "acme lists only its own documents: {listed:?}"
    );
    let err = c
        .delete(with_principal(
            cfg::DeleteRequest {
                scope: cfg::Scope::Tenant as i32,
                kind: cfg::Kind::Model as i32,
                name: "secret-model".into(),
                expected_version: None,
            },
            &acme(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = c
        .history(with_principal(
            cfg::HistoryRequest {
                scope: cfg::Scope::Tenant as i32,
                kind: cfg::Kind::Model as i32,
                name: "secret-model".into(),
                page: None,
            },
            &acme(),
        ))
        .await
        .map(|r| r.into_inner().versions.len());
    assert!(
        matches!(&err, Ok(0)) || err.as_ref().is_err_and(|e| e.code() == Code::NotFound),
        "{err:?}"
    );
    // A write of the same name by acme is acme's own document; globex's is untouched.
    let mine = put_tenant_model(&mesh, &acme(), "secret-model").await;
    assert_eq!(mine.tenant, "acme");
    let read = get(acme()).await.unwrap().into_inner().document.unwrap();
    assert_eq!((read.tenant.as_str(), read.version), ("acme", mine.version));
    let still = get(globex()).await.unwrap().into_inner().document.unwrap();
    assert_eq!(still.tenant, "globex");
    assert_eq!(still.version, theirs.version);
    mesh.shutdown().await;
}
