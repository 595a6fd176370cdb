//! The crate's one error type and its mapping to gRPC status classes.

use crewmesh_kit::status::{ErrorClass, ServiceError};

pub type Result<T, E = AgentRuntimeError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum AgentRuntimeError {
    /// The request is malformed; the message names the field and the problem.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("run `{0}` not found")]
    RunNotFound(String),
    #[error("agent `{0}` not found")]
    AgentNotFound(String),
    #[error(
        "no config service configured: named agents need peers.config (inline agents work without it)"
    )]
    NoConfigService,
    /// The agent document exists but this runtime cannot run it.
    #[error("agent `{name}`: {problem}")]
    UnusableAgent { name: String, problem: String },
    /// The config service answered an error the caller should see.
    #[error("config service: {message}")]
    Config { class: ErrorClass, message: String },
    /// The config service refused the runtime itself or failed internally.
    #[error("config service call failed: {0}")]
    ConfigInternal(tonic::Status),
    #[error("database error: {0}")]
    Store(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored run `{id}` is unreadable: {problem}")]
    Corrupt { id: String, problem: String },
    #[error("run `{0}` vanished from the store while it was executing")]
    RunVanished(String),
    #[error("cannot read the database password file {path}: {source}")]
    PasswordFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Settings(#[from] crewmesh_kit::settings::ConfigError),
    #[error(transparent)]
    Tls(#[from] crewmesh_kit::tls::TlsError),
    #[error(transparent)]
    Server(#[from] crewmesh_kit::server::ServerError),
    #[error(transparent)]
    Peer(#[from] crewmesh_kit::clients::PeerError),
    #[error(transparent)]
    Identity(#[from] crewmesh_kit::identity::SpiffeIdError),
}

impl ServiceError for AgentRuntimeError {
    fn class(&self) -> ErrorClass {
        match self {
            AgentRuntimeError::InvalidArgument(_) => ErrorClass::InvalidArgument,
            AgentRuntimeError::RunNotFound(_) | AgentRuntimeError::AgentNotFound(_) => {
                ErrorClass::NotFound
            }
            AgentRuntimeError::NoConfigService | AgentRuntimeError::UnusableAgent { .. } => {
                ErrorClass::FailedPrecondition
            }
            AgentRuntimeError::Config { class, .. } => *class,
            AgentRuntimeError::ConfigInternal(_)
            | AgentRuntimeError::Store(_)
            | AgentRuntimeError::Migrate(_)
            | AgentRuntimeError::Corrupt { .. }
            | AgentRuntimeError::RunVanished(_)
            | AgentRuntimeError::PasswordFile { .. }
            | AgentRuntimeError::Settings(_)
            | AgentRuntimeError::Tls(_)
            | AgentRuntimeError::Server(_)
            | AgentRuntimeError::Peer(_)
            | AgentRuntimeError::Identity(_) => ErrorClass::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crewmesh_kit::status::to_status;
    use tonic::Code;

    #[test]
    fn errors_cross_threads() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<AgentRuntimeError>();
    }

    #[test]
    fn caller_errors_keep_their_message_and_internal_ones_do_not_leak() {
        let s = to_status(&AgentRuntimeError::AgentNotFound("x".into()));
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "agent `x` not found");

        let s = to_status(&AgentRuntimeError::NoConfigService);
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(
            s.message().starts_with("no config service configured"),
            "{}",
            s.message()
        );

        let s = to_status(&AgentRuntimeError::Corrupt {
            id: "r".into(),
            problem: "secret detail".into(),
        });
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("secret detail"), "{}", s.message());
    }
}
