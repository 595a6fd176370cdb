//! The errors of the config service and its stores, and their classes.

use crewmesh_kit::status::{ErrorClass, ServiceError};

use crate::spec::SpecProblem;

/// Result alias for this crate.
pub type Result<T, E = ConfigServiceError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ConfigServiceError {
    /// A request field is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The document body breaks its kind's rules; every problem is listed.
    #[error("invalid {kind} spec: {}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    InvalidSpec {
        kind: &'static str,
        problems: Vec<SpecProblem>,
    },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("document {0} not found")]
    NotFound(String),
    /// The request is valid but the current documents do not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A delete would leave other documents with a reference that resolves to nothing.
    #[error("cannot delete {key}: still referenced by {}; change or delete those first", .referrers.join(", "))]
    StillReferenced { key: String, referrers: Vec<String> },
    /// A compare-and-set lost.
    #[error("version conflict on {key}: expected {expected}, but {current}")]
    Conflict {
        key: String,
        expected: String,
        current: String,
    },
    /// The backing store cannot be reached; retrying later can succeed.
    #[error("the config store ({backend}) is unavailable: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    /// A watch asked for changes the store no longer keeps.
    #[error(
        "changes after revision {requested} are no longer kept (compacted up to revision {compacted}): watch again with start_revision 0 to take a fresh snapshot"
    )]
    Compacted { requested: i64, compacted: i64 },
    /// A stored value is not a document value.
    #[error("stored value at {key} is not a config document: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("embedded store: {0}")]
    Database(#[from] sqlx::Error),
    #[error("embedded store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot open the embedded store at {path}: {source}")]
    OpenEmbedded {
        path: String,
        source: std::io::Error,
    },
    #[error("etcd: {0}")]
    Etcd(#[source] etcd_client::Error),
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crewmesh_kit::settings::ConfigError),
    #[error("cannot load the mesh tls material: {0}")]
    Tls(#[from] crewmesh_kit::tls::TlsError),
    #[error(transparent)]
    Server(#[from] crewmesh_kit::server::ServerError),
    #[error("cannot reach the audit service: {0}")]
    Peer(#[from] crewmesh_kit::clients::PeerError),
}

impl ServiceError for ConfigServiceError {
    fn class(&self) -> ErrorClass {
        match self {
            ConfigServiceError::InvalidArgument(_) | ConfigServiceError::InvalidSpec { .. } => {
                ErrorClass::InvalidArgument
            }
            ConfigServiceError::Unauthenticated(_) => ErrorClass::Unauthenticated,
            ConfigServiceError::PermissionDenied(_) => ErrorClass::PermissionDenied,
            ConfigServiceError::NotFound(_) => ErrorClass::NotFound,
            ConfigServiceError::Conflict { .. } => ErrorClass::Conflict,
            ConfigServiceError::Unavailable { .. } => ErrorClass::Unavailable,
            ConfigServiceError::Compacted { .. }
            | ConfigServiceError::StillReferenced { .. }
            | ConfigServiceError::FailedPrecondition(_) => ErrorClass::FailedPrecondition,
            ConfigServiceError::Corrupt { .. }
            | ConfigServiceError::Database(_)
            | ConfigServiceError::Migrate(_)
            | ConfigServiceError::OpenEmbedded { .. }
            | ConfigServiceError::Etcd(_)
            | ConfigServiceError::ReadFile { .. }
            | ConfigServiceError::Config(_)
            | ConfigServiceError::Tls(_)
            | ConfigServiceError::Server(_)
            | ConfigServiceError::Peer(_) => ErrorClass::Internal,
        }
    }
}

impl ConfigServiceError {
    /// A lost compare-and-set; `current` is the document's version, `None` if absent.
    pub(crate) fn conflict(key: impl ToString, expected: i64, current: Option<i64>) -> Self {
        let expected = if expected == 0 {
            "the document to be absent".to_owned()
        } else {
            format!("version {expected}")
        };
        let current = match current {
            Some(v) => format!("the current version is {v}"),
            None => "the document does not exist".to_owned(),
        };
        ConfigServiceError::Conflict {
            key: key.to_string(),
            expected,
            current,
        }
    }
}
