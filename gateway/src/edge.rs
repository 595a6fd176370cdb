//! Edge hardening of the HTTP API: CORS, security headers, header limits and request
//! timeouts.
//!
//! One middleware ([`middleware`], its state [`Edge`]; [`apply`] wraps a router in it)
//! does the per-request work with precomputed header values:
//! it refuses requests with too many or too large headers (`431`), bounds the time
//! until the response headers (`504`; for a JSON answer that is the whole request,
//! since its body is complete when its headers are), ends server-sent event streams
//! that stay silent longer than the idle timeout with an error event, and sets the
//! security headers on every response. CORS (tower-http) is answered only for the
//! configured origins; with none configured the API sends no CORS headers at all.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::problem::Problem;

/// Edge hardening settings (`[gateway.http]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpEdgeConfig {
    /// Origins allowed to call the API from a browser (`https://app.example.com`), or
    /// `*` for any; empty: no CORS headers.
    pub cors_allowed_origins: Vec<String>,
    /// `Strict-Transport-Security: max-age=...` on every response; `None` sends none
    /// (TLS terminates at the ingress, which may set it instead).
    pub hsts_max_age: Option<Duration>,
    /// Adds `includeSubDomains` to the HSTS header.
    pub hsts_include_subdomains: bool,
    /// Most header fields a request may carry.
    pub max_headers: usize,
    /// Most bytes of header names and values a request may carry.
    pub max_header_bytes: usize,
    /// Time until the response headers; the whole request for non-streaming answers.
    pub request_timeout: Duration,
    /// Longest silence between two events of a streaming answer.
    pub stream_idle_timeout: Duration,
}

impl Default for HttpEdgeConfig {
    fn default() -> Self {
        Self {
            cors_allowed_origins: Vec::new(),
            hsts_max_age: None,
            hsts_include_subdomains: false,
            max_headers: 64,
            max_header_bytes: 16 * 1024,
            request_timeout: Duration::from_secs(150),
            stream_idle_timeout: Duration::from_secs(60),
        }
    }
}

impl HttpEdgeConfig {
    /// Invalid settings as (field, problem, fix).
    pub fn problems(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let mut add = |f: &str, p: String, x: &str| out.push((f.to_owned(), p, x.to_owned()));
        for o in &self.cors_allowed_origins {
            if let Err(problem) = check_origin(o) {
                add(
                    "gateway.http.cors_allowed_origins",
                    format!("`{o}` {problem}"),
                    "list origins as scheme://host[:port], e.g. https://app.example.com, or \"*\"",
                );
            }
        }
        if self.cors_allowed_origins.len() > 1 && self.cors_allowed_origins.iter().any(|o| o == "*")
        {
            add(
                "gateway.http.cors_allowed_origins",
                "\"*\" cannot be combined with other origins".into(),
                "use either [\"*\"] or a list of origins",
            );
        }
        if self.max_headers == 0 {
            add(
                "gateway.http.max_headers",
                "must be at least 1".into(),
                "e.g. 64",
            );
        }
        if self.max_header_bytes < 1024 {
            add(
                "gateway.http.max_header_bytes",
                format!(
                    "{} is too small for ordinary requests",
                    self.max_header_bytes
                ),
                "use at least 1024, e.g. 16384",
            );
        }
        if self.request_timeout.is_zero() {
            add(
                "gateway.http.request_timeout_secs",
                "must be at least 1".into(),
                "e.g. 150 (above upstream_timeout_secs)",
            );
        }
        if self.stream_idle_timeout.is_zero() {
            add(
                "gateway.http.stream_idle_timeout_secs",
                "must be at least 1".into(),
                "e.g. 60",
            );
        }
        out
    }
}

fn check_origin(o: &str) -> Result<(), &'static str> {
    if o == "*" {
        return Ok(());
    }
    HeaderValue::from_str(o).map_err(|_| "is not a valid header value")?;
    let uri: axum::http::Uri = o.parse().map_err(|_| "is not a URL")?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("needs the scheme http:// or https://");
    }
    if uri.authority().is_none_or(|a| a.host().is_empty()) {
        return Err("has no host");
    }
    // An Origin header is scheme://host[:port] only: "https://a.example/" never matches.
    if o.len()
        != uri.scheme_str().unwrap_or_default().len()
            + 3
            + uri.authority().map_or(0, |a| a.as_str().len())
    {
        return Err("has a path; an origin is scheme://host[:port] without a trailing slash");
    }
    Ok(())
}

