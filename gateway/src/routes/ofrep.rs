//! OFREP, the OpenFeature Remote Evaluation Protocol, so any OpenFeature SDK can use
//! crewmesh as its flag backend:
//!
//! - `POST /ofrep/v1/evaluate/flags/{key}` with `{"context": {...}}` evaluates one
//!   flag: 200 `{key, value, reason, variant, metadata}`, or 404 `FLAG_NOT_FOUND` /
//!   400 `PARSE_ERROR`, `TARGETING_KEY_MISSING`, `INVALID_CONTEXT` as
//!   `{key, errorCode, errorDetails}`.
//! - `POST /ofrep/v1/evaluate/flags` evaluates every flag the caller can see:
//!   200 `{"flags": [...]}` with an `ETag`; `If-None-Match` with that ETag gives 304.
//!
//! Flags are evaluated by the config service (`EvaluateFlags`) for the caller's
//! tenant: `_global` flags, overridden by the tenant's own flags of the same name.
//! The context's `targetingKey` is the targeting key; every other field is an
//! attribute.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use crewmesh_kit::clients::with_principal;
use crewmesh_kit::flags::wire;
use crewmesh_proto::config::v1 as pb;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::extract::Authed;
use crate::problem::Problem;

const EVALUATE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Deserialize)]
pub struct EvaluateBody {
    #[serde(default)]
    context: Option<Value>,
}

fn ofrep_error(status: StatusCode, key: Option<&str>, code: &str, details: &str) -> Response {
    let mut body = json!({"errorCode": code, "errorDetails": details});
    if let Some(k) = key {
        body["key"] = json!(k);
    }
    (status, Json(body)).into_response()
}

/// Parses the request body into an evaluation context.
fn context_of(body: &[u8]) -> Result<pb::EvaluationContext, String> {
    if body.is_empty() {
        return Ok(pb::EvaluationContext::default());
    }
    let parsed: EvaluateBody =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let mut attrs: Map<String, Value> = match parsed.context {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o,
        Some(_) => return Err("context must be a JSON object".to_owned()),
    };
    let targeting_key = match attrs.remove("targetingKey") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(_) => return Err("context.targetingKey must be a string".to_owned()),
    };
    Ok(pb::EvaluationContext {
        targeting_key,
        attributes: Some(wire::to_struct(&attrs)),
    })
}

fn reason_name(reason: i32) -> &'static str {
    match pb::EvaluationReason::try_from(reason) {
        Ok(pb::EvaluationReason::Static) => "STATIC",
        Ok(pb::EvaluationReason::Default) => "DEFAULT",
        Ok(pb::EvaluationReason::TargetingMatch) => "TARGETING_MATCH",
        Ok(pb::EvaluationReason::Split) => "SPLIT",
        Ok(pb::EvaluationReason::Disabled) => "DISABLED",
        Ok(pb::EvaluationReason::Error) => "ERROR",
        _ => "UNKNOWN",
    }
}

fn error_name(code: i32) -> Option<&'static str> {
    match pb::EvaluationErrorCode::try_from(code) {
        Ok(pb::EvaluationErrorCode::FlagNotFound) => Some("FLAG_NOT_FOUND"),
        Ok(pb::EvaluationErrorCode::ParseError) => Some("PARSE_ERROR"),
        Ok(pb::EvaluationErrorCode::TypeMismatch) => Some("TYPE_MISMATCH"),
        Ok(pb::EvaluationErrorCode::TargetingKeyMissing) => Some("TARGETING_KEY_MISSING"),
        Ok(pb::EvaluationErrorCode::InvalidContext) => Some("INVALID_CONTEXT"),
        Ok(pb::EvaluationErrorCode::General) => Some("GENERAL"),
        _ => None,
    }
}

/// One evaluation as OFREP shows it, success or error.
fn evaluation_json(e: &pb::FlagEvaluation) -> Value {
    match error_name(e.error_code) {
        Some(code) => json!({"key": e.key, "errorCode": code, "errorDetails": e.error_message}),
        None => json!({
            "key": e.key,
            "value": e.value.as_ref().map_or(Value::Null, wire::from_value),
            "reason": reason_name(e.reason),
            "variant": e.variant,
            "metadata": {},
        }),
    }
}

async fn evaluate(
    state: &AppState,
    principal: &crewmesh_kit::principal::Principal,
    keys: Vec<String>,
    context: pb::EvaluationContext,
) -> Result<Vec<pb::FlagEvaluation>, Problem> {
    let mut req = with_principal(
        pb::EvaluateFlagsRequest {
            keys,
            context: Some(context),
        },
        principal,
    );
    req.set_timeout(EVALUATE_TIMEOUT);
    Ok(state
        .config_store
        .clone()
        .evaluate_flags(req)
        .await?
        .into_inner()
        .evaluations)
}

pub async fn evaluate_one(
    State(state): State<AppState>,
    Authed(principal): Authed,
    Path(key): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, Problem> {
    let context = match context_of(&body) {
        Ok(c) => c,
        Err(e) => {
            return Ok(ofrep_error(
                StatusCode::BAD_REQUEST,
                Some(&key),
                "INVALID_CONTEXT",
                &e,
            ));
        }
    };
    let evaluations = evaluate(&state, &principal, vec![key.clone()], context).await?;
    let Some(e) = evaluations.first() else {
        return Ok(ofrep_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some(&key),
            "GENERAL",
            "the config service returned no evaluation",
        ));
    };
    let status = match error_name(e.error_code) {
        None => StatusCode::OK,
        Some("FLAG_NOT_FOUND") => StatusCode::NOT_FOUND,
        Some("GENERAL") => StatusCode::INTERNAL_SERVER_ERROR,
        Some(_) => StatusCode::BAD_REQUEST,
    };
    Ok((status, Json(evaluation_json(e))).into_response())
}

pub async fn evaluate_all(
    State(state): State<AppState>,
    Authed(principal): Authed,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, Problem> {
    let context = match context_of(&body) {
        Ok(c) => c,
        Err(e) => {
            return Ok(ofrep_error(
                StatusCode::BAD_REQUEST,
                None,
                "INVALID_CONTEXT",
                &e,
            ));
        }
    };
    let evaluations = evaluate(&state, &principal, Vec::new(), context).await?;
    let body = json!({"flags": evaluations.iter().map(evaluation_json).collect::<Vec<_>>()});
    let text = body.to_string();
    let etag = format!(
        "\"{}\"",
        hex::encode(&Sha256::digest(text.as_bytes())[..16])
    );
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if unchanged {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            text,
        )
            .into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    Ok(resp)
}
