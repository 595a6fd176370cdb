//! `/v1/config/*`: typed config documents over HTTP, on the config service.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/config/schemas/{kind}` | the kind's JSON Schema |
//! | `GET /v1/config/{kind}` | list (`?scope=tenant\|global`, `page_size`, `page_token`) |
//! | `GET /v1/config/{kind}/{name}` | one document; `ETag` is its version |
//! | `PUT /v1/config/{kind}/{name}` | create or replace; body is the spec; `If-Match: <version>` or `If-None-Match: *` |
//! | `DELETE /v1/config/{kind}/{name}` | delete; optional `If-Match` |
//! | `GET /v1/config/{kind}/{name}/history` | earlier versions, newest first |
//! | `POST /v1/config/{kind}/{name}/rollback` | `{"to_version": N}`: writes version N again as a new version |
//! | `POST /v1/config/apply` | several puts and deletes, all or nothing; `"dry_run": true` checks everything and writes nothing |
//!
//! `?scope=global` addresses `_global` documents (admins); the default is the caller's
//! tenant. Reads need `config:read`, writes `config:write` (admin, operator).
//!
//! Every response of the gateway (not only these routes) carries
//! `x-crewmesh-config-revision`: the config store revision of the gateway's last
//! confirmed config sync (see [`revision_header`]).

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use crewmesh_kit::clients::with_principal;
use crewmesh_kit::principal::Principal;
use crewmesh_proto::config::v1 as pb;
use crewmesh_proto::types::v1::PageRequest;
use serde::Deserialize;
use serde_json::{Value, json};

use super::rfc3339;
use crate::AppState;
use crate::extract::{Authed, JsonBody};
use crate::problem::Problem;

/// The response header naming the config revision the gateway last synced to.
pub const REVISION_HEADER: &str = "x-crewmesh-config-revision";

/// Sets [`REVISION_HEADER`] on a response: the store revision up to which this
/// gateway's config cache has confirmed it is current (absent before the first
/// snapshot). A client that wrote a document at version N and sees a revision >= N
/// knows this gateway has seen the change.
pub(crate) async fn revision_header(
    state: &AppState,
    req: Request,
    next: impl AsyncFnOnce(Request) -> Response,
) -> Response {
    let mut resp = next(req).await;
    let revision = state.config_docs.confirmed_revision();
    if revision > 0 {
        resp.headers_mut()
            .insert(REVISION_HEADER, HeaderValue::from(revision));
    }
    resp
}

/// Deadline of one config call.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(10);

const KINDS: [(&str, pb::Kind); 8] = [
    ("provider", pb::Kind::Provider),
    ("model", pb::Kind::Model),
    ("agent", pb::Kind::Agent),
    ("crew", pb::Kind::Crew),
    ("tool", pb::Kind::Tool),
    ("tenant", pb::Kind::Tenant),
    ("apikey", pb::Kind::Apikey),
    ("flag", pb::Kind::Flag),
];

/// The published JSON Schemas (kept current by a test in the config service).
const SCHEMAS: [(&str, &str); 8] = [
    (
        "provider",
        include_str!("../../../docs/schemas/provider.json"),
    ),
    ("model", include_str!("../../../docs/schemas/model.json")),
    ("agent", include_str!("../../../docs/schemas/agent.json")),
    ("crew", include_str!("../../../docs/schemas/crew.json")),
    ("tool", include_str!("../../../docs/schemas/tool.json")),
    ("tenant", include_str!("../../../docs/schemas/tenant.json")),
    ("apikey", include_str!("../../../docs/schemas/apikey.json")),
    ("flag", include_str!("../../../docs/schemas/flag.json")),
];

fn kind_of(s: &str) -> Result<pb::Kind, Problem> {
    KINDS
        .iter()
        .find(|(n, _)| *n == s)
        .map(|(_, k)| *k)
        .ok_or_else(|| {
            Problem::not_found(format!(
                "`{s}` is not a config kind; use one of {}",
                KINDS.map(|(n, _)| n).join(", ")
            ))
        })
}

fn kind_name(kind: i32) -> &'static str {
    KINDS
        .iter()
        .find(|(_, k)| *k as i32 == kind)
        .map_or("unknown", |(n, _)| n)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeParams {
    scope: Option<String>,
    page_size: Option<u32>,
    page_token: Option<String>,
}

fn scope_of(s: Option<&str>) -> Result<pb::Scope, Problem> {
    match s {
        None | Some("tenant") => Ok(pb::Scope::Tenant),
        Some("global") => Ok(pb::Scope::Global),
        Some(other) => Err(Problem::bad_request(format!(
            "scope: `{other}` is not a scope; use tenant (the default) or global"
        ))),
    }
}

