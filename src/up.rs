//! `crewmesh up`: the whole mesh in one process. Every service still listens on its
//! own loopback port and talks to the others over mTLS, so this mode runs the same
//! code paths as a distributed install. State lives under the data directory: the dev
//! PKI, SQLite databases, the embedded config store and the admin API key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use crewmesh_kit::mesh::Service;
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::pki::{CLI_IDENTITY, DevPki};
use crewmesh_kit::settings::{CommonConfig, DatabaseConfig, PeersConfig, Secret, ServerConfig};
use crewmesh_kit::telemetry::TelemetryConfig;
use crewmesh_proto::config::v1 as cfg;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::state::{Pki, ServiceEndpoints, State};
use crewmesh_kit::idle_poll::IdlePoll;

pub use crate::state::FILE_NAME as STATE_FILE;

pub struct UpOptions {
    pub data_dir: PathBuf,
    pub gateway_addr: SocketAddr,
    pub trust_domain: String,
    /// Where the config service keeps documents.
    pub config_store: ConfigStoreChoice,
    /// Where audit, metrics and the agent runtime keep their data.
    pub databases: DatabaseChoice,
    /// How often the router refreshes its model catalog.
    pub refresh_interval: Duration,
    /// Worker threads of the data plane's runtime (see [`ServiceRuntime`]).
    pub data_plane_threads: usize,
    /// The longest the data plane keeps polling its sockets after its last work
    /// before its threads sleep (`crewmesh_kit::idle_poll`: the window adapts up to
    /// this); zero: not at all. Default [`DEFAULT_DATA_PLANE_IDLE_POLL`].
    pub data_plane_idle_poll: Duration,
}

/// The data plane's longest idle-poll window by default: a worker idle for less than
/// this between requests keeps polling; requests further apart cost no polling.
pub const DEFAULT_DATA_PLANE_IDLE_POLL: Duration = Duration::from_millis(2);

/// [`DEFAULT_DATA_PLANE_IDLE_POLL`] as the command line writes it (`crewmesh up` and
/// `crewmesh bench gateway` take it as their default).
pub const DEFAULT_DATA_PLANE_IDLE_POLL_ARG: &str = "2ms";

/// The longest idle-poll window `--data-plane-idle-poll` accepts.
pub const MAX_DATA_PLANE_IDLE_POLL: Duration = Duration::from_secs(1);

/// A `--data-plane-idle-poll` window: a duration (`5ms`, `200us`, `0`, ...) of at most
/// [`MAX_DATA_PLANE_IDLE_POLL`].
pub fn parse_idle_poll(text: &str) -> Result<Duration, String> {
    let window = crate::bench::parse_duration(text)?;
    if window > MAX_DATA_PLANE_IDLE_POLL {
        return Err(format!(
            "{text:?} is longer than the longest idle-poll window, {MAX_DATA_PLANE_IDLE_POLL:?}"
        ));
    }
    Ok(window)
}

impl UpOptions {
    /// The defaults of `crewmesh up`: embedded config store and SQLite under `data_dir`.
    pub fn embedded(data_dir: PathBuf, gateway_addr: SocketAddr) -> Self {
        Self {
            data_dir,
            gateway_addr,
            trust_domain: crewmesh_kit::settings::default_trust_domain(),
            config_store: ConfigStoreChoice::Embedded,
            databases: DatabaseChoice::Sqlite,
            refresh_interval: Duration::from_millis(500),
            data_plane_threads: 1,
            data_plane_idle_poll: DEFAULT_DATA_PLANE_IDLE_POLL,
        }
    }
}

