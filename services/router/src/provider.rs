//! The OpenAI-compatible provider client (used for OpenAI, compatible servers and the
//! simulated upstream). One pooled HTTP client per router; HTTP/2 where the upstream
//! offers it.

use std::time::{Duration, Instant};

use crewmesh_openai::{ChatResponse, request_from_proto, response_to_proto};
use crewmesh_proto::router::v1 as pb;

use crate::catalog::Provider;

/// Why one upstream attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("upstream answered {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("upstream answer is not a chat completion: {0}")]
    Malformed(String),
    #[error("provider type `{0}` is not supported yet")]
    Unsupported(String),
}

impl UpstreamError {
    /// Whether another attempt (on this or another deployment) can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::Connect(_) | UpstreamError::Timeout(_) => true,
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            UpstreamError::Malformed(_) | UpstreamError::Unsupported(_) => false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ProviderClient {
    http: reqwest::Client,
    timeout: Duration,
}

/// The answer of one successful attempt.
pub struct Answer {
    pub response: pb::CompleteResponse,
    pub latency: Duration,
}

impl ProviderClient {
    pub fn new(connect_timeout: Duration, timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .user_agent(concat!("crewmesh-router/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, timeout })
    }

    /// One attempt against one provider.
    pub async fn complete(
        &self,
        provider: &Provider,
        upstream_model: &str,
        req: &pb::CompleteRequest,
    ) -> Result<Answer, UpstreamError> {
        match provider.kind.as_str() {
            "openai" | "simulated" => {}
            other => return Err(UpstreamError::Unsupported(other.to_owned())),
        }
        let body = request_from_proto(req, upstream_model);
        let url = format!("{}/chat/completions", provider.base_url);
        let mut call = self.http.post(&url).json(&body).timeout(self.timeout);
        if let Some(key) = &provider.api_key {
            call = call.bearer_auth(key.expose());
        }
        let started = Instant::now();
        let resp = call.send().await.map_err(|e| self.classify(e))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp.bytes().await.map_err(|e| self.classify(e))?;
        if !status.is_success() {
            return Err(UpstreamError::Status {
                status: status.as_u16(),
                message: error_message(&bytes),
                retry_after,
            });
        }
        let parsed: ChatResponse =
            serde_json::from_slice(&bytes).map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let response =
            response_to_proto(parsed).map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        Ok(Answer {
            response,
            latency: started.elapsed(),
        })
    }

    fn classify(&self, e: reqwest::Error) -> UpstreamError {
        if e.is_timeout() {
            UpstreamError::Timeout(self.timeout)
        } else {
            // The error chain can include the URL; it never includes the API key.
            UpstreamError::Connect(error_chain(&e))
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The `error.message` of an OpenAI-style error body, or a short prefix of the body.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_retryable_failures() {
        let status = |s| UpstreamError::Status {
            status: s,
            message: String::new(),
            retry_after: None,
        };
        assert!(status(500).is_retryable());
        assert!(status(429).is_retryable());
        assert!(!status(400).is_retryable());
        assert!(UpstreamError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(!UpstreamError::Malformed("x".into()).is_retryable());
    }

    #[test]
    fn extracts_openai_error_messages() {
        assert_eq!(error_message(br#"{"error":{"message":"bad"}}"#), "bad");
        assert_eq!(error_message(b"plain"), "plain");
    }
}
