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
use crewmesh_kit::transport::PeerChannel as Channel;
use crewmesh_kit::transport::mesh_channel;
use crewmesh_proto::audit::v1 as audit;
use crewmesh_proto::audit::v1::audit_service_server::{AuditService, AuditServiceServer};
use crewmesh_proto::config::v1::config_service_client::ConfigServiceClient;
use crewmesh_proto::config::v1::{
    ApplyOperation, ApplyRequest, DeleteRequest, EventType, GetRequest, HistoryRequest, Kind,
    ListRequest, PutRequest, RollbackRequest, Scope, WatchRequest, WatchResponse, apply_operation,
};
use crewmesh_proto::types::v1::PageRequest;
use crewmesh_testkit::{TRUST_DOMAIN, TestPki};
use tokio::sync::oneshot;
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
        secrets_key_file: None,
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

    // A model naming a provider that does not exist is refused, every dangling
    // reference listed by path, nothing written.
    let dangling = gateway
        .put(with_principal(
            put(
                Scope::Tenant,
                Kind::Model,
                "gpt-4o-mini",
                r#"{"deployments":[{"provider":"sim","model":"m"},{"provider":"nope","model":"m"}],"fallback_models":["ghost"]}"#,
                None,
            ),
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(dangling.code(), Code::InvalidArgument);
    assert_eq!(
        dangling.message(),
        r#"invalid model spec: deployments[0].provider: provider "sim" does not exist (in tenant acme or _global); deployments[1].provider: provider "nope" does not exist (in tenant acme or _global); fallback_models[0]: model "ghost" does not exist (in tenant acme or _global)"#
    );

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
    let listed = router
        .list(ListRequest {
            scope: Scope::Global as i32,
            kind: Kind::Provider as i32,
            page: None,
        })
        .await
        .unwrap();
    assert_eq!(
        listed.metadata().get("x-crewmesh-config-revision").unwrap(),
        &provider.version.to_string()
    );
    assert_eq!(provider.updated_by, "spiffe://crewmesh.local/cli");

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
    assert_eq!(created.version, 3);
    assert_eq!(created.create_version, 3);
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
                Some(3),
            ),
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!((updated.version, updated.create_version), (4, 3));
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
        "version conflict on acme/model/gpt-4o-mini: expected version 2, but the current version is 4"
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
            ("acme", Kind::Model as i32, "gpt-4o-mini", 4),
        ]
    );
    assert_eq!(listing.revision, 4);
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

    // The provider cannot be deleted while the tenant's model uses it.
    let in_use = cli
        .delete(DeleteRequest {
            scope: Scope::Global as i32,
            kind: Kind::Provider as i32,
            name: "sim".to_owned(),
            expected_version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(in_use.code(), Code::FailedPrecondition);
    assert_eq!(
        in_use.message(),
        "cannot delete _global/provider/sim: still referenced by acme/model/gpt-4o-mini (deployments[0].provider); change or delete those first"
    );

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
                expected_version: Some(4),
            },
            &admin,
        ))
        .await
        .unwrap();
    assert_eq!(
        deleted
            .metadata()
            .get("x-crewmesh-config-revision")
            .unwrap(),
        "5"
    );
    assert_eq!(deleted.into_inner().revision, 5);

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
                serde_json::from_str::<serde_json::Value>(&e.details_json).unwrap(),
            )
        })
        .collect();
    let model: serde_json::Value = serde_json::from_str(MODEL_SPEC).unwrap();
    let provider_spec =
        serde_json::json!({"type": "simulated", "base_url": "http://127.0.0.1:9/v1"});
    let success = crewmesh_proto::types::v1::Outcome::Success as i32;
    let config_uri = "spiffe://crewmesh.local/config".to_owned();
    let p = provider.version;
    assert_eq!(p, 2);
    assert_eq!(
        summary,
        vec![
            (
                "config.put",
                "_global",
                "spiffe://crewmesh.local/cli".to_owned(),
                config_uri.clone(),
                "provider".to_owned(),
                "sim".to_owned(),
                success,
                serde_json::json!({"version": p, "before": null, "after": provider_spec}),
            ),
            (
                "config.put",
                "acme",
                "key:admin-1".to_owned(),
                config_uri.clone(),
                "model".to_owned(),
                "gpt-4o-mini".to_owned(),
                success,
                serde_json::json!({"version": 3, "before": null, "after": model}),
            ),
            (
                "config.put",
                "acme",
                "key:admin-1".to_owned(),
                config_uri.clone(),
                "model".to_owned(),
                "gpt-4o-mini".to_owned(),
                success,
                serde_json::json!({"version": 4, "before": {"version": 3, "spec": model}, "after": model}),
            ),
            (
                "config.delete",
                "acme",
                "key:admin-1".to_owned(),
                config_uri,
                "model".to_owned(),
                "gpt-4o-mini".to_owned(),
                success,
                serde_json::json!({"version": 5, "before": {"version": 4, "spec": model}, "after": null}),
            ),
        ]
    );
    assert!(events.iter().all(|e| !e.id.is_empty() && e.time.is_some()));

    stop_audit.send(()).unwrap();
    audit_task.await.unwrap().unwrap();
}