pub enum ConfigStoreChoice {
    /// SQLite file `config.db` in the data directory.
    Embedded,
    /// An etcd cluster.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

pub enum DatabaseChoice {
    /// SQLite files in the data directory.
    Sqlite,
    /// One Postgres database URL per service.
    Postgres {
        audit: String,
        metrics: String,
        agent_runtime: String,
    },
}

/// Model aliases `crewmesh up` configures on the simulated upstream.
pub const SIMULATED_MODELS: [&str; 2] = ["sim-small", "sim-large"];

fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

fn database(choice: &DatabaseChoice, data_dir: &Path, service: Service) -> DatabaseConfig {
    let url = match (choice, service) {
        (DatabaseChoice::Postgres { audit, .. }, Service::Audit) => audit.clone(),
        (DatabaseChoice::Postgres { metrics, .. }, Service::Metrics) => metrics.clone(),
        (DatabaseChoice::Postgres { agent_runtime, .. }, _) => agent_runtime.clone(),
        (DatabaseChoice::Sqlite, svc) => sqlite_url(&data_dir.join(format!("{}.db", svc.name()))),
    };
    DatabaseConfig {
        url,
        password_file: None,
        max_connections: 4,
    }
}

/// Reads the admin key from `path`, creating a new random one (mode 0600) if absent.
fn admin_key(path: &Path) -> anyhow::Result<Secret> {
    if path.exists() {
        return crewmesh_kit::settings::read_secret_file(path)
            .with_context(|| format!("reading {}", path.display()));
    }
    let key = format!("cm_{}", hex::encode(rand::random::<[u8; 24]>()));
    write_private(path, key.as_bytes())?;
    Ok(Secret::new(key))
}

/// The key that encrypts inline provider secrets in the embedded config store
/// (`DATA_DIR/config.key`, 32 random bytes, created on first start).
fn secrets_key_file(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("config.key");
    if !path.exists() {
        write_private(&path, &rand::random::<[u8; 32]>())?;
    }
    Ok(path)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

type Tasks = JoinSet<(Service, anyhow::Result<()>)>;

/// A runtime of its own for a group of services. `crewmesh up` runs two:
///
/// * the **data plane** (the gateway, the router and the simulated upstream): their
///   listeners, connections and tasks. With one thread (the default), every hop of a
///   model call inside the process (gateway -> router -> upstream and back) is read by
///   the thread that wrote it, so no hop waits for another CPU to wake up;
/// * **bookkeeping** (config, audit, metrics, agent runtime), at a lower CPU priority
///   (`nice` 10, threads it starts inherit it): audit hashing and signing, SQLite
///   writes and usage rollups use what the data plane leaves and do not delay a model
///   call's turn on the CPU.
///
/// The data plane polls its sockets for a while after its last work before its
/// threads sleep (`--data-plane-idle-poll`, up to 2 ms by default): at a steady rate
/// of requests it never sleeps, and no request finds its CPU idle with cold caches
/// (`crewmesh_kit::idle_poll`; the cost is the CPU it polls on, see
/// docs/performance.md).
///
/// The data plane's services deliver their audit events and usage records from the
/// bookkeeping runtime ([`ServiceRuntime::delivering_on`]): of each record, only its
/// spool write stays on a request's path.
///
/// The mesh itself is unchanged: every service still listens on its own port and
/// every call between services goes over mTLS.
pub struct ServiceRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    /// Where the services built here spawn their delivery work (see
    /// `crewmesh_kit::tasks::background`); `None`: this runtime.
    background: Option<tokio::runtime::Handle>,
}

/// The `nice` value of the bookkeeping runtime's threads.
const BOOKKEEPING_NICE: i32 = 10;

impl ServiceRuntime {
    /// `threads`: worker threads (`None`: one per CPU); `nice`: their CPU priority
    /// ([`lower_priority`]); `idle_poll`: the longest a worker polls after its last
    /// work before it sleeps (zero: it sleeps at once; see `crewmesh_kit::idle_poll`).
    fn new(
        name: &'static str,
        threads: Option<usize>,
        nice: i32,
        idle_poll: Duration,
    ) -> anyhow::Result<Self> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = threads {
            builder.worker_threads(n.max(1));
        }
        let idle_poll = (!idle_poll.is_zero()).then(|| IdlePoll::new(idle_poll));
        if let Some(poll) = &idle_poll {
            builder
                .on_thread_park(poll.on_park())
                .on_thread_unpark(poll.on_unpark());
        }
        let runtime = builder
            .thread_name(name)
            .on_thread_start(move || lower_priority(nice))
            .enable_all()
            .build()
            .with_context(|| format!("starting the {name} runtime"))?;
        if let Some(poll) = idle_poll {
            poll.spawn_pollers(runtime.handle());
        }
        Ok(Self {
            runtime: Some(runtime),
            background: None,
        })
    }

