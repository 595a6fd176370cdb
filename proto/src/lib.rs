//! The gRPC contracts of crewmesh, generated from `proto/crewmesh/**/*.proto`.
//!
//! This crate is the only place code generation happens. It re-exports `tonic` and
//! `prost` so that every service uses the same versions, and it carries the encoded
//! descriptor set that the services register for gRPC server reflection.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub use prost;
pub use prost_types;
pub use tonic;

/// Encoded `FileDescriptorSet` of every crewmesh proto (with its imports), for
/// `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/crewmesh_descriptor.bin"));

pub mod codec;

/// Shared messages (`crewmesh.types.v1`).
pub mod types {
    pub mod v1 {
        tonic::include_proto!("crewmesh.types.v1");
    }
}

/// Model routing (`crewmesh.router.v1`).
pub mod router {
    pub mod v1 {
        tonic::include_proto!("crewmesh.router.v1");
    }
}

/// Agent and crew runs (`crewmesh.agent.v1`).
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("crewmesh.agent.v1");
    }
}

/// Audit log (`crewmesh.audit.v1`).
pub mod audit {
    pub mod v1 {
        tonic::include_proto!("crewmesh.audit.v1");
    }
}

/// Configuration documents and flags (`crewmesh.config.v1`).
pub mod config {
    pub mod v1 {
        tonic::include_proto!("crewmesh.config.v1");
    }
}

/// Usage accounting (`crewmesh.metrics.v1`).
pub mod metrics {
    pub mod v1 {
        tonic::include_proto!("crewmesh.metrics.v1");
    }
}

/// The tool contract (`crewmesh.tools.v1`).
pub mod tools {
    pub mod v1 {
        tonic::include_proto!("crewmesh.tools.v1");
    }
}

/// Converts between `std::time::SystemTime` and `google.protobuf.Timestamp`.
pub mod time {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    pub fn to_timestamp(t: SystemTime) -> prost_types::Timestamp {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        prost_types::Timestamp {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        }
    }

    /// Unix microseconds of a timestamp; negative or out-of-range nanos are clamped.
    pub fn to_micros(ts: &prost_types::Timestamp) -> i64 {
        ts.seconds
            .saturating_mul(1_000_000)
            .saturating_add(i64::from(ts.nanos.clamp(0, 999_999_999) / 1_000))
    }

    pub fn from_micros(micros: i64) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: micros.div_euclid(1_000_000),
            nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
        }
    }
}
