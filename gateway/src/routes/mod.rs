//! HTTP routes of the gateway, one module per area.

pub mod audit;
pub mod chat;
pub mod config;
pub mod keys;
pub mod ofrep;
pub mod runs;
pub mod stream;
pub mod usage;

use crate::problem::Problem;

/// Routes of the documented API that a later release implements.
pub async fn not_implemented(uri: axum::http::Uri) -> Problem {
    Problem::not_implemented(uri.path())
}

/// Formats a proto timestamp as RFC 3339 (UTC).
pub fn rfc3339(ts: Option<&crewmesh_proto::prost_types::Timestamp>) -> Option<String> {
    let ts = ts?;
    let t = time::OffsetDateTime::from_unix_timestamp(ts.seconds).ok()?
        + time::Duration::nanoseconds(i64::from(ts.nanos));
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// Parses an RFC 3339 query parameter into a proto timestamp.
pub fn parse_time(
    param: &str,
    value: &str,
) -> Result<crewmesh_proto::prost_types::Timestamp, Problem> {
    let t = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            Problem::bad_request(format!("{param}: `{value}` is not an RFC 3339 time ({e})"))
        })?;
    Ok(crewmesh_proto::prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    })
}
