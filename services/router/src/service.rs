//! The `RouterService` gRPC implementation.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use crewmesh_kit::clients::{AuditClient, UsageClient};
use crewmesh_kit::principal::{Principal, require_principal};
use crewmesh_kit::status::not_implemented;
use crewmesh_proto::audit::v1 as audit;
use crewmesh_proto::metrics::v1 as metrics;
use crewmesh_proto::router::v1 as pb;
use crewmesh_proto::types::v1::{Outcome, TokenUsage};
use tonic::{Request, Response, Status};

use crate::catalog::{Catalog, Model};
use crate::error::RouterError;
use crate::provider::{ProviderClient, UpstreamError};

pub struct RouterService {
    pub(crate) catalog: Arc<ArcSwap<Catalog>>,
    pub(crate) provider: ProviderClient,
    pub(crate) usage: Option<UsageClient>,
    pub(crate) audit: Option<AuditClient>,
}

/// Limits on what a caller may send.
const MAX_MESSAGES: usize = 4096;

fn validate(req: &pb::CompleteRequest) -> Result<(), RouterError> {
    if req.model.is_empty() {
        return Err(RouterError::InvalidRequest("model is required".into()));
    }
    if req.messages.is_empty() {
        return Err(RouterError::InvalidRequest(
            "messages must not be empty".into(),
        ));
    }
    if req.messages.len() > MAX_MESSAGES {
        return Err(RouterError::InvalidRequest(format!(
            "at most {MAX_MESSAGES} messages"
        )));
    }
    for (i, m) in req.messages.iter().enumerate() {
        if pb::Role::try_from(m.role).is_err() || m.role == pb::Role::Unspecified as i32 {
            return Err(RouterError::InvalidRequest(format!(
                "messages[{i}].role is not set"
            )));
        }
    }
    Ok(())
}

/// What happened on the way to an answer.
struct Attempts {
    retries: u32,
    fallbacks: u32,
}

