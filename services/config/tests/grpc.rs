//! The config service over real mTLS: built on loopback port 0 with a per-run PKI and
//! the embedded store, called as the gateway (for an end user), as the router (a mesh
//! service) and as the CLI, with a stand-in audit service that records what it gets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crewmesh_config::{Application, ConfigServiceConfig, StoreConfig};
use crewmesh_kit::clients::with_principal;
use crewmesh_kit::identity::SpiffeId;
use crewmesh_kit::mesh::Service;
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::principal::{Principal, Role, TenantId};
use crewmesh_kit::server::MeshServer;
use crewmesh_kit::settings::{CommonConfig, PeersConfig, ServerConfig};
use crewmesh_kit::tls::MeshTls;
use crewmesh_kit::transport::mesh_channel;
use crewmesh_proto::audit::v1 as audit;
use crewmesh_proto::audit::v1::audit_service_server::{AuditService, AuditServiceServer};
use crewmesh_proto::config::v1::config_service_client::ConfigServiceClient;
use crewmesh_proto::config::v1::{
    DeleteRequest, GetRequest, Kind, ListRequest, PutRequest, Scope, WatchRequest,
};
use crewmesh_proto::types::v1::PageRequest;
use crewmesh_testkit::{TRUST_DOMAIN, TestPki};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

const MODEL_SPEC: &str = r#"{"deployments":[{"provider":"sim","model":"sim-small","weight":1}]}"#;

/// An audit service that keeps what it is sent.
#[derive(Clone, Default)]
struct RecordingAudit {
    events: Arc<Mutex<Vec<audit::EventInput>>>,
}

#[tonic::async_trait]
impl AuditService for RecordingAudit {
    async fn append(
        &self,
        request: Request<audit::AppendRequest>,
    ) -> Result<Response<audit::AppendResponse>, Status> {
        let events = request.into_inner().events;
        let n = events.len() as u64;
        self.events.lock().unwrap().extend(events);
        Ok(Response::new(audit::AppendResponse {
            appended: n,
            ..Default::default()
        }))
    }

    async fn query(
        &self,
        _: Request<audit::QueryRequest>,
    ) -> Result<Response<audit::QueryResponse>, Status> {
        Err(Status::unimplemented("test double"))
    }

    async fn verify(
        &self,
        _: Request<audit::VerifyRequest>,
    ) -> Result<Response<audit::VerifyResponse>, Status> {
        Err(Status::unimplemented("test double"))
    }

    type ExportStream = futures::stream::BoxStream<'static, Result<audit::ExportResponse, Status>>;

    async fn export(
        &self,
        _: Request<audit::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        Err(Status::unimplemented("test double"))
    }

    async fn checkpoints(
        &self,
        _: Request<audit::CheckpointsRequest>,
    ) -> Result<Response<audit::CheckpointsResponse>, Status> {
        Err(Status::unimplemented("test double"))
    }
}

fn common(pki: &TestPki, workload: &str, peers: PeersConfig) -> CommonConfig {
    CommonConfig {
        trust_domain: TRUST_DOMAIN.to_owned(),
        server: ServerConfig::loopback(),
        tls: pki.files(workload),
        telemetry: Default::default(),
        peers,
    }
}

fn client(pki: &TestPki, workload: &str, addr: &str) -> ConfigServiceClient<Channel> {
    let tls = MeshTls::load(pki.files(workload)).unwrap();
    let config_id = SpiffeId::new(TRUST_DOMAIN, "config").unwrap();
    ConfigServiceClient::new(mesh_channel(addr, config_id, tls).unwrap())
}

fn principal(roles: &[Role]) -> Principal {
    Principal {
        tenant: TenantId::parse("acme").unwrap(),
        subject: "key:admin-1".to_owned(),
        roles: roles.to_vec(),
    }
}

fn put(scope: Scope, kind: Kind, name: &str, spec: &str, expected: Option<i64>) -> PutRequest {
    PutRequest {
        scope: scope as i32,
        kind: kind as i32,
        name: name.to_owned(),
        spec_json: spec.to_owned(),
        expected_version: expected,
    }
}

fn get(scope: Scope, kind: Kind, name: &str) -> GetRequest {
    GetRequest {
        scope: scope as i32,
        kind: kind as i32,
        name: name.to_owned(),
    }
}

