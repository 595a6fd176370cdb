//! A small mesh for the agent runtime's tests: the real runtime on SQLite, over real
//! mTLS, next to deterministic test doubles of the services it calls.
//!
//! - The router double is served by the kit's `MeshServer` as the `router` workload,
//!   so the real allow-list and principal rules apply to the runtime's calls. It
//!   answers `echo: <last user message>` with fixed usage (3 + 2 tokens) and cost
//!   (0.25 USD), NOT_FOUND for the model `missing`, and never answers the input `hang`
//!   while its hang switch is on.
//! - The audit double is served by `MeshServer` as the `audit` workload and keeps
//!   every appended event.
//! - The config double answers `Get` for `agent` documents from a fixed table (the
//!   caller's tenant for SCOPE_TENANT, `_global` for SCOPE_GLOBAL). It is served over
//!   the same mTLS transport but without the kit's authorisation layer: the mesh policy
//!   in the kit does not (yet) accept principal metadata from the agent runtime at the
//!   config service, and the config service's own policy is not under test here. The
//!   double records the caller's identity and principal so tests can check them.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crewmesh_agent_runtime::{AgentRuntimeConfig, Application};
use crewmesh_kit::authz::Caller;
use crewmesh_kit::clients::with_principal;
use crewmesh_kit::identity::{PeerInfo, SpiffeId};
use crewmesh_kit::mesh::Service;
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::principal::{Principal, Role, TenantId, principal_of};
use crewmesh_kit::server::MeshServer;
use crewmesh_kit::settings::{CommonConfig, DatabaseConfig, PeersConfig, ServerConfig};
use crewmesh_kit::tls::MeshTls;
use crewmesh_kit::transport::PeerChannel as Channel;
use crewmesh_proto::agent::v1 as agent;
use crewmesh_proto::agent::v1::agent_service_client::AgentServiceClient;
use crewmesh_proto::audit::v1 as audit;
use crewmesh_proto::audit::v1::audit_service_server::{AuditService, AuditServiceServer};
use crewmesh_proto::config::v1 as config;
use crewmesh_proto::config::v1::config_service_server::{ConfigService, ConfigServiceServer};
use crewmesh_proto::router::v1 as router;
use crewmesh_proto::router::v1::router_service_server::{RouterService, RouterServiceServer};
use crewmesh_proto::types::v1::TokenUsage;
use crewmesh_testkit::{TRUST_DOMAIN, TestPki};
use futures::Stream;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// How long a test waits for a condition before failing.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn principal(tenant: &str, subject: &str) -> Principal {
    Principal {
        tenant: TenantId::parse(tenant).unwrap(),
        subject: subject.to_owned(),
        roles: vec![Role::Developer],
    }
}

/// Stops a served task when dropped.
struct Stopper(Option<oneshot::Sender<()>>);

impl Drop for Stopper {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
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

// ---------------------------------------------------------------- router double

/// One `Complete` call as the router double saw it.
#[derive(Debug, Clone)]
pub struct RouterCall {
    pub caller: String,
    pub principal: Option<Principal>,
    pub model: String,
    /// (role, content) of each message.
    pub messages: Vec<(router::Role, String)>,
    pub agent: String,
    pub run_id: String,
    pub grpc_timeout: Option<String>,
}

#[derive(Clone, Default)]
pub struct RouterDouble {
    pub calls: Arc<Mutex<Vec<RouterCall>>>,
    pub hang: Arc<AtomicBool>,
}

impl RouterDouble {
    pub fn calls(&self) -> Vec<RouterCall> {
        self.calls.lock().unwrap().clone()
    }

