//! The one place where service errors become `tonic::Status`. Internal causes are
//! logged once with their chain and never sent to the caller.

use tonic::{Code, Status};

/// The small set of failure classes a service reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    /// A compare-and-set lost: retry after re-reading.
    Conflict,
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    ResourceExhausted,
    /// A dependency is down; retrying later can succeed.
    Unavailable,
    DeadlineExceeded,
    Unimplemented,
    Internal,
}

impl ErrorClass {
    pub fn code(self) -> Code {
        match self {
            ErrorClass::InvalidArgument => Code::InvalidArgument,
            ErrorClass::NotFound => Code::NotFound,
            ErrorClass::AlreadyExists => Code::AlreadyExists,
            ErrorClass::Conflict => Code::Aborted,
            ErrorClass::FailedPrecondition => Code::FailedPrecondition,
            ErrorClass::PermissionDenied => Code::PermissionDenied,
            ErrorClass::Unauthenticated => Code::Unauthenticated,
            ErrorClass::ResourceExhausted => Code::ResourceExhausted,
            ErrorClass::Unavailable => Code::Unavailable,
            ErrorClass::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorClass::Unimplemented => Code::Unimplemented,
            ErrorClass::Internal => Code::Internal,
        }
    }
}

/// Implemented by each service's error enum.
pub trait ServiceError: std::error::Error {
    fn class(&self) -> ErrorClass;
}

/// Converts a service error into a status. Internal errors are logged with their
/// source chain and answered with a generic message carrying the trace id.
pub fn to_status<E: ServiceError>(err: &E) -> Status {
    let class = err.class();
    if class == ErrorClass::Internal {
        let mut chain = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        let trace_id = crate::telemetry::current_trace_id();
        tracing::error!(error = %chain, "internal error");
        return Status::internal(format!("internal error (trace id {trace_id})"));
    }
    Status::new(class.code(), err.to_string())
}

/// The answer of an RPC that a later release implements.
pub fn not_implemented(method: &str) -> Status {
    Status::unimplemented(format!("{method} is not implemented yet"))
}

/// Maps a gRPC code from a downstream call to the class a caller should see.
pub fn class_of_code(code: Code) -> ErrorClass {
    match code {
        Code::InvalidArgument | Code::OutOfRange => ErrorClass::InvalidArgument,
        Code::NotFound => ErrorClass::NotFound,
        Code::AlreadyExists => ErrorClass::AlreadyExists,
        Code::Aborted => ErrorClass::Conflict,
        Code::FailedPrecondition => ErrorClass::FailedPrecondition,
        Code::PermissionDenied => ErrorClass::PermissionDenied,
        Code::Unauthenticated => ErrorClass::Unauthenticated,
        Code::ResourceExhausted => ErrorClass::ResourceExhausted,
        Code::Unavailable | Code::Cancelled => ErrorClass::Unavailable,
        Code::DeadlineExceeded => ErrorClass::DeadlineExceeded,
        Code::Unimplemented => ErrorClass::Unimplemented,
        _ => ErrorClass::Internal,
    }
}
