//! The provider client: OpenAI-compatible chat completions (OpenAI, compatible servers
//! and the simulated upstream) and Anthropic Messages, non-streaming and streaming,
//! with separate connect, first-byte and total timeouts.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crewmesh_openai::{
    ChatChunk, ChatResponse, chunk_to_proto, request_from_proto, response_to_proto,
    stream_request_from_proto,
};
use crewmesh_proto::router::v1 as pb;
use crewmesh_proto::types::v1::TokenUsage;
use futures::StreamExt;
use futures::stream::BoxStream;
use http_body_util::{BodyExt, Full};

use crate::catalog::Provider;
use crate::upstream_http::{BuildError, UpstreamHttp};

/// Which timeout fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    FirstByte,
    Total,
}

impl std::fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimeoutKind::FirstByte => "first-byte",
            TimeoutKind::Total => "total",
        })
    }
}

/// Why one upstream attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("{0} timeout after {1:?}")]
    Timeout(TimeoutKind, Duration),
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
    /// The wait the upstream asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::Connect(_) | UpstreamError::Timeout(..) => true,
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            UpstreamError::Malformed(_) | UpstreamError::Unsupported(_) => false,
        }
    }
}

/// The router-wide defaults for provider timeouts.
#[derive(Debug, Clone, Copy)]
pub struct DefaultTimeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub total: Duration,
}

/// The timeouts of one attempt, after provider overrides and the caller's deadline.
#[derive(Debug, Clone, Copy)]
pub struct AttemptTimeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub total: Duration,
}

impl DefaultTimeouts {
    /// The provider's own timeouts where set, these defaults elsewhere, and never
    /// beyond `remaining` (what is left of the caller's deadline).
    pub fn for_attempt(&self, provider: &Provider, remaining: Option<Duration>) -> AttemptTimeouts {
        let t = provider.timeouts;
        let cap = |d: Duration| remaining.map_or(d, |r| d.min(r));
        AttemptTimeouts {
            connect: t.connect.unwrap_or(self.connect),
            first_byte: cap(t.first_byte.unwrap_or(self.first_byte)),
            total: cap(t.total.unwrap_or(self.total)),
        }
    }
}

/// One pooled HTTP client per distinct connect timeout (the connector sets it per
/// client); HTTP/2 where the upstream offers it.
#[derive(Clone, Debug)]
pub struct ProviderClient {
    clients: Arc<Mutex<HashMap<Duration, UpstreamHttp>>>,
    pub defaults: DefaultTimeouts,
}

/// The answer of one successful attempt.
pub struct Answer {
    pub response: pb::CompleteResponse,
    pub latency: Duration,
}

/// One event of an upstream stream, in the router's terms.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    Deltas(Vec<pb::StreamDelta>),
    Usage(TokenUsage),
    /// The upstream said the stream is complete.
    Done,
}

/// An upstream stream whose first event has arrived.
pub struct UpstreamStream {
    body: BoxStream<'static, Result<Bytes, hyper::Error>>,
    buf: Vec<u8>,
    pending: VecDeque<StreamItem>,
    deadline: tokio::time::Instant,
    total: Duration,
    wire: Wire,
    anthropic: crate::anthropic::StreamState,
    pub started: Instant,
    pub time_to_first_event: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    OpenAi,
    Anthropic,
}

impl Wire {
    /// The API a provider `type` speaks (`None`: not one the router supports).
    pub(crate) fn of(kind: &str) -> Option<Self> {
        match kind {
            "openai" | "simulated" => Some(Wire::OpenAi),
            "anthropic" => Some(Wire::Anthropic),
            _ => None,
        }
    }

    /// The path of the chat endpoint under a provider's `base_url`.
    pub(crate) fn path(self) -> &'static str {
        match self {
            Wire::OpenAi => "chat/completions",
            Wire::Anthropic => "messages",
        }
    }
}

