//! crewmesh gateway: the HTTP edge of the mesh.
//!
//! Clients speak HTTP/JSON (OpenAI-compatible for chat completions) to the gateway;
//! it authenticates them, and calls the mesh services over mTLS gRPC with the
//! caller's principal (tenant, subject, roles) in metadata. Every error is an RFC 7807
//! problem document.

#![forbid(unsafe_code)]

pub mod audit_trail;
pub mod auth;
pub mod edge;
mod extract;
pub mod limits;
pub mod oidc;
pub mod openapi;
pub mod problem;
pub mod rbac;
mod routes;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{any, get, post};
use crewmesh_kit::admin::Readiness;
use crewmesh_kit::clients::{MeshChannel, Peers};
use crewmesh_kit::config_cache::ConfigCache;
use crewmesh_kit::mesh::Service;
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::settings::{CommonConfig, ConfigError, Problems, Secret};
use crewmesh_kit::tls::MeshTls;
use crewmesh_proto::agent::v1::agent_service_client::AgentServiceClient;
use crewmesh_proto::audit::v1::audit_service_client::AuditServiceClient;
use crewmesh_proto::config::v1::Kind;
use crewmesh_proto::config::v1::config_service_client::ConfigServiceClient;
use crewmesh_proto::metrics::v1::metrics_service_client::MetricsServiceClient;
use crewmesh_proto::router::v1::router_service_client::RouterServiceClient;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::auth::{KeyRing, KeySource};
use crate::extract::Authenticated;
use crate::problem::Problem;
use crewmesh_kit::principal::Principal;

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
    /// Authentication and limit settings of the edge.
    pub edge: EdgeConfig,
}

/// Settings of the gateway's authentication and limits.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// How often the gateway re-reads its config documents (API keys, tenants).
    pub config_refresh: Duration,
    /// Replica membership in etcd, so limits are shared by the replicas; `None` for a
    /// single gateway.
    pub membership: Option<crewmesh_kit::membership::MembershipConfig>,
    /// How long a tenant's month-to-date spend is reused before asking metrics again.
    pub spend_cache_ttl: Duration,
    /// OIDC bearer tokens, besides API keys; `None` accepts API keys only.
    pub oidc: Option<Box<oidc::OidcConfig>>,
    /// CORS, security headers, header limits and timeouts of the HTTP API.
    pub http: edge::HttpEdgeConfig,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            config_refresh: Duration::from_secs(1),
            membership: None,
            spend_cache_ttl: Duration::from_secs(5),
            oidc: None,
            http: edge::HttpEdgeConfig::default(),
        }
    }
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
                Service::Config,
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
        if let Some(o) = &self.edge.oidc {
            for (field, problem, fix) in o.problems() {
                p.add(field, problem, fix);
            }
        }
        for (field, problem, fix) in self.edge.http.problems() {
            p.add(field, problem, fix);
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

/// What every handler shares: one `Arc`, because every middleware layer and handler
/// takes its own copy of the state on every request.
#[derive(Clone)]
pub struct AppState(Arc<SharedState>);

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

/// The fields of [`AppState`].
pub struct SharedState {
    pub keys: Arc<ArcSwap<KeyRing>>,
    /// Rebuilds `keys` from apikey documents and this gateway's own key changes.
    pub key_source: Arc<KeySource>,
    /// The config service, for API key documents.
    pub config_store: ConfigServiceClient<MeshChannel>,
    /// The watched apikey and tenant documents; its confirmed revision goes out in
    /// the `x-crewmesh-config-revision` header of every response.
    pub config_docs: ConfigCache,
    /// Tenant limits and budgets from `_global` tenant documents.
    pub tenant_policies: Arc<ArcSwap<HashMap<String, limits::TenantPolicy>>>,
    pub limiter: Arc<limits::Limiter>,
    pub spend: Arc<limits::SpendCache>,
    /// Verifies OIDC tokens when configured.
    pub oidc: Option<Arc<oidc::OidcVerifier>>,
    pub router: RouterServiceClient<MeshChannel>,
    pub agents: AgentServiceClient<MeshChannel>,
    pub audit: AuditServiceClient<MeshChannel>,
    pub metrics: MetricsServiceClient<MeshChannel>,
    pub upstream_timeout: Duration,
    /// CORS, security headers, header limits and timeouts of the HTTP API.
    pub http: Arc<edge::HttpEdgeConfig>,
    /// Records an audit event for every request (see [`audit_trail`]).
    pub audit_trail: audit_trail::AuditTrail,
    http_metrics: HttpMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: &'static str,
    status: u16,
}

/// The series of one route, method and status.
struct HttpSeries {
    method: &'static str,
    status: u16,
    requests: Counter,
    duration: Histogram,
}

#[derive(Clone)]
struct HttpMetrics {
    requests: Family<HttpLabels, Counter>,
    duration: Family<HttpLabels, Histogram>,
    /// The series requests have used, by route, looked up without building labels.
    /// Bounded: routes are the router's patterns and "unmatched", methods the
    /// standard ones and "other", statuses three digits.
    seen: Arc<std::sync::RwLock<HashMap<String, Vec<Arc<HttpSeries>>>>>,
}

/// The method label: the standard methods by name, any other as "other", so that a
/// client cannot create series at will.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
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
            seen: Arc::default(),
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

    /// Counts one request and its latency.
    fn observe(&self, route: &str, method: &'static str, status: u16, seconds: f64) {
        let series = self.series(route, method, status);
        series.requests.inc();
        series.duration.observe(seconds);
    }

    fn series(&self, route: &str, method: &'static str, status: u16) -> Arc<HttpSeries> {
        let matches = |s: &&Arc<HttpSeries>| s.method == method && s.status == status;
        {
            let seen = self.seen.read().unwrap_or_else(|p| p.into_inner());
            if let Some(found) = seen.get(route).and_then(|v| v.iter().find(matches)) {
                return found.clone();
            }
        }
        let labels = HttpLabels {
            route: route.to_owned(),
            method,
            status,
        };
        let found = Arc::new(HttpSeries {
            method,
            status,
            requests: self.requests.get_or_create(&labels).clone(),
            duration: self.duration.get_or_create(&labels).clone(),
        });
        let mut seen = self.seen.write().unwrap_or_else(|p| p.into_inner());
        let of_route = seen.entry(labels.route).or_default();
        match of_route.iter().find(matches) {
            Some(raced) => raced.clone(),
            None => {
                of_route.push(found.clone());
                found
            }
        }
    }
}

