//! The `crewmesh.metrics.v1.MetricsService` gRPC handlers. The authorisation layer
//! has already checked the caller's identity against the allow-list; handlers
//! convert the messages into checked domain types and call the store.

use crewmesh_kit::principal::require_principal;
use crewmesh_kit::status::to_status;
use crewmesh_proto::metrics::v1 as pb;
use crewmesh_proto::metrics::v1::metrics_service_server::MetricsService;
use crewmesh_proto::types::v1::TokenUsage;
use tonic::{Request, Response, Status};

use crate::counters::UsageCounters;
use crate::error::{MetricsError, Result};
use crate::page;
use crate::store::{Grouping, UsageFilter, UsageStore};
use crate::usage::UsageRow;

/// The gRPC service over a store.
#[derive(Debug, Clone)]
pub struct MetricsApi<S> {
    store: S,
    counters: UsageCounters,
}

impl<S: UsageStore> MetricsApi<S> {
    pub fn new(store: S, counters: UsageCounters) -> Self {
        Self { store, counters }
    }

    async fn record(&self, request: pb::RecordRequest) -> Result<pb::RecordResponse> {
        let rows = request
            .records
            .into_iter()
            .enumerate()
            .map(|(index, record)| {
                UsageRow::from_proto(record).map_err(|p| MetricsError::InvalidRecord {
                    index,
                    field: p.field,
                    problem: p.problem,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let outcome = self.store.record(rows).await?;
        self.counters.observe(&outcome.accepted);
        tracing::debug!(
            accepted = outcome.accepted.len(),
            duplicates = outcome.duplicates,
            "recorded usage"
        );
        Ok(pb::RecordResponse {
            accepted: outcome.accepted.len() as u64,
            duplicates: outcome.duplicates,
        })
    }

    async fn query(&self, tenant: &str, request: pb::QueryRequest) -> Result<pb::QueryResponse> {
        let page_request = request.page.unwrap_or_default();
        let limit = page::page_size(page_request.page_size);
        let after = page::decode(&page_request.page_token)?;
        let filter = usage_filter(tenant, request.filter.unwrap_or_default())?;
        let mut records = self.store.query(&filter, after, limit + 1).await?;
        let mut next_page_token = String::new();
        if records.len() > limit as usize {
            records.truncate(limit as usize);
            if let Some(last) = records.last() {
                next_page_token = page::encode(last.cursor);
            }
        }
        Ok(pb::QueryResponse {
            records: records.into_iter().map(|r| r.row.into_proto()).collect(),
            next_page_token,
        })
    }

    async fn spend(&self, tenant: &str, request: pb::SpendRequest) -> Result<pb::SpendResponse> {
        let grouping = match pb::GroupBy::try_from(request.group_by) {
            Ok(pb::GroupBy::Unspecified) => Grouping::Total,
            Ok(pb::GroupBy::Model) => Grouping::Model,
            Ok(pb::GroupBy::Subject) => Grouping::Subject,
            Ok(pb::GroupBy::Agent) => Grouping::Agent,
            Ok(pb::GroupBy::Day) => Grouping::Day,
            Err(_) => return Err(MetricsError::InvalidGroupBy(request.group_by)),
        };
        let filter = usage_filter(tenant, request.filter.unwrap_or_default())?;
        let buckets = self.store.spend(&filter, grouping).await?;
        let total_cost_usd = buckets.iter().map(|b| b.cost_usd).sum();
        Ok(pb::SpendResponse {
            rows: buckets
                .into_iter()
                .map(|b| pb::SpendRow {
                    key: b.key,
                    requests: b.requests,
                    usage: Some(TokenUsage {
                        prompt_tokens: b.prompt_tokens,
                        completion_tokens: b.completion_tokens,
                        total_tokens: b.total_tokens,
                    }),
                    cost_usd: b.cost_usd,
                })
                .collect(),
            total_cost_usd,
        })
    }
}

/// The store filter for a tenant and a wire filter.
fn usage_filter(tenant: &str, filter: pb::UsageFilter) -> Result<UsageFilter> {
    let from_micros = filter.from.as_ref().map(crewmesh_proto::time::to_micros);
    let to_micros = filter.to.as_ref().map(crewmesh_proto::time::to_micros);
    if let (Some(from), Some(to)) = (from_micros, to_micros)
        && from > to
    {
        return Err(MetricsError::InvalidFilter(
            "`from` is after `to`".to_owned(),
        ));
    }
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    Ok(UsageFilter {
        tenant: tenant.to_owned(),
        from_micros,
        to_micros,
        model: non_empty(filter.model),
        subject: non_empty(filter.subject),
        agent: non_empty(filter.agent),
    })
}

#[tonic::async_trait]
impl<S: UsageStore> MetricsService for MetricsApi<S> {
    #[tracing::instrument(skip_all, fields(records = request.get_ref().records.len()))]
    async fn record(
        &self,
        request: Request<pb::RecordRequest>,
    ) -> Result<Response<pb::RecordResponse>, Status> {
        self.record(request.into_inner())
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

    #[tracing::instrument(skip_all, fields(group_by = request.get_ref().group_by))]
    async fn spend(
        &self,
        request: Request<pb::SpendRequest>,
    ) -> Result<Response<pb::SpendResponse>, Status> {
        let principal = require_principal(&request)?;
        self.spend(principal.tenant.as_str(), request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(&e))
    }
}
