//! Building and running the config service: mTLS material, the store, the optional
//! audit client, and the mesh server that serves `ConfigService`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crewmesh_kit::admin::Readiness;
use crewmesh_kit::clients::{AuditClient, Peers};
use crewmesh_kit::mesh::Service;
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::server::MeshServer;
use crewmesh_kit::tasks::AbortOnDrop;
use crewmesh_kit::tls::MeshTls;
use crewmesh_proto::config::v1::config_service_server::ConfigServiceServer;
use tokio::task::JoinHandle;

use crate::document::DEFAULT_PREFIX;
use crate::error::Result;
use crate::service::ConfigApi;
use crate::settings::{ConfigServiceConfig, StoreConfig};
use crate::store::{ConfigStore, EmbeddedStore, EtcdStore, SharedStore};

/// How often the store is probed for `/readyz`.
const STORE_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How long shutdown waits for queued audit events to be sent.
const AUDIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// The readiness check that reports the store's health.
const STORE_CHECK: &str = "store";

/// The config service, bound and ready to run.
pub struct Application {
    server: MeshServer,
    store: SharedStore,
    audit: Option<AuditClient>,
    readiness: Readiness,
    /// Ends open watches at shutdown.
    stop_watches: tokio::sync::watch::Sender<bool>,
    _tls_reloader: AbortOnDrop,
}

/// Opens the store a config names.
pub async fn open_store(config: &StoreConfig) -> Result<SharedStore> {
    Ok(match config {
        StoreConfig::Embedded { path } => {
            Arc::new(EmbeddedStore::open(path, DEFAULT_PREFIX).await?)
        }
        StoreConfig::Etcd(etcd) => Arc::new(EtcdStore::connect(etcd).await?),
    })
}

impl Application {
    /// Loads TLS, opens the store (migrating the embedded one), connects the audit
    /// client when `peers.audit` is set, and binds the listeners (port 0 works).
    pub async fn build(config: ConfigServiceConfig, metrics: MetricsRegistry) -> Result<Self> {
        config.validate()?;
        let common = &config.common;
        let tls = MeshTls::load(common.tls.clone())?;
        let reloader = tls.spawn_reloader(crewmesh_kit::tls::RELOAD_INTERVAL);
        let store = open_store(&config.store).await?;
        let secrets = match &config.secrets_key_file {
            Some(path) => Some(Arc::new(crate::secrets::SecretsKey::load(path)?)),
            None => None,
        };
        let audit = Peers::new(&common.trust_domain, common.peers.clone(), tls.clone())
            .audit_client(Service::Config, &common.server, &metrics)?;
        let mut server = MeshServer::bind(Service::Config, common, tls, metrics).await?;
        let (stop_watches, stopping) = tokio::sync::watch::channel(false);
        server.add_service(ConfigServiceServer::new(
            ConfigApi::new(store.clone(), audit.clone())
                .with_secrets(secrets.clone())
                .with_stop_signal(stopping),
        ));
        let readiness = server.readiness();
        tracing::info!(
            grpc = %server.grpc_addr(),
            admin = %server.admin_addr(),
            store = store.backend(),
            audit = audit.is_some(),
            secrets_key = secrets.as_ref().map(|k| k.id()),
            "config service built"
        );
        Ok(Self {
            server,
            store,
            audit,
            readiness,
            stop_watches,
            _tls_reloader: reloader,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.server.grpc_addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.server.admin_addr()
    }

    /// The document store, e.g. for `crewmesh up` to seed default documents.
    pub fn store(&self) -> Arc<dyn ConfigStore> {
        self.store.clone()
    }

    /// Serves until `shutdown` resolves, drains in-flight calls, then flushes queued
    /// audit events.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let probe = AbortOnDrop(spawn_store_probe(
            self.store.clone(),
            self.readiness.clone(),
        ));
        let stop_watches = self.stop_watches;
        let served = self
            .server
            .run(async move {
                shutdown.await;
                let _ = stop_watches.send(true);
            })
            .await;
        drop(probe);
        if let Some(audit) = &self.audit
            && !audit.flush(AUDIT_FLUSH_TIMEOUT).await
        {
            tracing::warn!(
                timeout_secs = AUDIT_FLUSH_TIMEOUT.as_secs(),
                "audit events still queued at shutdown"
            );
        }
        served?;
        Ok(())
    }
}

/// Reports in `/readyz` whether the store answers.
fn spawn_store_probe(store: SharedStore, readiness: Readiness) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(STORE_PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut healthy = true;
        loop {
            tick.tick().await;
            match store.current_revision().await {
                Ok(_) => {
                    if !healthy {
                        tracing::info!(store = store.backend(), "config store reachable again");
                    }
                    healthy = true;
                    readiness.set_ready(STORE_CHECK);
                }
                Err(e) => {
                    if healthy {
                        tracing::warn!(store = store.backend(), error = %e, "config store unreachable");
                    }
                    healthy = false;
                    readiness.set_not_ready(STORE_CHECK, e.to_string());
                }
            }
        }
    })
}
