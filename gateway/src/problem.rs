//! RFC 7807 problem details: every error the gateway returns, in one shape.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic::Code;

/// Base of the `type` URIs; each problem type is documented in docs/api.md.
pub const TYPE_BASE: &str = "https://crewmesh.dev/problems/";

/// A problem document. Boxed so that `Result<T, Problem>` stays small.
#[derive(Debug, Clone)]
pub struct Problem(Box<ProblemBody>);

impl std::ops::Deref for Problem {
    type Target = ProblemBody;

    fn deref(&self) -> &ProblemBody {
        &self.0
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Problem)]
pub struct ProblemBody {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// OpenAI SDKs read `error.message`; include it so their exceptions are useful.
    pub error: OpenAiError,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OpenAiError {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub code: String,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        let detail = detail.into();
        let openai_type = match status.as_u16() {
            400 | 404 | 409 | 413 | 415 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            _ => "api_error",
        };
        Self(Box::new(ProblemBody {
            kind: format!("{TYPE_BASE}{slug}"),
            title,
            status: status.as_u16(),
            detail: detail.clone(),
            request_id: None,
            error: OpenAiError {
                message: detail,
                kind: openai_type,
                code: slug.to_owned(),
            },
        }))
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid-request",
            "Invalid request",
            detail,
        )
    }

    pub fn unauthenticated(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Authentication required",
            detail,
        )
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            detail,
        )
    }

    pub fn not_implemented(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            "not-implemented",
            "Not implemented",
            format!("{what} is not implemented yet"),
        )
    }

    /// Maps a status from a mesh service. Internal details were already hidden by
    /// the service; the message is safe to show.
    pub fn from_status(status: &tonic::Status) -> Self {
        let (code, slug, title) = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => (
                StatusCode::BAD_REQUEST,
                "invalid-request",
                "Invalid request",
            ),
            Code::NotFound => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            Code::AlreadyExists => (StatusCode::CONFLICT, "already-exists", "Already exists"),
            Code::Aborted => (StatusCode::CONFLICT, "conflict", "Conflict"),
            Code::FailedPrecondition => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "failed-precondition",
                "Failed precondition",
            ),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            Code::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Authentication required",
            ),
            Code::ResourceExhausted => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
            ),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout", "Upstream timeout"),
            Code::Unimplemented => (
                StatusCode::NOT_IMPLEMENTED,
                "not-implemented",
                "Not implemented",
            ),
            Code::Unavailable | Code::Cancelled => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
            _ => return Self::internal(status.message()),
        };
        Self::new(code, slug, title, status.message().to_owned())
    }

    pub fn with_request_id(mut self, id: &str) -> Self {
        self.0.request_id = Some(id.to_owned());
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&*self.0).unwrap_or_default();
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        resp
    }
}

impl From<tonic::Status> for Problem {
    fn from(s: tonic::Status) -> Self {
        Problem::from_status(&s)
    }
}
