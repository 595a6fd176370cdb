//! Clients every service uses to reach the mesh: typed gRPC clients over mTLS
//! channels, and the asynchronous audit and usage clients.

use std::time::{Duration, SystemTime};

use crewmesh_proto::audit::v1 as audit;
use crewmesh_proto::audit::v1::audit_service_client::AuditServiceClient;
use crewmesh_proto::config::v1::config_service_client::ConfigServiceClient;
use crewmesh_proto::metrics::v1 as metrics;
use crewmesh_proto::metrics::v1::metrics_service_client::MetricsServiceClient;
use crewmesh_proto::router::v1::router_service_client::RouterServiceClient;
use tonic::transport::Channel;

use crate::batch::{BatchConfig, Batcher};
use crate::identity::SpiffeId;
use crate::mesh::Service;
use crate::observe::MetricsRegistry;
use crate::principal::Principal;
use crate::settings::PeersConfig;
use crate::spool::{SpoolBatcher, SpoolConfig};
use crate::telemetry::InjectTrace;
use crate::tls::MeshTls;
use crate::transport::{ConnectError, mesh_channel};

/// A channel to a mesh service that carries the caller's trace context.
pub type MeshChannel = InjectTrace<Channel>;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no address configured for the {0} service (set peers.{1})")]
    Missing(Service, String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Identity(#[from] crate::identity::SpiffeIdError),
    #[error("cannot open the audit spool: {0}")]
    Spool(std::io::Error),
}

/// Opens channels to the other services named in `[peers]`.
#[derive(Clone, Debug)]
pub struct Peers {
    trust_domain: String,
    peers: PeersConfig,
    tls: MeshTls,
}

impl Peers {
    pub fn new(trust_domain: &str, peers: PeersConfig, tls: MeshTls) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            peers,
            tls,
        }
    }

    pub fn channel(&self, service: Service) -> Result<MeshChannel, PeerError> {
        let addr = self
            .peers
            .get(service)
            .ok_or_else(|| PeerError::Missing(service, service.name().replace('-', "_")))?;
        let id = SpiffeId::new(&self.trust_domain, service.name())?;
        Ok(InjectTrace::new(mesh_channel(addr, id, self.tls.clone())?))
    }

    pub fn config(&self) -> Result<ConfigServiceClient<MeshChannel>, PeerError> {
        Ok(ConfigServiceClient::new(self.channel(Service::Config)?))
    }

    pub fn router(&self) -> Result<RouterServiceClient<MeshChannel>, PeerError> {
        Ok(RouterServiceClient::new(self.channel(Service::Router)?))
    }

    pub fn audit(&self) -> Result<AuditServiceClient<MeshChannel>, PeerError> {
        Ok(AuditServiceClient::new(self.channel(Service::Audit)?))
    }

    /// The audit client of `service`, or `None` when no audit peer is configured.
    /// It spools to `<state_dir>/spool/audit` when the service has a state directory
    /// (so nothing accepted is lost across an audit outage or a crash), and queues in
    /// memory otherwise.
    pub fn audit_client(
        &self,
        service: Service,
        server: &crate::settings::ServerConfig,
        metrics: &MetricsRegistry,
    ) -> Result<Option<AuditClient>, PeerError> {
        if self.peers.audit.is_none() {
            return Ok(None);
        }
        let me = SpiffeId::new(&self.trust_domain, service.name())?;
        let client = self.audit()?;
        let audit = match &server.state_dir {
            Some(dir) => AuditClient::with_spool(
                client,
                me,
                BatchConfig::default(),
                SpoolConfig::new(dir.join("spool").join("audit")),
                Some(metrics),
            )
            .map_err(PeerError::Spool)?,
            None => AuditClient::new(client, me, BatchConfig::default()),
        };
        Ok(Some(audit))
    }

    pub fn metrics(&self) -> Result<MetricsServiceClient<MeshChannel>, PeerError> {
        Ok(MetricsServiceClient::new(self.channel(Service::Metrics)?))
    }
}

/// Attaches a principal to an outgoing request.
pub fn with_principal<T>(msg: T, principal: &Principal) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    principal.insert_into(req.metadata_mut());
    req
}

/// Records audit events off the request path, in batches: through a bounded
/// in-memory queue ([`AuditClient::new`]), or through a durable local spool that
/// loses no accepted event across audit outages and crashes of the sender
/// ([`AuditClient::with_spool`], see [`crate::spool`]).
#[derive(Clone)]
pub struct AuditClient {
    sender: AuditSender,
    service: SpiffeId,
}

