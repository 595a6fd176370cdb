//! Clients every service uses to reach the mesh: typed gRPC clients over mTLS
//! channels, and the asynchronous audit and usage clients.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crewmesh_proto::audit::v1 as audit;
use crewmesh_proto::audit::v1::audit_service_client::AuditServiceClient;
use crewmesh_proto::config::v1::config_service_client::ConfigServiceClient;
use crewmesh_proto::metrics::v1 as metrics;
use crewmesh_proto::metrics::v1::metrics_service_client::MetricsServiceClient;
use crewmesh_proto::router::v1::router_service_client::RouterServiceClient;

use crate::batch::{BatchConfig, Batcher};
use crate::identity::SpiffeId;
use crate::mesh::Service;
use crate::observe::MetricsRegistry;
use crate::principal::Principal;
use crate::settings::PeersConfig;
use crate::spool::{SpoolBatcher, SpoolConfig};
use crate::telemetry::InjectTrace;
use crate::tls::MeshTls;
use crate::transport::{ConnectError, PeerChannel, mesh_channel};

/// A channel to a mesh service that carries the caller's trace context.
pub type MeshChannel = InjectTrace<PeerChannel>;

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
    #[error("cannot open the usage spool: {0}")]
    UsageSpool(std::io::Error),
}

/// The tenant of audit events about requests whose caller could not be
/// authenticated (so no tenant is known).
pub const UNAUTHENTICATED_TENANT: &str = "_unauthenticated";

/// How long [`AuditClient::record_durable`] waits for the audit service to
/// acknowledge an event it could not make durable locally.
pub const DURABLE_APPEND_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// Its channel and its delivery start on [`crate::tasks::background`].
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
        crate::tasks::on_background(|| {
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
        })
    }

    pub fn metrics(&self) -> Result<MetricsServiceClient<MeshChannel>, PeerError> {
        Ok(MetricsServiceClient::new(self.channel(Service::Metrics)?))
    }

    /// The usage client, or `None` when no metrics peer is configured. Like
    /// [`Peers::audit_client`], it spools to `<state_dir>/spool/usage` when the
    /// service has a state directory, and queues in memory otherwise. Its channel and its
    /// delivery start on [`crate::tasks::background`].
    pub fn usage_client(
        &self,
        server: &crate::settings::ServerConfig,
        metrics: &MetricsRegistry,
    ) -> Result<Option<UsageClient>, PeerError> {
        if self.peers.metrics.is_none() {
            return Ok(None);
        }
        crate::tasks::on_background(|| {
            let client = self.metrics()?;
            let usage = match &server.state_dir {
                Some(dir) => UsageClient::with_spool(
                    client,
                    BatchConfig::default(),
                    SpoolConfig::new(dir.join("spool").join("usage")),
                    Some(metrics),
                )
                .map_err(PeerError::UsageSpool)?,
                None => UsageClient::new(client, BatchConfig::default()),
            };
            Ok(Some(usage))
        })
    }
}

/// Attaches a principal to an outgoing request.
pub fn with_principal<T>(msg: T, principal: &Principal) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    principal.insert_into(req.metadata_mut());
    req
}

/// An audit event's `details_json` from a struct of borrowed fields: serialised
/// straight into one buffer, without building a `serde_json::Value` first.
pub fn details_json<T: serde::Serialize>(details: &T) -> String {
    let mut out = Vec::with_capacity(256);
    // A struct of strings, numbers and booleans always serialises.
    let _ = serde_json::to_writer(&mut out, details);
    String::from_utf8(out).unwrap_or_default()
}

/// Records audit events off the request path, in batches: through a bounded
/// in-memory queue ([`AuditClient::new`]), or through a durable local spool that
/// loses no accepted event across audit outages and crashes of the sender
/// ([`AuditClient::with_spool`], see [`crate::spool`]).
#[derive(Clone)]
pub struct AuditClient {
    sender: Sender<audit::EventInput>,
    /// The recording service's identity URI, written into every event's actor.
    service: Arc<str>,
    /// For appends that wait for the acknowledgement.
    client: AuditServiceClient<MeshChannel>,
}

/// Where [`AuditClient::record_durable`] made an event durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    /// Written and `fdatasync`ed to the local spool (delivered later, in order).
    Spooled,
    /// Acknowledged by the audit service (it is in the chain).
    Acknowledged,
}

/// [`AuditClient::record_durable`] could make the event durable neither locally
/// nor in the audit service.
#[derive(Debug, thiserror::Error)]
#[error("the audit event could not be made durable: {0}")]
pub struct AuditUnavailable(pub String);

/// How a client ships its items: a bounded in-memory queue, or a durable spool.
#[derive(Clone)]
enum Sender<T> {
    Memory(Batcher<T>),
    Spool(SpoolBatcher<T>),
}

