//! The `crewmesh.audit.v1.AuditService` gRPC handlers. The authorisation layer has
//! already checked the caller's identity against the allow-list; handlers convert
//! the messages into checked domain types and call the store.

use crewmesh_kit::principal::require_principal;
use crewmesh_kit::status::{not_implemented, to_status};
use crewmesh_proto::audit::v1 as pb;
use crewmesh_proto::audit::v1::audit_service_server::AuditService;
use crewmesh_proto::types::v1::Outcome;
use tonic::{Request, Response, Status};

use crate::error::{AuditError, Result};
use crate::event::{DEFAULT_CHAIN, NewEvent};
use crate::page;
use crate::store::{AuditStore, EventQuery};

/// The gRPC service over a store.
#[derive(Debug, Clone)]
pub struct AuditApi<S> {
    store: S,
}

impl<S: AuditStore> AuditApi<S> {
    pub fn new(store: S) -> Self {
        Self { store }
    }

    async fn append(&self, request: pb::AppendRequest) -> Result<pb::AppendResponse> {
        let events = request
            .events
            .into_iter()
            .enumerate()
            .map(|(index, input)| {
                NewEvent::from_input(input).map_err(|p| AuditError::InvalidEvent {
                    index,
                    field: p.field,
                    problem: p.problem,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let outcome = self.store.append(DEFAULT_CHAIN, events).await?;
        tracing::debug!(
            appended = outcome.appended,
            duplicates = outcome.duplicates,
            head_sequence = outcome.head_sequence,
            "appended audit events"
        );
        Ok(pb::AppendResponse {
            appended: outcome.appended,
            duplicates: outcome.duplicates,
            head_sequence: u64::try_from(outcome.head_sequence).unwrap_or(0),
            head_hash: outcome.head_hash,
        })
    }

    async fn query(&self, tenant: &str, request: pb::QueryRequest) -> Result<pb::QueryResponse> {
        let page_request = request.page.unwrap_or_default();
        let limit = page::page_size(page_request.page_size);
        let mut query = event_query(tenant, request.filter.unwrap_or_default(), limit + 1)?;
        query.before_sequence = page::decode(&page_request.page_token)?;
        let mut events = self.store.query(&query).await?;
        let mut next_page_token = String::new();
        if events.len() > limit as usize {
            events.truncate(limit as usize);
            if let Some(last) = events.last() {
                next_page_token = page::encode(last.sequence);
            }
        }
        Ok(pb::QueryResponse {
            events: events.into_iter().map(|e| e.into_proto()).collect(),
            next_page_token,
        })
    }
}

/// The store query for a tenant and a wire filter.
fn event_query(tenant: &str, filter: pb::EventFilter, limit: u32) -> Result<EventQuery> {
    let mut query = EventQuery::new(DEFAULT_CHAIN, tenant, limit);
    query.from_micros = filter.from.as_ref().map(crewmesh_proto::time::to_micros);
    query.to_micros = filter.to.as_ref().map(crewmesh_proto::time::to_micros);
    if let (Some(from), Some(to)) = (query.from_micros, query.to_micros)
        && from > to
    {
        return Err(AuditError::InvalidFilter("`from` is after `to`".to_owned()));
    }
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    query.actor_subject = non_empty(filter.actor);
    query.action = non_empty(filter.action);
    query.resource_kind = non_empty(filter.resource_kind);
    query.resource_name = non_empty(filter.resource_name);
    query.outcome = match Outcome::try_from(filter.outcome) {
        Ok(Outcome::Unspecified) => None,
        Ok(outcome) => Some(outcome as i32),
        Err(_) => {
            return Err(AuditError::InvalidFilter(format!(
                "{} is not a known outcome",
                filter.outcome
            )));
        }
    };
    Ok(query)
}

type ExportStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ExportResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<S: AuditStore> AuditService for AuditApi<S> {
    #[tracing::instrument(skip_all, fields(events = request.get_ref().events.len()))]
    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        self.append(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(&e))
    }

    #[tracing::instrument(skip_all)]
    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let principal = require_principal(&request)?;
        self.query(principal.tenant.as_str(), request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(&e))
    }

    async fn verify(
        &self,
        _request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        Err(not_implemented("crewmesh.audit.v1.AuditService/Verify"))
    }

    type ExportStream = ExportStream;

    async fn export(
        &self,
        _request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        Err(not_implemented("crewmesh.audit.v1.AuditService/Export"))
    }

    async fn checkpoints(
        &self,
        _request: Request<pb::CheckpointsRequest>,
    ) -> Result<Response<pb::CheckpointsResponse>, Status> {
        Err(not_implemented(
            "crewmesh.audit.v1.AuditService/Checkpoints",
        ))
    }
}
