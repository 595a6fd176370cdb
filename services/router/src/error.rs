//! The router's errors and their gRPC classes.

use crewmesh_kit::status::{ErrorClass, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("model `{0}` is not configured for this tenant (see GET /v1/models)")]
    UnknownModel(String),
    #[error("provider `{provider}` of deployment `{deployment}` is not configured")]
    UnknownProvider {
        deployment: String,
        provider: String,
    },
    #[error("provider type `{0}` is not supported by this router yet")]
    UnsupportedProvider(String),
    #[error("the upstream rejected the request ({status}): {message}")]
    UpstreamRejected { status: u16, message: String },
    #[error("every deployment of `{model}` failed; last error: {last}")]
    AllDeploymentsFailed { model: String, last: String },
    #[error("the upstream is rate limiting: {0}")]
    UpstreamRateLimited(String),
    #[error("the circuit breaker of deployment `{0}` is open")]
    BreakerOpen(String),
    #[error("deployment `{deployment}` is at its rate limit; retry in {}s", retry_after.as_secs().max(1))]
    DeploymentLimited {
        deployment: String,
        retry_after: std::time::Duration,
    },
    #[error(
        "the request (about {estimated} tokens with max_tokens) does not fit the context window of deployment `{deployment}` ({context_window} tokens)"
    )]
    ContextTooLong {
        deployment: String,
        context_window: u64,
        estimated: u64,
    },
    #[error("the caller's deadline passed before an upstream answered")]
    DeadlineExceeded,
    #[error("no deployment of `{model}` meets quality tier {quality_tier}")]
    NoEligibleDeployment { model: String, quality_tier: u32 },
    #[error("configuration not loaded yet")]
    NotReady,
    #[error("cannot start: {0}")]
    Startup(String),
    #[error(transparent)]
    Server(#[from] crewmesh_kit::server::ServerError),
}

impl ServiceError for RouterError {
    fn class(&self) -> ErrorClass {
        match self {
            RouterError::InvalidRequest(_)
            | RouterError::UpstreamRejected { .. }
            | RouterError::ContextTooLong { .. } => ErrorClass::InvalidArgument,
            RouterError::UnknownModel(_) => ErrorClass::NotFound,
            RouterError::UnknownProvider { .. } | RouterError::UnsupportedProvider(_) => {
                ErrorClass::FailedPrecondition
            }
            RouterError::AllDeploymentsFailed { .. }
            | RouterError::NotReady
            | RouterError::BreakerOpen(_) => ErrorClass::Unavailable,
            RouterError::UpstreamRateLimited(_) | RouterError::DeploymentLimited { .. } => {
                ErrorClass::ResourceExhausted
            }
            RouterError::DeadlineExceeded => ErrorClass::DeadlineExceeded,
            RouterError::NoEligibleDeployment { .. } => ErrorClass::FailedPrecondition,
            RouterError::Startup(_) | RouterError::Server(_) => ErrorClass::Internal,
        }
    }
}

impl From<RouterError> for tonic::Status {
    fn from(e: RouterError) -> Self {
        crewmesh_kit::status::to_status(&e)
    }
}
