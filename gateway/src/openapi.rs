//! `GET /openapi.json`: the OpenAPI 3.1 description of the HTTP API, generated from the
//! request and response types of the code (utoipa). Every operation lists its problem
//! (RFC 7807) answers and the two bearer schemes; a test checks that every route the
//! API registers is described, so the document cannot drift from the router.

use std::sync::OnceLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use crewmesh_openai::{ChatChunk, ChatRequest, ChatResponse};
use serde_json::Value;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::problem::ProblemBody;
use crate::routes::audit::{AuditParams, ExportParams, PageParams, ReportParams, VerifyParams};
use crate::routes::keys::{CreateKey, TenantParam};
use crate::routes::runs::StartRun;
use crate::routes::usage::UsageParams;

/// One model of `GET /v1/models`.
#[derive(ToSchema)]
#[allow(dead_code)]
struct Model {
    id: String,
    /// Always `model`.
    object: String,
    created: i64,
    owned_by: String,
}

/// `GET /v1/models`.
#[derive(ToSchema)]
#[allow(dead_code)]
struct ModelList {
    /// Always `list`.
    object: String,
    data: Vec<Model>,
}

/// A JSON object whose members are described by the operation.
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
struct JsonObject(Value);

/// Problem answers every authenticated operation may give.
const COMMON_PROBLEMS: [(&str, &str); 8] = [
    ("400", "invalid request: the detail names the parameter"),
    (
        "401",
        "no, malformed, unknown, revoked or expired credential",
    ),
    (
        "403",
        "the caller's roles do not grant the route's permission",
    ),
    ("431", "too many or too large request header fields"),
    ("500", "internal error"),
    ("503", "a service behind the gateway is unavailable"),
    ("504", "the request took longer than the request timeout"),
    ("404", "not found (unknown resource, or another tenant's)"),
];

struct Edge;

impl Modify for Edge {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("crewmesh API key")
                    .description(Some("`Authorization: Bearer cm_...`"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "oidc",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "an OIDC access token of the configured issuer and audience",
                    ))
                    .build(),
            ),
        );
        let problem = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/problem+json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Problem")))
                        .build(),
                )
                .build()
        };
        for (path, item) in api.paths.paths.iter_mut() {
            if path == "/openapi.json" {
                continue;
            }
            for op in operations(item) {
                for (code, description) in COMMON_PROBLEMS {
                    op.responses
                        .responses
                        .entry(code.to_owned())
                        .or_insert_with(|| problem(description).into());
                }
            }
        }
    }
}

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
        item.head.as_mut(),
    ]
    .into_iter()
    .flatten()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "crewmesh gateway",
        description = "The HTTP API of crewmesh. Every error is an RFC 7807 problem document (`application/problem+json`). See docs/api.md.",
    ),
    paths(
        chat_completions, models, usage, runs_start, runs_get, audit_events, audit_export,
        audit_verify, audit_checkpoints, audit_public_key, audit_report, config_apply,
        config_schema, config_list, config_get, config_put, config_delete, config_history,
        config_rollback, ofrep_all, ofrep_one, keys_create, keys_list, keys_revoke, openapi_json,
    ),
    components(schemas(ProblemBody, ChatChunk)),
    modifiers(&Edge),
    security(("api_key" = []), ("oidc" = [])),
    tags(
        (name = "models", description = "OpenAI-compatible chat completions"),
        (name = "runs", description = "Agent runs"),
        (name = "usage", description = "Usage and spend"),
        (name = "audit", description = "The audit trail"),
        (name = "config", description = "Config documents"),
        (name = "flags", description = "OpenFeature remote evaluation"),
        (name = "keys", description = "API keys"),
        (name = "meta", description = "This description"),
    ),
)]
struct ApiDoc;

/// The OpenAPI document of the HTTP API.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// `GET /openapi.json`, served without authentication; built once.
pub async fn serve() -> Response {
    static JSON: OnceLock<Vec<u8>> = OnceLock::new();
    let body = JSON.get_or_init(|| serde_json::to_vec(&document()).unwrap_or_default());
    let mut resp = body.clone().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

// The operations. The handlers live in `routes`; these carry their descriptions.

/// Chat completion (OpenAI-compatible).
///
/// With `stream: true` the answer is `text/event-stream`: `data: {chat.completion.chunk}`
/// events, then `data: [DONE]`; a failure after the first chunk ends the stream with a
/// `data: {"error": ...}` event. Counts against the tenant's and key's rate limits and
/// monthly budgets.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "models",
    request_body = ChatRequest,
    responses(
        (status = 200, description = "the completion, or with `stream: true` its events",
            content((ChatResponse = "application/json"), (ChatChunk = "text/event-stream")),
            headers(
                ("x-crewmesh-deployment" = String, description = "the deployment that answered"),
                ("x-crewmesh-cost-usd" = String, description = "the call's cost"),
            )),
        (status = 402, description = "the tenant's or the key's monthly budget is used up",
            body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "body over 4 MiB", body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "the body is not JSON", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "a rate limit is reached (`Retry-After`)", body = ProblemBody,
            content_type = "application/problem+json", headers(("retry-after" = u64))),
    ))]
