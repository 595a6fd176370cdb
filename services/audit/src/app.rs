//! The audit service's `Application`: TLS, store, listeners, serving.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use crewmesh_kit::mesh::Service;
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::server::MeshServer;
use crewmesh_kit::tasks::AbortOnDrop;
use crewmesh_kit::tls::MeshTls;
use crewmesh_proto::audit::v1::audit_service_server::AuditServiceServer;

use std::sync::Arc;

use crate::api::AuditApi;
use crate::checkpoint::{Checkpointer, Signer};
use crate::config::AuditConfig;
use crate::error::Result;
use crate::event::DEFAULT_CHAIN;
use crate::store::{Backend, PgAuditStore, SqliteAuditStore};

/// A built audit service: listeners bound, store connected and migrated.
pub struct Application {
    server: MeshServer,
    store: Backend,
    checkpointer: Option<CheckpointTask>,
    _tls_reloader: AbortOnDrop,
}

/// The checkpointer of whichever store is in use.
enum CheckpointTask {
    Postgres(Arc<Checkpointer<PgAuditStore>>, Duration, Option<u64>),
    Sqlite(Arc<Checkpointer<SqliteAuditStore>>, Duration, Option<u64>),
}

impl CheckpointTask {
    async fn run(self, stop: impl Future<Output = ()>) {
        match self {
            CheckpointTask::Postgres(c, every, keep) => c.run(every, keep, stop).await,
            CheckpointTask::Sqlite(c, every, keep) => c.run(every, keep, stop).await,
        }
    }
}

impl Application {
    /// Validates the config, loads TLS (and watches the files), connects the store,
    /// runs its migrations and binds the listeners (port 0 picks a free port).
    /// `metrics` is the process-wide registry.
    pub async fn build(config: AuditConfig, metrics: MetricsRegistry) -> Result<Self> {
        config.validate()?;
        let tls = MeshTls::load(config.common.tls.clone())?;
        let tls_reloader = tls.spawn_reloader(crewmesh_kit::tls::RELOAD_INTERVAL);
        let store = Backend::connect(&config.database).await?;
        let signer = match &config.checkpoints.signing_key_file {
            Some(path) => Some(Signer::from_file(
                path,
                config.checkpoints.create_key_if_missing,
            )?),
            None => {
                tracing::warn!(
                    "no checkpoints.signing_key_file: the audit chain is not checkpointed"
                );
                None
            }
        };
        let every = config.checkpoints.every_events;
        let interval = Duration::from_secs(config.checkpoints.interval_secs);
        let retention = config.checkpoints.retention_days;
        let mut server = MeshServer::bind(Service::Audit, &config.common, tls, metrics).await?;
        let checkpointer = match (&store, signer) {
            (Backend::Postgres(s), Some(signer)) => {
                let c = Arc::new(Checkpointer::new(s.clone(), signer, DEFAULT_CHAIN, every).await?);
                server.add_service(AuditServiceServer::new(AuditApi::with_checkpointer(
                    s.clone(),
                    c.clone(),
                )));
                Some(CheckpointTask::Postgres(c, interval, retention))
            }
            (Backend::Sqlite(s), Some(signer)) => {
                let c = Arc::new(Checkpointer::new(s.clone(), signer, DEFAULT_CHAIN, every).await?);
                server.add_service(AuditServiceServer::new(AuditApi::with_checkpointer(
                    s.clone(),
                    c.clone(),
                )));
                Some(CheckpointTask::Sqlite(c, interval, retention))
            }
            (Backend::Postgres(s), None) => {
                server.add_service(AuditServiceServer::new(AuditApi::new(s.clone())));
                None
            }
            (Backend::Sqlite(s), None) => {
                server.add_service(AuditServiceServer::new(AuditApi::new(s.clone())));
                None
            }
        };
        tracing::info!(
            grpc = %server.grpc_addr(),
            admin = %server.admin_addr(),
            store = match &store { Backend::Postgres(_) => "postgres", Backend::Sqlite(_) => "sqlite" },
            "audit service built"
        );
        Ok(Self {
            server,
            store,
            checkpointer,
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
    /// period, takes a last checkpoint, then closes the database pool.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let checkpoints = self.checkpointer.map(|task| {
            tokio::spawn(task.run(async move {
                let _ = stop_rx.await;
            }))
        });
        let served = self.server.run(shutdown).await;
        let _ = stop_tx.send(());
        if let Some(task) = checkpoints {
            let _ = task.await;
        }
        self.store.close().await;
        served?;
        Ok(())
    }
}