    /// Services built on this runtime spawn their audit and usage delivery on `other`.
    fn delivering_on(mut self, other: &ServiceRuntime) -> Self {
        self.background = Some(other.handle().clone());
        self
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .expect("the runtime lives until drop")
            .handle()
    }

    /// Runs `fut` (a service's `build`) on this runtime, so that what it binds and
    /// spawns lives there (its delivery work on the background runtime), and waits
    /// for its output.
    async fn run<F>(&self, fut: F) -> anyhow::Result<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let background = self
            .background
            .clone()
            .unwrap_or_else(|| self.handle().clone());
        self.handle()
            .spawn(crewmesh_kit::tasks::with_background(background, fut))
            .await
            .context("a service runtime task failed")
    }

    /// Runs a started service on this runtime until its stop signal (`run`); its
    /// outcome joins `tasks`.
    fn serve<E>(
        &self,
        tasks: &mut Tasks,
        svc: Service,
        run: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    ) where
        anyhow::Error: From<E>,
    {
        tasks.spawn_on(
            async move { (svc, run.await.map_err(anyhow::Error::from)) },
            self.handle(),
        );
    }
}

impl Drop for ServiceRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Dropped from async code: do not block on the remaining tasks.
            runtime.shutdown_background();
        }
    }
}

/// Raises the calling thread's `nice` value by `nice` (0: unchanged). Lowering a
/// priority needs no privilege; a refusal only costs latency, so it is not an error.
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    if nice > 0 {
        // On Linux, `who` = a thread id sets that thread's nice value only.
        let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// Starts the mesh and returns once it is ready; the returned handle stops it.
pub struct RunningMesh {
    pub state: State,
    /// In start order.
    stops: Vec<watch::Sender<bool>>,
    stop_sim: watch::Sender<bool>,
    tasks: Tasks,
    sim: tokio::task::JoinHandle<std::io::Result<()>>,
    data_dir: PathBuf,
    /// Declared last: dropped after everything that runs on them has been joined.
    _runtimes: [ServiceRuntime; 2],
}

impl RunningMesh {
    /// Signals every service to drain and waits for them.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        for stop in self.stops.iter().rev() {
            let _ = stop.send(true);
            // Wait for that service (or whichever finishes first) before the next.
            match self.tasks.join_next().await {
                Some(Ok((svc, Err(e)))) => failed.push(format!("{svc}: {e:#}")),
                Some(Ok((_, Ok(())))) => {}
                Some(Err(e)) => failed.push(format!("task: {e}")),
                None => break,
            }
        }
        while let Some(joined) = self.tasks.join_next().await {
            if let Ok((svc, Err(e))) = joined {
                failed.push(format!("{svc}: {e:#}"));
            }
        }

        // The simulated upstream stands in for an external provider: it stays up until
        // the services have drained, so in-flight model calls can finish.
        let _ = self.stop_sim.send(true);
        let _ = self.sim.await;
        State::remove(&self.data_dir);
        if !failed.is_empty() {
            bail!("some services failed: {}", failed.join("; "));
        }
        Ok(())
    }

    /// Resolves when a service stops on its own (an error).
    pub async fn wait_for_failure(&mut self) -> anyhow::Error {
        match self.tasks.join_next().await {
            Some(Ok((svc, Err(e)))) => e.context(format!("the {svc} service failed")),
            Some(Ok((svc, Ok(())))) => anyhow::anyhow!("the {svc} service stopped unexpectedly"),
            Some(Err(e)) => anyhow::anyhow!("a service task failed: {e}"),
            None => anyhow::anyhow!("no services are running"),
        }
    }
}