/// `[gateway.http]` of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    pub cors_allowed_origins: Vec<String>,
    pub hsts_max_age_secs: Option<u64>,
    pub hsts_include_subdomains: bool,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub request_timeout_secs: u64,
    pub stream_idle_timeout_secs: u64,
}

impl Default for HttpSection {
    fn default() -> Self {
        let d = HttpEdgeConfig::default();
        Self {
            cors_allowed_origins: d.cors_allowed_origins,
            hsts_max_age_secs: None,
            hsts_include_subdomains: d.hsts_include_subdomains,
            max_headers: d.max_headers,
            max_header_bytes: d.max_header_bytes,
            request_timeout_secs: d.request_timeout.as_secs(),
            stream_idle_timeout_secs: d.stream_idle_timeout.as_secs(),
        }
    }
}

impl From<HttpSection> for HttpEdgeConfig {
    fn from(s: HttpSection) -> Self {
        Self {
            cors_allowed_origins: s.cors_allowed_origins,
            hsts_max_age: s.hsts_max_age_secs.map(Duration::from_secs),
            hsts_include_subdomains: s.hsts_include_subdomains,
            max_headers: s.max_headers,
            max_header_bytes: s.max_header_bytes,
            request_timeout: Duration::from_secs(s.request_timeout_secs),
            stream_idle_timeout: Duration::from_secs(s.stream_idle_timeout_secs),
        }
    }
}

/// Request headers a browser may send cross-origin: the API's own and those of the
/// OpenAI JavaScript SDK.
const CORS_REQUEST_HEADERS: [&str; 16] = [
    "authorization",
    "content-type",
    "x-request-id",
    "traceparent",
    "tracestate",
    "if-match",
    "if-none-match",
    "openai-organization",
    "openai-project",
    "x-stainless-arch",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-retry-count",
];

/// Response headers a browser script may read.
const CORS_EXPOSED_HEADERS: [&str; 6] = [
    "x-request-id",
    "retry-after",
    "etag",
    "x-crewmesh-deployment",
    "x-crewmesh-cost-usd",
    "x-crewmesh-simulated",
];

/// The CORS layer of `config`, or `None` when no origin is allowed.
pub fn cors(config: &HttpEdgeConfig) -> Option<CorsLayer> {
    if config.cors_allowed_origins.is_empty() {
        return None;
    }
    let origin = if config.cors_allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            config
                .cors_allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers(CORS_REQUEST_HEADERS.map(HeaderName::from_static))
            .expose_headers(CORS_EXPOSED_HEADERS.map(HeaderName::from_static))
            .max_age(Duration::from_secs(600)),
    )
}

/// What the edge middleware needs per request, computed once from the config.
#[derive(Debug, Clone)]
pub struct Edge {
    max_headers: usize,
    max_header_bytes: usize,
    request_timeout: Duration,
    stream_idle_timeout: Duration,
    hsts: Option<HeaderValue>,
}

const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
const NO_REFERRER: HeaderValue = HeaderValue::from_static("no-referrer");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const CSP: HeaderValue = HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'");

/// The event that ends a stream silent for longer than the idle timeout (the shape of
/// the stream's other error events).
const IDLE_EVENT: &[u8] = b"data: {\"error\":{\"message\":\"the model stream was idle for longer than the gateway's stream idle timeout\",\"type\":\"api_error\",\"code\":\"timeout\"}}\n\n";

impl Edge {
    pub fn new(config: &HttpEdgeConfig) -> Arc<Self> {
        let hsts = config.hsts_max_age.and_then(|age| {
            let sub = if config.hsts_include_subdomains {
                "; includeSubDomains"
            } else {
                ""
            };
            HeaderValue::from_str(&format!("max-age={}{sub}", age.as_secs())).ok()
        });
        Arc::new(Self {
            max_headers: config.max_headers,
            max_header_bytes: config.max_header_bytes,
            request_timeout: config.request_timeout,
            stream_idle_timeout: config.stream_idle_timeout,
            hsts,
        })
    }
}

