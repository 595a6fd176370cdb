//! crewmesh router: picks a provider deployment for each model call.
//!
//! The router serves `crewmesh.router.v1.RouterService` over mTLS. It reads its model
//! aliases and providers from the config service (kept current by the kit's config
//! cache), calls OpenAI-compatible upstreams, falls back to the next deployment of an
//! alias on retryable failures, and accounts every call to the metrics and audit
//! services asynchronously, off the request path.

#![forbid(unsafe_code)]

pub mod catalog;
pub mod error;
pub mod provider;
mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use crewmesh_kit::batch::BatchConfig;
use crewmesh_kit::clients::{AuditClient, Peers, UsageClient};
use crewmesh_kit::config_cache::ConfigCache;
use crewmesh_kit::identity::SpiffeId;
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
    pub upstream_connect_timeout: Duration,
    pub upstream_timeout: Duration,
}

impl RouterConfig {
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            refresh_interval: Duration::from_secs(1),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(120),
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
}

impl Application {
    pub async fn build(
        config: RouterConfig,
        metrics: MetricsRegistry,
    ) -> Result<Self, RouterError> {
        let common = &config.common;
        let tls =
            MeshTls::load(common.tls.clone()).map_err(|e| RouterError::Startup(e.to_string()))?;
        tls.spawn_reloader(Duration::from_secs(5));
        let peers = Peers::new(&common.trust_domain, common.peers.clone(), tls.clone());
        let mut server = MeshServer::bind(Service::Router, common, tls, metrics.clone()).await?;

        let config_client = peers
            .config()
            .map_err(|e| RouterError::Startup(e.to_string()))?;
        let cache = ConfigCache::spawn(
            config_client,
            vec![Kind::Provider, Kind::Model],
            config.refresh_interval,
            server.readiness(),
            &metrics,
        );
        let catalog = Arc::new(ArcSwap::from_pointee(catalog::Catalog::default()));
        {
            let catalog = catalog.clone();
            let mut rx = cache.subscribe();
            tokio::spawn(async move {
                loop {
                    let snap = rx.borrow_and_update().clone();
                    catalog.store(Arc::new(catalog::Catalog::from_snapshot(&snap)));
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
        let me = SpiffeId::new(&common.trust_domain, Service::Router.name())
            .map_err(|e| RouterError::Startup(e.to_string()))?;
        let usage = match common.peers.metrics {
            Some(_) => Some(UsageClient::new(
                peers
                    .metrics()
                    .map_err(|e| RouterError::Startup(e.to_string()))?,
                BatchConfig::default(),
            )),
            None => None,
        };
        let audit = match common.peers.audit {
            Some(_) => Some(AuditClient::new(
                peers
                    .audit()
                    .map_err(|e| RouterError::Startup(e.to_string()))?,
                me,
                BatchConfig::default(),
            )),
            None => None,
        };
        let provider =
            provider::ProviderClient::new(config.upstream_connect_timeout, config.upstream_timeout)
                .map_err(|e| RouterError::Startup(e.to_string()))?;
        let svc = service::RouterService {
            catalog,
            provider,
            usage: usage.clone(),
            audit: audit.clone(),
        };
        server.add_service(RouterServiceServer::new(svc));
        Ok(Self {
            server,
            usage,
            audit,
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
        if let Some(u) = &self.usage {
            u.flush(Duration::from_secs(5)).await;
        }
        if let Some(a) = &self.audit {
            a.flush(Duration::from_secs(5)).await;
        }
        Ok(())
    }
}