impl UpstreamStream {
    /// The next event; `Ok(None)` when the upstream closed the stream (a close before
    /// [`StreamItem::Done`] is a truncated stream).
    pub async fn next(&mut self) -> Result<Option<StreamItem>, UpstreamError> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(Some(item));
            }
            let chunk = tokio::time::timeout_at(self.deadline, self.body.next())
                .await
                .map_err(|_| UpstreamError::Timeout(TimeoutKind::Total, self.total))?;
            match chunk {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(UpstreamError::Connect(format!(
                        "the stream broke: {}",
                        error_chain(&e)
                    )));
                }
                Some(Ok(bytes)) => {
                    self.buf.extend_from_slice(&bytes);
                    self.parse_events()?;
                }
            }
        }
    }

    fn parse_events(&mut self) -> Result<(), UpstreamError> {
        while let Some((end, sep)) = find_event_end(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end + sep).take(end).collect();
            let text = std::str::from_utf8(&event)
                .map_err(|_| UpstreamError::Malformed("a stream event is not UTF-8".into()))?;
            let mut data = String::new();
            let mut name = "";
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
                } else if let Some(rest) = line.strip_prefix("event:") {
                    name = rest.trim();
                }
            }
            if data.is_empty() {
                continue;
            }
            match self.wire {
                Wire::OpenAi => self.openai_event(&data)?,
                Wire::Anthropic => {
                    let items = crate::anthropic::stream_event(name, &data, &mut self.anthropic)?;
                    self.pending.extend(items);
                }
            }
        }
        Ok(())
    }

    fn openai_event(&mut self, data: &str) -> Result<(), UpstreamError> {
        if data.trim() == "[DONE]" {
            self.pending.push_back(StreamItem::Done);
            return Ok(());
        }
        let value: serde_json::Value = serde_json::from_str(data)
            .map_err(|e| UpstreamError::Malformed(format!("a stream event: {e}")))?;
        if let Some(err) = value.get("error") {
            return Err(UpstreamError::Status {
                status: 502,
                message: err
                    .get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("the upstream sent an error event")
                    .to_owned(),
                retry_after: None,
            });
        }
        let chunk: ChatChunk = serde_json::from_value(value)
            .map_err(|e| UpstreamError::Malformed(format!("a stream chunk: {e}")))?;
        let deltas = chunk_to_proto(&chunk);
        if !deltas.is_empty() {
            self.pending.push_back(StreamItem::Deltas(deltas));
        }
        if let Some(u) = chunk.usage {
            self.pending.push_back(StreamItem::Usage(TokenUsage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                total_tokens: u.total_tokens,
            }));
        }
        Ok(())
    }
}

/// The end of the first complete event in `buf` and the separator's length.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    for i in 0..buf.len() {
        if buf[i..].starts_with(b"\n\n") {
            return Some((i, 2));
        }
        if buf[i..].starts_with(b"\r\n\r\n") {
            return Some((i, 4));
        }
    }
    None
}

impl ProviderClient {
    pub fn new(defaults: DefaultTimeouts) -> Result<Self, BuildError> {
        let me = Self {
            clients: Arc::new(Mutex::new(HashMap::new())),
            defaults,
        };
        me.client(defaults.connect)?;
        Ok(me)
    }

