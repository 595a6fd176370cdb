//! Fault injection for router tests: which fault a request asks for (by `x-sim-fault`
//! header or by model name), and the broken response bodies of `stream-break`.

use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream;

use crate::error::{ApiError, Result};

/// Request header that selects a fault; it wins over the model name.
pub const FAULT_HEADER: &str = "x-sim-fault";
/// Longest delay `slow-<ms>` will wait.
pub(crate) const MAX_SLOW: Duration = Duration::from_millis(30_000);
/// How long a broken body waits after its last good frame before failing, so that the
/// frame is flushed to the client before the connection is torn down.
const BREAK_FLUSH_GRACE: Duration = Duration::from_millis(20);

/// A failure the simulated upstream can be asked to act out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// HTTP 500 `server_error`.
    Error500,
    /// HTTP 429 with `retry-after: 1`.
    Error429,
    /// HTTP 400 `invalid_request_error`.
    Error400,
    /// Wait this long (capped at [`MAX_SLOW`]), then answer normally.
    Slow(Duration),
    /// Send part of the body, then drop the connection.
    StreamBreak,
    /// Never answer; the request ends when the client goes away or the server drains.
    Hang,
}

impl Fault {
    /// Parses a fault name (`error-500`, `slow-200`, ...); case-insensitive. Anything else,
    /// e.g. a normal model name, is no fault.
    pub(crate) fn parse(name: &str) -> Option<Self> {
        let name = name.trim().to_ascii_lowercase();
        match name.as_str() {
            "error-500" => Some(Self::Error500),
            "error-429" => Some(Self::Error429),
            "error-400" => Some(Self::Error400),
            "stream-break" => Some(Self::StreamBreak),
            "hang" => Some(Self::Hang),
            other => {
                let millis: u64 = other.strip_prefix("slow-")?.parse().ok()?;
                Some(Self::Slow(Duration::from_millis(millis).min(MAX_SLOW)))
            }
        }
    }

    /// The error this fault answers with, for the `error-*` faults.
    pub(crate) fn error(self) -> Option<ApiError> {
        match self {
            Self::Error500 => Some(ApiError::SimulatedServerError),
            Self::Error429 => Some(ApiError::SimulatedRateLimit { retry_after_s: 1 }),
            Self::Error400 => Some(ApiError::SimulatedBadRequest),
            Self::Slow(_) | Self::StreamBreak | Self::Hang => None,
        }
    }
}

/// What the `x-sim-fault` header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderFault {
    /// No header: the model name decides.
    Absent,
    /// `x-sim-fault: none`: no fault, whatever the model name says.
    Disabled,
    /// A fault, whatever the model name says.
    Fault(Fault),
}

impl HeaderFault {
    /// Reads the header; an unknown value is a client error so typos in tests show up.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Result<Self> {
        let Some(value) = headers.get(FAULT_HEADER) else {
            return Ok(Self::Absent);
        };
        let value = value
            .to_str()
            .map_err(|_| ApiError::UnknownFault("<non-ascii value>".to_owned()))?;
        if value.trim().eq_ignore_ascii_case("none") {
            return Ok(Self::Disabled);
        }
        Fault::parse(value)
            .map(Self::Fault)
            .ok_or_else(|| ApiError::UnknownFault(value.to_owned()))
    }

    /// The fault in force for a request to `model`.
    pub(crate) fn resolve(self, model: &str) -> Option<Fault> {
        match self {
            Self::Absent => Fault::parse(model),
            Self::Disabled => None,
            Self::Fault(fault) => Some(fault),
        }
    }
}

/// Error that aborts a `stream-break` body; hyper then drops the connection without
/// finishing the response.
#[derive(Debug, thiserror::Error)]
#[error("simulated stream break")]
pub(crate) struct StreamBroken;

/// A body that sends `frames` and then fails, so the client sees a truncated response.
pub(crate) fn broken_body(frames: Vec<Bytes>) -> Body {
    let frames = stream::iter(frames.into_iter().map(Ok::<Bytes, StreamBroken>));
    let abort = stream::once(async {
        tokio::time::sleep(BREAK_FLUSH_GRACE).await;
        Err(StreamBroken)
    });
    Body::from_stream(frames.chain(abort))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn parses_every_fault_name() {
        assert_eq!(Fault::parse("error-500"), Some(Fault::Error500));
        assert_eq!(Fault::parse("ERROR-429"), Some(Fault::Error429));
        assert_eq!(Fault::parse(" error-400 "), Some(Fault::Error400));
        assert_eq!(Fault::parse("stream-break"), Some(Fault::StreamBreak));
        assert_eq!(Fault::parse("hang"), Some(Fault::Hang));
        assert_eq!(
            Fault::parse("slow-200"),
            Some(Fault::Slow(Duration::from_millis(200)))
        );
        assert_eq!(Fault::parse("slow-999999999"), Some(Fault::Slow(MAX_SLOW)));
        assert_eq!(Fault::parse("slow-99999999999999999999999"), None);
        assert_eq!(Fault::parse("slow-"), None);
        assert_eq!(Fault::parse("slow--5"), None);
        assert_eq!(Fault::parse("sim-small"), None);
        assert_eq!(Fault::parse("gpt-4o"), None);
    }

    #[test]
    fn header_wins_over_model() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            HeaderFault::from_headers(&headers)
                .expect("ok")
                .resolve("error-500"),
            Some(Fault::Error500)
        );
        headers.insert(FAULT_HEADER, HeaderValue::from_static("error-429"));
        assert_eq!(
            HeaderFault::from_headers(&headers)
                .expect("ok")
                .resolve("error-500"),
            Some(Fault::Error429)
        );
        headers.insert(FAULT_HEADER, HeaderValue::from_static("None"));
        assert_eq!(
            HeaderFault::from_headers(&headers)
                .expect("ok")
                .resolve("error-500"),
            None
        );
    }

    #[test]
    fn unknown_header_value_is_rejected() {
        let mut headers = HeaderMap::new();
        headers.insert(FAULT_HEADER, HeaderValue::from_static("error-501"));
        assert!(matches!(
            HeaderFault::from_headers(&headers),
            Err(ApiError::UnknownFault(value)) if value == "error-501"
        ));
        headers.insert(
            FAULT_HEADER,
            HeaderValue::from_bytes(b"\xffbad").expect("opaque header values are allowed"),
        );
        assert!(HeaderFault::from_headers(&headers).is_err());
    }

    #[test]
    fn only_error_faults_have_errors() {
        assert!(matches!(
            Fault::Error500.error(),
            Some(ApiError::SimulatedServerError)
        ));
        assert!(Fault::Hang.error().is_none());
        assert!(Fault::StreamBreak.error().is_none());
    }
}
