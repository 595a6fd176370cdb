//! The audit trail over HTTP: `GET /v1/audit/events` (the caller's tenant's events,
//! newest first), `/v1/audit/export` (JSON Lines or CSV, streamed), `/v1/audit/verify`
//! (recompute the chain and check the signed checkpoints), `/v1/audit/checkpoints`
//! and `/v1/audit/public-key`. All need the admin or auditor role.

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use crewmesh_kit::clients::with_principal;
use crewmesh_kit::principal::{Principal, Role};
use crewmesh_proto::audit::v1 as pb;
use crewmesh_proto::types::v1::{Outcome, PageRequest};
use futures::StreamExt;
use serde::Deserialize;

use super::{parse_time, rfc3339};
use crate::AppState;
use crate::extract::Authed;
use crate::problem::Problem;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
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

fn require_auditor(principal: &Principal) -> Result<(), Problem> {
    if principal.has_role(Role::Admin) || principal.has_role(Role::Auditor) {
        Ok(())
    } else {
        Err(Problem::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            "reading the audit trail needs the admin or auditor role",
        ))
    }
}

pub async fn events(
    State(state): State<AppState>,
    Authed(principal): Authed,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, Problem> {
    require_auditor(&principal)?;
    let Query(p) = params.map_err(|e| Problem::bad_request(e.body_text()))?;
    let filter = event_filter(&p)?;
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

fn event_filter(p: &AuditParams) -> Result<pb::EventFilter, Problem> {
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
    Ok(pb::EventFilter {
        from: p
            .from
            .as_deref()
            .map(|v| parse_time("from", v))
            .transpose()?,
        to: p.to.as_deref().map(|v| parse_time("to", v)).transpose()?,
        actor: p.actor.clone().unwrap_or_default(),
        action: p.action.clone().unwrap_or_default(),
        resource_kind: p.resource_kind.clone().unwrap_or_default(),
        resource_name: p.resource_name.clone().unwrap_or_default(),
        outcome: outcome as i32,
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ExportParams {
    format: Option<String>,
    from: Option<String>,
    to: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    resource_kind: Option<String>,
    resource_name: Option<String>,
    outcome: Option<String>,
}

/// `GET /v1/audit/export?format=jsonl|csv&<filters>`: the tenant's matching events,
/// oldest first, streamed.
pub async fn export(
    State(state): State<AppState>,
    Authed(principal): Authed,
    params: Result<Query<ExportParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    require_auditor(&principal)?;
    let Query(p) = params.map_err(|e| Problem::bad_request(e.body_text()))?;
    let (format, content_type) = match p.format.as_deref() {
        None | Some("jsonl") => (pb::ExportFormat::Jsonl, "application/x-ndjson"),
        Some("csv") => (pb::ExportFormat::Csv, "text/csv; charset=utf-8"),
        Some(other) => {
            return Err(Problem::bad_request(format!(
                "format: `{other}` is not one of jsonl, csv"
            )));
        }
    };
    let filter = event_filter(&AuditParams {
        from: p.from,
        to: p.to,
        actor: p.actor,
        action: p.action,
        resource_kind: p.resource_kind,
        resource_name: p.resource_name,
        outcome: p.outcome,
        page_size: None,
        page_token: None,
    })?;
    let stream = state
        .audit
        .clone()
        .export(with_principal(
            pb::ExportRequest {
                filter: Some(filter),
                format: format as i32,
            },
            &principal,
        ))
        .await?
        .into_inner();
    let body = axum::body::Body::from_stream(
        stream.map(|chunk| chunk.map(|c| bytes::Bytes::from(c.data))),
    );
    Ok(([(axum::http::header::CONTENT_TYPE, content_type)], body).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct VerifyParams {
    from_sequence: Option<u64>,
}

/// `GET /v1/audit/verify`: recomputes the chain and checks the signed checkpoints.
/// 200 with `ok: false` and `first_broken` when the chain does not hold.
pub async fn verify(
    State(state): State<AppState>,
    Authed(principal): Authed,
    params: Result<Query<VerifyParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, Problem> {
    require_auditor(&principal)?;
    let Query(p) = params.map_err(|e| Problem::bad_request(e.body_text()))?;
    let r = state
        .audit
        .clone()
        .verify(with_principal(
            pb::VerifyRequest {
                chain: String::new(),
                from_sequence: p.from_sequence.unwrap_or(0),
            },
            &principal,
        ))
        .await?
        .into_inner();
    Ok(Json(serde_json::json!({
        "ok": r.ok,
        "events_verified": r.events_verified,
        "checkpoints_verified": r.checkpoints_verified,
        "first_broken": r.first_broken.map(|b| serde_json::json!({
            "sequence": b.sequence,
            "event_id": b.event_id,
            "reason": b.reason,
        })),
        "head_hash": r.head_hash,
    })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    page_size: Option<u32>,
    page_token: Option<String>,
}

/// `GET /v1/audit/checkpoints`: signed checkpoints, oldest first, and the public key.
pub async fn checkpoints(
    State(state): State<AppState>,
    Authed(principal): Authed,
    params: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, Problem> {
    require_auditor(&principal)?;
    let Query(p) = params.map_err(|e| Problem::bad_request(e.body_text()))?;
    let r = state
        .audit
        .clone()
        .checkpoints(with_principal(
            pb::CheckpointsRequest {
                chain: String::new(),
                page: Some(PageRequest {
                    page_size: p.page_size.unwrap_or(0),
                    page_token: p.page_token.unwrap_or_default(),
                }),
            },
            &principal,
        ))
        .await?
        .into_inner();
    let data: Vec<serde_json::Value> = r
        .checkpoints
        .iter()
        .map(|c| {
            serde_json::json!({
                "chain": c.chain,
                "sequence": c.sequence,
                "head_hash": c.head_hash,
                "time": rfc3339(c.time.as_ref()),
                "time_micros": c.time.as_ref().map(crewmesh_proto::time::to_micros),
                "signature": c.signature,
                "key_id": c.key_id,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "object": "list",
        "data": data,
        "next_page_token": r.next_page_token,
        "public_key": r.public_key,
    })))
}

/// `GET /v1/audit/public-key`: the Ed25519 key that verifies checkpoints.
pub async fn public_key(
    State(state): State<AppState>,
    Authed(principal): Authed,
) -> Result<Json<serde_json::Value>, Problem> {
    require_auditor(&principal)?;
    let r = state
        .audit
        .clone()
        .checkpoints(with_principal(
            pb::CheckpointsRequest {
                chain: String::new(),
                page: Some(PageRequest {
                    page_size: 1,
                    page_token: String::new(),
                }),
            },
            &principal,
        ))
        .await?
        .into_inner();
    if r.public_key.is_empty() {
        return Err(Problem::new(
            axum::http::StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "the audit service has no checkpoint signing key configured",
        ));
    }
    Ok(Json(serde_json::json!({
        "algorithm": "Ed25519",
        "encoding": "base64 of the raw 32-byte public key",
        "public_key": r.public_key,
    })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReportParams {
    from: Option<String>,
    to: Option<String>,
    format: Option<String>,
}

/// Entries listed individually (denied accesses, config changes) before the report
/// says it is truncated.
const REPORT_LIST_LIMIT: usize = 1000;

/// Events read per page while building a report.
const REPORT_PAGE: u32 = 500;

/// `GET /v1/audit/report?from=&to=&format=json|markdown`: a compliance report of the
/// caller's tenant for a period: counts by action, actor and outcome, every denied
/// access, every config change, and the integrity of the chain.
pub async fn report(
    State(state): State<AppState>,
    Authed(principal): Authed,
    params: Result<Query<ReportParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    require_auditor(&principal)?;
    let Query(p) = params.map_err(|e| Problem::bad_request(e.body_text()))?;
    let markdown = match p.format.as_deref() {
        None | Some("json") => false,
        Some("markdown") | Some("md") => true,
        Some(other) => {
            return Err(Problem::bad_request(format!(
                "format: `{other}` is not one of json, markdown"
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
        ..Default::default()
    };
    let mut by_action = std::collections::BTreeMap::<String, u64>::new();
    let mut by_actor = std::collections::BTreeMap::<String, u64>::new();
    let mut by_outcome = std::collections::BTreeMap::<&'static str, u64>::new();
    let mut denied = Vec::new();
    let mut config_changes = Vec::new();
    let (mut denied_total, mut config_total, mut total) = (0u64, 0u64, 0u64);
    let mut page_token = String::new();
    let mut audit = state.audit.clone();
    loop {
        let resp = audit
            .query(with_principal(
                pb::QueryRequest {
                    filter: Some(filter.clone()),
                    page: Some(PageRequest {
                        page_size: REPORT_PAGE,
                        page_token: page_token.clone(),
                    }),
                },
                &principal,
            ))
            .await?
            .into_inner();
        for e in &resp.events {
            total += 1;
            *by_action.entry(e.action.clone()).or_default() += 1;
            let actor = e.actor.clone().unwrap_or_default();
            let who = if actor.subject.is_empty() {
                actor.service
            } else {
                actor.subject
            };
            *by_actor.entry(who).or_default() += 1;
            *by_outcome.entry(outcome_name(e.outcome)).or_default() += 1;
            if e.outcome == Outcome::Denied as i32 {
                denied_total += 1;
                if denied.len() < REPORT_LIST_LIMIT {
                    denied.push(event_json(e));
                }
            }
            if e.action.starts_with("config.") {
                config_total += 1;
                if config_changes.len() < REPORT_LIST_LIMIT {
                    config_changes.push(event_json(e));
                }
            }
        }
        if resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    let integrity = audit
        .verify(with_principal(pb::VerifyRequest::default(), &principal))
        .await?
        .into_inner();
    let report = serde_json::json!({
        "object": "audit.report",
        "tenant": principal.tenant.as_str(),
        "from": p.from,
        "to": p.to,
        "generated_at": rfc3339(Some(&crewmesh_proto::time::to_timestamp(std::time::SystemTime::now()))),
        "total_events": total,
        "by_action": by_action,
        "by_actor": by_actor,
        "by_outcome": by_outcome,
        "denied": { "total": denied_total, "events": denied, "truncated": denied_total as usize > REPORT_LIST_LIMIT },
        "config_changes": { "total": config_total, "events": config_changes, "truncated": config_total as usize > REPORT_LIST_LIMIT },
        "integrity": {
            "ok": integrity.ok,
            "events_verified": integrity.events_verified,
            "checkpoints_verified": integrity.checkpoints_verified,
            "head_hash": integrity.head_hash,
            "first_broken": integrity.first_broken.map(|b| serde_json::json!({
                "sequence": b.sequence, "event_id": b.event_id, "reason": b.reason,
            })),
        },
    });
    if markdown {
        Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                "text/markdown; charset=utf-8",
            )],
            report_markdown(&report),
        )
            .into_response())
    } else {
        Ok(Json(report).into_response())
    }
}

/// Escapes a table cell.
fn cell(v: &serde_json::Value) -> String {
    let s = match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    s.replace('|', "\\|").replace('\n', " ")
}

/// The Markdown rendering of a report built by [`report`].
fn report_markdown(r: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let period = format!(
        "{} to {}",
        r["from"].as_str().unwrap_or("the first event"),
        r["to"].as_str().unwrap_or("now")
    );
    let _ = writeln!(md, "# Audit report: tenant `{}`\n", cell(&r["tenant"]));
    let _ = writeln!(md, "- Period: {period}");
    let _ = writeln!(md, "- Generated: {}", cell(&r["generated_at"]));
    let _ = writeln!(md, "- Events: {}", r["total_events"]);
    let i = &r["integrity"];
    if i["ok"] == true {
        let _ = writeln!(
            md,
            "- Integrity: the chain verifies ({} events, {} signed checkpoints; head `{}`)",
            i["events_verified"],
            i["checkpoints_verified"],
            cell(&i["head_hash"])
        );
    } else {
        let _ = writeln!(
            md,
            "- Integrity: **BROKEN** at sequence {}: {}",
            i["first_broken"]["sequence"],
            cell(&i["first_broken"]["reason"])
        );
    }
    for (title, key, column) in [
        ("Outcomes", "by_outcome", "outcome"),
        ("Actions", "by_action", "action"),
        ("Actors", "by_actor", "actor"),
    ] {
        let _ = writeln!(md, "\n## {title}\n\n| {column} | events |\n|---|---:|");
        if let Some(map) = r[key].as_object() {
            for (k, v) in map {
                let _ = writeln!(md, "| {} | {v} |", k.replace('|', "\\|"));
            }
        }
    }
    for (title, key) in [
        ("Denied access", "denied"),
        ("Config changes", "config_changes"),
    ] {
        let section = &r[key];
        let _ = writeln!(md, "\n## {title} ({})\n", section["total"]);
        let events = section["events"].as_array().cloned().unwrap_or_default();
        if events.is_empty() {
            md.push_str("None.\n");
            continue;
        }
        md.push_str(
            "| time | actor | action | resource | outcome | request |\n|---|---|---|---|---|---|\n",
        );
        for e in &events {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {}/{} | {} | {} |",
                cell(&e["time"]),
                cell(&e["actor"]["subject"]),
                cell(&e["action"]),
                cell(&e["resource"]["kind"]),
                cell(&e["resource"]["name"]),
                cell(&e["outcome"]),
                cell(&e["request_id"])
            );
        }
        if section["truncated"] == true {
            let _ = writeln!(md, "\nOnly the newest {REPORT_LIST_LIMIT} are listed.");
        }
    }
    md
}