    fn client(&self, connect_timeout: Duration) -> Result<UpstreamHttp, BuildError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&connect_timeout) {
            return Ok(c.clone());
        }
        let http = UpstreamHttp::new(connect_timeout)?;
        clients.insert(connect_timeout, http.clone());
        Ok(http)
    }

    fn wire(provider: &Provider) -> Result<Wire, UpstreamError> {
        Wire::of(&provider.kind).ok_or_else(|| UpstreamError::Unsupported(provider.kind.clone()))
    }

    /// Sends the request and waits for the response headers within the first-byte
    /// timeout; a non-2xx answer is read and turned into [`UpstreamError::Status`].
    /// `deadline`: when the attempt's total timeout ends.
    async fn send(
        &self,
        provider: &Provider,
        wire: Wire,
        body: Vec<u8>,
        t: AttemptTimeouts,
        deadline: tokio::time::Instant,
    ) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
        let http = self
            .client(t.connect)
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let uri = provider.endpoint.clone().map_err(UpstreamError::Connect)?;
        let mut req = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, USER_AGENT);
        match (wire, &provider.api_key) {
            (Wire::OpenAi, Some(key)) => {
                req = req.header(http::header::AUTHORIZATION, secret_header("Bearer ", key)?);
            }
            (Wire::Anthropic, key) => {
                req = req.header("anthropic-version", crate::anthropic::API_VERSION);
                if let Some(key) = key {
                    req = req.header("x-api-key", secret_header("", key)?);
                }
            }
            (Wire::OpenAi, None) => {}
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| UpstreamError::Connect(format!("cannot build the request: {e}")))?;
        let first_byte = deadline.min(tokio::time::Instant::now() + t.first_byte);
        let resp = match tokio::time::timeout_at(first_byte, http.send(req)).await {
            Err(_) if first_byte < deadline => {
                return Err(UpstreamError::Timeout(TimeoutKind::FirstByte, t.first_byte));
            }
            Err(_) => return Err(UpstreamError::Timeout(TimeoutKind::Total, t.total)),
            Ok(r) => r.map_err(|e| UpstreamError::Connect(error_chain(&e)))?,
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = read_body(resp, t, deadline).await?;
        Err(UpstreamError::Status {
            status: status.as_u16(),
            message: error_message(&bytes),
            retry_after,
        })
    }

    /// One attempt against one provider.
    pub async fn complete(
        &self,
        provider: &Provider,
        upstream_model: &str,
        req: &pb::CompleteRequest,
        t: AttemptTimeouts,
    ) -> Result<Answer, UpstreamError> {
        let wire = Self::wire(provider)?;
        let body = match wire {
            Wire::OpenAi => serde_json::to_vec(&request_from_proto(req, upstream_model)),
            Wire::Anthropic => {
                serde_json::to_vec(&crate::anthropic::request(req, upstream_model, false))
            }
        }
        .map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + t.total;
        let resp = self.send(provider, wire, body, t, deadline).await?;
        let bytes = read_body(resp, t, deadline).await?;
        let response = match wire {
            Wire::OpenAi => {
                let parsed: ChatResponse = serde_json::from_slice(&bytes)
                    .map_err(|e| UpstreamError::Malformed(e.to_string()))?;
                response_to_proto(parsed).map_err(|e| UpstreamError::Malformed(e.to_string()))?
            }
            Wire::Anthropic => crate::anthropic::response(&bytes)?,
        };
        Ok(Answer {
            response,
            latency: started.elapsed(),
        })
    }

    /// Opens a stream and waits for its first event (both within the first-byte
    /// timeout), so that a failure before anything reached the caller can fail over.
    pub async fn open_stream(
        &self,
        provider: &Provider,
        upstream_model: &str,
        req: &pb::CompleteRequest,
        t: AttemptTimeouts,
    ) -> Result<(StreamItem, UpstreamStream), UpstreamError> {
        let wire = Self::wire(provider)?;
        let body = match wire {
            Wire::OpenAi => serde_json::to_vec(&stream_request_from_proto(req, upstream_model)),
            Wire::Anthropic => {
                serde_json::to_vec(&crate::anthropic::request(req, upstream_model, true))
            }
        }
        .map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let started = Instant::now();
        let first_deadline = tokio::time::Instant::now() + t.first_byte;
        let deadline = tokio::time::Instant::now() + t.total;
        let resp = self.send(provider, wire, body, t, deadline).await?;
        let mut stream = UpstreamStream {
            body: resp.into_body().into_data_stream().boxed(),
            buf: Vec::new(),
            pending: VecDeque::new(),
            deadline,
            total: t.total,
            wire,
            anthropic: crate::anthropic::StreamState::default(),
            started,
            time_to_first_event: Duration::ZERO,
        };
        let first = tokio::time::timeout_at(first_deadline, stream.next())
            .await
            .map_err(|_| UpstreamError::Timeout(TimeoutKind::FirstByte, t.first_byte))??;
        let first = first.ok_or_else(|| {
            UpstreamError::Connect("the upstream closed the stream before any event".into())
        })?;
        stream.time_to_first_event = started.elapsed();
        Ok((first, stream))
    }
}

const USER_AGENT: &str = concat!("crewmesh-router/", env!("CARGO_PKG_VERSION"));

