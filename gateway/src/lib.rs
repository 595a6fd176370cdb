//! crewmesh gateway: the HTTP edge of the mesh.
//!
//! Clients speak HTTP/JSON (OpenAI-compatible for chat completions) to the gateway;
//! it authenticates them, and calls the mesh services over mTLS gRPC with the
//! caller's principal (tenant, subject, roles) in metadata. Every error is an RFC 7807
//! problem document.

#![forbid(unsafe_code)]

pub mod auth;
mod extract;
pub mod problem;
mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{any, get, post};
use crewmesh_kit::admin::Readiness;
use crewmesh_kit::clients::{MeshChannel, Peers};
use crewmesh_kit::mesh::Service;
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::settings::{CommonConfig, ConfigError, Problems, Secret};
use crewmesh_kit::tls::MeshTls;
use crewmesh_proto::agent::v1::agent_service_client::AgentServiceClient;
use crewmesh_proto::audit::v1::audit_service_client::AuditServiceClient;
use crewmesh_proto::metrics::v1::metrics_service_client::MetricsServiceClient;
use crewmesh_proto::router::v1::router_service_client::RouterServiceClient;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::auth::KeyRing;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub common: CommonConfig,
    /// Where the HTTP API listens (plain HTTP; terminate TLS at the ingress).
    pub http_addr: SocketAddr,
    /// The first admin API key (tenant `default`).
    pub bootstrap_api_key: Option<Secret>,
    /// Deadline for a model call through the mesh.
    pub upstream_timeout: Duration,
}

impl GatewayConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.common.validate(
            Service::Gateway,
            &[
                Service::Router,
                Service::AgentRuntime,
                Service::Audit,
                Service::Metrics,
            ],
            &mut p,
        );
        if let Some(k) = &self.bootstrap_api_key
            && k.expose().len() < 16
        {
            p.add(
                "gateway.bootstrap_api_key_file",
                "the key is shorter than 16 characters",
                "use a long random key, e.g. `crewmesh keys generate`",
            );
        }
        p.into_result()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot start: {0}")]
    Startup(String),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub keys: Arc<ArcSwap<KeyRing>>,
    pub router: RouterServiceClient<MeshChannel>,
    pub agents: AgentServiceClient<MeshChannel>,
    pub audit: AuditServiceClient<MeshChannel>,
    pub metrics: MetricsServiceClient<MeshChannel>,
    pub upstream_timeout: Duration,
    http_metrics: HttpMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone)]
struct HttpMetrics {
    requests: Family<HttpLabels, Counter>,
    duration: Family<HttpLabels, Histogram>,
}

impl HttpMetrics {
    fn register(registry: &MetricsRegistry) -> Self {
        let m = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new([
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ])
            }),
        };
        registry.register(
            "gateway_http_requests",
            "HTTP requests by route, method and status",
            m.requests.clone(),
        );
        registry.register(
            "gateway_http_duration_seconds",
            "HTTP request latency",
            m.duration.clone(),
        );
        m
    }
}

