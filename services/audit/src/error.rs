//! The audit service's one error type and its mapping to status classes.

use crewmesh_kit::status::{ErrorClass, ServiceError};

pub type Result<T, E = AuditError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// One event of an Append batch is invalid; the whole batch is refused.
    #[error("events[{index}].{field}: {problem}; nothing was appended")]
    InvalidEvent {
        index: usize,
        field: &'static str,
        problem: String,
    },
    #[error("invalid page token: pass the next_page_token of a previous response, unchanged")]
    InvalidPageToken,
    #[error("invalid filter: {0}")]
    InvalidFilter(String),
    #[error(transparent)]
    Config(#[from] crewmesh_kit::settings::ConfigError),
    #[error("cannot read the database password file {path}: {source}")]
    PasswordFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the chain head of `{chain}` is corrupt: {problem}")]
    CorruptHead { chain: String, problem: String },
    #[error("audit signing key {path}: {problem}")]
    SigningKey {
        path: std::path::PathBuf,
        problem: String,
    },
    #[error("verification task failed: {0}")]
    Verify(String),
    #[error("tls: {0}")]
    Tls(#[from] crewmesh_kit::tls::TlsError),
    #[error(transparent)]
    Server(#[from] crewmesh_kit::server::ServerError),
}

impl ServiceError for AuditError {
    fn class(&self) -> ErrorClass {
        match self {
            AuditError::InvalidEvent { .. }
            | AuditError::InvalidPageToken
            | AuditError::InvalidFilter(_)
            | AuditError::Config(_) => ErrorClass::InvalidArgument,
            AuditError::Database(e) if is_transient(e) => ErrorClass::Unavailable,
            AuditError::Database(_)
            | AuditError::PasswordFile { .. }
            | AuditError::Migrate(_)
            | AuditError::CorruptHead { .. }
            | AuditError::SigningKey { .. }
            | AuditError::Verify(_)
            | AuditError::Tls(_)
            | AuditError::Server(_) => ErrorClass::Internal,
        }
    }
}

/// Errors after which retrying the same call can succeed.
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            // Postgres serialization failure / deadlock; SQLite busy or locked.
            matches!(
                db.code().as_deref(),
                Some("40001" | "40P01" | "5" | "6" | "517" | "261" | "262")
            )
        }
        _ => false,
    }
}
