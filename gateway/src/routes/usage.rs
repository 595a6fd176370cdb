//! `GET /v1/usage`: the caller's tenant's usage records and spend.

use axum::Json;
use axum::extract::{Query, State};
use crewmesh_kit::clients::with_principal;
use crewmesh_proto::metrics::v1 as pb;
use crewmesh_proto::types::v1::PageRequest;
use serde::Deserialize;

use super::{parse_time, rfc3339};
use crate::AppState;
use crate::extract::Authed;
use crate::problem::Problem;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    from: Option<String>,
    to: Option<String>,
    model: Option<String>,
    subject: Option<String>,
    agent: Option<String>,
    page_size: Option<u32>,
    page_token: Option<String>,
}

fn record_json(r: &pb::UsageRecord) -> serde_json::Value {
    let u = r.usage.unwrap_or_default();
    serde_json::json!({
        "id": r.id,
        "time": rfc3339(r.time.as_ref()),
        "subject": r.subject,
        "model": r.model,
        "deployment": r.deployment,
        "provider": r.provider,
        "agent": r.agent,
        "run_id": r.run_id,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "cost_usd": r.cost_usd,
        "latency_ms": r.latency_ms,
        "cache_hit": r.cache_hit,
        "retries": r.retries,
        "fallbacks": r.fallbacks,
        "request_id": r.request_id,
        "simulated": r.simulated,
    })
}

pub async fn usage(
    State(state): State<AppState>,
    Authed(principal): Authed,
    params: Result<Query<UsageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, Problem> {
    let Query(p) = params.map_err(|e| Problem::bad_request(e.body_text()))?;
    let filter = pb::UsageFilter {
        from: p
            .from
            .as_deref()
            .map(|v| parse_time("from", v))
            .transpose()?,
        to: p.to.as_deref().map(|v| parse_time("to", v)).transpose()?,
        model: p.model.unwrap_or_default(),
        subject: p.subject.unwrap_or_default(),
        agent: p.agent.unwrap_or_default(),
    };
    let mut metrics = state.metrics.clone();
    let records = metrics
        .query(with_principal(
            pb::QueryRequest {
                filter: Some(filter.clone()),
                page: Some(PageRequest {
                    page_size: p.page_size.unwrap_or(0),
                    page_token: p.page_token.unwrap_or_default(),
                }),
            },
            &principal,
        ))
        .await?
        .into_inner();
    let spend = metrics
        .spend(with_principal(
            pb::SpendRequest {
                filter: Some(filter),
                group_by: pb::GroupBy::Model as i32,
            },
            &principal,
        ))
        .await?
        .into_inner();
    Ok(Json(serde_json::json!({
        "object": "list",
        "tenant": principal.tenant.as_str(),
        "data": records.records.iter().map(record_json).collect::<Vec<_>>(),
        "next_page_token": records.next_page_token,
        "spend": {
            "total_cost_usd": spend.total_cost_usd,
            "by_model": spend.rows.iter().map(|r| {
                let u = r.usage.unwrap_or_default();
                serde_json::json!({
                    "model": r.key,
                    "requests": r.requests,
                    "prompt_tokens": u.prompt_tokens,
                    "completion_tokens": u.completion_tokens,
                    "cost_usd": r.cost_usd,
                })
            }).collect::<Vec<_>>(),
        },
    })))
}
