//! The agent runtime as a running service: build from config, serve, drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crewmesh_kit::clients::{AuditClient, Peers};
use crewmesh_kit::mesh::Service;
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::server::MeshServer;
use crewmesh_kit::tasks::AbortOnDrop;
use crewmesh_kit::tls::MeshTls;
use crewmesh_proto::agent::v1::agent_service_server::AgentServiceServer;

use crate::agents::AgentResolver;
use crate::error::Result;
use crate::execution::{Executor, RunMetrics};
use crate::service::AgentApi;
use crate::settings::AgentRuntimeConfig;
use crate::store::{self, RunStore};

/// How long the audit client may take to send what it holds at shutdown.
const AUDIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent runtime, bound and ready to serve.
pub struct Application {
    server: MeshServer,
    store: Arc<dyn RunStore>,
    executor: Arc<Executor>,
    audit: Option<AuditClient>,
    grace: Duration,
    _tls_reloader: AbortOnDrop,
}

impl Application {
    /// Loads TLS, connects the store and migrates it, binds the listeners (port 0
    /// works) and resumes every run a previous process left PENDING or RUNNING.
    pub async fn build(config: AgentRuntimeConfig, metrics: MetricsRegistry) -> Result<Self> {
        config.validate()?;
        let common = &config.common;
        let tls = MeshTls::load(common.tls.clone())?;
        let tls_reloader = tls.spawn_reloader(crewmesh_kit::tls::RELOAD_INTERVAL);

        let store = store::connect(&config.database).await?;

        let peers = Peers::new(&common.trust_domain, common.peers.clone(), tls.clone());
        let router = peers.router()?;
        let config_client = match common.peers.get(Service::Config) {
            Some(_) => Some(peers.config()?),
            None => None,
        };
        let audit = peers.audit_client(Service::AgentRuntime, &common.server, &metrics)?;

        let mut server =
            MeshServer::bind(Service::AgentRuntime, common, tls, metrics.clone()).await?;
        let executor = Arc::new(Executor::new(
            store.clone(),
            router,
            audit.clone(),
            RunMetrics::register(&metrics),
        ));
        let api = AgentApi::new(
            store.clone(),
            AgentResolver::new(config_client),
            executor.clone(),
            audit.clone(),
        );
        server.add_service(AgentServiceServer::new(api));

        let resumed = executor.resume_unfinished().await?;
        if resumed > 0 {
            tracing::info!(runs = resumed, "resumed unfinished runs");
        }

        Ok(Self {
            server,
            store,
            executor,
            audit,
            grace: common.server.grace(),
            _tls_reloader: tls_reloader,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.server.grpc_addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.server.admin_addr()
    }

    /// Serves until `shutdown` resolves; then stops accepting, drains in-flight calls,
    /// gives executing runs the grace period to finish (the rest stay in the store and
    /// resume at the next start), flushes the audit client and closes the store.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let served = self.server.run(shutdown).await;
        self.executor.drain(self.grace).await;
        if let Some(audit) = &self.audit
            && !audit.flush(AUDIT_FLUSH_TIMEOUT).await
        {
            tracing::warn!("audit events still queued at shutdown could not be sent");
        }
        self.store.close().await;
        served?;
        Ok(())
    }
}