fn headers_too_large(detail: String) -> Response {
    Problem::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers-too-large",
        "Request header fields too large",
        detail,
    )
    .into_response()
}

/// Wraps `router` in the edge hardening of `config` alone: CORS (when origins are
/// configured) inside [`middleware`]. The gateway puts the same two layers into its
/// one layer stack instead ([`crate::api`]).
pub fn apply<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
    config: &HttpEdgeConfig,
) -> axum::Router<S> {
    router.layer(
        tower::ServiceBuilder::new()
            .layer(axum::middleware::from_fn_with_state(
                Edge::new(config),
                middleware,
            ))
            .option_layer(cors(config)),
    )
}

/// The header limits, the request timeout, the stream idle timeout and the security
/// headers (state: [`Edge::new`]). CORS ([`cors`]) goes inside it.
pub async fn middleware(State(edge): State<Arc<Edge>>, req: Request, next: Next) -> Response {
    guard(&edge, req, async |req| next.run(req).await).await
}

/// [`middleware`] around `next`.
pub(crate) async fn guard(
    edge: &Edge,
    req: Request,
    next: impl AsyncFnOnce(Request) -> Response,
) -> Response {
    let headers = req.headers();
    let mut resp = if headers.len() > edge.max_headers {
        headers_too_large(format!(
            "the request has {} header fields; at most {} are accepted",
            headers.len(),
            edge.max_headers
        ))
    } else {
        let bytes: usize = headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        if bytes > edge.max_header_bytes {
            headers_too_large(format!(
                "the request's header fields take {bytes} bytes; at most {} are accepted",
                edge.max_header_bytes
            ))
        } else {
            match tokio::time::timeout(edge.request_timeout, next(req)).await {
                Ok(resp) => resp,
                Err(_) => Problem::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    "Upstream timeout",
                    format!(
                        "the request took longer than the gateway's request timeout ({}s)",
                        edge.request_timeout.as_secs_f64()
                    ),
                )
                .into_response(),
            }
        }
    };
    if is_event_stream(&resp) {
        resp = with_idle_timeout(resp, edge.stream_idle_timeout);
    }
    let h = resp.headers_mut();
    h.insert(header::X_CONTENT_TYPE_OPTIONS, NOSNIFF);
    h.insert(header::REFERRER_POLICY, NO_REFERRER);
    h.insert(header::CONTENT_SECURITY_POLICY, CSP);
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, NO_STORE);
    }
    if let Some(v) = &edge.hsts {
        h.insert(header::STRICT_TRANSPORT_SECURITY, v.clone());
    }
    resp
}