pub async fn start(opts: UpOptions) -> anyhow::Result<RunningMesh> {
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("creating the data directory {}", opts.data_dir.display()))?;
    let data_dir = opts
        .data_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", opts.data_dir.display()))?;
    let td = opts.trust_domain.clone();
    let pki = DevPki::new(data_dir.join("pki"));
    if !pki.is_complete() {
        pki.init(&td, &[]).context("creating the dev PKI")?;
        tracing::info!(dir = %pki.dir.display(), "created a development CA and certificates");
    }
    let key = admin_key(&data_dir.join("admin-api-key"))?;
    let metrics = MetricsRegistry::new();
    // One stop signal per service, so shutdown can go in reverse start order: the
    // edge stops first and audit last, and every service's final audit and usage
    // flush still finds its destination up.
    let mut stops: Vec<watch::Sender<bool>> = Vec::new();
    let mut stop = || {
        let (tx, mut rx) = watch::channel(false);
        stops.push(tx);
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let common = |svc: Service, peers: PeersConfig| CommonConfig {
        trust_domain: td.clone(),
        server: ServerConfig {
            // Each service's local state (its audit spool) under the data directory.
            state_dir: Some(data_dir.join("state").join(svc.name())),
            ..ServerConfig::loopback()
        },
        tls: pki.files_for(svc.name()),
        telemetry: TelemetryConfig::default(),
        peers,
    };
    let mut tasks: Tasks = JoinSet::new();
    let mut services: BTreeMap<String, ServiceEndpoints> = BTreeMap::new();
    let mut peers = PeersConfig::default();
    let mut record =
        |svc: Service, grpc: SocketAddr, admin: SocketAddr, peers: &mut PeersConfig| {
            peers.set(svc, grpc.to_string());
            services.insert(
                svc.name().to_owned(),
                ServiceEndpoints {
                    grpc: Some(grpc.to_string()),
                    admin: format!("http://{admin}"),
                    http: None,
                },
            );
        };

    // Records a started service's addresses (later services dial them) and runs it
    // until its own stop signal.
    macro_rules! launch {
        ($svc:expr, $app:ident, $runtime:expr) => {{
            record($svc, $app.grpc_addr(), $app.admin_addr(), &mut peers);
            $runtime.serve(&mut tasks, $svc, $app.run_until_stopped(stop()));
        }};
    }

    // The simulated model upstream (plain HTTP on loopback, labelled simulated).
    let bookkeeping = ServiceRuntime::new(
        "crewmesh-bookkeeping",
        None,
        BOOKKEEPING_NICE,
        Duration::ZERO,
    )?;
    let data_plane = ServiceRuntime::new(
        "crewmesh-data-plane",
        Some(opts.data_plane_threads),
        0,
        opts.data_plane_idle_poll,
    )?
    .delivering_on(&bookkeeping);
    let sim = data_plane
        .run(crewmesh_simulated_upstream::SimulatedUpstream::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
        ))
        .await?
        .context("starting the simulated upstream")?;
    let sim_url = sim.base_url();
    let (stop_sim, stop_sim_rx) = watch::channel(false);
    let sim = data_plane.handle().spawn(sim.run_until_stopped(async move {
        let mut rx = stop_sim_rx;
        let _ = rx.wait_for(|s| *s).await;
    }));

    // Start in dependency order: each service learns the addresses of the ones before it.
    let audit = bookkeeping
        .run(crewmesh_audit::Application::build(
            crewmesh_audit::AuditConfig {
                common: common(Service::Audit, PeersConfig::default()),
                database: database(&opts.databases, &data_dir, Service::Audit),
                checkpoints: crewmesh_audit::CheckpointConfig::with_key_file(
                    data_dir.join("audit-signing-key.pk8"),
                ),
            },
            metrics.clone(),
        ))
        .await?
        .context("starting the audit service")?;
    launch!(Service::Audit, audit, bookkeeping);

    let config = bookkeeping
        .run(crewmesh_config::Application::build(
            crewmesh_config::ConfigServiceConfig {
                common: common(Service::Config, peers.clone()),
                store: match &opts.config_store {
                    ConfigStoreChoice::Embedded => crewmesh_config::StoreConfig::Embedded {
                        path: data_dir.join("config.db"),
                    },
                    ConfigStoreChoice::Etcd { endpoints, prefix } => {
                        crewmesh_config::StoreConfig::Etcd(crewmesh_config::EtcdConfig {
                            endpoints: endpoints.clone(),
                            tls: None,
                            username: None,
                            password: None,
                            prefix: prefix.clone(),
                            timeout: Duration::from_secs(5),
                        })
                    }
                },
                secrets_key_file: Some(secrets_key_file(&data_dir)?),
            },
            metrics.clone(),
        ))
        .await?
        .context("starting the config service")?;
    launch!(Service::Config, config, bookkeeping);
    seed_config(
        &pki,
        &td,
        peers.config.as_deref().unwrap_or_default(),
        &sim_url,
    )
    .await
    .context("writing the simulated provider and models to the config store")?;

    let metrics_svc = bookkeeping
        .run(crewmesh_metrics::Application::build(
            crewmesh_metrics::MetricsConfig {
                common: common(Service::Metrics, peers.clone()),
                database: database(&opts.databases, &data_dir, Service::Metrics),
            },
            metrics.clone(),
        ))
        .await?
        .context("starting the metrics service")?;
    launch!(Service::Metrics, metrics_svc, bookkeeping);

    let router = data_plane
        .run(crewmesh_router::Application::build(
            crewmesh_router::RouterConfig {
                refresh_interval: opts.refresh_interval,
                ..crewmesh_router::RouterConfig::new(common(Service::Router, peers.clone()))
            },
            metrics.clone(),
        ))
        .await?
        .context("starting the router")?;
    launch!(Service::Router, router, data_plane);

    let agents = bookkeeping
        .run(crewmesh_agent_runtime::Application::build(
            crewmesh_agent_runtime::AgentRuntimeConfig {
                common: common(Service::AgentRuntime, peers.clone()),
                database: database(&opts.databases, &data_dir, Service::AgentRuntime),
            },
            metrics.clone(),
        ))
        .await?
        .context("starting the agent runtime")?;
    launch!(Service::AgentRuntime, agents, bookkeeping);

    let gateway = data_plane
        .run(crewmesh_gateway::Application::build(
            crewmesh_gateway::GatewayConfig {
                common: CommonConfig {
                    server: ServerConfig {
                        grpc_addr: None,
                        // The gateway's audit spool, like every service's.
                        state_dir: Some(data_dir.join("state").join("gateway")),
                        ..ServerConfig::loopback()
                    },
                    ..common(Service::Gateway, peers.clone())
                },
                http_addr: opts.gateway_addr,
                bootstrap_api_key: Some(key.clone()),
                upstream_timeout: Duration::from_secs(120),
                edge: crewmesh_gateway::EdgeConfig {
                    config_refresh: opts.refresh_interval,
                    ..Default::default()
                },
            },
            metrics.clone(),
        ))
        .await?
        .with_context(|| format!("starting the gateway on {}", opts.gateway_addr))?;
    let gateway_url = format!("http://{}", gateway.http_addr());
    services.insert(
        "gateway".to_owned(),
        ServiceEndpoints {
            grpc: None,
            admin: format!("http://{}", gateway.admin_addr()),
            http: Some(gateway_url.clone()),
        },
    );
    data_plane.serve(
        &mut tasks,
        Service::Gateway,
        gateway.run_until_stopped(stop()),
    );

    wait_ready(&services).await?;
    let cli = pki.files_for(CLI_IDENTITY);
    let state = State {
        gateway_url,
        admin_api_key: key.expose().to_owned(),
        simulated_upstream_url: sim_url,
        trust_domain: td,
        services,
        pki: Pki {
            ca: cli.ca_file,
            client_cert: cli.cert_file,
            client_key: cli.key_file,
        },
        pid: std::process::id(),
    };
    state.write(&data_dir).context("writing state.json")?;
    Ok(RunningMesh {
        state,
        stops,
        stop_sim,
        tasks,
        sim,
        data_dir,
        _runtimes: [data_plane, bookkeeping],
    })
}