#[allow(dead_code)]
fn chat_completions() {}

/// The model aliases the caller's tenant may use.
#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses((status = 200, description = "OpenAI list shape", body = ModelList)))]
#[allow(dead_code)]
fn models() {}

/// The tenant's usage records, newest first, and spend by model.
#[utoipa::path(get, path = "/v1/usage", tag = "usage", params(UsageParams),
    responses((status = 200, description = "`data` (records), `next_page_token`, `spend`", body = JsonObject)))]
#[allow(dead_code)]
fn usage() {}

/// Start a one-step agent run.
#[utoipa::path(post, path = "/v1/runs", tag = "runs", request_body = StartRun,
    responses((status = 202, description = "the run (`pending` or `running`)", body = JsonObject)))]
#[allow(dead_code)]
fn runs_start() {}

/// A run of the caller's tenant.
#[utoipa::path(get, path = "/v1/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "the run id")),
    responses((status = 200, description = "the run: `status`, `output`, `error`, `steps`, `usage`, `cost_usd`", body = JsonObject)))]
#[allow(dead_code)]
fn runs_get() {}

/// The tenant's audit events, newest first.
#[utoipa::path(get, path = "/v1/audit/events", tag = "audit", params(AuditParams),
    responses((status = 200, description = "`data` (events with `sequence`, `prev_hash`, `hash`), `next_page_token`", body = JsonObject)))]
#[allow(dead_code)]
fn audit_events() {}

/// The tenant's matching events, oldest first, streamed.
#[utoipa::path(get, path = "/v1/audit/export", tag = "audit", params(ExportParams),
    responses((status = 200, description = "JSON lines or CSV",
        content(("application/x-ndjson"), ("text/csv")))))]
#[allow(dead_code)]
fn audit_export() {}

/// Recomputes the hash chain and checks the signed checkpoints.
#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit", params(VerifyParams),
    responses((status = 200, description = "`ok`, `events_verified`, `checkpoints_verified`, `head_hash`, `first_broken`", body = JsonObject)))]
#[allow(dead_code)]
fn audit_verify() {}

/// Signed checkpoints, oldest first.
#[utoipa::path(get, path = "/v1/audit/checkpoints", tag = "audit", params(PageParams),
    responses((status = 200, description = "`data`, `next_page_token`, `public_key`", body = JsonObject)))]
#[allow(dead_code)]
fn audit_checkpoints() {}

/// The Ed25519 public key that verifies checkpoints.
#[utoipa::path(get, path = "/v1/audit/public-key", tag = "audit",
    responses((status = 200, description = "`public_key` (base64 of the raw 32 bytes)", body = JsonObject)))]
#[allow(dead_code)]
fn audit_public_key() {}

/// A compliance report of the tenant for a period.
#[utoipa::path(get, path = "/v1/audit/report", tag = "audit", params(ReportParams),
    responses((status = 200, description = "the report",
        content((JsonObject = "application/json"), ("text/markdown")))))]
#[allow(dead_code)]
fn audit_report() {}

/// Several config writes at one revision, or none.
#[utoipa::path(post, path = "/v1/config/apply", tag = "config",
    request_body(content = JsonObject, description = "`{\"operations\": [{\"op\": \"put\" | \"delete\", \"kind\", \"name\", \"scope\", \"spec\", \"expected_version\"}]}`"),
    responses(
        (status = 200, description = "the revision and the written documents", body = JsonObject),
        (status = 409, description = "a compare-and-set lost", body = ProblemBody, content_type = "application/problem+json"),
    ))]
#[allow(dead_code)]
fn config_apply() {}

/// The JSON Schema of a document kind.
#[utoipa::path(get, path = "/v1/config/schemas/{kind}", tag = "config",
    params(("kind" = String, Path, description = "provider, model, agent, crew, tool, tenant, apikey or flag")),
    responses((status = 200, description = "a JSON Schema", body = JsonObject)))]