impl<T: crewmesh_proto::prost::Message + Default + Clone + Send + 'static> Sender<T> {
    fn submit(&self, item: T) {
        match self {
            Self::Memory(b) => {
                b.submit(item);
            }
            Self::Spool(s) => {
                s.submit(&item);
            }
        }
    }

    async fn flush(&self, timeout: Duration) -> bool {
        match self {
            Self::Memory(b) => b.flush(timeout).await,
            Self::Spool(s) => s.flush(timeout).await,
        }
    }

    fn stats(&self) -> &crate::batch::BatchStats {
        match self {
            Self::Memory(b) => b.stats(),
            Self::Spool(s) => s.stats(),
        }
    }

    fn spooled_bytes(&self) -> u64 {
        match self {
            Self::Memory(_) => 0,
            Self::Spool(s) => s.pending_bytes(),
        }
    }
}

/// One batch call (Append, Record) in flight.
type SendFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send>>;

fn append_fn(
    client: AuditServiceClient<MeshChannel>,
) -> impl Fn(Vec<audit::EventInput>) -> SendFuture + Send + Sync + 'static {
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
        let batcher = Batcher::spawn("audit", config, append_fn(client.clone()));
        Self {
            sender: Sender::Memory(batcher),
            service: service.uri().into(),
            client,
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
        let batcher =
            SpoolBatcher::open("audit", config, spool, metrics, append_fn(client.clone()))?;
        Ok(Self {
            sender: Sender::Spool(batcher),
            service: service.uri().into(),
            client,
        })
    }

    /// Queues an event; fills in id, time, the recording service and the trace id.
    pub fn record(&self, event: audit::EventInput) {
        self.sender.submit(self.complete(event));
    }

    /// Records an event durably before returning, for actions that must not happen
    /// unaudited: it is written and synced to the spool, or, when there is no spool
    /// or the spool cannot take it (full, disk error), appended to the audit service
    /// directly and acknowledged (within [`DURABLE_APPEND_TIMEOUT`]). Either way it
    /// survives a crash of this process. Fills in the same fields as [`Self::record`].
    pub async fn record_durable(
        &self,
        event: audit::EventInput,
    ) -> Result<Durable, AuditUnavailable> {
        let event = self.complete(event);
        if let Sender::Spool(s) = &self.sender
            && s.submit_durable(&event).await
        {
            return Ok(Durable::Spooled);
        }
        let mut client = self.client.clone();
        let append = client.append(audit::AppendRequest {
            events: vec![event],
        });
        match tokio::time::timeout(DURABLE_APPEND_TIMEOUT, append).await {
            Ok(Ok(_)) => Ok(Durable::Acknowledged),
            Ok(Err(status)) => Err(AuditUnavailable(format!(
                "the spool cannot take it and the audit service answered {:?}: {}",
                status.code(),
                status.message()
            ))),
            Err(_) => Err(AuditUnavailable(format!(
                "the spool cannot take it and the audit service did not answer within {DURABLE_APPEND_TIMEOUT:?}"
            ))),
        }
    }

    fn complete(&self, mut event: audit::EventInput) -> audit::EventInput {
        if event.id.is_empty() {
            event.id = uuid::Uuid::now_v7().to_string();
        }
        if event.time.is_none() {
            event.time = Some(crewmesh_proto::time::to_timestamp(SystemTime::now()));
        }
        let actor = event.actor.get_or_insert_with(Default::default);
        if actor.service.is_empty() {
            actor.service = String::from(&*self.service);
        }
        if event.trace_id.is_empty() {
            event.trace_id = crate::telemetry::current_trace_id();
        }
        event
    }

    /// Waits until everything recorded so far is delivered (or `timeout`). With a
    /// spool, what is not delivered stays on disk for the next start.
    pub async fn flush(&self, timeout: Duration) -> bool {
        self.sender.flush(timeout).await
    }

    pub fn stats(&self) -> &crate::batch::BatchStats {
        self.sender.stats()
    }

    /// Bytes waiting in the spool (0 without one).
    pub fn spooled_bytes(&self) -> u64 {
        self.sender.spooled_bytes()
    }
}

/// Records usage off the request path, in batches: through a bounded in-memory queue
/// ([`UsageClient::new`]), or through a durable local spool like the audit client's
/// ([`UsageClient::with_spool`]), so accepted records survive a metrics outage and a
/// crash of the sender (metrics deduplicates replayed records by id).
#[derive(Clone)]
pub struct UsageClient {
    sender: Sender<metrics::UsageRecord>,
}

fn record_fn(
    client: MetricsServiceClient<MeshChannel>,
) -> impl Fn(Vec<metrics::UsageRecord>) -> SendFuture + Send + Sync + 'static {
    move |records| {
        let mut client = client.clone();
        Box::pin(async move {
            client
                .record(metrics::RecordRequest { records })
                .await
                .map(|_| ())
        })
    }
}

impl UsageClient {
    /// In-memory queue: records queued when the process dies, or beyond the retries
    /// of an outage, are lost. Prefer [`UsageClient::with_spool`].
    pub fn new(client: MetricsServiceClient<MeshChannel>, config: BatchConfig) -> Self {
        let batcher = Batcher::spawn("usage", config, record_fn(client));
        Self {
            sender: Sender::Memory(batcher),
        }
    }

