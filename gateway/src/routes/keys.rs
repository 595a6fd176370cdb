//! `POST /v1/keys`, `GET /v1/keys`, `DELETE /v1/keys/{id}`: API keys as `apikey` config
//! documents. A key is shown once, when it is created; only its SHA-256 is stored.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use crewmesh_kit::clients::with_principal;
use crewmesh_kit::principal::{Principal, Role, TenantId};
use crewmesh_proto::config::v1 as pb;
use crewmesh_proto::types::v1::PageRequest;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::AppState;
use crate::auth::{ApiKeySpec, DEFAULT_TENANT, KeyEntry, digest, generate_key};
use crate::extract::{Authed, JsonBody};
use crate::problem::Problem;

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    #[serde(default)]
    roles: Option<Vec<String>>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    expires_in_days: Option<u32>,
    #[serde(default)]
    rpm: Option<u64>,
    #[serde(default)]
    tpm: Option<u64>,
    /// Spend limit of the key per calendar month (UTC), besides the tenant's budget.
    #[serde(default)]
    budget_usd_month: Option<f64>,
    /// Another tenant; only for platform admins (admins of tenant `default`).
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TenantParam {
    tenant: Option<String>,
}

/// The principal to act as in `tenant`: the caller itself, or, for a platform admin
/// naming another tenant, an admin of that tenant with the caller's subject.
fn acting_principal(caller: &Principal, tenant: Option<&str>) -> Result<Principal, Problem> {
    let Some(tenant) = tenant.filter(|t| *t != caller.tenant.as_str()) else {
        return Ok(caller.clone());
    };
    let tenant = TenantId::parse(tenant).map_err(|e| Problem::bad_request(e.to_string()))?;
    if caller.tenant.as_str() != DEFAULT_TENANT || !caller.has_role(Role::Admin) {
        return Err(Problem::forbidden(format!(
            "managing the keys of tenant `{tenant}` needs the admin role in tenant `{DEFAULT_TENANT}`"
        )));
    }
    Ok(Principal {
        tenant,
        subject: caller.subject.clone(),
        roles: vec![Role::Admin],
    })
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn expiry(body: &CreateKey) -> Result<Option<String>, Problem> {
    let now = OffsetDateTime::now_utc();
    let at = match (&body.expires_at, body.expires_in_days) {
        (Some(_), Some(_)) => {
            return Err(Problem::bad_request(
                "send either expires_at or expires_in_days, not both",
            ));
        }
        (Some(t), None) => Some(OffsetDateTime::parse(t, &Rfc3339).map_err(|e| {
            Problem::bad_request(format!("expires_at: `{t}` is not an RFC 3339 time ({e})"))
        })?),
        (None, Some(0)) => return Err(Problem::bad_request("expires_in_days must be at least 1")),
        (None, Some(d)) => Some(now + time::Duration::days(i64::from(d))),
        (None, None) => None,
    };
    if let Some(at) = at
        && at <= now
    {
        return Err(Problem::bad_request("expires_at must be in the future"));
    }
    Ok(at.map(|t| {
        t.replace_nanosecond(0)
            .unwrap_or(t)
            .format(&Rfc3339)
            .unwrap_or_default()
    }))
}

fn key_json(doc: &pb::Document, spec: &ApiKeySpec) -> serde_json::Value {
    let expired = spec
        .expires_at
        .as_deref()
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .is_some_and(|t| t <= OffsetDateTime::now_utc());
    serde_json::json!({
        "id": doc.name,
        "object": "api_key",
        "tenant": doc.tenant,
        "roles": spec.roles,
        "expires_at": spec.expires_at,
        "expired": expired,
        "rpm": spec.rpm,
        "tpm": spec.tpm,
        "budget_usd_month": spec.budget_usd_month,
        "description": spec.description,
        "created_at": spec.created_at,
        "created_by": spec.created_by,
        "version": doc.version,
    })
}

pub async fn create(
    State(state): State<AppState>,
    Authed(caller): Authed,
    JsonBody(body): JsonBody<CreateKey>,
) -> Result<Response, Problem> {
    let acting = acting_principal(&caller, body.tenant.as_deref())?;
    let roles = body
        .roles
        .clone()
        .unwrap_or_else(|| vec![Role::Developer.as_str().to_owned()]);
    if roles.is_empty() {
        return Err(Problem::bad_request("roles: give at least one role"));
    }
    for r in &roles {
        Role::parse(r).map_err(|_| {
            Problem::bad_request(format!(
                "roles: unknown role `{r}` (use admin, operator, developer, auditor or viewer)"
            ))
        })?;
    }
    if body.description.as_ref().is_some_and(|d| d.len() > 512) {
        return Err(Problem::bad_request("description: at most 512 characters"));
    }
    if body
        .budget_usd_month
        .is_some_and(|b| !b.is_finite() || b < 0.0)
    {
        return Err(Problem::bad_request(
            "budget_usd_month: must be a non-negative number of US dollars",
        ));
    }
    let expires_at = expiry(&body)?;
    let key = generate_key();
    let id = format!("key-{}", hex::encode(rand::random::<[u8; 8]>()));
    let spec = ApiKeySpec {
        key_sha256: hex::encode(digest(&key)),
        tenant: acting.tenant.as_str().to_owned(),
        roles,
        expires_at,
        rpm: body.rpm,
        tpm: body.tpm,
        budget_usd_month: body.budget_usd_month,
        description: body.description,
        created_at: Some(now_rfc3339()),
        created_by: Some(caller.subject.clone()),
    };
    let spec_json =
        serde_json::to_string(&spec).map_err(|e| Problem::bad_request(e.to_string()))?;
    let doc = state
        .config_store
        .clone()
        .put(with_principal(
            pb::PutRequest {
                scope: pb::Scope::Tenant as i32,
                kind: pb::Kind::Apikey as i32,
                name: id.clone(),
                spec_json,
                expected_version: Some(0),
            },
            &acting,
        ))
        .await?
        .into_inner()
        .document
        .ok_or_else(|| Problem::from_status(&tonic::Status::internal("no document")))?;
    match KeyEntry::from_document(&doc) {
        Ok(entry) => state.key_source.created(doc.version, entry),
        Err(e) => tracing::error!(error = %e, "a key this gateway created is unusable"),
    }
    tracing::info!(key_id = %id, tenant = %acting.tenant, "api key created");
    let mut out = key_json(&doc, &spec);
    out["key"] = key.into();
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

pub async fn list(
    State(state): State<AppState>,
    Authed(caller): Authed,
    params: Result<Query<TenantParam>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, Problem> {
    let Query(p) = params.map_err(|e| Problem::bad_request(e.body_text()))?;
    let acting = acting_principal(&caller, p.tenant.as_deref())?;
    let mut data = Vec::new();
    let mut token = String::new();
    loop {
        let resp = state
            .config_store
            .clone()
            .list(with_principal(
                pb::ListRequest {
                    scope: pb::Scope::Tenant as i32,
                    kind: pb::Kind::Apikey as i32,
                    page: Some(PageRequest {
                        page_size: 500,
                        page_token: token.clone(),
                    }),
                },
                &acting,
            ))
            .await?
            .into_inner();
        for doc in &resp.documents {
            match serde_json::from_str::<ApiKeySpec>(&doc.spec_json) {
                Ok(spec) => data.push(key_json(doc, &spec)),
                Err(e) => {
                    tracing::warn!(key_id = %doc.name, error = %e, "unreadable apikey document")
                }
            }
        }
        if resp.next_page_token.is_empty() {
            break;
        }
        token = resp.next_page_token;
    }
    Ok(Json(serde_json::json!({
        "object": "list",
        "tenant": acting.tenant.as_str(),
        "data": data,
    })))
}

pub async fn revoke(
    State(state): State<AppState>,
    Authed(caller): Authed,
    Path(id): Path<String>,
    params: Result<Query<TenantParam>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, Problem> {
    let Query(p) = params.map_err(|e| Problem::bad_request(e.body_text()))?;
    let acting = acting_principal(&caller, p.tenant.as_deref())?;
    let mut config = state.config_store.clone();
    // Only apikey documents: the id must name an existing key of this tenant.
    config
        .get(with_principal(
            pb::GetRequest {
                scope: pb::Scope::Tenant as i32,
                kind: pb::Kind::Apikey as i32,
                name: id.clone(),
            },
            &acting,
        ))
        .await
        .map_err(|s| {
            if s.code() == tonic::Code::NotFound {
                Problem::not_found(format!("no API key `{id}` in tenant `{}`", acting.tenant))
            } else {
                Problem::from_status(&s)
            }
        })?;
    let revision = config
        .delete(with_principal(
            pb::DeleteRequest {
                scope: pb::Scope::Tenant as i32,
                kind: pb::Kind::Apikey as i32,
                name: id.clone(),
                expected_version: None,
            },
            &acting,
        ))
        .await?
        .into_inner()
        .revision;
    state
        .key_source
        .revoked(revision, acting.tenant.as_str(), &id);
    tracing::info!(key_id = %id, tenant = %acting.tenant, "api key revoked");
    Ok(Json(serde_json::json!({
        "id": id,
        "object": "api_key",
        "tenant": acting.tenant.as_str(),
        "revoked": true,
    })))
}
