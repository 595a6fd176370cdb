//! The one place where failures of the simulated upstream become HTTP responses in the
//! OpenAI error format (`{"error":{"message","type","param"?,"code"}}`).

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::wire::{ErrorBody, ErrorDetail};

/// Result alias for this crate.
pub(crate) type Result<T, E = ApiError> = std::result::Result<T, E>;

/// Everything the simulated upstream can answer with instead of a completion.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The body is not JSON at all.
    #[error("we could not parse the JSON body of your request: {0}")]
    InvalidJson(String),
    /// The body is JSON but breaks the chat-completions schema.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// The body is over the size limit.
    #[error("the request body exceeds the {limit_mib} MiB limit of the simulated upstream", limit_mib = crate::routes::MAX_BODY_BYTES / (1024 * 1024))]
    BodyTooLarge,
    /// The body could not be read (client went away, bad framing).
    #[error("could not read the request body: {0}")]
    BodyUnreadable(String),
    /// The `x-sim-fault` header holds a value we do not know.
    #[error(
        "unknown x-sim-fault value {0:?}; expected one of error-500, error-429, error-400, \
         slow-<ms>, stream-break, hang, none"
    )]
    UnknownFault(String),
    /// Injected fault `error-500`.
    #[error("simulated upstream failure")]
    SimulatedServerError,
    /// Injected fault `error-429`, or a rate limit set at run time.
    #[error("simulated rate limit exceeded")]
    SimulatedRateLimit { retry_after_s: u64 },
    /// An error status set at run time (`error_rate`/`error_status`).
    #[error("simulated upstream failure")]
    SimulatedStatus(StatusCode),
    /// `GET`/`DELETE /_sim/faults/{model}` for a model without settings.
    #[error("no simulated fault settings for model {0:?}")]
    NoFaultSettings(String),
    /// Injected fault `error-400`.
    #[error("simulated invalid request")]
    SimulatedBadRequest,
    /// A `slow-*` or `hang` request was cut short because the server is draining.
    #[error("the simulated upstream is shutting down")]
    ShuttingDown,
    /// No route for this method and path.
    #[error("unknown request URL: {method} {path} (simulated upstream)")]
    NotFound { method: String, path: String },
    /// Encoding our own response failed; the cause is logged, not returned.
    #[error("the simulated upstream failed to encode its response")]
    Encode(#[from] serde_json::Error),
}

impl ApiError {
    /// A schema violation without a specific parameter.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: None,
        }
    }

    /// A schema violation naming the offending parameter.
    pub(crate) fn invalid_param(message: impl Into<String>, param: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// Maps a failure to read the body.
    pub(crate) fn from_body_rejection(rejection: &BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::BodyTooLarge
        } else {
            Self::BodyUnreadable(rejection.body_text())
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_)
            | Self::InvalidRequest { .. }
            | Self::BodyUnreadable(_)
            | Self::UnknownFault(_)
            | Self::SimulatedBadRequest => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::SimulatedServerError | Self::Encode(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::SimulatedRateLimit { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::SimulatedStatus(status) => *status,
            Self::NoFaultSettings(_) => StatusCode::NOT_FOUND,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
        }
    }

    fn error_type(&self) -> &'static str {
        match self {
            Self::InvalidJson(_)
            | Self::InvalidRequest { .. }
            | Self::BodyTooLarge
            | Self::BodyUnreadable(_)
            | Self::UnknownFault(_)
            | Self::SimulatedBadRequest
            | Self::NotFound { .. }
            | Self::NoFaultSettings(_) => "invalid_request_error",
            Self::SimulatedServerError | Self::ShuttingDown | Self::Encode(_) => "server_error",
            Self::SimulatedStatus(status) if status.is_server_error() => "server_error",
            Self::SimulatedStatus(_) => "invalid_request_error",
            Self::SimulatedRateLimit { .. } => "requests",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            Self::SimulatedRateLimit { .. } => Some("rate_limit_exceeded"),
            Self::NotFound { .. } => Some("unknown_url"),
            _ => None,
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            Self::InvalidRequest { param, .. } => param.clone(),
            _ => None,
        }
    }

    /// The JSON body this error is answered with.
    pub(crate) fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.error_type(),
                param: self.param(),
                code: self.code(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Encode(cause) = &self {
            tracing::error!(error = %cause, "failed to encode a simulated response");
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        if let Self::SimulatedRateLimit { retry_after_s } = self {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry_after_s));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_json(err: &ApiError) -> String {
        serde_json::to_string(&err.body()).expect("error bodies encode")
    }

    #[test]
    fn server_error_has_the_exact_openai_shape() {
        assert_eq!(
            body_json(&ApiError::SimulatedServerError),
            r#"{"error":{"message":"simulated upstream failure","type":"server_error","code":null}}"#
        );
        assert_eq!(
            ApiError::SimulatedServerError.status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn invalid_request_names_the_param() {
        let err = ApiError::invalid_param("missing required parameter: 'messages'", "messages");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            body_json(&err),
            r#"{"error":{"message":"missing required parameter: 'messages'","type":"invalid_request_error","param":"messages","code":null}}"#
        );
    }

    #[test]
    fn rate_limit_sets_retry_after() {
        let response = ApiError::SimulatedRateLimit { retry_after_s: 1 }.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            response.headers().get(RETRY_AFTER),
            Some(&HeaderValue::from_static("1"))
        );
        let response = ApiError::SimulatedRateLimit { retry_after_s: 30 }.into_response();
        assert_eq!(
            response.headers().get(RETRY_AFTER),
            Some(&HeaderValue::from_static("30"))
        );
    }

    #[test]
    fn injected_status_keeps_its_code_and_class() {
        let err = ApiError::SimulatedStatus(StatusCode::BAD_GATEWAY);
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            body_json(&err),
            r#"{"error":{"message":"simulated upstream failure","type":"server_error","code":null}}"#
        );
        let err = ApiError::SimulatedStatus(StatusCode::CONFLICT);
        assert_eq!(err.status(), StatusCode::CONFLICT);
        assert_eq!(err.error_type(), "invalid_request_error");
    }

    #[test]
    fn encode_errors_do_not_leak_their_cause() {
        let cause = serde_json::from_str::<u8>("\"secret detail\"").expect_err("not a number");
        let err = ApiError::from(cause);
        assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!body_json(&err).contains("secret"));
    }

    #[test]
    fn body_limit_message_names_the_limit() {
        assert_eq!(
            ApiError::BodyTooLarge.to_string(),
            "the request body exceeds the 4 MiB limit of the simulated upstream"
        );
    }
}
