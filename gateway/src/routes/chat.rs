//! `POST /v1/chat/completions` and `GET /v1/models`: the OpenAI-compatible surface.

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::HeaderName;
use axum::response::{IntoResponse, Response};
use crewmesh_kit::clients::with_principal;
use crewmesh_openai::{ChatRequest, request_to_proto, response_from_proto};
use crewmesh_proto::router::v1 as pb;

use crate::extract::{Authed, JsonBody};
use crate::problem::Problem;
use crate::{AppState, RequestId};

// Response header names, built at compile time (a `&str` name is parsed on every use).
const DEPLOYMENT_HEADER: HeaderName = HeaderName::from_static("x-crewmesh-deployment");
const COST_HEADER: HeaderName = HeaderName::from_static("x-crewmesh-cost-usd");
const SIMULATED_HEADER: HeaderName = HeaderName::from_static("x-crewmesh-simulated");

pub async fn completions(
    State(state): State<AppState>,
    Authed(principal): Authed,
    Extension(RequestId(request_id)): Extension<RequestId>,
    JsonBody(body): JsonBody<ChatRequest>,
) -> Result<Response, Problem> {
    let mut req = request_to_proto(&body).map_err(|e| Problem::bad_request(e.to_string()))?;
    req.request_id = request_id;
    if body.stream == Some(true) {
        let include_usage = super::stream::include_usage(body.stream_options.as_ref());
        return super::stream::completions(&state, &principal, req, include_usage).await;
    }
    let mut call = with_principal(req, &principal);
    call.set_timeout(state.upstream_timeout);
    let resp = state.router.clone().complete(call).await?.into_inner();
    if let Some(u) = resp.usage {
        state.limiter.debit_tokens(
            principal.tenant.as_str(),
            &principal.subject,
            u.total_tokens,
        );
    }
    let simulated = resp.call.as_ref().is_some_and(|c| c.simulated);
    let mut out = json_response(&response_from_proto(&resp))?;
    if let Some(call) = &resp.call {
        let h = out.headers_mut();
        if let Ok(v) = call.deployment.parse() {
            h.insert(DEPLOYMENT_HEADER, v);
        }
        if let Ok(v) = format!("{:.8}", call.cost_usd).parse() {
            h.insert(COST_HEADER, v);
        }
    }
    if simulated {
        out.headers_mut().insert(
            SIMULATED_HEADER,
            axum::http::HeaderValue::from_static("true"),
        );
    }
    Ok(out)
}

/// `value` as an `application/json` response, serialised into one buffer sized for a
/// typical completion (axum's `Json` starts at 128 bytes and grows several times).
fn json_response<T: serde::Serialize>(value: &T) -> Result<Response, Problem> {
    let mut body = Vec::with_capacity(1024);
    serde_json::to_writer(&mut body, value)
        .map_err(|e| Problem::internal(format!("cannot encode the response: {e}")))?;
    let json = axum::http::HeaderValue::from_static("application/json");
    Ok(([(axum::http::header::CONTENT_TYPE, json)], body).into_response())
}

pub async fn models(
    State(state): State<AppState>,
    Authed(principal): Authed,
) -> Result<Response, Problem> {
    let resp = state
        .router
        .clone()
        .list_models(with_principal(pb::ListModelsRequest {}, &principal))
        .await?
        .into_inner();
    let data: Vec<_> = resp
        .models
        .iter()
        .map(|m| {
            serde_json::json!({
                "id": m.id,
                "object": "model",
                "created": 0,
                "owned_by": m.owned_by,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "object": "list", "data": data })).into_response())
}