/// Starts a config service on the embedded store without an audit peer.
async fn start_plain(pki: &TestPki, dir: &std::path::Path) -> (String, oneshot::Sender<()>) {
    let config = ConfigServiceConfig {
        common: common(pki, "config", PeersConfig::default()),
        store: StoreConfig::Embedded {
            path: dir.join("config.db"),
        },
        secrets_key_file: None,
    };
    let app = Application::build(config, MetricsRegistry::new())
        .await
        .unwrap();
    let addr = app.grpc_addr().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

async fn next_message(stream: &mut tonic::Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a watch message within 10s")
        .expect("no watch error")
        .expect("the watch stays open")
}

/// The next message that carries events (skipping heartbeats).
async fn next_events(stream: &mut tonic::Streaming<WatchResponse>) -> WatchResponse {
    loop {
        let msg = next_message(stream).await;
        if !msg.events.is_empty() {
            return msg;
        }
    }
}

fn names(msg: &WatchResponse) -> Vec<(i32, String, String, i64)> {
    msg.events
        .iter()
        .map(|e| {
            let d = e.document.clone().unwrap();
            (e.r#type, d.tenant, d.name, d.version)
        })
        .collect()
}

#[tokio::test]
async fn watch_history_rollback_and_apply_over_mtls() {
    crewmesh_testkit::init_crypto();
    crewmesh_testkit::init_test_logs();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (addr, stop) = start_plain(&pki, dir.path()).await;
    let mut router = client(&pki, "router", &addr);
    let mut cli = client(&pki, "cli", &addr);
    let mut gateway = client(&pki, "gateway", &addr);
    let admin = principal(&[Role::Admin]);
    let spec_v = |m: &str| format!(r#"{{"deployments":[{{"provider":"p","model":"{m}"}}]}}"#);

    cli.put(put(
        Scope::Global,
        Kind::Provider,
        "p",
        r#"{"type":"simulated","base_url":"http://127.0.0.1:1/v1"}"#,
        None,
    ))
    .await
    .unwrap();
    let v1 = cli
        .put(put(Scope::Global, Kind::Model, "m", &spec_v("one"), None))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();

    // A snapshot of the kinds asked for, then the end-of-snapshot marker.
    let mut watch = router
        .watch(WatchRequest {
            scope: Scope::All as i32,
            kinds: vec![Kind::Model as i32],
            start_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let snap = next_message(&mut watch).await;
    assert!(snap.snapshot);
    assert_eq!(
        names(&snap),
        vec![(
            EventType::Put as i32,
            "_global".into(),
            "m".into(),
            v1.version
        )]
    );
    let marker = next_message(&mut watch).await;
    assert_eq!((marker.snapshot, marker.events.len()), (false, 0));
    assert_eq!(marker.revision, snap.revision);

    // Changes follow; other kinds are filtered out.
    let v2 = cli
        .put(put(
            Scope::Global,
            Kind::Model,
            "m",
            &spec_v("two"),
            Some(v1.version),
        ))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    let change = next_events(&mut watch).await;
    assert_eq!(
        names(&change),
        vec![(
            EventType::Put as i32,
            "_global".into(),
            "m".into(),
            v2.version
        )]
    );
    assert!(!change.snapshot);

    // History, newest first, paged.
    let history = gateway
        .history(with_principal(
            HistoryRequest {
                scope: Scope::Global as i32,
                kind: Kind::Model as i32,
                name: "m".into(),
                page: Some(PageRequest {
                    page_size: 1,
                    page_token: String::new(),
                }),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        history
            .versions
            .iter()
            .map(|d| d.version)
            .collect::<Vec<_>>(),
        vec![v2.version]
    );
    assert_eq!(history.next_page_token, v2.version.to_string());

    // Rollback writes the old body as a new version, which the watch delivers.
    let rolled = gateway
        .rollback(with_principal(
            RollbackRequest {
                scope: Scope::Global as i32,
                kind: Kind::Model as i32,
                name: "m".into(),
                to_version: v1.version,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert!(rolled.version > v2.version);
    assert_eq!(rolled.spec_json, v1.spec_json);
    assert_eq!(rolled.updated_by, "key:admin-1");
    let change = next_events(&mut watch).await;
    assert_eq!(
        names(&change),
        vec![(
            EventType::Put as i32,
            "_global".into(),
            "m".into(),
            rolled.version
        )]
    );
    let missing = gateway
        .rollback(with_principal(
            RollbackRequest {
                scope: Scope::Global as i32,
                kind: Kind::Model as i32,
                name: "m".into(),
                to_version: 9999,
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    // Apply: every problem of every operation is listed, and nothing is written.
    let op_put = |name: &str, spec: &str| ApplyOperation {
        op: Some(apply_operation::Op::Put(put(
            Scope::Global,
            Kind::Model,
            name,
            spec,
            None,
        ))),
    };
    let bad = cli
        .apply(ApplyRequest {
            operations: vec![
                op_put("a", &spec_v("a")),
                op_put("b", r#"{"deployments":[]}"#),
                op_put("Bad Name", &spec_v("c")),
            ],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().starts_with("nothing was applied: operations[1]: invalid model spec: deployments: must not be empty; operations[2]: "),
        "{}",
        bad.message()
    );
    let absent = router
        .get(get(Scope::Global, Kind::Model, "a"))
        .await
        .unwrap_err();
    assert_eq!(absent.code(), Code::NotFound);

    // A dry run checks what a real apply checks and writes nothing; references may
    // point at documents the same apply creates.
    let q_model = r#"{"deployments":[{"provider":"q","model":"x"}],"fallback_models":["a"]}"#;
    let q_provider = ApplyOperation {
        op: Some(apply_operation::Op::Put(put(
            Scope::Global,
            Kind::Provider,
            "q",
            r#"{"type":"simulated","base_url":"http://127.0.0.1:2/v1"}"#,
            None,
        ))),
    };
    let dry = cli
        .apply(ApplyRequest {
            operations: vec![op_put("qa", q_model), op_put("a", &spec_v("a")), q_provider],
            validate_only: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((dry.revision, dry.documents.len()), (rolled.version, 0));
    let absent = router
        .get(get(Scope::Global, Kind::Model, "qa"))
        .await
        .unwrap_err();
    assert_eq!(absent.code(), Code::NotFound);
    let dangling = cli
        .apply(ApplyRequest {
            operations: vec![op_put("qa", q_model)],
            validate_only: true,
        })
        .await
        .unwrap_err();
    assert_eq!(dangling.code(), Code::InvalidArgument);
    assert_eq!(
        dangling.message(),
        r#"nothing was applied: operations[0]: invalid model spec: deployments[0].provider: provider "q" does not exist (in _global); fallback_models[0]: model "a" does not exist (in _global)"#
    );
    let delete_p = ApplyOperation {
        op: Some(apply_operation::Op::Delete(DeleteRequest {
            scope: Scope::Global as i32,
            kind: Kind::Provider as i32,
            name: "p".into(),
            expected_version: None,
        })),
    };
    let in_use = cli
        .apply(ApplyRequest {
            operations: vec![delete_p],
            validate_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(in_use.code(), Code::FailedPrecondition);
    assert_eq!(
        in_use.message(),
        "nothing was applied: operations[0]: cannot delete _global/provider/p: still referenced by _global/model/m (deployments[0].provider); change or delete those first"
    );
    let stale = cli
        .apply(ApplyRequest {
            operations: vec![ApplyOperation {
                op: Some(apply_operation::Op::Put(put(
                    Scope::Global,
                    Kind::Model,
                    "m",
                    &spec_v("x"),
                    Some(v1.version),
                ))),
            }],
            validate_only: true,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);

    // A good apply lands at one revision, seen as one watch message.
    let applied = cli
        .apply(ApplyRequest {
            operations: vec![
                op_put("a", &spec_v("a")),
                op_put("b", &spec_v("b")),
                ApplyOperation {
                    op: Some(apply_operation::Op::Delete(DeleteRequest {
                        scope: Scope::Global as i32,
                        kind: Kind::Model as i32,
                        name: "m".into(),
                        expected_version: Some(rolled.version),
                    })),
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.documents.len(), 2);
    let change = next_events(&mut watch).await;
    assert_eq!(change.revision, applied.revision);
    assert_eq!(
        names(&change),
        vec![
            (
                EventType::Put as i32,
                "_global".into(),
                "a".into(),
                applied.revision
            ),
            (
                EventType::Put as i32,
                "_global".into(),
                "b".into(),
                applied.revision
            ),
            (EventType::Delete as i32, "_global".into(), "m".into(), 0),
        ]
    );

    // Resuming from a revision replays what came after it.
    let mut resumed = router
        .watch(WatchRequest {
            scope: Scope::All as i32,
            kinds: vec![Kind::Model as i32],
            start_revision: rolled.version,
        })
        .await
        .unwrap()
        .into_inner();
    let replay = next_events(&mut resumed).await;
    assert_eq!(replay.revision, applied.revision);
    assert_eq!(replay.events.len(), 3);

    // Scopes are checked like List: an end user cannot watch every tenant.
    let refused = gateway
        .watch(with_principal(
            WatchRequest {
                scope: Scope::All as i32,
                kinds: vec![],
                start_revision: 0,
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);

    // Stopping the service ends open watches, so that it can drain.
    stop.send(()).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch stayed open after shutdown");
}

#[tokio::test]
async fn flags_evaluate_with_tenant_overrides() {
    use crewmesh_proto::config::v1::{
        EvaluateFlagsRequest, EvaluationContext, EvaluationErrorCode, EvaluationReason,
    };
    crewmesh_testkit::init_crypto();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (addr, stop) = start_plain(&pki, dir.path()).await;
    let mut router = client(&pki, "router", &addr);
    let mut cli = client(&pki, "cli", &addr);
    let mut gateway = client(&pki, "gateway", &addr);
    let admin = principal(&[Role::Admin]);
    let flag = r#"{"variants":{"on":true,"off":false},"default_variant":"off",
        "rules":[{"when":{"attribute":"plan","op":"equals","value":"pro"},"variant":"on"}]}"#;
    cli.put(put(Scope::Global, Kind::Flag, "new-ui", flag, None))
        .await
        .unwrap();
    let tenant_flag = r#"{"variants":{"a":"model-a","b":"model-b"},"default_variant":"a",
        "rollout":[{"variant":"a","weight":50},{"variant":"b","weight":50}]}"#;
    gateway
        .put(with_principal(
            put(Scope::Tenant, Kind::Flag, "new-ui", tenant_flag, None),
            &admin,
        ))
        .await
        .unwrap();
    // A bad flag is refused with its problems.
    let bad = cli
        .put(put(
            Scope::Global,
            Kind::Flag,
            "bad",
            r#"{"variants":{"a":1},"default_variant":"b"}"#,
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        bad.message(),
        r#"invalid flag spec: default_variant: "b" is not one of the variants"#
    );

    let context = |key: &str, plan: &str| {
        Some(EvaluationContext {
            targeting_key: key.into(),
            attributes: Some(crewmesh_kit::flags::wire::to_struct(
                serde_json::json!({"plan": plan}).as_object().unwrap(),
            )),
        })
    };
    // A mesh service sees the global flag.
    let global = router
        .evaluate_flags(EvaluateFlagsRequest {
            keys: vec!["new-ui".into(), "missing".into()],
            context: context("", "pro"),
        })
        .await
        .unwrap()
        .into_inner()
        .evaluations;
    assert_eq!(global[0].variant, "on");
    assert_eq!(global[0].reason, EvaluationReason::TargetingMatch as i32);
    assert_eq!(
        global[0].value,
        Some(crewmesh_kit::flags::wire::to_value(&serde_json::json!(
            true
        )))
    );
    assert_eq!(global[1].reason, EvaluationReason::Error as i32);
    assert_eq!(
        global[1].error_code,
        EvaluationErrorCode::FlagNotFound as i32
    );
    // The tenant's own flag of the same name wins for its users: a stable split.
    let eval = |key: &'static str| {
        let mut gateway = gateway.clone();
        let admin = admin.clone();
        async move {
            gateway
                .evaluate_flags(with_principal(
                    EvaluateFlagsRequest {
                        keys: vec![],
                        context: context(key, "pro"),
                    },
                    &admin,
                ))
                .await
                .unwrap()
                .into_inner()
                .evaluations
        }
    };
    let first = eval("user-1").await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].reason, EvaluationReason::Split as i32);
    assert_eq!(eval("user-1").await, first);
    let bucket = crewmesh_kit::flags::bucket("new-ui", "user-1");
    assert_eq!(first[0].variant, if bucket < 5000 { "a" } else { "b" });
    stop.send(()).unwrap();
}

/// Starts a config service on etcd with an optional secrets key file.
async fn start_on_etcd(
    pki: &TestPki,
    prefix: &str,
    key_file: Option<std::path::PathBuf>,
) -> (String, oneshot::Sender<()>) {
    let mut etcd = crewmesh_config::EtcdConfig::new(vec![crewmesh_testkit::etcd().endpoint()]);
    etcd.prefix = prefix.to_owned();
    let config = ConfigServiceConfig {
        common: common(pki, "config", PeersConfig::default()),
        store: StoreConfig::Etcd(etcd),
        secrets_key_file: key_file,
    };
    let app = Application::build(config, MetricsRegistry::new())
        .await
        .unwrap();
    let addr = app.grpc_addr().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

fn api_key_of(doc: &crewmesh_proto::config::v1::Document) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&doc.spec_json).unwrap()["api_key"].clone()
}

#[tokio::test]
async fn inline_secrets_are_stored_encrypted_and_only_the_router_reads_them() {
    crewmesh_testkit::init_crypto();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let prefix = crewmesh_testkit::etcd().unique_prefix();
    let spec = r#"{"type":"openai","base_url":"https://api.example.com/v1","api_key":{"inline":"sk-very-secret-42"}}"#;

    // Without a key file an inline secret is refused, nothing written.
    let (addr, stop) = start_on_etcd(&pki, &prefix, None).await;
    let refused = client(&pki, "cli", &addr)
        .put(put(Scope::Global, Kind::Provider, "openai", spec, None))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(
        refused.message(),
        "invalid provider spec: api_key: inline secrets are refused: this config service has no [config] secrets_key_file to encrypt them with; reference the key with api_key_env or api_key_file instead"
    );
    stop.send(()).unwrap();

    let key_file = dir.path().join("config.key");
    std::fs::write(&key_file, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    let (addr, stop) = start_on_etcd(&pki, &prefix, Some(key_file.clone())).await;
    let mut cli = client(&pki, "cli", &addr);
    let mut router = client(&pki, "router", &addr);
    let mut gateway = client(&pki, "gateway", &addr);
    let written = cli
        .put(put(Scope::Global, Kind::Provider, "openai", spec, None))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    let key_id = "630dcd2966c43366";
    let redacted = serde_json::json!({"redacted": format!("encrypted with key {key_id}")});
    assert_eq!(api_key_of(&written), redacted);

    // etcd holds only the envelope: no plaintext in the document or its history.
    let mut etcd = etcd_client::Client::connect([crewmesh_testkit::etcd().endpoint()], None)
        .await
        .unwrap();
    let all = etcd
        .get(
            prefix.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let stored: Vec<String> = all
        .kvs()
        .iter()
        .filter(|kv| {
            kv.key_str()
                .unwrap_or_default()
                .contains("/provider/openai")
        })
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        .collect();
    assert!(stored.len() >= 2, "document and history entry: {stored:?}");
    for value in &stored {
        assert!(!value.contains("sk-very-secret-42"), "{value}");
        assert!(value.contains("\"wrapped_key\""), "{value}");
        assert!(value.contains(key_id), "{value}");
    }

    // Readers see a redacted marker; the router's identity gets the key.
    let admin = principal(&[Role::Admin]);
    let seen = gateway
        .get(with_principal(
            get(Scope::Global, Kind::Provider, "openai"),
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!(api_key_of(&seen), redacted);
    let history = gateway
        .history(with_principal(
            HistoryRequest {
                scope: Scope::Global as i32,
                kind: Kind::Provider as i32,
                name: "openai".into(),
                page: None,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(api_key_of(&history.versions[0]), redacted);
    let for_router = router
        .list(ListRequest {
            scope: Scope::All as i32,
            kind: Kind::Provider as i32,
            page: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        api_key_of(&for_router.documents[0]),
        serde_json::json!({"value": "sk-very-secret-42"})
    );
    let mut watch = router
        .watch(WatchRequest {
            scope: Scope::All as i32,
            kinds: vec![Kind::Provider as i32],
            start_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let snap = next_message(&mut watch).await;
    assert_eq!(
        api_key_of(snap.events[0].document.as_ref().unwrap()),
        serde_json::json!({"value": "sk-very-secret-42"})
    );
    // The redacted form cannot be written back.
    let back = cli
        .put(put(
            Scope::Global,
            Kind::Provider,
            "openai",
            &seen.spec_json,
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(back.code(), Code::InvalidArgument);
    stop.send(()).unwrap();

    // With another key the router is told clearly why there is no key.
    std::fs::write(&key_file, [9u8; 32]).unwrap();
    let (addr, stop) = start_on_etcd(&pki, &prefix, Some(key_file)).await;
    let for_router = client(&pki, "router", &addr)
        .get(get(Scope::Global, Kind::Provider, "openai"))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    let shown = api_key_of(&for_router);
    assert!(!shown.to_string().contains("sk-very-secret-42"));
    assert!(
        shown["redacted"].as_str().unwrap().starts_with(&format!(
            "cannot decrypt: it was encrypted with key {key_id}, but this config service has key "
        )),
        "{shown}"
    );
    stop.send(()).unwrap();
}