#[allow(dead_code)]
fn config_schema() {}

/// The documents of a kind.
#[utoipa::path(get, path = "/v1/config/{kind}", tag = "config",
    params(("kind" = String, Path), ("scope" = Option<String>, Query, description = "`global` for `_global` documents")),
    responses((status = 200, description = "`data` (documents)", body = JsonObject)))]
#[allow(dead_code)]
fn config_list() {}

/// One document (`ETag` is its version).
#[utoipa::path(get, path = "/v1/config/{kind}/{name}", tag = "config",
    params(("kind" = String, Path), ("name" = String, Path), ("scope" = Option<String>, Query)),
    responses((status = 200, description = "the document", body = JsonObject, headers(("etag" = String)))))]
#[allow(dead_code)]
fn config_get() {}

/// Write a document; `If-Match` or `If-None-Match: *` make it compare-and-set.
#[utoipa::path(put, path = "/v1/config/{kind}/{name}", tag = "config",
    params(("kind" = String, Path), ("name" = String, Path), ("scope" = Option<String>, Query),
        ("if-match" = Option<String>, Header), ("if-none-match" = Option<String>, Header)),
    request_body(content = JsonObject, description = "the spec"),
    responses(
        (status = 200, description = "the written document", body = JsonObject),
        (status = 201, description = "the created document", body = JsonObject),
        (status = 409, description = "the version is stale", body = ProblemBody, content_type = "application/problem+json"),
    ))]
#[allow(dead_code)]
fn config_put() {}

/// Delete a document.
#[utoipa::path(delete, path = "/v1/config/{kind}/{name}", tag = "config",
    params(("kind" = String, Path), ("name" = String, Path), ("scope" = Option<String>, Query)),
    responses((status = 200, description = "`deleted`, `revision`", body = JsonObject)))]
#[allow(dead_code)]
fn config_delete() {}

/// Earlier versions of a document, newest first.
#[utoipa::path(get, path = "/v1/config/{kind}/{name}/history", tag = "config",
    params(("kind" = String, Path), ("name" = String, Path), ("scope" = Option<String>, Query),
        ("page_size" = Option<u32>, Query), ("page_token" = Option<String>, Query)),
    responses((status = 200, description = "`data` (versions), `next_page_token`", body = JsonObject)))]
#[allow(dead_code)]
fn config_history() {}

/// Write an earlier version again as a new version.
#[utoipa::path(post, path = "/v1/config/{kind}/{name}/rollback", tag = "config",
    params(("kind" = String, Path), ("name" = String, Path), ("scope" = Option<String>, Query)),
    request_body(content = JsonObject, description = "`{\"to_version\": N}`"),
    responses((status = 200, description = "the written document", body = JsonObject)))]
#[allow(dead_code)]
fn config_rollback() {}

/// Evaluate every flag (OFREP bulk evaluation).
#[utoipa::path(post, path = "/ofrep/v1/evaluate/flags", tag = "flags",
    request_body(content = JsonObject, description = "`{\"context\": {\"targetingKey\", ...}}`"),
    responses(
        (status = 200, description = "`flags`", body = JsonObject, headers(("etag" = String))),
        (status = 304, description = "unchanged since `If-None-Match`"),
    ))]
#[allow(dead_code)]
fn ofrep_all() {}

/// Evaluate one flag (OFREP).
#[utoipa::path(post, path = "/ofrep/v1/evaluate/flags/{key}", tag = "flags",
    params(("key" = String, Path, description = "the flag key")),
    request_body(content = JsonObject, description = "`{\"context\": {\"targetingKey\", ...}}`"),
    responses((status = 200, description = "`key`, `value`, `reason`, `variant`, `metadata`", body = JsonObject)))]
#[allow(dead_code)]
fn ofrep_one() {}

/// Create an API key; the secret is in the answer only this once.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKey,
    responses((status = 201, description = "`key`, `id`, `tenant`, `roles`, `expires_at`", body = JsonObject)))]
#[allow(dead_code)]
fn keys_create() {}

/// The tenant's keys, without secrets or digests.
#[utoipa::path(get, path = "/v1/keys", tag = "keys", params(TenantParam),
    responses((status = 200, description = "`data` (keys)", body = JsonObject)))]
#[allow(dead_code)]
fn keys_list() {}