fn params(
    q: Result<Query<ScopeParams>, axum::extract::rejection::QueryRejection>,
) -> Result<ScopeParams, Problem> {
    q.map(|Query(p)| p)
        .map_err(|e| Problem::bad_request(e.body_text()))
}

fn call<T>(msg: T, principal: &Principal) -> tonic::Request<T> {
    let mut req = with_principal(msg, principal);
    req.set_timeout(CONFIG_TIMEOUT);
    req
}

/// A document as the API shows it: the spec as JSON, not as text.
pub fn document_json(d: &pb::Document) -> Value {
    json!({
        "tenant": d.tenant,
        "kind": kind_name(d.kind),
        "name": d.name,
        "version": d.version,
        "create_version": d.create_version,
        "updated_at": rfc3339(d.updated_at.as_ref()),
        "updated_by": d.updated_by,
        "spec": serde_json::from_str::<Value>(&d.spec_json).unwrap_or(Value::Null),
    })
}

fn with_etag(doc: &pb::Document, status: StatusCode) -> Response {
    let mut resp = (status, Json(document_json(doc))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", doc.version)) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// `If-Match: "12"` (or `12`) -> `Some(12)`; `If-None-Match: *` -> `Some(0)`.
fn expected_version(headers: &HeaderMap) -> Result<Option<i64>, Problem> {
    if let Some(v) = headers.get(header::IF_MATCH) {
        let text = v.to_str().unwrap_or_default().trim().trim_matches('"');
        return text.parse::<i64>().ok().filter(|n| *n > 0).map(Some).ok_or_else(|| {
            Problem::bad_request(format!(
                "If-Match: `{text}` is not a document version; send the ETag of the version you read"
            ))
        });
    }
    if let Some(v) = headers.get(header::IF_NONE_MATCH) {
        if v.to_str().unwrap_or_default().trim() == "*" {
            return Ok(Some(0));
        }
        return Err(Problem::bad_request(
            "If-None-Match: only `*` (create only if absent) is supported on writes",
        ));
    }
    Ok(None)
}

pub async fn schema(Path(kind): Path<String>) -> Result<Response, Problem> {
    kind_of(&kind)?;
    let text = SCHEMAS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or("{}", |(_, s)| s);
    let mut resp = text.to_owned().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/schema+json"),
    );
    Ok(resp)
}

pub async fn list(
    State(state): State<AppState>,
    Authed(principal): Authed,
    Path(kind): Path<String>,
    q: Result<Query<ScopeParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, Problem> {
    let p = params(q)?;
    let req = pb::ListRequest {
        scope: scope_of(p.scope.as_deref())? as i32,
        kind: kind_of(&kind)? as i32,
        page: Some(PageRequest {
            page_size: p.page_size.unwrap_or(0),
            page_token: p.page_token.unwrap_or_default(),
        }),
    };
    let resp = state
        .config_store
        .clone()
        .list(call(req, &principal))
        .await?
        .into_inner();
    Ok(Json(json!({
        "data": resp.documents.iter().map(document_json).collect::<Vec<_>>(),
        "next_page_token": resp.next_page_token,
        "revision": resp.revision,
    })))
}

pub async fn get(
    State(state): State<AppState>,
    Authed(principal): Authed,
    Path((kind, name)): Path<(String, String)>,
    q: Result<Query<ScopeParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let p = params(q)?;
    let req = pb::GetRequest {
        scope: scope_of(p.scope.as_deref())? as i32,
        kind: kind_of(&kind)? as i32,
        name,
    };
    let doc = state
        .config_store
        .clone()
        .get(call(req, &principal))
        .await?
        .into_inner()
        .document
        .unwrap_or_default();
    Ok(with_etag(&doc, StatusCode::OK))
}

pub async fn put(
    State(state): State<AppState>,
    Authed(principal): Authed,
    Path((kind, name)): Path<(String, String)>,
    q: Result<Query<ScopeParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    JsonBody(spec): JsonBody<Value>,
) -> Result<Response, Problem> {
    let p = params(q)?;
    let expected = expected_version(&headers)?;
    let req = pb::PutRequest {
        scope: scope_of(p.scope.as_deref())? as i32,
        kind: kind_of(&kind)? as i32,
        name,
        spec_json: spec.to_string(),
        expected_version: expected,
    };
    let doc = state
        .config_store
        .clone()
        .put(call(req, &principal))
        .await?
        .into_inner()
        .document
        .unwrap_or_default();
    let status = if doc.version == doc.create_version {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(with_etag(&doc, status))
}

pub async fn delete(
    State(state): State<AppState>,
    Authed(principal): Authed,
    Path((kind, name)): Path<(String, String)>,
    q: Result<Query<ScopeParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<Value>, Problem> {
    let p = params(q)?;
    let req = pb::DeleteRequest {
        scope: scope_of(p.scope.as_deref())? as i32,
        kind: kind_of(&kind)? as i32,
        name,
        expected_version: expected_version(&headers)?,
    };
    let resp = state
        .config_store
        .clone()
        .delete(call(req, &principal))
        .await?
        .into_inner();
    Ok(Json(json!({"deleted": true, "revision": resp.revision})))
}

pub async fn history(
    State(state): State<AppState>,
    Authed(principal): Authed,
    Path((kind, name)): Path<(String, String)>,
    q: Result<Query<ScopeParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, Problem> {
    let p = params(q)?;
    let req = pb::HistoryRequest {
        scope: scope_of(p.scope.as_deref())? as i32,
        kind: kind_of(&kind)? as i32,
        name,
        page: Some(PageRequest {
            page_size: p.page_size.unwrap_or(0),
            page_token: p.page_token.unwrap_or_default(),
        }),
    };
    let resp = state
        .config_store
        .clone()
        .history(call(req, &principal))
        .await?
        .into_inner();
    Ok(Json(json!({
        "data": resp.versions.iter().map(document_json).collect::<Vec<_>>(),
        "next_page_token": resp.next_page_token,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    to_version: i64,
}

pub async fn rollback(
    State(state): State<AppState>,
    Authed(principal): Authed,
    Path((kind, name)): Path<(String, String)>,
    q: Result<Query<ScopeParams>, axum::extract::rejection::QueryRejection>,
    JsonBody(body): JsonBody<RollbackBody>,
) -> Result<Response, Problem> {
    let p = params(q)?;
    let req = pb::RollbackRequest {
        scope: scope_of(p.scope.as_deref())? as i32,
        kind: kind_of(&kind)? as i32,
        name,
        to_version: body.to_version,
    };
    let doc = state
        .config_store
        .clone()
        .rollback(call(req, &principal))
        .await?
        .into_inner()
        .document
        .unwrap_or_default();
    Ok(with_etag(&doc, StatusCode::OK))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyBody {
    operations: Vec<ApplyItem>,
    /// Check everything, write nothing.
    #[serde(default)]
    dry_run: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "op", rename_all = "lowercase")]
pub enum ApplyItem {
    Put {
        kind: String,
        name: String,
        #[serde(default)]
        scope: Option<String>,
        spec: Value,
        #[serde(default)]
        expected_version: Option<i64>,
    },
    Delete {
        kind: String,
        name: String,
        #[serde(default)]
        scope: Option<String>,
        #[serde(default)]
        expected_version: Option<i64>,
    },
}

pub async fn apply(
    State(state): State<AppState>,
    Authed(principal): Authed,
    JsonBody(body): JsonBody<ApplyBody>,
) -> Result<Json<Value>, Problem> {
    let mut operations = Vec::with_capacity(body.operations.len());
    for (i, item) in body.operations.iter().cloned().enumerate() {
        let at = |p: Problem| Problem::bad_request(format!("operations[{i}]: {}", p.detail));
        let op = match item {
            ApplyItem::Put {
                kind,
                name,
                scope,
                spec,
                expected_version,
            } => pb::apply_operation::Op::Put(pb::PutRequest {
                scope: scope_of(scope.as_deref()).map_err(at)? as i32,
                kind: kind_of(&kind).map_err(at)? as i32,
                name,
                spec_json: spec.to_string(),
                expected_version,
            }),
            ApplyItem::Delete {
                kind,
                name,
                scope,
                expected_version,
            } => pb::apply_operation::Op::Delete(pb::DeleteRequest {
                scope: scope_of(scope.as_deref()).map_err(at)? as i32,
                kind: kind_of(&kind).map_err(at)? as i32,
                name,
                expected_version,
            }),
        };
        operations.push(pb::ApplyOperation { op: Some(op) });
    }
    let resp = state
        .config_store
        .clone()
        .apply(call(
            pb::ApplyRequest {
                operations,
                validate_only: body.dry_run,
            },
            &principal,
        ))
        .await?
        .into_inner();
    Ok(Json(json!({
        "revision": resp.revision,
        "dry_run": body.dry_run,
        "data": resp.documents.iter().map(document_json).collect::<Vec<_>>(),
    })))
}