    pub fn calls_for(&self, run_id: &str) -> Vec<RouterCall> {
        self.calls()
            .into_iter()
            .filter(|c| c.run_id == run_id)
            .collect()
    }
}

#[tonic::async_trait]
impl RouterService for RouterDouble {
    async fn complete(
        &self,
        request: Request<router::CompleteRequest>,
    ) -> Result<Response<router::CompleteResponse>, Status> {
        let caller = request
            .extensions()
            .get::<Caller>()
            .map(|c| c.0.name().to_owned())
            .unwrap_or_default();
        let principal = principal_of(&request).cloned();
        let grpc_timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = request.into_inner();
        let messages = body
            .messages
            .iter()
            .map(|m| {
                (
                    router::Role::try_from(m.role).unwrap_or(router::Role::Unspecified),
                    m.content.clone().unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>();
        self.calls.lock().unwrap().push(RouterCall {
            caller,
            principal: principal.clone(),
            model: body.model.clone(),
            messages: messages.clone(),
            agent: body.agent.clone(),
            run_id: body.run_id.clone(),
            grpc_timeout,
        });
        if principal.is_none() {
            return Err(Status::unauthenticated("no principal"));
        }
        if body.model == "missing" {
            return Err(Status::not_found("unknown model `missing`"));
        }
        let input = messages.last().map(|m| m.1.clone()).unwrap_or_default();
        if input == "hang" && self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(Response::new(router::CompleteResponse {
            id: "cmpl-test".into(),
            model: body.model,
            created: 1_700_000_000,
            choices: vec![router::Choice {
                index: 0,
                message: Some(router::ChatMessage {
                    role: router::Role::Assistant as i32,
                    content: Some(format!("echo: {input}")),
                    ..Default::default()
                }),
                finish_reason: "stop".into(),
                logprobs_json: String::new(),
            }],
            usage: Some(TokenUsage {
                prompt_tokens: 3,
                completion_tokens: 2,
                total_tokens: 5,
            }),
            call: Some(router::CallInfo {
                cost_usd: 0.25,
                simulated: true,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    type StreamCompleteStream = BoxStream<router::StreamCompleteResponse>;

    async fn stream_complete(
        &self,
        _request: Request<router::StreamCompleteRequest>,
    ) -> Result<Response<Self::StreamCompleteStream>, Status> {
        Err(Status::unimplemented("not in the test double"))
    }

    async fn list_models(
        &self,
        _request: Request<router::ListModelsRequest>,
    ) -> Result<Response<router::ListModelsResponse>, Status> {
        Err(Status::unimplemented("not in the test double"))
    }
}

// ----------------------------------------------------------------- audit double

#[derive(Clone, Default)]
pub struct AuditDouble {
    pub events: Arc<Mutex<Vec<audit::EventInput>>>,
}

impl AuditDouble {
    pub fn events_for(&self, run_id: &str) -> Vec<audit::EventInput> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.resource.as_ref().is_some_and(|r| r.name == run_id))
            .cloned()
            .collect()
    }
}

#[tonic::async_trait]
impl AuditService for AuditDouble {
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
        _request: Request<audit::QueryRequest>,
    ) -> Result<Response<audit::QueryResponse>, Status> {
        Err(Status::unimplemented("not in the test double"))
    }

    async fn verify(
        &self,
        _request: Request<audit::VerifyRequest>,
    ) -> Result<Response<audit::VerifyResponse>, Status> {
        Err(Status::unimplemented("not in the test double"))
    }

    type ExportStream = BoxStream<audit::ExportResponse>;

    async fn export(
        &self,
        _request: Request<audit::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        Err(Status::unimplemented("not in the test double"))
    }

    async fn checkpoints(
        &self,
        _request: Request<audit::CheckpointsRequest>,
    ) -> Result<Response<audit::CheckpointsResponse>, Status> {
        Err(Status::unimplemented("not in the test double"))
    }
}

// ---------------------------------------------------------------- config double

/// One `Get` as the config double saw it.
#[derive(Debug, Clone)]
pub struct ConfigGet {
    pub caller: String,
    pub tenant: Option<String>,
    pub scope: config::Scope,
    pub name: String,
}

#[derive(Clone, Default)]
pub struct ConfigDouble {
    /// (tenant or `_global`, name) -> spec_json of `agent` documents.
    pub agents: Arc<HashMap<(String, String), String>>,
    pub gets: Arc<Mutex<Vec<ConfigGet>>>,
}

#[tonic::async_trait]
impl ConfigService for ConfigDouble {
    async fn get(
        &self,
        request: Request<config::GetRequest>,
    ) -> Result<Response<config::GetResponse>, Status> {
        let caller = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.identity.as_ref())
            .map(|id| id.name().to_owned())
            .unwrap_or_default();
        let principal = Principal::from_headers(&request.metadata().clone().into_headers())
            .ok()
            .flatten();
        let body = request.into_inner();
        let scope = config::Scope::try_from(body.scope).unwrap_or(config::Scope::Unspecified);
        self.gets.lock().unwrap().push(ConfigGet {
            caller,
            tenant: principal.as_ref().map(|p| p.tenant.to_string()),
            scope,
            name: body.name.clone(),
        });
        if body.kind != config::Kind::Agent as i32 {
            return Err(Status::invalid_argument("the double only has agents"));
        }
        let owner = match scope {
            config::Scope::Tenant => principal
                .ok_or_else(|| Status::unauthenticated("SCOPE_TENANT needs a principal"))?
                .tenant
                .to_string(),
            config::Scope::Global => "_global".to_owned(),
            _ => return Err(Status::invalid_argument("unsupported scope")),
        };
        let spec = self
            .agents
            .get(&(owner.clone(), body.name.clone()))
            .ok_or_else(|| Status::not_found(format!("agent/{} not found", body.name)))?;
        Ok(Response::new(config::GetResponse {
            document: Some(config::Document {
                tenant: owner,
                kind: config::Kind::Agent as i32,
                name: body.name,
                spec_json: spec.clone(),
                version: 7,
                ..Default::default()
            }),
        }))
    }

    async fn list(
        &self,
        _request: Request<config::ListRequest>,
    ) -> Result<Response<config::ListResponse>, Status> {
        Err(Status::unimplemented("not in the test double"))
    }

    async fn put(
        &self,
        _request: Request<config::PutRequest>,
    ) -> Result<Response<config::PutResponse>, Status> {
        Err(Status::unimplemented("not in the test double"))
    }

    async fn delete(
        &self,
        _request: Request<config::DeleteRequest>,
    ) -> Result<Response<config::DeleteResponse>, Status> {
        Err(Status::unimplemented("not in the test double"))
    }

    async fn apply(
        &self,
        _request: Request<config::ApplyRequest>,
    ) -> Result<Response<config::ApplyResponse>, Status> {
        Err(Status::unimplemented("not in the test double"))
    }

    type WatchStream = BoxStream<config::WatchResponse>;

    async fn watch(
        &self,
        _request: Request<config::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not in the test double"))
    }

    async fn history(
        &self,
        _request: Request<config::HistoryRequest>,
    ) -> Result<Response<config::HistoryResponse>, Status> {
        Err(Status::unimplemented("not in the test double"))
    }

    async fn rollback(
        &self,
        _request: Request<config::RollbackRequest>,
    ) -> Result<Response<config::RollbackResponse>, Status> {
        Err(Status::unimplemented("not in the test double"))
    }

    async fn evaluate_flags(
        &self,
        _request: Request<config::EvaluateFlagsRequest>,
    ) -> Result<Response<config::EvaluateFlagsResponse>, Status> {
        Err(Status::unimplemented("not in the test double"))
    }
}

// ------------------------------------------------------------------------ mesh

/// The doubles, served.
pub struct Doubles {
    pub pki: TestPki,
    pub router: RouterDouble,
    pub audit: AuditDouble,
    pub config: ConfigDouble,
    pub router_addr: SocketAddr,
    pub audit_addr: SocketAddr,
    pub config_addr: SocketAddr,
    _stop: Vec<Stopper>,
}

async fn serve_mesh(
    pki: &TestPki,
    service: Service,
    add: impl FnOnce(&mut MeshServer),
) -> (SocketAddr, Stopper) {
    let common = common(pki, service.name(), PeersConfig::default());
    let tls = MeshTls::load(common.tls.clone()).unwrap();
    let mut server = MeshServer::bind(service, &common, tls, MetricsRegistry::new())
        .await
        .unwrap();
    add(&mut server);
    let addr = server.grpc_addr();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    (addr, Stopper(Some(tx)))
}

/// Starts the router, audit and config doubles. The config double knows the agent
/// documents `agents`: ((tenant or `_global`, name), spec_json).
pub async fn start_doubles(agents: &[((&str, &str), &str)]) -> Doubles {
    crewmesh_testkit::init_crypto();
    crewmesh_testkit::init_test_logs();
    let pki = TestPki::new();

    let router = RouterDouble::default();
    let (router_addr, router_stop) = serve_mesh(&pki, Service::Router, |s| {
        s.add_service(RouterServiceServer::new(router.clone()))
    })
    .await;

    let audit = AuditDouble::default();
    let (audit_addr, audit_stop) = serve_mesh(&pki, Service::Audit, |s| {
        s.add_service(AuditServiceServer::new(audit.clone()))
    })
    .await;

    let config = ConfigDouble {
        agents: Arc::new(
            agents
                .iter()
                .map(|((t, n), s)| (((*t).to_owned(), (*n).to_owned()), (*s).to_owned()))
                .collect(),
        ),
        gets: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config_addr = listener.local_addr().unwrap();
    let incoming = crewmesh_kit::transport::mtls_incoming(
        listener,
        MeshTls::load(pki.files("config")).unwrap(),
    );
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ConfigServiceServer::new(config.clone()))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.await;
            }),
    );

    Doubles {
        pki,
        router,
        audit,
        config,
        router_addr,
        audit_addr,
        config_addr,
        _stop: vec![router_stop, audit_stop, Stopper(Some(tx))],
    }
}

impl Doubles {
    /// The runtime's config: all doubles as peers (config only if `with_config`).
    pub fn runtime_config(&self, database_url: &str, with_config: bool) -> AgentRuntimeConfig {
        let peers = PeersConfig {
            router: Some(self.router_addr.to_string()),
            audit: Some(self.audit_addr.to_string()),
            config: with_config.then(|| self.config_addr.to_string()),
            ..Default::default()
        };
        AgentRuntimeConfig {
            common: common(&self.pki, "agent-runtime", peers),
            database: DatabaseConfig {
                url: database_url.to_owned(),
                password_file: None,
                max_connections: 4,
            },
        }
    }

    /// A client holding the certificate of `workload` (normally `gateway`).
    pub fn client(&self, workload: &str, addr: SocketAddr) -> AgentServiceClient<Channel> {
        let tls = MeshTls::load(self.pki.files(workload)).unwrap();
        let expected = SpiffeId::new(TRUST_DOMAIN, "agent-runtime").unwrap();
        let channel =
            crewmesh_kit::transport::mesh_channel(&addr.to_string(), expected, tls).unwrap();
        AgentServiceClient::new(channel)
    }
}

/// A runtime served in the background.
pub struct Runtime {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<crewmesh_agent_runtime::Result<()>>>,
}

impl Runtime {
    pub async fn start(config: AgentRuntimeConfig) -> Self {
        let app = Application::build(config, MetricsRegistry::new())
            .await
            .expect("the runtime builds");
        let addr = app.grpc_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Signals shutdown and waits until the runtime has drained and stopped.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("the runtime task")
                .expect("the runtime stops cleanly");
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A fresh SQLite database URL in `dir`.
pub fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}?mode=rwc", dir.path().join("runs.db").display())
}

pub async fn start_run(
    client: &mut AgentServiceClient<Channel>,
    who: &Principal,
    req: agent::StartRunRequest,
) -> Result<agent::Run, Status> {
    client
        .start_run(with_principal(req, who))
        .await
        .map(|r| r.into_inner().run.expect("a run"))
}

pub fn inline(model: &str, system_prompt: &str, input: &str) -> agent::StartRunRequest {
    agent::StartRunRequest {
        agent_ref: Some(agent::start_run_request::AgentRef::Inline(
            agent::AgentSpec {
                model: model.to_owned(),
                system_prompt: system_prompt.to_owned(),
                tools: vec![],
                max_steps: 0,
            },
        )),
        input: input.to_owned(),
        idempotency_key: String::new(),
    }
}

pub fn named(agent_name: &str, input: &str) -> agent::StartRunRequest {
    agent::StartRunRequest {
        agent_ref: Some(agent::start_run_request::AgentRef::Agent(
            agent_name.to_owned(),
        )),
        input: input.to_owned(),
        idempotency_key: String::new(),
    }
}

pub async fn get_run(
    client: &mut AgentServiceClient<Channel>,
    who: &Principal,
    run_id: &str,
) -> Result<agent::Run, Status> {
    client
        .get_run(with_principal(
            agent::GetRunRequest {
                run_id: run_id.to_owned(),
            },
            who,
        ))
        .await
        .map(|r| r.into_inner().run.expect("a run"))
}

/// Polls GetRun until the run is SUCCEEDED or FAILED.
pub async fn wait_until_finished(
    client: &mut AgentServiceClient<Channel>,
    who: &Principal,
    run_id: &str,
) -> agent::Run {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let run = get_run(client, who, run_id).await.expect("GetRun");
        let status = agent::RunStatus::try_from(run.status).unwrap();
        if matches!(
            status,
            agent::RunStatus::Succeeded | agent::RunStatus::Failed
        ) {
            return run;
        }
        assert!(
            Instant::now() < deadline,
            "run {run_id} did not finish within {DEADLINE:?}: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` until it holds.
pub async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
