//! The service config file of `crewmesh serve` and `crewmesh check-config`: one TOML
//! shape for every service (plus `CREWMESH_`-prefixed environment), mapped into the
//! typed config of the service being started. Sections that do not apply to that
//! service are rejected, so a typo or a misplaced section never goes unnoticed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crewmesh_kit::mesh::Service;
use crewmesh_kit::settings::{
    self, CommonConfig, ConfigError, DatabaseConfig, PeersConfig, Problems, ServerConfig,
    read_secret_file,
};
use crewmesh_kit::telemetry::TelemetryConfig;
use crewmesh_kit::tls::TlsFiles;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default = "settings::default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub server: Option<ServerConfig>,
    pub tls: TlsFiles,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub peers: PeersConfig,
    #[serde(default)]
    pub database: Option<DatabaseConfig>,
    #[serde(default)]
    pub store: Option<crewmesh_config::settings::StoreSettings>,
    /// Config service only: `[config] secrets_key_file`.
    #[serde(default)]
    pub config: Option<crewmesh_config::settings::ConfigSection>,
    #[serde(default)]
    pub gateway: Option<GatewaySection>,
    #[serde(default)]
    pub router: Option<RouterSection>,
    /// Audit only: signed checkpoints (`[checkpoints]`).
    #[serde(default)]
    pub checkpoints: Option<crewmesh_audit::CheckpointConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    #[serde(default = "default_http")]
    pub http_addr: SocketAddr,
    /// File holding the first admin API key (tenant `default`).
    #[serde(default)]
    pub bootstrap_api_key_file: Option<PathBuf>,
    #[serde(default = "default_upstream_secs")]
    pub upstream_timeout_secs: u64,
    /// OIDC bearer tokens (besides API keys).
    #[serde(default)]
    pub oidc: Option<crewmesh_gateway::oidc::OidcSection>,
    /// Replica membership in etcd, so tenant limits hold across gateway replicas.
    #[serde(default)]
    pub membership: Option<crewmesh_kit::membership::MembershipSection>,
    /// CORS, security headers, header limits and timeouts (`[gateway.http]`).
    #[serde(default)]
    pub http: crewmesh_gateway::edge::HttpSection,
}

fn default_http() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}

