//! Server bootstrap shared by every service: binds the mTLS gRPC port and the admin
//! HTTP port, serves health and reflection next to the service's own gRPC services,
//! wraps everything in the common tower layers, and drains on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic_health::server::HealthReporter;
use tower::Service as TowerService;
use tower::util::BoxCloneSyncService;

use crate::admin::{self, Readiness};
use crate::authz::AuthzLayer;
use crate::http2::GrpcRoutes;
use crate::mesh::Service;
use crate::observe::{MetricsRegistry, RpcMetrics, RpcMetricsLayer};
use crate::settings::CommonConfig;
use crate::telemetry::GrpcTraceLayer;
use crate::tls::MeshTls;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Grpc(tokio::task::JoinError),
    #[error("admin server failed: {0}")]
    Admin(std::io::Error),
    #[error("service {0} has no gRPC address configured")]
    NoGrpcAddr(Service),
}

/// A service's listeners and gRPC routes, before it starts serving.
pub struct MeshServer {
    service: Service,
    trust_domain: String,
    tls: MeshTls,
    grpc: TcpListener,
    admin: TcpListener,
    grace: Duration,
    routes: GrpcRoutes,
    readiness: Readiness,
    metrics: MetricsRegistry,
    admin_routes: axum::Router,
}

impl MeshServer {
    /// Binds both listeners (port 0 picks a free port).
    pub async fn bind(
        service: Service,
        common: &CommonConfig,
        tls: MeshTls,
        metrics: MetricsRegistry,
    ) -> Result<Self, ServerError> {
        let grpc_addr = common
            .server
            .grpc_addr
            .ok_or(ServerError::NoGrpcAddr(service))?;
        let grpc = TcpListener::bind(grpc_addr)
            .await
            .map_err(|source| ServerError::Bind {
                what: "gRPC port",
                addr: grpc_addr,
                source,
            })?;
        let admin = bind_admin(common.server.admin_addr).await?;
        Ok(Self {
            service,
            trust_domain: common.trust_domain.clone(),
            tls,
            grpc,
            admin,
            grace: common.server.grace(),
            routes: GrpcRoutes::default(),
            readiness: Readiness::new(),
            metrics,
            admin_routes: axum::Router::new(),
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    pub fn metrics(&self) -> &MetricsRegistry {
        &self.metrics
    }

    /// Adds one of the service's own gRPC services.
    pub fn add_service<S>(&mut self, svc: S)
    where
        S: TowerService<Request<Body>, Response = Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.routes.add(S::NAME, BoxCloneSyncService::new(svc));
    }

    /// Extra admin HTTP routes (merged into `/healthz`, `/readyz`, `/metrics`).
    pub fn merge_admin(&mut self, routes: axum::Router) {
        let current = std::mem::take(&mut self.admin_routes);
        self.admin_routes = current.merge(routes);
    }

    /// Serves until `shutdown` resolves, then stops accepting, reports NOT_SERVING,
    /// and gives in-flight calls up to the grace period to finish.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let (health, health_service): (HealthReporter, _) = tonic_health::server::health_reporter();
        for name in self.service.grpc_service_names() {
            health
                .set_service_status(*name, tonic_health::ServingStatus::Serving)
                .await;
        }
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crewmesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the compiled descriptor set is valid");
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crewmesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("the compiled descriptor set is valid");
        self.add_service(health_service);
        self.add_service(reflection_v1);
        self.add_service(reflection_v1alpha);

        let rpc_metrics = RpcMetrics::register(&self.metrics, self.service.name());
        // Outermost first:
        let layers = tower::ServiceBuilder::new()
            // a span per request, child of the caller's trace, so every later log line
            // (denials included) carries the trace id;
            .layer(GrpcTraceLayer::new(self.service.name()))
            // count and time every request, refused ones too;
            .layer(RpcMetricsLayer::new(rpc_metrics))
            // then deny anything the caller's identity may not do.
            .layer(AuthzLayer::new(self.service, &self.trust_domain));

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        };

        let incoming = crate::transport::mesh_incoming(self.grpc, self.tls.clone());
        let service = layers.service(std::mem::take(&mut self.routes));
        let grpc = crate::http2::serve(incoming, service, stop_rx.clone());
        let mut grpc = tokio::spawn(grpc);

        let admin_router =
            admin::router(self.readiness.clone(), self.metrics.clone()).merge(self.admin_routes);
        let admin = axum::serve(self.admin, admin_router)
            .with_graceful_shutdown(wait_stop(stop_rx.clone()));
        let admin = tokio::spawn(async move { admin.await });

        self.readiness.set_ready("server");
        tracing::info!(service = self.service.name(), "serving");
        shutdown.await;
        tracing::info!(
            service = self.service.name(),
            grace_secs = self.grace.as_secs(),
            "shutting down: draining in-flight requests"
        );
        self.readiness.set_not_ready("server", "shutting down");
        health.set_not_serving::<tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let _ = stop_tx.send(true);

        let drained = tokio::time::timeout(self.grace, async {
            let g = (&mut grpc).await;
            let a = admin.await;
            (g, a)
        })
        .await;
        match drained {
            Ok((g, a)) => {
                if let Err(e) = g {
                    return Err(ServerError::Grpc(e));
                }
                if let Ok(Err(e)) = a {
                    return Err(ServerError::Admin(e));
                }
            }
            Err(_) => {
                tracing::warn!(
                    service = self.service.name(),
                    "grace period elapsed; closing remaining connections"
                );
                grpc.abort();
            }
        }
        Ok(())
    }
}

/// Binds an admin HTTP listener.
pub async fn bind_admin(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            what: "admin port",
            addr,
            source,
        })
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