/// A header value carrying a credential, marked sensitive so that it is never logged
/// nor indexed by HPACK.
fn secret_header(
    prefix: &str,
    key: &crewmesh_kit::settings::Secret,
) -> Result<http::HeaderValue, UpstreamError> {
    let mut value = http::HeaderValue::try_from(format!("{prefix}{}", key.expose()))
        .map_err(|_| UpstreamError::Connect("the API key is not a valid header value".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// The whole body of `resp`, before the attempt's deadline.
async fn read_body(
    resp: http::Response<hyper::body::Incoming>,
    t: AttemptTimeouts,
    deadline: tokio::time::Instant,
) -> Result<Bytes, UpstreamError> {
    match tokio::time::timeout_at(deadline, resp.into_body().collect()).await {
        Err(_) => Err(UpstreamError::Timeout(TimeoutKind::Total, t.total)),
        Ok(Err(e)) => Err(UpstreamError::Connect(format!(
            "reading the answer: {}",
            error_chain(&e)
        ))),
        Ok(Ok(body)) => Ok(body.to_bytes()),
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
        assert!(
            UpstreamError::Timeout(TimeoutKind::FirstByte, Duration::from_secs(1)).is_retryable()
        );
        assert!(!UpstreamError::Malformed("x".into()).is_retryable());
    }

    /// A client and an OpenAI-type provider pointing at `app` (served until dropped).
    struct Double {
        client: ProviderClient,
        provider: Provider,
        t: AttemptTimeouts,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    async fn provider_at(app: axum::Router, api_key: Option<&str>) -> Double {
        crewmesh_testkit::init_crypto();
        let (base_url, stop) = crate::tests::serve(app).await;
        let defaults = DefaultTimeouts {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(5),
            total: Duration::from_secs(5),
        };
        let provider = Provider {
            name: "double".into(),
            kind: "openai".into(),
            endpoint: crate::catalog::endpoint("openai", &base_url),
            base_url,
            api_key: api_key.map(|k| crewmesh_kit::settings::Secret::new(k.to_owned())),
            timeouts: Default::default(),
        };
        Double {
            t: defaults.for_attempt(&provider, None),
            client: ProviderClient::new(defaults).unwrap(),
            provider,
            _stop: stop,
        }
    }

    async fn send(d: &Double) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
        let deadline = tokio::time::Instant::now() + d.t.total;
        d.client
            .send(&d.provider, Wire::OpenAi, b"{}".to_vec(), d.t, deadline)
            .await
    }

    #[tokio::test]
    async fn a_redirect_is_the_upstreams_error_and_is_not_followed() {
        let followed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hit = followed.clone();
        let app = axum::Router::new()
            .route(
                "/v1/chat/completions",
                axum::routing::post(|| async {
                    (
                        axum::http::StatusCode::TEMPORARY_REDIRECT,
                        [(axum::http::header::LOCATION, "/elsewhere")],
                    )
                }),
            )
            .route(
                "/elsewhere",
                axum::routing::post(move || async move {
                    hit.store(true, std::sync::atomic::Ordering::SeqCst);
                    "followed"
                }),
            );
        let err = send(&provider_at(app, None).await)
            .await
            .expect_err("a redirect is an error");
        assert!(
            matches!(err, UpstreamError::Status { status: 307, .. }),
            "{err:?}"
        );
        assert!(!followed.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn an_openai_call_carries_the_key_as_a_bearer_token_and_says_who_calls() {
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(|headers: http::HeaderMap| async move {
                let h = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned());
                assert_eq!(h("authorization").as_deref(), Some("Bearer sk-test"));
                assert_eq!(h("content-type").as_deref(), Some("application/json"));
                assert!(h("user-agent").unwrap().starts_with("crewmesh-router/"));
                "{}"
            }),
        );
        let resp = send(&provider_at(app, Some("sk-test")).await)
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[test]
    fn extracts_openai_error_messages() {
        assert_eq!(error_message(br#"{"error":{"message":"bad"}}"#), "bad");
        assert_eq!(error_message(b"plain"), "plain");
    }
}
