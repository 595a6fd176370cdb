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
            RouterError::InvalidRequest(_) | RouterError::UpstreamRejected { .. } => {
                ErrorClass::InvalidArgument
            }
            RouterError::UnknownModel(_) => ErrorClass::NotFound,
            RouterError::UnknownProvider { .. } | RouterError::UnsupportedProvider(_) => {
                ErrorClass::FailedPrecondition
            }
            RouterError::AllDeploymentsFailed { .. } | RouterError::NotReady => {
                ErrorClass::Unavailable
            }
            RouterError::UpstreamRateLimited(_) => ErrorClass::ResourceExhausted,
            RouterError::Startup(_) | RouterError::Server(_) => ErrorClass::Internal,
        }
    }
}

impl From<RouterError> for tonic::Status {
    fn from(e: RouterError) -> Self {
        crewmesh_kit::status::to_status(&e)
    }
}
