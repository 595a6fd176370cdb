//! `GET /v1/audit/events`: the caller's tenant's audit trail.

use axum::Json;
use axum::extract::{Query, State};
use crewmesh_kit::clients::with_principal;
use crewmesh_kit::principal::Role;
use crewmesh_proto::audit::v1 as pb;
use crewmesh_proto::types::v1::{Outcome, PageRequest};
use serde::Deserialize;

use super::{parse_time, rfc3339};
use crate::AppState;
use crate::extract::Authed;
use crate::problem::Problem;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    from: Option<String>,
    to: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    resource_kind: Option<String>,
    resource_name: Option<String>,
    outcome: Option<String>,
    page_size: Option<u32>,
    page_token: Option<String>,
}

fn outcome_name(o: i32) -> &'static str {
    match Outcome::try_from(o).unwrap_or(Outcome::Unspecified) {
        Outcome::Success => "success",
        Outcome::Denied => "denied",
        Outcome::Failure => "failure",
        Outcome::Unspecified => "unspecified",
    }
}

fn event_json(e: &pb::Event) -> serde_json::Value {
    let actor = e.actor.clone().unwrap_or_default();
    let resource = e.resource.clone().unwrap_or_default();
    serde_json::json!({
        "id": e.id,
        "chain": e.chain,
        "sequence": e.sequence,
        "time": rfc3339(e.time.as_ref()),
        "tenant": e.tenant,
        "actor": { "subject": actor.subject, "service": actor.service },
        "action": e.action,
        "resource": { "kind": resource.kind, "name": resource.name },
        "outcome": outcome_name(e.outcome),
        "request_id": e.request_id,
        "trace_id": e.trace_id,
        "details": serde_json::from_str::<serde_json::Value>(&e.details_json).unwrap_or(serde_json::Value::Null),
        "prev_hash": e.prev_hash,
        "hash": e.hash,
    })
}

pub async fn events(
    State(state): State<AppState>,
    Authed(principal): Authed,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, Problem> {
    if !(principal.has_role(Role::Admin) || principal.has_role(Role::Auditor)) {
        return Err(Problem::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            "reading the audit trail needs the admin or auditor role",
        ));
    }
    let Query(p) = params.map_err(|e| Problem::bad_request(e.body_text()))?;
    let outcome = match p.outcome.as_deref() {
        None | Some("") => Outcome::Unspecified,
        Some("success") => Outcome::Success,
        Some("denied") => Outcome::Denied,
        Some("failure") => Outcome::Failure,
        Some(other) => {
            return Err(Problem::bad_request(format!(
                "outcome: `{other}` is not one of success, denied, failure"
            )));
        }
    };
    let filter = pb::EventFilter {
        from: p
            .from
            .as_deref()
            .map(|v| parse_time("from", v))
            .transpose()?,
        to: p.to.as_deref().map(|v| parse_time("to", v)).transpose()?,
        actor: p.actor.unwrap_or_default(),
        action: p.action.unwrap_or_default(),
        resource_kind: p.resource_kind.unwrap_or_default(),
        resource_name: p.resource_name.unwrap_or_default(),
        outcome: outcome as i32,
    };
    let resp = state
        .audit
        .clone()
        .query(with_principal(
            pb::QueryRequest {
                filter: Some(filter),
                page: Some(PageRequest {
                    page_size: p.page_size.unwrap_or(0),
                    page_token: p.page_token.unwrap_or_default(),
                }),
            },
            &principal,
        ))
        .await?
        .into_inner();
    Ok(Json(serde_json::json!({
        "object": "list",
        "data": resp.events.iter().map(event_json).collect::<Vec<_>>(),
        "next_page_token": resp.next_page_token,
    })))
}
