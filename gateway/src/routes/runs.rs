//! `POST /v1/runs` and `GET /v1/runs/{id}`: agent runs.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use crewmesh_kit::clients::with_principal;
use crewmesh_proto::agent::v1 as pb;
use serde::Deserialize;

use super::rfc3339;
use crate::AppState;
use crate::extract::{Authed, JsonBody};
use crate::problem::Problem;

/// Either `agent` (a configured agent's name) or an inline agent (`model`, optional
/// `system_prompt`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    agent: Option<String>,
    model: Option<String>,
    system_prompt: Option<String>,
    input: String,
    idempotency_key: Option<String>,
}

fn status_name(s: i32) -> &'static str {
    match pb::RunStatus::try_from(s).unwrap_or(pb::RunStatus::Unspecified) {
        pb::RunStatus::Pending => "pending",
        pb::RunStatus::Running => "running",
        pb::RunStatus::WaitingApproval => "waiting_approval",
        pb::RunStatus::Succeeded => "succeeded",
        pb::RunStatus::Failed => "failed",
        pb::RunStatus::Cancelled => "cancelled",
        pb::RunStatus::Unspecified => "unspecified",
    }
}

pub fn run_json(r: &pb::Run) -> serde_json::Value {
    let u = r.usage.unwrap_or_default();
    serde_json::json!({
        "id": r.id,
        "object": "run",
        "agent": r.agent,
        "status": status_name(r.status),
        "input": r.input,
        "output": r.output,
        "error": (!r.error.is_empty()).then(|| r.error.clone()),
        "steps": r.steps.iter().map(|s| serde_json::json!({
            "index": s.index,
            "kind": match pb::StepKind::try_from(s.kind).unwrap_or(pb::StepKind::Unspecified) {
                pb::StepKind::ModelCall => "model_call",
                pb::StepKind::ToolCall => "tool_call",
                pb::StepKind::Unspecified => "unspecified",
            },
            "target": s.target,
            "output": s.output,
            "error": (!s.error.is_empty()).then(|| s.error.clone()),
            "started_at": rfc3339(s.started_at.as_ref()),
            "finished_at": rfc3339(s.finished_at.as_ref()),
        })).collect::<Vec<_>>(),
        "usage": { "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens },
        "cost_usd": r.cost_usd,
        "created_at": rfc3339(r.created_at.as_ref()),
        "updated_at": rfc3339(r.updated_at.as_ref()),
    })
}

pub async fn start(
    State(state): State<AppState>,
    Authed(principal): Authed,
    JsonBody(body): JsonBody<StartRun>,
) -> Result<(StatusCode, Json<serde_json::Value>), Problem> {
    let agent_ref = match (body.agent, body.model) {
        (Some(name), None) => pb::start_run_request::AgentRef::Agent(name),
        (None, Some(model)) => pb::start_run_request::AgentRef::Inline(pb::AgentSpec {
            model,
            system_prompt: body.system_prompt.unwrap_or_default(),
            tools: Vec::new(),
            max_steps: 0,
        }),
        _ => {
            return Err(Problem::bad_request(
                "give either `agent` (a configured agent) or `model` (an inline agent), not both",
            ));
        }
    };
    let resp = state
        .agents
        .clone()
        .start_run(with_principal(
            pb::StartRunRequest {
                agent_ref: Some(agent_ref),
                input: body.input,
                idempotency_key: body.idempotency_key.unwrap_or_default(),
            },
            &principal,
        ))
        .await?
        .into_inner();
    let run = resp
        .run
        .ok_or_else(|| Problem::from_status(&tonic::Status::internal("no run returned")))?;
    Ok((StatusCode::ACCEPTED, Json(run_json(&run))))
}

pub async fn get(
    State(state): State<AppState>,
    Authed(principal): Authed,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, Problem> {
    let resp = state
        .agents
        .clone()
        .get_run(with_principal(pb::GetRunRequest { run_id: id }, &principal))
        .await?
        .into_inner();
    let run = resp
        .run
        .ok_or_else(|| Problem::not_found("run not found"))?;
    Ok(Json(run_json(&run)))
}
