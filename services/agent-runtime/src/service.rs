//! `crewmesh.agent.v1.AgentService`: the gRPC edge. Requests are checked into domain
//! values here; every error becomes a status through `to_status`.

use std::pin::Pin;
use std::sync::Arc;

use crewmesh_kit::clients::AuditClient;
use crewmesh_kit::principal::{Principal, require_principal};
use crewmesh_kit::status::{not_implemented, to_status};
use crewmesh_proto::agent::v1 as pb;
use crewmesh_proto::agent::v1::agent_service_server::AgentService;
use crewmesh_proto::types::v1::Outcome;
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::agents::AgentResolver;
use crate::error::{AgentRuntimeError, Result};
use crate::execution::{Executor, run_event};
use crate::request::{StartRun, parse_run_id};
use crate::run::Run;
use crate::store::{Created, RunStore};

/// What the handlers share.
pub struct AgentApi {
    store: Arc<dyn RunStore>,
    resolver: AgentResolver,
    executor: Arc<Executor>,
    audit: Option<AuditClient>,
}

impl AgentApi {
    pub fn new(
        store: Arc<dyn RunStore>,
        resolver: AgentResolver,
        executor: Arc<Executor>,
        audit: Option<AuditClient>,
    ) -> Self {
        Self {
            store,
            resolver,
            executor,
            audit,
        }
    }

    /// Accepts a run: resolves its agent, stores it PENDING and starts executing it.
    /// A repeated idempotency key of the tenant returns the first run instead.
    #[tracing::instrument(skip_all, fields(tenant = %principal.tenant))]
    async fn start(&self, principal: Principal, req: StartRun) -> Result<Run> {
        if let Some(existing) = self
            .store
            .find_by_idempotency_key(&principal.tenant, &req.idempotency_key)
            .await?
        {
            return Ok(existing);
        }
        let (agent, spec) = self.resolver.resolve(&principal, req.agent).await?;
        let run = Run::new_pending(principal, agent, spec, req.input, req.idempotency_key);
        match self.store.create_run(&run).await? {
            Created::Existing(existing) => Ok(*existing),
            Created::New => {
                tracing::info!(run_id = %run.id, agent = %run.agent, model = %run.spec.model, "run accepted");
                if let Some(audit) = &self.audit {
                    let details = serde_json::json!({
                        "agent": run.agent,
                        "model": run.spec.model,
                    });
                    audit.record(run_event(
                        &run,
                        "agent.run.start",
                        Outcome::Success,
                        details,
                    ));
                }
                self.executor.launch(run.clone());
                Ok(run)
            }
        }
    }

    async fn get(&self, principal: &Principal, run_id: &str) -> Result<Run> {
        let id = parse_run_id(run_id)?;
        self.store
            .get_run(&principal.tenant, id)
            .await?
            .ok_or_else(|| AgentRuntimeError::RunNotFound(id.to_string()))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchRunResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn start_run(
        &self,
        request: Request<pb::StartRunRequest>,
    ) -> Result<Response<pb::StartRunResponse>, Status> {
        let principal = require_principal(&request)?;
        let req = StartRun::try_from(request.into_inner()).map_err(|e| to_status(&e))?;
        let run = self
            .start(principal, req)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::StartRunResponse {
            run: Some(run.to_proto()),
        }))
    }

    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::GetRunResponse>, Status> {
        let principal = require_principal(&request)?;
        let run = self
            .get(&principal, &request.get_ref().run_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::GetRunResponse {
            run: Some(run.to_proto()),
        }))
    }

    type WatchRunStream = WatchStream;

    async fn watch_run(
        &self,
        _request: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        Err(not_implemented("crewmesh.agent.v1.AgentService/WatchRun"))
    }

    async fn cancel_run(
        &self,
        _request: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::CancelRunResponse>, Status> {
        Err(not_implemented("crewmesh.agent.v1.AgentService/CancelRun"))
    }

    async fn approve_step(
        &self,
        _request: Request<pb::ApproveStepRequest>,
    ) -> Result<Response<pb::ApproveStepResponse>, Status> {
        Err(not_implemented(
            "crewmesh.agent.v1.AgentService/ApproveStep",
        ))
    }

    async fn start_crew(
        &self,
        _request: Request<pb::StartCrewRequest>,
    ) -> Result<Response<pb::StartCrewResponse>, Status> {
        Err(not_implemented("crewmesh.agent.v1.AgentService/StartCrew"))
    }
}