    /// Every record is first appended to the spool in `spool.dir`, then sent in
    /// order; what an earlier process left there is sent first. Reports the spooled
    /// bytes as `crewmesh_usage_spool_bytes` in `metrics`.
    pub fn with_spool(
        client: MetricsServiceClient<MeshChannel>,
        config: BatchConfig,
        spool: SpoolConfig,
        metrics: Option<&MetricsRegistry>,
    ) -> std::io::Result<Self> {
        let batcher = SpoolBatcher::open("usage", config, spool, metrics, record_fn(client))?;
        Ok(Self {
            sender: Sender::Spool(batcher),
        })
    }

    /// Queues a record; fills in its id and time when empty.
    pub fn record(&self, mut record: metrics::UsageRecord) {
        if record.id.is_empty() {
            record.id = uuid::Uuid::now_v7().to_string();
        }
        if record.time.is_none() {
            record.time = Some(crewmesh_proto::time::to_timestamp(SystemTime::now()));
        }
        self.sender.submit(record);
    }

    /// Waits until everything recorded so far is delivered (or `timeout`). With a
    /// spool, what is not delivered stays on disk for the next start.
    pub async fn flush(&self, timeout: Duration) -> bool {
        self.sender.flush(timeout).await
    }

    pub fn stats(&self) -> &crate::batch::BatchStats {
        self.sender.stats()
    }

    /// Bytes waiting in the spool (0 without one).
    pub fn spooled_bytes(&self) -> u64 {
        self.sender.spooled_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crewmesh_proto::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    /// A metrics service that keeps the ids it is sent, and can be switched down.
    #[derive(Clone, Default)]
    struct FakeMetrics {
        ids: Arc<Mutex<Vec<String>>>,
        down: Arc<AtomicBool>,
    }

    #[tonic::async_trait]
    impl MetricsService for FakeMetrics {
        async fn record(
            &self,
            request: tonic::Request<metrics::RecordRequest>,
        ) -> Result<tonic::Response<metrics::RecordResponse>, tonic::Status> {
            if self.down.load(Ordering::Relaxed) {
                return Err(tonic::Status::unavailable("metrics is down"));
            }
            let records = request.into_inner().records;
            let mut ids = self.ids.lock().unwrap();
            let before = ids.len();
            for r in records {
                if !ids.contains(&r.id) {
                    ids.push(r.id);
                }
            }
            Ok(tonic::Response::new(metrics::RecordResponse {
                accepted: (ids.len() - before) as u64,
                duplicates: 0,
            }))
        }

        async fn query(
            &self,
            _: tonic::Request<metrics::QueryRequest>,
        ) -> Result<tonic::Response<metrics::QueryResponse>, tonic::Status> {
            Err(crate::status::not_implemented("Query"))
        }

        async fn spend(
            &self,
            _: tonic::Request<metrics::SpendRequest>,
        ) -> Result<tonic::Response<metrics::SpendResponse>, tonic::Status> {
            Err(crate::status::not_implemented("Spend"))
        }
    }

    async fn serve(fake: FakeMetrics) -> MetricsServiceClient<MeshChannel> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(MetricsServiceServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = PeerChannel::plaintext(&addr.to_string());
        MetricsServiceClient::new(InjectTrace::new(channel))
    }

    fn record_n(n: u32) -> metrics::UsageRecord {
        metrics::UsageRecord {
            id: format!("0190a5c4-0000-7000-8000-{n:012x}"),
            ..Default::default()
        }
    }

    fn quick() -> BatchConfig {
        BatchConfig {
            capacity: 100,
            max_batch: 8,
            max_delay: Duration::from_millis(1),
        }
    }

    #[tokio::test]
    async fn spooled_usage_survives_an_outage_and_a_crash_of_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeMetrics::default();
        fake.down.store(true, Ordering::Relaxed);
        let client = serve(fake.clone()).await;
        let registry = MetricsRegistry::new();
        let usage = UsageClient::with_spool(
            client.clone(),
            quick(),
            SpoolConfig::new(dir.path()),
            Some(&registry),
        )
        .unwrap();
        for n in 0..20 {
            usage.record(record_n(n));
        }
        // Metrics is down: nothing is delivered, everything waits on disk.
        assert!(!usage.flush(Duration::from_millis(200)).await);
        assert!(usage.spooled_bytes() > 0);
        assert!(
            registry
                .encode()
                .contains("crewmesh_usage_spool_bytes{client=\"usage\"} "),
            "{}",
            registry.encode()
        );
        // The sender dies; the next one, with the same directory, delivers it all.
        drop(usage);
        fake.down.store(false, Ordering::Relaxed);
        let usage =
            UsageClient::with_spool(client, quick(), SpoolConfig::new(dir.path()), None).unwrap();
        usage.record(record_n(20));
        assert!(usage.flush(Duration::from_secs(10)).await);
        assert_eq!(
            *fake.ids.lock().unwrap(),
            (0..=20).map(|n| record_n(n).id).collect::<Vec<_>>()
        );
        assert_eq!(usage.spooled_bytes(), 0);
        assert_eq!(usage.stats().dropped.load(Ordering::Relaxed), 0);
    }
}