/// Points the `simulated` provider at this run's simulated upstream and makes sure
/// the simulated model aliases exist. Written through the config API as the CLI
/// identity, like an operator would.
async fn seed_config(
    pki: &DevPki,
    td: &str,
    config_addr: &str,
    sim_url: &str,
) -> anyhow::Result<()> {
    let tls = crewmesh_kit::tls::MeshTls::load(pki.files_for(CLI_IDENTITY))?;
    let id = crewmesh_kit::identity::SpiffeId::new(td, Service::Config.name())?;
    let channel = crewmesh_kit::transport::mesh_channel(config_addr, id, tls)?;
    let mut client = cfg::config_service_client::ConfigServiceClient::new(channel);
    let provider = serde_json::json!({
        "type": "simulated",
        "base_url": sim_url,
        "description": "simulated OpenAI-compatible upstream started by `crewmesh up` (not a real model)",
    });
    let mut docs = vec![(cfg::Kind::Provider, "simulated".to_owned(), provider)];
    for m in SIMULATED_MODELS {
        docs.push((
            cfg::Kind::Model,
            m.to_owned(),
            serde_json::json!({
                "deployments": [{"provider": "simulated", "model": m}],
                "owned_by": "crewmesh-simulated",
            }),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (kind, name, spec) in docs {
        loop {
            let req = cfg::PutRequest {
                scope: cfg::Scope::Global as i32,
                kind: kind as i32,
                name: name.clone(),
                spec_json: spec.to_string(),
                expected_version: None,
            };
            match client.put(req).await {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(s) => bail!("config put {name}: {}", s.message()),
            }
        }
    }
    Ok(())
}

/// Polls every service's `/readyz` until all are ready.
async fn wait_ready(services: &BTreeMap<String, ServiceEndpoints>) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, ep) in services {
        let url = format!("{}/readyz", ep.admin);
        loop {
            let last = match http.get(&url).send().await {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!("the {name} service did not become ready within 30s: {last}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_poll_windows_are_durations_of_at_most_a_second() {
        assert_eq!(
            parse_idle_poll(DEFAULT_DATA_PLANE_IDLE_POLL_ARG),
            Ok(DEFAULT_DATA_PLANE_IDLE_POLL)
        );
        assert_eq!(parse_idle_poll("0"), Ok(Duration::ZERO));
        assert_eq!(parse_idle_poll("1s"), Ok(MAX_DATA_PLANE_IDLE_POLL));
        assert_eq!(
            parse_idle_poll("10000000000000000000s"),
            Err(
                "\"10000000000000000000s\" is longer than the longest idle-poll window, 1s"
                    .to_owned()
            )
        );
        assert!(parse_idle_poll("1.5s").is_err());
        assert!(parse_idle_poll("fast").is_err());
    }

    #[tokio::test]
    async fn a_service_runtime_has_the_threads_asked_for_and_runs_its_tasks() {
        for threads in [1, 3] {
            let runtime =
                ServiceRuntime::new("test-runtime", Some(threads), 0, Duration::ZERO).unwrap();
            assert_eq!(runtime.handle().metrics().num_workers(), threads);
            let name = runtime
                .run(async { std::thread::current().name().map(str::to_owned) })
                .await
                .unwrap();
            assert_eq!(name.as_deref(), Some("test-runtime"));
        }
    }

    #[tokio::test]
    async fn a_runtime_with_idle_polling_keeps_its_worker_awake_after_work() {
        for (idle_poll, stays_awake) in [(Duration::from_secs(5), true), (Duration::ZERO, false)] {
            let runtime = ServiceRuntime::new("test-runtime", Some(1), 0, idle_poll).unwrap();
            let metrics = runtime.handle().metrics();
            tokio::time::sleep(Duration::from_millis(50)).await;
            // The worker is parked now; work wakes it.
            let parked = metrics.worker_park_count(0);
            runtime.run(async {}).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Polling, it has not parked again; otherwise it parked once the work was done.
            assert_eq!(
                metrics.worker_park_count(0) == parked,
                stays_awake,
                "{idle_poll:?}"
            );
        }
    }

    #[tokio::test]
    async fn what_a_service_built_on_the_data_plane_delivers_runs_on_the_bookkeeping_runtime() {
        let bookkeeping =
            ServiceRuntime::new("test-bookkeeping", Some(1), 0, Duration::ZERO).unwrap();
        let data_plane = ServiceRuntime::new("test-data-plane", Some(1), 0, Duration::ZERO)
            .unwrap()
            .delivering_on(&bookkeeping);
        let thread = || std::thread::current().name().map(str::to_owned);
        let (built_on, delivering_on) = data_plane
            .run(async move {
                let delivery = crewmesh_kit::tasks::background().spawn(async move { thread() });
                (thread(), delivery.await.unwrap())
            })
            .await
            .unwrap();
        assert_eq!(built_on.as_deref(), Some("test-data-plane"));
        assert_eq!(delivering_on.as_deref(), Some("test-bookkeeping"));
        // Without `delivering_on`, a runtime delivers on itself.
        let delivering_on = bookkeeping
            .run(async move {
                crewmesh_kit::tasks::background()
                    .spawn(async move { thread() })
                    .await
                    .unwrap()
            })
            .await
            .unwrap();
        assert_eq!(delivering_on.as_deref(), Some("test-bookkeeping"));
    }
}