fn default_upstream_secs() -> u64 {
    120
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSection {
    #[serde(default = "default_refresh_ms")]
    pub refresh_interval_ms: u64,
    #[serde(default = "default_connect_ms")]
    pub upstream_connect_timeout_ms: u64,
    #[serde(default = "default_upstream_ms")]
    pub upstream_timeout_ms: u64,
    /// Default time to the first byte of an upstream answer (a provider document can
    /// override it).
    #[serde(default)]
    pub upstream_first_byte_timeout_ms: Option<u64>,
    /// Replica membership in etcd, so provider RPM/TPM limits hold across routers.
    #[serde(default)]
    pub membership: Option<crewmesh_kit::membership::MembershipSection>,
}

fn default_refresh_ms() -> u64 {
    1000
}
fn default_connect_ms() -> u64 {
    5000
}
fn default_upstream_ms() -> u64 {
    120_000
}

/// The typed config of one service, ready for its `Application::build`.
pub enum ServiceConfig {
    Gateway(crewmesh_gateway::GatewayConfig),
    Router(crewmesh_router::RouterConfig),
    AgentRuntime(crewmesh_agent_runtime::AgentRuntimeConfig),
    Audit(crewmesh_audit::AuditConfig),
    Config(crewmesh_config::ConfigServiceConfig),
    Metrics(crewmesh_metrics::MetricsConfig),
}

impl ServiceConfig {
    pub fn common(&self) -> &CommonConfig {
        match self {
            ServiceConfig::Gateway(c) => &c.common,
            ServiceConfig::Router(c) => &c.common,
            ServiceConfig::AgentRuntime(c) => &c.common,
            ServiceConfig::Audit(c) => &c.common,
            ServiceConfig::Config(c) => &c.common,
            ServiceConfig::Metrics(c) => &c.common,
        }
    }
}

/// Reads and validates the config of `service` from `path` and the environment.
pub fn load(
    service: Service,
    path: &Path,
    env: &[(String, String)],
) -> Result<ServiceConfig, ConfigError> {
    let file: FileConfig = settings::load(Some(path), env)?;
    into_service(service, file)
}

fn misplaced(p: &mut Problems, present: bool, section: &str, service: Service) {
    if present {
        p.add(
            section,
            format!("does not apply to the {service} service"),
            "remove the section (each service reads only its own sections)",
        );
    }
}

fn into_service(service: Service, f: FileConfig) -> Result<ServiceConfig, ConfigError> {
    let mut p = Problems::default();
    let mut server = f.server.unwrap_or(ServerConfig {
        grpc_addr: None,
        admin_addr: SocketAddr::from(([0, 0, 0, 0], 9090)),
        shutdown_grace_secs: 20,
        state_dir: None,
    });
    if server.grpc_addr.is_none()
        && let Some(port) = service.default_grpc_port()
    {
        server.grpc_addr = Some(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if service == Service::Gateway && server.grpc_addr.is_some() {
        p.add(
            "server.grpc_addr",
            "the gateway has no gRPC port",
            "remove it; set gateway.http_addr instead",
        );
    }
    let common = CommonConfig {
        trust_domain: f.trust_domain,
        server,
        tls: f.tls,
        telemetry: f.telemetry,
        peers: f.peers,
    };
    let uses_db = matches!(
        service,
        Service::Audit | Service::Metrics | Service::AgentRuntime
    );
    misplaced(
        &mut p,
        !uses_db && f.database.is_some(),
        "database",
        service,
    );
    misplaced(
        &mut p,
        service != Service::Config && f.store.is_some(),
        "store",
        service,
    );
    misplaced(
        &mut p,
        service != Service::Gateway && f.gateway.is_some(),
        "gateway",
        service,
    );
    misplaced(
        &mut p,
        service != Service::Router && f.router.is_some(),
        "router",
        service,
    );
    let database = if uses_db {
        match f.database {
            Some(d) => Some(d),
            None => {
                p.add(
                    "database",
                    "missing",
                    "add [database] with url = \"postgres://...\" or \"sqlite:///path\"",
                );
                None
            }
        }
    } else {
        None
    };
    // Report misplaced and missing sections before service-specific checks.
    p.into_result()?;

    let config = match service {
        Service::Gateway => {
            let g = f.gateway.unwrap_or(GatewaySection {
                http_addr: default_http(),
                bootstrap_api_key_file: None,
                upstream_timeout_secs: default_upstream_secs(),
                oidc: None,
                membership: None,
                http: Default::default(),
            });
            let oidc = g
                .oidc
                .map(|o| o.into_config().map(Box::new))
                .transpose()
                .map_err(|problem| {
                    ConfigError::Invalid(vec![settings::FieldError {
                        field: "gateway.oidc.role_map".into(),
                        problem,
                        fix: "map claim values to admin, operator, developer, auditor or viewer"
                            .into(),
                    }])
                })?;
            let bootstrap_api_key = match &g.bootstrap_api_key_file {
                Some(path) => Some(read_secret_file(path).map_err(|e| {
                    ConfigError::Invalid(vec![settings::FieldError {
                        field: "gateway.bootstrap_api_key_file".into(),
                        problem: format!("cannot read {}: {e}", path.display()),
                        fix: "point it at a readable file holding the key".into(),
                    }])
                })?),
                None => None,
            };
            let c = crewmesh_gateway::GatewayConfig {
                common,
                http_addr: g.http_addr,
                bootstrap_api_key,
                upstream_timeout: Duration::from_secs(g.upstream_timeout_secs),
                edge: crewmesh_gateway::EdgeConfig {
                    oidc,
                    membership: g.membership.map(Into::into),
                    http: g.http.into(),
                    ..Default::default()
                },
            };
            c.validate()?;
            ServiceConfig::Gateway(c)
        }
        Service::Router => {
            let mut c = crewmesh_router::RouterConfig::new(common);
            if let Some(r) = f.router {
                c.refresh_interval = Duration::from_millis(r.refresh_interval_ms);
                c.upstream_connect_timeout = Duration::from_millis(r.upstream_connect_timeout_ms);
                c.upstream_timeout = Duration::from_millis(r.upstream_timeout_ms);
                if let Some(ms) = r.upstream_first_byte_timeout_ms {
                    c.upstream_first_byte_timeout = Duration::from_millis(ms);
                }
                c.membership = r.membership.map(Into::into);
            }
            c.validate()?;
            ServiceConfig::Router(c)
        }
        Service::AgentRuntime => {
            let c = crewmesh_agent_runtime::AgentRuntimeConfig {
                common,
                database: database.expect("checked above"),
            };
            c.validate()?;
            ServiceConfig::AgentRuntime(c)
        }
        Service::Audit => {
            let c = crewmesh_audit::AuditConfig {
                common,
                database: database.expect("checked above"),
                checkpoints: f.checkpoints.unwrap_or_default(),
            };
            c.validate()?;
            ServiceConfig::Audit(c)
        }
        Service::Metrics => {
            let c = crewmesh_metrics::MetricsConfig {
                common,
                database: database.expect("checked above"),
            };
            c.validate()?;
            ServiceConfig::Metrics(c)
        }
        Service::Config => {
            let raw = f.store.ok_or_else(|| {
                ConfigError::Invalid(vec![settings::FieldError {
                    field: "store".into(),
                    problem: "missing".into(),
                    fix: "add [store] with backend = \"etcd\" (and [store.etcd]) or \"embedded\""
                        .into(),
                }])
            })?;
            let store = raw.into_typed()?;
            let c = crewmesh_config::ConfigServiceConfig {
                common,
                store,
                secrets_key_file: f.config.and_then(|c| c.secrets_key_file),
            };
            c.validate()?;
            ServiceConfig::Config(c)
        }
    };
    Ok(config)
}
