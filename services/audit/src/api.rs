//! The `crewmesh.audit.v1.AuditService` gRPC handlers. The authorisation layer has
//! already checked the caller's identity against the allow-list; handlers convert
//! the messages into checked domain types and call the store.

use std::sync::Arc;

use crewmesh_kit::principal::require_principal;
use crewmesh_kit::status::to_status;
use crewmesh_proto::audit::v1 as pb;
use crewmesh_proto::audit::v1::audit_service_server::AuditService;
use crewmesh_proto::types::v1::Outcome;
use tonic::{Request, Response, Status};

use crate::checkpoint::{Checkpointer, PublicKey};
use crate::error::{AuditError, Result};
use crate::event::{DEFAULT_CHAIN, NewEvent};
use crate::export::{ExportFormat, export_stream};
use crate::page;
use crate::store::{AuditStore, EventQuery};
use crate::verify::verify_chain;

/// The gRPC service over a store.
#[derive(Clone)]
pub struct AuditApi<S> {
    store: S,
    checkpointer: Option<Arc<Checkpointer<S>>>,
    public_key: Option<PublicKey>,
}

impl<S: AuditStore> AuditApi<S> {
    /// Without a signing key: no checkpoints are taken.
    pub fn new(store: S) -> Self {
        Self {
            store,
            checkpointer: None,
            public_key: None,
        }
    }

    /// Wakes `checkpointer` after appends and serves its public key.
    pub fn with_checkpointer(store: S, checkpointer: Arc<Checkpointer<S>>) -> Self {
        Self {
            store,
            public_key: Some(checkpointer.public_key()),
            checkpointer: Some(checkpointer),
        }
    }

    async fn verify(&self, request: pb::VerifyRequest) -> Result<pb::VerifyResponse> {
        let chain = chain_name(&request.chain)?;
        let from = i64::try_from(request.from_sequence).map_err(|_| {
            AuditError::InvalidFilter("from_sequence is beyond the largest sequence".into())
        })?;
        let report = verify_chain(&self.store, chain, from, self.public_key.as_ref()).await?;
        match &report.first_broken {
            Some(b) => tracing::warn!(
                chain,
                sequence = b.sequence,
                reason = %b.reason,
                "audit chain verification failed"
            ),
            None => tracing::info!(
                chain,
                events = report.events_verified,
                checkpoints = report.checkpoints_verified,
                "audit chain verified"
            ),
        }
        Ok(report.into_proto())
    }

    async fn checkpoints(
        &self,
        request: pb::CheckpointsRequest,
    ) -> Result<pb::CheckpointsResponse> {
        let chain = chain_name(&request.chain)?;
        let page_request = request.page.unwrap_or_default();
        let limit = page::page_size(page_request.page_size);
        let after = page::decode(&page_request.page_token)?.unwrap_or(0);
        let mut checkpoints = self.store.checkpoints(chain, after, limit + 1).await?;
        let mut next_page_token = String::new();
        if checkpoints.len() > limit as usize {
            checkpoints.truncate(limit as usize);
            if let Some(last) = checkpoints.last() {
                next_page_token = page::encode(last.sequence);
            }
        }
        Ok(pb::CheckpointsResponse {
            checkpoints: checkpoints.into_iter().map(|c| c.into_proto()).collect(),
            next_page_token,
            public_key: self
                .public_key
                .as_ref()
                .map(PublicKey::to_base64)
                .unwrap_or_default(),
        })
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
        if let Some(checkpointer) = &self.checkpointer {
            checkpointer.appended(outcome.head_sequence);
        }
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

/// The chain a request names (empty: the default chain).
fn chain_name(chain: &str) -> Result<&str> {
    match chain {
        "" | DEFAULT_CHAIN => Ok(DEFAULT_CHAIN),
        other => Err(AuditError::InvalidFilter(format!(
            "chain `{other}` does not exist: the only chain is `{DEFAULT_CHAIN}`"
        ))),
    }
}

/// The store query for a tenant and a wire filter.
pub(crate) fn event_query(tenant: &str, filter: pb::EventFilter, limit: u32) -> Result<EventQuery> {
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

    #[tracing::instrument(skip_all)]
    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        self.verify(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(&e))
    }

    type ExportStream = ExportStream;

    #[tracing::instrument(skip_all)]
    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let principal = require_principal(&request)?;
        let request = request.into_inner();
        let format = ExportFormat::try_from(request.format).map_err(|e| to_status(&e))?;
        let mut query = event_query(
            principal.tenant.as_str(),
            request.filter.unwrap_or_default(),
            crate::export::EXPORT_PAGE,
        )
        .map_err(|e| to_status(&e))?;
        query.ascending = true;
        let stream = export_stream(self.store.clone(), query, format);
        Ok(Response::new(Box::pin(futures::StreamExt::map(
            stream,
            |chunk| {
                chunk
                    .map(|data| pb::ExportResponse { data })
                    .map_err(|e| to_status(&e))
            },
        ))))
    }

    #[tracing::instrument(skip_all)]
    async fn checkpoints(
        &self,
        request: Request<pb::CheckpointsRequest>,
    ) -> Result<Response<pb::CheckpointsResponse>, Status> {
        self.checkpoints(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(&e))
    }
}