/// The request id [`observe`] chose for a request (also in its `x-request-id`
/// header), for handlers: `Extension(RequestId(id))`.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// `x-request-id`, named at compile time (a `&str` name is parsed on every use).
const REQUEST_ID_HEADER: axum::http::HeaderName =
    axum::http::HeaderName::from_static("x-request-id");

/// The request id of a request: the client's `x-request-id` when it is sane, else a
/// fresh one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// One span per request (child of the client's W3C trace context), a request id on
/// request and response, and HTTP metrics.
async fn observe(
    state: &AppState,
    mut req: Request,
    next: impl AsyncFnOnce(Request) -> Response,
) -> Response {
    let id = request_id(req.headers());
    let id_header = id.parse::<axum::http::HeaderValue>().ok();
    if let Some(v) = &id_header {
        req.headers_mut().insert(REQUEST_ID_HEADER, v.clone());
    }
    req.extensions_mut().insert(RequestId(id.clone()));
    let route = req.extensions().get::<MatchedPath>().cloned();
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let method = method_label(req.method());
    let span = tracing::info_span!(
        "http",
        method = %req.method(),
        route = %route,
        request_id = %id,
        subject = tracing::field::Empty,
        status = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    crewmesh_kit::telemetry::adopt_remote_parent(&span, req.headers());
    let started = Instant::now();
    let mut resp = next(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    span.record("status", status);
    if let Some(v) = id_header {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    state
        .http_metrics
        .observe(route, method, status, started.elapsed().as_secs_f64());
    span.in_scope(|| {
        tracing::info!(
            status,
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        )
    });
    resp
}

/// Applies every snapshot of the apikey and tenant documents, the tenant policies
/// first and then the keys, in one task: a key is never accepted before the policy
/// of the same snapshot (limits, budgets, `audit_mode`) applies to its tenant.
fn follow_key_documents(
    cache: &ConfigCache,
    keys: Arc<KeySource>,
    policies: Arc<ArcSwap<HashMap<String, limits::TenantPolicy>>>,
) {
    let mut rx = cache.subscribe();
    tokio::spawn(async move {
        loop {
            let snap = rx.borrow_and_update().clone();
            policies.store(Arc::new(limits::tenant_policies(&snap)));
            keys.apply_snapshot(snap);
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The caller of a request: an OIDC token when OIDC is configured and the bearer
/// credential is a JWT, else an API key; with the key's own limits.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Arc<Principal>, limits::KeyLimits), Problem> {
    if let Some(verifier) = &state.oidc {
        let token = auth::bearer(headers)?;
        if oidc::looks_like_jwt(token) {
            return Ok((
                Arc::new(verifier.verify(token).await?),
                limits::KeyLimits::default(),
            ));
        }
    }
    let keys = state.keys.load();
    let entry = keys.authenticate(headers)?;
    Ok((
        entry.principal.clone(),
        limits::KeyLimits {
            rpm: entry.rpm,
            tpm: entry.tpm,
            budget_usd_month: entry.budget_usd_month,
        },
    ))
}

/// Authenticates the caller of every API route and checks that its roles grant the
/// route's permission (see [`rbac`]); leaves the principal in the request for the
/// handler.
async fn authorize(
    state: &AppState,
    mut req: Request,
    next: impl AsyncFnOnce(Request) -> Response,
) -> Response {
    use axum::response::IntoResponse;
    let route = req.extensions().get::<MatchedPath>();
    let Some(perm) = route.and_then(|r| rbac::required(req.method(), r.as_str(), req.uri().path()))
    else {
        return next(req).await;
    };
    // Every refusal says who was refused and why, for the audit trail.
    let refuse = |mut resp: Response, principal: Option<&Principal>, reason: String| {
        resp.extensions_mut().insert(audit_trail::Refused {
            principal: principal.cloned(),
            reason,
        });
        resp
    };
    let (principal, key_limits) = match authenticate(state, req.headers()).await {
        Ok(v) => v,
        Err(p) => {
            let reason = p.detail.clone();
            return refuse(p.into_response(), None, reason);
        }
    };
    tracing::Span::current().record("subject", principal.subject.as_str());
    if !rbac::grants(&principal, perm) {
        let roles = principal
            .roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let reason =
            format!("this needs the permission {perm}; your roles ({roles}) do not grant it");
        let resp = Problem::forbidden(reason.clone()).into_response();
        return refuse(resp, Some(&principal), reason);
    }
    if perm == rbac::Permission::ModelsInvoke
        && let Err(resp) = limits::check(state, &principal, key_limits).await
    {
        let reason = match resp.status() {
            StatusCode::TOO_MANY_REQUESTS => "rate limited".to_owned(),
            StatusCode::PAYMENT_REQUIRED => "budget exhausted".to_owned(),
            s => format!("refused with status {}", s.as_u16()),
        };
        return refuse(resp, Some(&principal), reason);
    }
    req.extensions_mut().insert(Authenticated(principal));
    next(req).await
}

async fn fallback(uri: axum::http::Uri) -> problem::Problem {
    problem::Problem::not_found(format!("no route for {}", uri.path()))
}

/// The HTTP API.
pub fn api(state: AppState) -> Router {
    let router = Router::new()
        .route("/v1/chat/completions", post(routes::chat::completions))
        .route("/v1/models", get(routes::chat::models))
        .route("/v1/usage", get(routes::usage::usage))
        .route("/v1/audit/events", get(routes::audit::events))
        .route("/v1/audit/export", get(routes::audit::export))
        .route("/v1/audit/verify", get(routes::audit::verify))
        .route("/v1/audit/checkpoints", get(routes::audit::checkpoints))
        .route("/v1/audit/public-key", get(routes::audit::public_key))
        .route("/v1/audit/report", get(routes::audit::report))
        .route("/v1/runs", post(routes::runs::start))
        .route("/v1/runs/{id}", get(routes::runs::get))
        .route("/v1/agents", any(routes::not_implemented))
        .route("/v1/agents/{*rest}", any(routes::not_implemented))
        .route("/v1/runs/{id}/{*rest}", any(routes::not_implemented))
        .route("/v1/crews", any(routes::not_implemented))
        .route("/v1/crews/{*rest}", any(routes::not_implemented))
        .route("/v1/config/apply", post(routes::config::apply))
        .route("/v1/config/schemas/{kind}", get(routes::config::schema))
        .route("/v1/config/{kind}", get(routes::config::list))
        .route(
            "/v1/config/{kind}/{name}",
            get(routes::config::get)
                .put(routes::config::put)
                .delete(routes::config::delete),
        )
        .route(
            "/v1/config/{kind}/{name}/history",
            get(routes::config::history),
        )
        .route(
            "/v1/config/{kind}/{name}/rollback",
            post(routes::config::rollback),
        )
        .route("/v1/flags/{*rest}", any(routes::not_implemented))
        .route(
            "/ofrep/v1/evaluate/flags",
            post(routes::ofrep::evaluate_all),
        )
        .route(
            "/ofrep/v1/evaluate/flags/{key}",
            post(routes::ofrep::evaluate_one),
        )
        .route("/ofrep/v1/{*rest}", any(routes::not_implemented))
        .route("/v1/audit/{*rest}", any(routes::not_implemented))
        .route(
            "/v1/keys",
            post(routes::keys::create).get(routes::keys::list),
        )
        .route("/v1/keys/{id}", axum::routing::delete(routes::keys::revoke))
        .route("/openapi.json", get(openapi::serve))
        .fallback(fallback);
    // One stack, wrapped around each route once: every `Router::layer` call would box
    // the route again, and each box is cloned and allocated on every request. The
    // middleware steps are plain async functions chained inside two layers (each layer
    // boxes its future and the rest of the chain), on either side of CORS.
    let layers = tower::ServiceBuilder::new()
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            (state.clone(), edge::Edge::new(&state.http)),
            outer_middleware,
        ))
        .option_layer(edge::cors(&state.http))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            inner_middleware,
        ));
    router.layer(layers).with_state(state)
}

/// Outside CORS, outermost first: every response, refusals included, says which config
/// it saw ([`routes::config::revision_header`]); then the request id, span, metrics and
/// log line ([`observe`]); then the edge limits and security headers ([`edge::guard`]).
async fn outer_middleware(
    axum::extract::State((state, edge)): axum::extract::State<(AppState, Arc<edge::Edge>)>,
    req: Request,
    next: Next,
) -> Response {
    routes::config::revision_header(&state, req, async |req| {
        observe(&state, req, async |req| {
            edge::guard(&edge, req, async |req| next.run(req).await).await
        })
        .await
    })
    .await
}

/// Inside CORS, outermost first: the audit record, around authentication so that
/// refusals are audited too ([`audit_trail::record`]); authentication and authorisation
/// ([`authorize`]); then, once the caller is known, admission of fail-closed audit
/// tenants ([`audit_trail::admit`]).
async fn inner_middleware(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    audit_trail::record(&state, req, async |req| {
        authorize(&state, req, async |req| {
            audit_trail::admit(&state, req, async |req| next.run(req).await).await
        })
        .await
    })
    .await
}

pub struct Application {
    http: TcpListener,
    admin: TcpListener,
    router: Router,
    readiness: Readiness,
    metrics: MetricsRegistry,
    grace: Duration,
    membership: Option<crewmesh_kit::membership::Membership>,
    audit_trail: audit_trail::AuditTrail,
    _tls_reloader: crewmesh_kit::tasks::AbortOnDrop,
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
        let tls_reloader = tls.spawn_reloader(crewmesh_kit::tls::RELOAD_INTERVAL);
        let peers = Peers::new(&common.trust_domain, common.peers.clone(), tls);
        let startup = |e: crewmesh_kit::clients::PeerError| GatewayError::Startup(e.to_string());
        let readiness = Readiness::new();
        let config_store = peers.config().map_err(startup)?;
        let key_source = Arc::new(KeySource::new(config.bootstrap_api_key.clone()));
        let key_docs = ConfigCache::spawn(
            config_store.clone(),
            vec![Kind::Apikey, Kind::Tenant],
            config.edge.config_refresh,
            readiness.clone(),
            &metrics,
        );
        let tenant_policies = Arc::new(ArcSwap::from_pointee(HashMap::new()));
        follow_key_documents(&key_docs, key_source.clone(), tenant_policies.clone());
        let replica_count = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let membership = match &config.edge.membership {
            Some(m) => Some(
                crewmesh_kit::membership::Membership::join(m, "gateways", replica_count.clone())
                    .await
                    .map_err(|e| GatewayError::Startup(e.to_string()))?,
            ),
            None => None,
        };
        let state = AppState(Arc::new(SharedState {
            keys: key_source.ring().clone(),
            key_source,
            config_store,
            config_docs: key_docs.clone(),
            tenant_policies,
            limiter: Arc::new(limits::Limiter::new(replica_count)),
            spend: Arc::new(limits::SpendCache::new(config.edge.spend_cache_ttl)),
            oidc: config
                .edge
                .oidc
                .clone()
                .map(|o| Arc::new(oidc::OidcVerifier::new(*o))),
            router: peers.router().map_err(startup)?,
            agents: AgentServiceClient::new(peers.channel(Service::AgentRuntime).map_err(startup)?),
            audit: peers.audit().map_err(startup)?,
            metrics: peers.metrics().map_err(startup)?,
            upstream_timeout: config.upstream_timeout,
            http: Arc::new(config.edge.http.clone()),
            audit_trail: audit_trail::AuditTrail::new(
                peers
                    .audit_client(Service::Gateway, &common.server, &metrics)
                    .map_err(startup)?,
            ),
            http_metrics: HttpMetrics::register(&metrics),
        }));
        let audit_trail = state.audit_trail.clone();
        let http = bind("HTTP API", config.http_addr).await?;
        let admin = bind("admin port", common.server.admin_addr).await?;
        Ok(Self {
            http,
            admin,
            router: api(state),
            readiness,
            membership,
            audit_trail,
            metrics,
            grace: common.server.grace(),
            _tls_reloader: tls_reloader,
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
        if let Some(m) = self.membership {
            m.leave().await;
        }
        let _ = stop_tx.send(true);
        match tokio::time::timeout(self.grace, async { (http.await, admin.await) }).await {
            Ok((Ok(Err(e)), _)) | Ok((_, Ok(Err(e)))) => return Err(GatewayError::Serve(e)),
            Ok(_) => {}
            Err(_) => tracing::warn!(
                service = "gateway",
                "grace period elapsed; closing remaining connections"
            ),
        }
        if !self.audit_trail.flush(self.grace).await {
            tracing::warn!(
                service = "gateway",
                "audit events not delivered at shutdown stay in the spool"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_metrics_count_by_route_method_and_status_with_a_bounded_method_label() {
        let registry = MetricsRegistry::new();
        let m = HttpMetrics::register(&registry);
        let brew = axum::http::Method::from_bytes(b"BREW").unwrap();
        m.observe("/v1/chat/completions", "POST", 200, 0.001);
        m.observe("/v1/chat/completions", "POST", 200, 0.002);
        m.observe("/v1/chat/completions", "POST", 429, 0.001);
        m.observe("unmatched", method_label(&brew), 404, 0.001);
        let text = registry.encode();
        let count = |labels: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("crewmesh_gateway_http_requests_total{") && l.contains(labels)
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(
            count(r#"route="/v1/chat/completions",method="POST",status="200""#).as_deref(),
            Some("2"),
            "{text}"
        );
        assert_eq!(
            count(r#"route="/v1/chat/completions",method="POST",status="429""#).as_deref(),
            Some("1")
        );
        assert_eq!(
            count(r#"route="unmatched",method="other",status="404""#).as_deref(),
            Some("1")
        );
        assert!(!text.contains("BREW"), "{text}");
        assert!(text.contains(
            r#"crewmesh_gateway_http_duration_seconds_count{route="/v1/chat/completions",method="POST",status="200"} 2"#
        ));
    }
}
