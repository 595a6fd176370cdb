//! crewmesh router: picks a provider deployment for each model call.
//!
//! The router serves `crewmesh.router.v1.RouterService` over mTLS. It reads its model
//! aliases and providers from the config service (kept current by the kit's config
//! cache) and calls OpenAI-compatible and Anthropic upstreams, whole or streamed. Per
//! alias a strategy orders the deployments (priority, weighted random, least latency,
//! cost, adaptive); retryable failures are retried with backoff inside the caller's
//! deadline and then fall back to the next deployment and to fallback aliases;
//! per-deployment circuit breakers, RPM/TPM limits (split between replicas counted in
//! etcd) and an opt-in response cache apply. Every call is accounted to the metrics
//! and audit services asynchronously, off the request path. See `docs/routing.md`.

#![forbid(unsafe_code)]

pub mod anthropic;
pub mod breaker;
pub mod cache;
pub mod catalog;
pub mod error;
pub mod limits;
pub mod provider;
mod service;
pub mod strategy;
#[cfg(test)]
mod tests;
pub mod upstream_http;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use crewmesh_kit::clients::{AuditClient, Peers, UsageClient};
use crewmesh_kit::config_cache::ConfigCache;
use crewmesh_kit::mesh::Service;
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::server::MeshServer;
use crewmesh_kit::settings::{CommonConfig, ConfigError, Problems};
use crewmesh_kit::tls::MeshTls;
use crewmesh_proto::config::v1::Kind;
use crewmesh_proto::router::v1::router_service_server::RouterServiceServer;

pub use error::RouterError;

/// The router's configuration.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub common: CommonConfig,
    /// How often the model catalog is refreshed from the config service.
    pub refresh_interval: Duration,
    /// Provider timeouts used where a provider document sets none.
    pub upstream_connect_timeout: Duration,
    pub upstream_first_byte_timeout: Duration,
    pub upstream_timeout: Duration,
    /// Bounds of the response cache (entries and bytes; 0 entries disables it).
    pub cache_max_entries: usize,
    pub cache_max_bytes: usize,
    /// Replica membership in etcd, so provider limits are split between replicas;
    /// `None` for a single router (it enforces the whole limit).
    pub membership: Option<crewmesh_kit::membership::MembershipConfig>,
}

impl RouterConfig {
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            refresh_interval: Duration::from_secs(1),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_first_byte_timeout: Duration::from_secs(60),
            upstream_timeout: Duration::from_secs(120),
            cache_max_entries: 10_000,
            cache_max_bytes: 64 << 20,
            membership: None,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.common
            .validate(Service::Router, &[Service::Config], &mut p);
        if self.refresh_interval.is_zero() {
            p.add(
                "router.refresh_interval_ms",
                "must be positive",
                "set e.g. 1000",
            );
        }
        p.into_result()
    }
}

pub struct Application {
    server: MeshServer,
    usage: Option<UsageClient>,
    audit: Option<AuditClient>,
    membership: Option<crewmesh_kit::membership::Membership>,
    /// The config watch runs as long as this handle lives.
    _config: ConfigCache,
    _tls_reloader: crewmesh_kit::tasks::AbortOnDrop,
}

impl Application {
    pub async fn build(
        config: RouterConfig,
        metrics: MetricsRegistry,
    ) -> Result<Self, RouterError> {
        let common = &config.common;
        let tls =
            MeshTls::load(common.tls.clone()).map_err(|e| RouterError::Startup(e.to_string()))?;
        let tls_reloader = tls.spawn_reloader(crewmesh_kit::tls::RELOAD_INTERVAL);
        let peers = Peers::new(&common.trust_domain, common.peers.clone(), tls.clone());
        let mut server = MeshServer::bind(Service::Router, common, tls, metrics.clone()).await?;

        let config_client = peers
            .config()
            .map_err(|e| RouterError::Startup(e.to_string()))?;
        let cache = ConfigCache::spawn(
            config_client,
            vec![Kind::Provider, Kind::Model, Kind::Flag],
            config.refresh_interval,
            server.readiness(),
            &metrics,
        );
        let catalog = Arc::new(ArcSwap::from_pointee(catalog::Catalog::default()));
        {
            let catalog = catalog.clone();
            let variant_metrics = catalog::VariantMetrics::register(&metrics);
            let mut rx = cache.subscribe();
            tokio::spawn(async move {
                loop {
                    let snap = rx.borrow_and_update().clone();
                    catalog.store(Arc::new(
                        catalog::Catalog::from_snapshot(&snap)
                            .with_metrics(variant_metrics.clone()),
                    ));
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
        let usage = peers
            .usage_client(&common.server, &metrics)
            .map_err(|e| RouterError::Startup(e.to_string()))?;
        let audit = peers
            .audit_client(Service::Router, &common.server, &metrics)
            .map_err(|e| RouterError::Startup(e.to_string()))?;
        let provider = provider::ProviderClient::new(provider::DefaultTimeouts {
            connect: config.upstream_connect_timeout,
            first_byte: config.upstream_first_byte_timeout,
            total: config.upstream_timeout,
        })
        .map_err(|e| RouterError::Startup(e.to_string()))?;
        let replicas = Arc::new(AtomicU64::new(1));
        let membership = match &config.membership {
            Some(m) => Some(
                crewmesh_kit::membership::Membership::join(m, "routers", replicas.clone())
                    .await
                    .map_err(|e| RouterError::Startup(e.to_string()))?,
            ),
            None => None,
        };
        let svc = service::RouterService {
            core: Arc::new(service::Core {
                catalog,
                provider,
                recorder: service::Recorder::new(usage.clone(), audit.clone()),
                breakers: Arc::new(breaker::Breakers::new(&metrics)),
                stats: Arc::new(strategy::Stats::default()),
                cache: Arc::new(cache::ResponseCache::new(
                    config.cache_max_entries,
                    config.cache_max_bytes,
                )),
                limits: Arc::new(limits::Limits::new(replicas)),
            }),
        };
        server.add_service(RouterServiceServer::new(svc));
        Ok(Self {
            server,
            usage,
            audit,
            membership,
            _config: cache,
            _tls_reloader: tls_reloader,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.server.grpc_addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.server.admin_addr()
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RouterError> {
        self.server.run(shutdown).await?;
        if let Some(m) = self.membership {
            m.leave().await;
        }
        if let Some(u) = &self.usage {
            u.flush(Duration::from_secs(5)).await;
        }
        if let Some(a) = &self.audit {
            a.flush(Duration::from_secs(5)).await;
        }
        Ok(())
    }
}