#[tokio::test]
async fn config_service_over_mtls() {
    crewmesh_testkit::init_crypto();
    crewmesh_testkit::init_test_logs();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();

    // The stand-in audit service, on its own port with the audit identity.
    let recorder = RecordingAudit::default();
    let mut audit_server = MeshServer::bind(
        Service::Audit,
        &common(&pki, "audit", PeersConfig::default()),
        MeshTls::load(pki.files("audit")).unwrap(),
        MetricsRegistry::new(),
    )
    .await
    .unwrap();
    audit_server.add_service(AuditServiceServer::new(recorder.clone()));
    let audit_addr = audit_server.grpc_addr();
    let (stop_audit, audit_stopped) = oneshot::channel::<()>();
    let audit_task = tokio::spawn(audit_server.run(async {
        let _ = audit_stopped.await;
    }));

    let config = ConfigServiceConfig {
        common: common(
            &pki,
            "config",
            PeersConfig {
                audit: Some(audit_addr.to_string()),
                ..Default::default()
            },
        ),
        store: StoreConfig::Embedded {
            path: dir.path().join("config.db"),
        },
    };
    let app = Application::build(config, MetricsRegistry::new())
        .await
        .unwrap();
    let addr = app.grpc_addr().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));

    let mut gateway = client(&pki, "gateway", &addr);
    let mut router = client(&pki, "router", &addr);
    let mut cli = client(&pki, "cli", &addr);
    let admin = principal(&[Role::Admin]);

    // As the gateway for a tenant admin: create, then read back.
    let created = gateway
        .put(with_principal(
            put(
                Scope::Tenant,
                Kind::Model,
                "gpt-4o-mini",
                MODEL_SPEC,
                Some(0),
            ),
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!(created.tenant, "acme");
    assert_eq!(created.kind, Kind::Model as i32);
    assert_eq!(created.name, "gpt-4o-mini");
    assert_eq!(created.version, 2);
    assert_eq!(created.create_version, 2);
    assert_eq!(created.updated_by, "key:admin-1");
    let spec: serde_json::Value = serde_json::from_str(&created.spec_json).unwrap();
    assert_eq!(
        spec,
        serde_json::from_str::<serde_json::Value>(MODEL_SPEC).unwrap()
    );

    let read = gateway
        .get(with_principal(
            get(Scope::Tenant, Kind::Model, "gpt-4o-mini"),
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!(read, created);

    // Update at the current version, then a stale write is ABORTED.
    let updated = gateway
        .put(with_principal(
            put(
                Scope::Tenant,
                Kind::Model,
                "gpt-4o-mini",
                MODEL_SPEC,
                Some(2),
            ),
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!((updated.version, updated.create_version), (3, 2));
    let stale = gateway
        .put(with_principal(
            put(
                Scope::Tenant,
                Kind::Model,
                "gpt-4o-mini",
                MODEL_SPEC,
                Some(2),
            ),
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(
        stale.message(),
        "version conflict on acme/model/gpt-4o-mini: expected version 2, but the current version is 3"
    );

    // A bad body is refused with every problem, and nothing is written.
    let bad = gateway
        .put(with_principal(
            put(
                Scope::Tenant,
                Kind::Model,
                "broken",
                r#"{"deployments":[{"provider":"sim","model":"m"},{"provider":"sim","weight":0}]}"#,
                None,
            ),
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(
        bad.message(),
        "invalid model spec: deployments[1].model: is required; deployments[1].weight: must be > 0"
    );
    let missing = gateway
        .get(with_principal(
            get(Scope::Tenant, Kind::Model, "broken"),
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let unspecified = gateway
        .get(with_principal(
            get(Scope::Tenant, Kind::Unspecified, "x"),
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(unspecified.code(), Code::InvalidArgument);

    // A viewer may read but not write.
    let viewer = principal(&[Role::Viewer]);
    let denied = gateway
        .put(with_principal(
            put(Scope::Tenant, Kind::Model, "other", MODEL_SPEC, None),
            &viewer,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // SCOPE_ALL is not for calls on behalf of an end user.
    let all_for_user = gateway
        .list(with_principal(
            ListRequest {
                scope: Scope::All as i32,
                kind: Kind::Model as i32,
                page: None,
            },
            &viewer,
        ))
        .await
        .unwrap_err();
    assert_eq!(all_for_user.code(), Code::InvalidArgument);

    // The CLI writes _global documents without a principal.
    let provider = cli
        .put(put(
            Scope::Global,
            Kind::Provider,
            "sim",
            r#"{"type":"simulated","base_url":"http://127.0.0.1:9/v1"}"#,
            Some(0),
        ))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!(provider.tenant, "_global");
    assert_eq!(provider.updated_by, "spiffe://crewmesh.local/cli");

    // As the router (a mesh service, no principal): list everything, read global.
    let listing = router
        .list(ListRequest {
            scope: Scope::All as i32,
            kind: Kind::Unspecified as i32,
            page: Some(PageRequest {
                page_size: 10,
                page_token: String::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<_> = listing
        .documents
        .iter()
        .map(|d| (d.tenant.as_str(), d.kind, d.name.as_str(), d.version))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("_global", Kind::Provider as i32, "sim", provider.version),
            ("acme", Kind::Model as i32, "gpt-4o-mini", 3),
        ]
    );
    assert_eq!(listing.revision, provider.version);
    assert_eq!(listing.next_page_token, "");
    let global = router
        .get(get(Scope::Global, Kind::Provider, "sim"))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!(global, provider);

    // The router may not write (the mesh allow-list refuses it).
    let refused = router
        .put(put(Scope::Global, Kind::Model, "x", MODEL_SPEC, None))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // Delete with a stale version, then the right one.
    let stale_delete = gateway
        .delete(with_principal(
            DeleteRequest {
                scope: Scope::Tenant as i32,
                kind: Kind::Model as i32,
                name: "gpt-4o-mini".to_owned(),
                expected_version: Some(2),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(stale_delete.code(), Code::Aborted);
    let deleted = gateway
        .delete(with_principal(
            DeleteRequest {
                scope: Scope::Tenant as i32,
                kind: Kind::Model as i32,
                name: "gpt-4o-mini".to_owned(),
                expected_version: Some(3),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.revision, provider.version + 1);

    // Later RPCs say so.
    let watch = router
        .watch(WatchRequest {
            scope: Scope::All as i32,
            kinds: vec![],
            start_revision: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(watch.code(), Code::Unimplemented);

    // Shutting down flushes the audit events of the four changes.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("config service stops")
        .unwrap()
        .unwrap();
    let events = recorder.events.lock().unwrap().clone();
    let summary: Vec<_> = events
        .iter()
        .map(|e| {
            let actor = e.actor.clone().unwrap_or_default();
            let resource = e.resource.clone().unwrap_or_default();
            (
                e.action.as_str(),
                e.tenant.as_str(),
                actor.subject,
                actor.service,
                resource.kind,
                resource.name,
                e.outcome,
                e.details_json.as_str(),
            )
        })
        .collect();
    let success = crewmesh_proto::types::v1::Outcome::Success as i32;
    let config_uri = "spiffe://crewmesh.local/config".to_owned();
    let p = provider.version;
    assert_eq!(
        summary,
        vec![
            (
                "config.put",
                "acme",
                "key:admin-1".to_owned(),
                config_uri.clone(),
                "model".to_owned(),
                "gpt-4o-mini".to_owned(),
                success,
                r#"{"version":2}"#
            ),
            (
                "config.put",
                "acme",
                "key:admin-1".to_owned(),
                config_uri.clone(),
                "model".to_owned(),
                "gpt-4o-mini".to_owned(),
                success,
                r#"{"version":3}"#
            ),
            (
                "config.put",
                "_global",
                "spiffe://crewmesh.local/cli".to_owned(),
                config_uri.clone(),
                "provider".to_owned(),
                "sim".to_owned(),
                success,
                format!(r#"{{"version":{p}}}"#).as_str()
            ),
            (
                "config.delete",
                "acme",
                "key:admin-1".to_owned(),
                config_uri,
                "model".to_owned(),
                "gpt-4o-mini".to_owned(),
                success,
                format!(r#"{{"version":{}}}"#, p + 1).as_str()
            ),
        ]
    );
    assert!(events.iter().all(|e| !e.id.is_empty() && e.time.is_some()));

    stop_audit.send(()).unwrap();
    audit_task.await.unwrap().unwrap();
}