#[derive(Clone)]
enum AuditSender {
    Memory(Batcher<audit::EventInput>),
    Spool(SpoolBatcher<audit::EventInput>),
}

/// One Append call in flight.
type AppendFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send>>;

fn append_fn(
    client: AuditServiceClient<MeshChannel>,
) -> impl Fn(Vec<audit::EventInput>) -> AppendFuture + Send + Sync + 'static {
    move |events| {
        let mut client = client.clone();
        Box::pin(async move {
            client
                .append(audit::AppendRequest { events })
                .await
                .map(|_| ())
        })
    }
}

impl AuditClient {
    /// In-memory queue: events queued when the process dies, or beyond the retries
    /// of an outage, are lost. Prefer [`AuditClient::with_spool`].
    pub fn new(
        client: AuditServiceClient<MeshChannel>,
        service: SpiffeId,
        config: BatchConfig,
    ) -> Self {
        let batcher = Batcher::spawn("audit", config, append_fn(client));
        Self {
            sender: AuditSender::Memory(batcher),
            service,
        }
    }

    /// Every recorded event is first appended to the spool in `spool.dir`, then
    /// sent in order; what an earlier process left there is sent first. Reports the
    /// spooled bytes as `crewmesh_audit_spool_bytes` in `metrics`.
    pub fn with_spool(
        client: AuditServiceClient<MeshChannel>,
        service: SpiffeId,
        config: BatchConfig,
        spool: SpoolConfig,
        metrics: Option<&MetricsRegistry>,
    ) -> std::io::Result<Self> {
        let batcher = SpoolBatcher::open("audit", config, spool, metrics, append_fn(client))?;
        Ok(Self {
            sender: AuditSender::Spool(batcher),
            service,
        })
    }

    /// Queues an event; fills in id, time, the recording service and the trace id.
    pub fn record(&self, mut event: audit::EventInput) {
        if event.id.is_empty() {
            event.id = uuid::Uuid::now_v7().to_string();
        }
        if event.time.is_none() {
            event.time = Some(crewmesh_proto::time::to_timestamp(SystemTime::now()));
        }
        let actor = event.actor.get_or_insert_with(Default::default);
        if actor.service.is_empty() {
            actor.service = self.service.uri();
        }
        if event.trace_id.is_empty() {
            event.trace_id = crate::telemetry::current_trace_id();
        }
        match &self.sender {
            AuditSender::Memory(b) => {
                b.submit(event);
            }
            AuditSender::Spool(s) => {
                s.submit(&event);
            }
        }
    }

    /// Waits until everything recorded so far is delivered (or `timeout`). With a
    /// spool, what is not delivered stays on disk for the next start.
    pub async fn flush(&self, timeout: Duration) -> bool {
        match &self.sender {
            AuditSender::Memory(b) => b.flush(timeout).await,
            AuditSender::Spool(s) => s.flush(timeout).await,
        }
    }

    pub fn stats(&self) -> &crate::batch::BatchStats {
        match &self.sender {
            AuditSender::Memory(b) => b.stats(),
            AuditSender::Spool(s) => s.stats(),
        }
    }

    /// Bytes waiting in the spool (0 without one).
    pub fn spooled_bytes(&self) -> u64 {
        match &self.sender {
            AuditSender::Memory(_) => 0,
            AuditSender::Spool(s) => s.pending_bytes(),
        }
    }
}

/// Records usage off the request path, in batches.
#[derive(Clone)]
pub struct UsageClient {
    batcher: Batcher<metrics::UsageRecord>,
}

impl UsageClient {
    pub fn new(client: MetricsServiceClient<MeshChannel>, config: BatchConfig) -> Self {
        let batcher = Batcher::spawn("usage", config, move |records| {
            let mut client = client.clone();
            async move {
                client
                    .record(metrics::RecordRequest { records })
                    .await
                    .map(|_| ())
            }
        });
        Self { batcher }
    }

    pub fn record(&self, mut record: metrics::UsageRecord) {
        if record.id.is_empty() {
            record.id = uuid::Uuid::now_v7().to_string();
        }
        if record.time.is_none() {
            record.time = Some(crewmesh_proto::time::to_timestamp(SystemTime::now()));
        }
        self.batcher.submit(record);
    }

    pub async fn flush(&self, timeout: Duration) -> bool {
        self.batcher.flush(timeout).await
    }
}
