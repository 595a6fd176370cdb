//! Request extractors: the authenticated principal and JSON bodies with precise,
//! RFC 7807 errors.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use crewmesh_kit::principal::Principal;
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::problem::Problem;

/// The caller, authenticated by API key (or OIDC token) and authorised for the route
/// by the `authorize` middleware, which leaves the principal in the request.
pub struct Authed(pub Arc<Principal>);

/// The principal the `authorize` middleware established for a request.
#[derive(Clone)]
pub(crate) struct Authenticated(pub Arc<Principal>);

impl FromRequestParts<AppState> for Authed {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(Authenticated(p)) = parts.extensions.get::<Authenticated>() {
            return Ok(Authed(p.clone()));
        }
        let keys = state.keys.load();
        let entry = keys.authenticate(&parts.headers)?;
        tracing::Span::current().record("subject", entry.principal.subject.as_str());
        Ok(Authed(entry.principal.clone()))
    }
}

/// A JSON body. Errors name the problem (and, from serde, the field and position).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(axum::http::header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("");
            if !ct.starts_with("application/json") && !ct.is_empty() {
                return Err(Problem::new(
                    axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported-media-type",
                    "Unsupported media type",
                    format!("send the body as application/json, not {ct}"),
                ));
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            Problem::new(
                e.status(),
                "invalid-body",
                "Invalid request body",
                e.body_text(),
            )
        })?;
        if bytes.is_empty() {
            return Err(Problem::bad_request(
                "the request body is empty; send a JSON object",
            ));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| Problem::bad_request(format!("invalid JSON body: {e}")))
    }
}