fn is_event_stream(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// Ends the body with [`IDLE_EVENT`] when no frame arrives for `idle`.
fn with_idle_timeout(resp: Response, idle: Duration) -> Response {
    let (parts, body) = resp.into_parts();
    let frames = body.into_data_stream();
    let guarded = futures::stream::unfold((frames, false), move |(mut frames, done)| async move {
        if done {
            return None;
        }
        match tokio::time::timeout(idle, frames.next()).await {
            Ok(Some(frame)) => Some((frame, (frames, false))),
            Ok(None) => None,
            Err(_) => {
                tracing::warn!(
                    idle_secs = idle.as_secs_f64(),
                    "ending a silent event stream"
                );
                Some((Ok(Bytes::from_static(IDLE_EVENT)), (frames, true)))
            }
        }
    });
    Response::from_parts(parts, Body::from_stream(guarded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::{get, post};
    use tower::ServiceExt;

    fn app(config: &HttpEdgeConfig) -> Router {
        let router = Router::new()
            .route(
                "/v1/fast",
                get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
            )
            .route(
                "/v1/slow",
                post(|| async {
                    std::future::pending::<()>().await;
                    "never"
                }),
            )
            .route(
                "/v1/stream",
                get(|| async {
                    let first = futures::stream::once(async {
                        Ok::<_, std::convert::Infallible>(Bytes::from_static(b"data: 1\n\n"))
                    });
                    let body = Body::from_stream(first.chain(futures::stream::pending()));
                    Response::builder()
                        .header(header::CONTENT_TYPE, "text/event-stream")
                        .body(body)
                        .unwrap()
                }),
            );
        apply(router, config)
    }

    async fn body_json(resp: Response) -> serde_json::Value {
        let b = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        serde_json::from_slice(&b).unwrap()
    }

    fn get_req(path: &str) -> Request {
        Request::builder().uri(path).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn every_response_carries_the_security_headers_and_hsts_only_when_configured() {
        let resp = app(&HttpEdgeConfig::default())
            .oneshot(get_req("/v1/fast"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let h = resp.headers();
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert_eq!(h["cache-control"], "no-store");
        assert_eq!(
            h["content-security-policy"],
            "default-src 'none'; frame-ancestors 'none'"
        );
        assert!(h.get("strict-transport-security").is_none());
        assert!(h.get("access-control-allow-origin").is_none());

        let config = HttpEdgeConfig {
            hsts_max_age: Some(Duration::from_secs(31_536_000)),
            hsts_include_subdomains: true,
            ..Default::default()
        };
        let resp = app(&config).oneshot(get_req("/nowhere")).await.unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(
            resp.headers()["strict-transport-security"],
            "max-age=31536000; includeSubDomains"
        );
        assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    }

    #[tokio::test]
    async fn too_many_or_too_large_headers_are_431_problems() {
        let config = HttpEdgeConfig {
            max_headers: 4,
            max_header_bytes: 1024,
            ..Default::default()
        };
        let mut b = Request::builder().uri("/v1/fast");
        for i in 0..5 {
            b = b.header(format!("x-h{i}"), "v");
        }
        let resp = app(&config)
            .oneshot(b.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 431);
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
        let v = body_json(resp).await;
        assert_eq!(v["type"], "https://crewmesh.dev/problems/headers-too-large");
        assert_eq!(
            v["detail"],
            "the request has 5 header fields; at most 4 are accepted"
        );

        let big = "a".repeat(1100);
        let req = Request::builder()
            .uri("/v1/fast")
            .header("x-big", big)
            .body(Body::empty())
            .unwrap();
        let resp = app(&config).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 431);
        let v = body_json(resp).await;
        assert_eq!(
            v["detail"],
            "the request's header fields take 1105 bytes; at most 1024 are accepted"
        );
        // At the limits, the request passes.
        let mut b = Request::builder().uri("/v1/fast");
        for i in 0..4 {
            b = b.header(format!("x-h{i}"), "v");
        }
        let resp = app(&config)
            .oneshot(b.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test]
    async fn a_request_over_the_timeout_is_a_504_problem() {
        let config = HttpEdgeConfig {
            request_timeout: Duration::from_millis(50),
            ..Default::default()
        };
        let req = Request::builder()
            .method("POST")
            .uri("/v1/slow")
            .body(Body::empty())
            .unwrap();
        let resp = app(&config).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 504);
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        assert_eq!(resp.headers()["cache-control"], "no-store");
        let v = body_json(resp).await;
        assert_eq!(v["type"], "https://crewmesh.dev/problems/timeout");
        assert_eq!(
            v["detail"],
            "the request took longer than the gateway's request timeout (0.05s)"
        );
    }

    #[tokio::test]
    async fn a_silent_stream_ends_with_an_error_event_after_the_idle_timeout() {
        // The request timeout is shorter than the stream's life: streams are exempt
        // once their headers are sent; only the idle timeout ends them.
        let config = HttpEdgeConfig {
            request_timeout: Duration::from_millis(20),
            stream_idle_timeout: Duration::from_millis(100),
            ..Default::default()
        };
        let resp = app(&config).oneshot(get_req("/v1/stream")).await.unwrap();
        assert_eq!(resp.status(), 200);
        let b = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let mut expected = b"data: 1\n\n".to_vec();
        expected.extend_from_slice(IDLE_EVENT);
        assert_eq!(
            std::str::from_utf8(&b).unwrap(),
            std::str::from_utf8(&expected).unwrap()
        );
        let last: serde_json::Value =
            serde_json::from_slice(&IDLE_EVENT[6..IDLE_EVENT.len() - 2]).unwrap();
        assert_eq!(last["error"]["code"], "timeout");
    }

    #[tokio::test]
    async fn cors_answers_preflights_for_allowed_origins_only() {
        let config = HttpEdgeConfig {
            cors_allowed_origins: vec!["https://app.example.com".into()],
            ..Default::default()
        };
        let preflight = |origin: &str| {
            Request::builder()
                .method("OPTIONS")
                .uri("/v1/fast")
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization,content-type",
                )
                .body(Body::empty())
                .unwrap()
        };
        let resp = app(&config)
            .oneshot(preflight("https://app.example.com"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let h = resp.headers();
        assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
        assert_eq!(h["access-control-allow-methods"], "GET,POST,PUT,DELETE");
        assert!(
            h["access-control-allow-headers"]
                .to_str()
                .unwrap()
                .starts_with("authorization,content-type,x-request-id,")
        );
        assert_eq!(h["access-control-max-age"], "600");
        assert_eq!(h["x-content-type-options"], "nosniff");

        let resp = app(&config)
            .oneshot(preflight("https://evil.example"))
            .await
            .unwrap();
        assert!(resp.headers().get("access-control-allow-origin").is_none());

        // A simple request from an allowed origin can read the exposed headers.
        let req = Request::builder()
            .uri("/v1/fast")
            .header("origin", "https://app.example.com")
            .body(Body::empty())
            .unwrap();
        let resp = app(&config).oneshot(req).await.unwrap();
        assert_eq!(
            resp.headers()["access-control-allow-origin"],
            "https://app.example.com"
        );
        assert_eq!(
            resp.headers()["access-control-expose-headers"],
            "x-request-id,retry-after,etag,x-crewmesh-deployment,x-crewmesh-cost-usd,x-crewmesh-simulated"
        );
    }

    #[test]
    fn the_config_section_maps_to_the_settings_and_rejects_unknown_fields() {
        let s: HttpSection = serde_json::from_value(serde_json::json!({
            "cors_allowed_origins": ["https://app.example.com"],
            "hsts_max_age_secs": 600,
            "request_timeout_secs": 30,
        }))
        .unwrap();
        assert_eq!(
            HttpEdgeConfig::from(s),
            HttpEdgeConfig {
                cors_allowed_origins: vec!["https://app.example.com".into()],
                hsts_max_age: Some(Duration::from_secs(600)),
                request_timeout: Duration::from_secs(30),
                ..Default::default()
            }
        );
        assert_eq!(
            HttpEdgeConfig::from(HttpSection::default()),
            HttpEdgeConfig::default()
        );
        let err = serde_json::from_value::<HttpSection>(serde_json::json!({"max_header": 1}))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("unknown field `max_header`"), "{err}");
    }

    #[test]
    fn origins_are_checked() {
        let config = HttpEdgeConfig {
            cors_allowed_origins: vec![
                "https://ok.example".into(),
                "http://localhost:3000".into(),
                "https://slash.example/".into(),
                "ftp://x.example".into(),
                "not a url".into(),
            ],
            max_headers: 0,
            ..Default::default()
        };
        let p: Vec<String> = config
            .problems()
            .into_iter()
            .map(|(f, p, _)| format!("{f}: {p}"))
            .collect();
        assert_eq!(
            p,
            [
                "gateway.http.cors_allowed_origins: `https://slash.example/` has a path; an origin is scheme://host[:port] without a trailing slash",
                "gateway.http.cors_allowed_origins: `ftp://x.example` needs the scheme http:// or https://",
                "gateway.http.cors_allowed_origins: `not a url` is not a URL",
                "gateway.http.max_headers: must be at least 1",
            ]
        );
        assert!(HttpEdgeConfig::default().problems().is_empty());
    }
}