impl RouterService {
    async fn route(
        &self,
        model: &Model,
        req: &pb::CompleteRequest,
    ) -> Result<(pb::CompleteResponse, pb::CallInfo), (RouterError, Attempts)> {
        let mut attempts = Attempts {
            retries: 0,
            fallbacks: 0,
        };
        let mut last: Option<UpstreamError> = None;
        for (i, dep) in model.deployments.iter().enumerate() {
            if i > 0 {
                attempts.fallbacks += 1;
            }
            let provider = match &dep.provider {
                Ok(p) => p,
                Err(name) => {
                    let err = RouterError::UnknownProvider {
                        deployment: dep.name.clone(),
                        provider: name.clone(),
                    };
                    return Err((err, attempts));
                }
            };
            match self
                .provider
                .complete(provider, &dep.upstream_model, req)
                .await
            {
                Ok(answer) => {
                    let usage = answer.response.usage.unwrap_or_default();
                    let call = pb::CallInfo {
                        deployment: dep.name.clone(),
                        provider: provider.name.clone(),
                        upstream_model: dep.upstream_model.clone(),
                        retries: attempts.retries,
                        fallbacks: attempts.fallbacks,
                        cache_hit: false,
                        cost_usd: dep.cost(usage.prompt_tokens, usage.completion_tokens),
                        latency_ms: answer.latency.as_secs_f64() * 1000.0,
                        time_to_first_token_ms: answer.latency.as_secs_f64() * 1000.0,
                        simulated: provider.kind == "simulated",
                    };
                    return Ok((answer.response, call));
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(deployment = %dep.name, error = %e, "deployment failed; trying the next one");
                    last = Some(e);
                }
                Err(UpstreamError::Unsupported(kind)) => {
                    return Err((RouterError::UnsupportedProvider(kind), attempts));
                }
                Err(UpstreamError::Status {
                    status, message, ..
                }) => {
                    return Err((RouterError::UpstreamRejected { status, message }, attempts));
                }
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        let err = match last {
            Some(UpstreamError::Status {
                status: 429,
                message,
                ..
            }) => RouterError::UpstreamRateLimited(message),
            Some(e) => RouterError::AllDeploymentsFailed {
                model: model.alias.clone(),
                last: e.to_string(),
            },
            None => RouterError::AllDeploymentsFailed {
                model: model.alias.clone(),
                last: "the alias has no deployments".into(),
            },
        };
        Err((err, attempts))
    }

    fn account(
        &self,
        principal: &Principal,
        req: &pb::CompleteRequest,
        request_id: &str,
        result: Result<(&TokenUsage, &pb::CallInfo), &RouterError>,
    ) {
        let outcome = if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        if let (Some(usage_client), Ok((usage, call))) = (&self.usage, result) {
            usage_client.record(metrics::UsageRecord {
                tenant: principal.tenant.to_string(),
                subject: principal.subject.clone(),
                model: req.model.clone(),
                deployment: call.deployment.clone(),
                provider: call.provider.clone(),
                agent: req.agent.clone(),
                run_id: req.run_id.clone(),
                usage: Some(*usage),
                cost_usd: call.cost_usd,
                latency_ms: call.latency_ms,
                time_to_first_token_ms: call.time_to_first_token_ms,
                cache_hit: call.cache_hit,
                retries: call.retries,
                fallbacks: call.fallbacks,
                outcome: outcome as i32,
                request_id: request_id.to_owned(),
                simulated: call.simulated,
                ..Default::default()
            });
        }
        if let Some(audit_client) = &self.audit {
            let details = match result {
                Ok((usage, call)) => serde_json::json!({
                    "deployment": call.deployment,
                    "provider": call.provider,
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "cost_usd": call.cost_usd,
                    "latency_ms": call.latency_ms,
                    "simulated": call.simulated,
                }),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            };
            audit_client.record(audit::EventInput {
                tenant: principal.tenant.to_string(),
                actor: Some(audit::Actor {
                    subject: principal.subject.clone(),
                    service: String::new(),
                }),
                action: "model.complete".into(),
                resource: Some(audit::Resource {
                    kind: "model".into(),
                    name: req.model.clone(),
                }),
                outcome: outcome as i32,
                request_id: request_id.to_owned(),
                details_json: details.to_string(),
                ..Default::default()
            });
        }
    }
}

#[tonic::async_trait]
impl pb::router_service_server::RouterService for RouterService {
    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let principal = require_principal(&request)?;
        let req = request.into_inner();
        validate(&req)?;
        let request_id = if req.request_id.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else {
            req.request_id.clone()
        };
        let catalog = self.catalog.load();
        let model = catalog
            .resolve(principal.tenant.as_str(), &req.model)
            .ok_or_else(|| RouterError::UnknownModel(req.model.clone()))?;
        match self.route(&model, &req).await {
            Ok((mut resp, call)) => {
                let usage = resp.usage.unwrap_or_default();
                self.account(&principal, &req, &request_id, Ok((&usage, &call)));
                resp.model = req.model.clone();
                if resp.created == 0 {
                    resp.created = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or(Duration::ZERO)
                        .as_secs() as i64;
                }
                resp.call = Some(call);
                resp.request_id = request_id;
                Ok(Response::new(resp))
            }
            Err((err, _attempts)) => {
                self.account(&principal, &req, &request_id, Err(&err));
                Err(err.into())
            }
        }
    }

    type StreamCompleteStream =
        futures::stream::BoxStream<'static, Result<pb::StreamCompleteResponse, Status>>;

    async fn stream_complete(
        &self,
        _request: Request<pb::StreamCompleteRequest>,
    ) -> Result<Response<Self::StreamCompleteStream>, Status> {
        Err(not_implemented(
            "crewmesh.router.v1.RouterService/StreamComplete",
        ))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let principal = require_principal(&request)?;
        let catalog = self.catalog.load();
        let models = catalog
            .visible(principal.tenant.as_str())
            .iter()
            .map(|m| pb::ModelInfo {
                id: m.alias.clone(),
                owned_by: m.owned_by.clone(),
                deployments: m
                    .deployments
                    .iter()
                    .map(|d| pb::DeploymentInfo {
                        name: d.name.clone(),
                        provider: d
                            .provider
                            .as_ref()
                            .map(|p| p.name.clone())
                            .unwrap_or_else(|n| n.clone()),
                        upstream_model: d.upstream_model.clone(),
                        breaker: pb::BreakerState::Closed as i32,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}