/// Revoke a key.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "the key id"), TenantParam),
    responses((status = 200, description = "`id`, `revoked`", body = JsonObject)))]
#[allow(dead_code)]
fn keys_revoke() {}

/// This document (no authentication).
#[utoipa::path(get, path = "/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "OpenAPI 3.1", body = JsonObject)))]
#[allow(dead_code)]
fn openapi_json() {}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(method, path)` of every route `api()` registers, read from its source, except
    /// the ones answered by `routes::not_implemented` (documented as 501 in docs/api.md).
    fn registered_routes() -> Vec<(String, String)> {
        let src = include_str!("lib.rs");
        let start = src.find("pub fn api(").expect("api() in lib.rs");
        let end = start
            + src[start..]
                .find(".fallback(")
                .expect("a fallback in api()");
        let body = &src[start..end];
        let mut out = Vec::new();
        for chunk in body.split(".route(").skip(1) {
            let path = chunk.split('"').nth(1).expect("a path literal").to_owned();
            // The handler expression ends at the route's closing parenthesis.
            let mut depth = 1;
            let expr: String = chunk
                .chars()
                .take_while(|c| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth > 0
                })
                .collect();
            if expr.contains("not_implemented") {
                continue;
            }
            let flat: String = expr.split_whitespace().collect();
            for method in ["get", "post", "put", "delete", "patch"] {
                if flat.contains(&format!("({method}("))
                    || flat.contains(&format!(",{method}("))
                    || flat.contains(&format!(".{method}("))
                    || flat.contains(&format!("::{method}("))
                {
                    out.push((method.to_owned(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn every_registered_route_is_described() {
        let routes = registered_routes();
        assert!(routes.len() >= 25, "{routes:?}");
        assert!(routes.contains(&("get".into(), "/openapi.json".into())));
        let doc = serde_json::to_value(document()).unwrap();
        for (method, path) in &routes {
            assert!(
                doc["paths"][path][method].is_object(),
                "{method} {path} is registered in api() but not described in /openapi.json"
            );
        }
        // And nothing is described that the router does not serve.
        let described: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|item| item.as_object().unwrap().len())
            .sum();
        assert_eq!(described, routes.len());
    }

    #[test]
    fn the_document_is_openapi_3_with_problems_and_security() {
        let v = serde_json::to_value(document()).unwrap();
        assert_eq!(v["openapi"], "3.1.0");
        assert_eq!(v["info"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["info"]["title"], "crewmesh gateway");
        // Every operation has responses, and each response a description.
        for (path, item) in v["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.contains_key("200")
                        || responses.contains_key("201")
                        || responses.contains_key("202"),
                    "{method} {path}"
                );
                for (code, r) in responses {
                    assert!(r["description"].is_string(), "{method} {path} {code}");
                }
            }
        }
        let schemes = &v["components"]["securitySchemes"];
        assert_eq!(schemes["api_key"]["scheme"], "bearer");
        assert_eq!(schemes["oidc"]["bearerFormat"], "JWT");
        assert_eq!(
            v["security"],
            serde_json::json!([{"api_key": []}, {"oidc": []}])
        );
        let chat = &v["paths"]["/v1/chat/completions"]["post"];
        assert_eq!(
            chat["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ChatRequest"
        );
        assert_eq!(
            chat["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ChatResponse"
        );
        for code in ["401", "402", "403", "429", "431", "504"] {
            assert_eq!(
                chat["responses"][code]["content"]["application/problem+json"]["schema"]["$ref"],
                "#/components/schemas/Problem",
                "{code}"
            );
        }
        let problem = &v["components"]["schemas"]["Problem"];
        for field in ["type", "title", "status", "detail", "error"] {
            assert!(problem["properties"][field].is_object(), "{field}");
        }
        // Served without authentication, so it declares none.
        assert_eq!(
            v["paths"]["/openapi.json"]["get"]["security"],
            serde_json::json!([{}])
        );
        assert!(
            v["paths"]["/openapi.json"]["get"]["responses"]["401"].is_null(),
            "no auth problems on the public document"
        );
        // Every referenced schema exists.
        let mut refs = Vec::new();
        collect_refs(&v, &mut refs);
        for r in refs {
            let name = r.strip_prefix("#/components/schemas/").unwrap();
            assert!(v["components"]["schemas"][name].is_object(), "{r} dangles");
        }
    }

    fn collect_refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "$ref" {
                        out.push(x.as_str().unwrap().to_owned());
                    } else {
                        collect_refs(x, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
            _ => {}
        }
    }
}
