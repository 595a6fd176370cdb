//! The metrics service's `Application`: TLS, store, listeners, serving.

use std::future::Future;
use std::net::SocketAddr;

use crewmesh_kit::mesh::Service;
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::server::MeshServer;
use crewmesh_kit::tasks::AbortOnDrop;
use crewmesh_kit::tls::MeshTls;
use crewmesh_proto::metrics::v1::metrics_service_server::MetricsServiceServer;

use crate::api::MetricsApi;
use crate::config::MetricsConfig;
use crate::counters::UsageCounters;
use crate::error::Result;
use crate::store::Backend;

/// A built metrics service: listeners bound, store connected and migrated.
pub struct Application {
    server: MeshServer,
    store: Backend,
    _tls_reloader: AbortOnDrop,
}

impl Application {
    /// Validates the config, loads TLS (and watches the files), connects the store,
    /// runs its migrations, registers the usage counters in `metrics` (the
    /// process-wide registry) and binds the listeners (port 0 picks a free port).
    pub async fn build(config: MetricsConfig, metrics: MetricsRegistry) -> Result<Self> {
        config.validate()?;
        let tls = MeshTls::load(config.common.tls.clone())?;
        let tls_reloader = tls.spawn_reloader(crewmesh_kit::tls::RELOAD_INTERVAL);
        let store = Backend::connect(&config.database).await?;
        let counters = UsageCounters::register(&metrics);
        let mut server = MeshServer::bind(Service::Metrics, &config.common, tls, metrics).await?;
        match &store {
            Backend::Postgres(s) => server.add_service(MetricsServiceServer::new(MetricsApi::new(
                s.clone(),
                counters,
            ))),
            Backend::Sqlite(s) => server.add_service(MetricsServiceServer::new(MetricsApi::new(
                s.clone(),
                counters,
            ))),
        }
        tracing::info!(
            grpc = %server.grpc_addr(),
            admin = %server.admin_addr(),
            store = match &store { Backend::Postgres(_) => "postgres", Backend::Sqlite(_) => "sqlite" },
            "metrics service built"
        );
        Ok(Self {
            server,
            store,
            _tls_reloader: tls_reloader,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.server.grpc_addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.server.admin_addr()
    }

    /// Serves until `shutdown` resolves, drains in-flight calls within the grace
    /// period, then closes the database pool.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let served = self.server.run(shutdown).await;
        self.store.close().await;
        served?;
        Ok(())
    }
}