/// The request id of a request: the client's `x-request-id` when it is sane, else a
/// fresh one.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// One span per request (child of the client's W3C trace context), a request id on
/// request and response, and HTTP metrics.
async fn observe(state: axum::extract::State<AppState>, mut req: Request, next: Next) -> Response {
    let id = request_id(req.headers());
    if let Ok(v) = id.parse() {
        req.headers_mut().insert("x-request-id", v);
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().to_string();
    let span = tracing::info_span!(
        "http",
        %method,
        route = %route,
        request_id = %id,
        subject = tracing::field::Empty,
        status = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    crewmesh_kit::telemetry::adopt_remote_parent(&span, req.headers());
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    span.record("status", status);
    if let Ok(v) = id.parse() {
        resp.headers_mut().insert("x-request-id", v);
    }
    let labels = HttpLabels {
        route,
        method,
        status,
    };
    state.http_metrics.requests.get_or_create(&labels).inc();
    state
        .http_metrics
        .duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    span.in_scope(|| {
        tracing::info!(
            status,
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        )
    });
    resp
}

async fn fallback(uri: axum::http::Uri) -> problem::Problem {
    problem::Problem::not_found(format!("no route for {}", uri.path()))
}

/// The HTTP API.
pub fn api(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(routes::chat::completions))
        .route("/v1/models", get(routes::chat::models))
        .route("/v1/usage", get(routes::usage::usage))
        .route("/v1/audit/events", get(routes::audit::events))
        .route("/v1/runs", post(routes::runs::start))
        .route("/v1/runs/{id}", get(routes::runs::get))
        .route("/v1/agents", any(routes::not_implemented))
        .route("/v1/agents/{*rest}", any(routes::not_implemented))
        .route("/v1/runs/{id}/{*rest}", any(routes::not_implemented))
        .route("/v1/crews", any(routes::not_implemented))
        .route("/v1/crews/{*rest}", any(routes::not_implemented))
        .route("/v1/config/{*rest}", any(routes::not_implemented))
        .route("/v1/flags/{*rest}", any(routes::not_implemented))
        .route("/ofrep/v1/{*rest}", any(routes::not_implemented))
        .route("/v1/audit/{*rest}", any(routes::not_implemented))
        .fallback(fallback)
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

pub struct Application {
    http: TcpListener,
    admin: TcpListener,
    router: Router,
    readiness: Readiness,
    metrics: MetricsRegistry,
    grace: Duration,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Bind { what, addr, source })
}

impl Application {
    pub async fn build(
        config: GatewayConfig,
        metrics: MetricsRegistry,
    ) -> Result<Self, GatewayError> {
        let common = &config.common;
        let tls =
            MeshTls::load(common.tls.clone()).map_err(|e| GatewayError::Startup(e.to_string()))?;
        tls.spawn_reloader(Duration::from_secs(5));
        let peers = Peers::new(&common.trust_domain, common.peers.clone(), tls);
        let startup = |e: crewmesh_kit::clients::PeerError| GatewayError::Startup(e.to_string());
        let state = AppState {
            keys: Arc::new(ArcSwap::from_pointee(KeyRing::with_bootstrap(
                config.bootstrap_api_key.as_ref(),
            ))),
            router: peers.router().map_err(startup)?,
            agents: AgentServiceClient::new(peers.channel(Service::AgentRuntime).map_err(startup)?),
            audit: peers.audit().map_err(startup)?,
            metrics: peers.metrics().map_err(startup)?,
            upstream_timeout: config.upstream_timeout,
            http_metrics: HttpMetrics::register(&metrics),
        };
        let http = bind("HTTP API", config.http_addr).await?;
        let admin = bind("admin port", common.server.admin_addr).await?;
        Ok(Self {
            http,
            admin,
            router: api(state),
            readiness: Readiness::new(),
            metrics,
            grace: common.server.grace(),
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound listener has an address")
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        use axum::serve::ListenerExt;
        // Small JSON answers must not wait for Nagle's algorithm.
        let listener = self.http.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let http = axum::serve(listener, self.router.into_make_service())
            .with_graceful_shutdown(wait(stop_rx.clone()));
        let http = tokio::spawn(async move { http.await });
        let admin = axum::serve(
            self.admin,
            crewmesh_kit::admin::router(self.readiness.clone(), self.metrics.clone()),
        )
        .with_graceful_shutdown(wait(stop_rx));
        let admin = tokio::spawn(async move { admin.await });
        self.readiness.set_ready("server");
        tracing::info!(service = "gateway", "serving");
        shutdown.await;
        tracing::info!(
            service = "gateway",
            "shutting down: draining in-flight requests"
        );
        self.readiness.set_not_ready("server", "shutting down");
        let _ = stop_tx.send(true);
        match tokio::time::timeout(self.grace, async { (http.await, admin.await) }).await {
            Ok((Ok(Err(e)), _)) | Ok((_, Ok(Err(e)))) => return Err(GatewayError::Serve(e)),
            Ok(_) => {}
            Err(_) => tracing::warn!(
                service = "gateway",
                "grace period elapsed; closing remaining connections"
            ),
        }
        Ok(())
    }
}
