//! Configuration loading: a TOML file plus `CREWMESH_`-prefixed environment variables
//! (`CREWMESH_SERVER__GRPC_ADDR` sets `server.grpc_addr`), read into a struct that
//! rejects unknown fields, then validated. Errors name the field and the fix.
//!
//! Each service defines its own config struct from the sections here plus its own;
//! nothing below `main` reads the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;
use crate::mesh::Service;
use crate::telemetry::TelemetryConfig;
use crate::tls::TlsFiles;

/// Exit code for a bad configuration (EX_USAGE in sysexits.h).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// A problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
    pub fix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {}: {} (fix: {})", e.field, e.problem, e.fix)).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

/// Collects field errors during validation.
#[derive(Debug, Default)]
pub struct Problems(Vec<FieldError>);

impl Problems {
    pub fn add(
        &mut self,
        field: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.0.push(FieldError {
            field: field.into(),
            problem: problem.into(),
            fix: fix.into(),
        });
    }

    pub fn into_result(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(self.0))
        }
    }
}

/// Reads `path` (optional) and the environment into `T`.
pub fn load<T: DeserializeOwned>(
    path: Option<&Path>,
    env: &[(String, String)],
) -> Result<T, ConfigError> {
    let mut fig = Figment::new();
    if let Some(path) = path {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        fig = fig.merge(Toml::string(&text));
    }
    // Figment's Env provider reads the process environment; to keep this function
    // pure we feed the given pairs through a TOML-like provider instead.
    let mut env_fig = Figment::new();
    for (k, v) in env {
        // Only `CREWMESH_<SECTION>__<FIELD>` and `CREWMESH_TRUST_DOMAIN` are config;
        // other CREWMESH_ variables (the CLI's CREWMESH_API_KEY, say) are not.
        if let Some(rest) = k
            .strip_prefix("CREWMESH_")
            .filter(|r| r.contains("__") || *r == "TRUST_DOMAIN")
        {
            let key = rest.to_ascii_lowercase().replace("__", ".");
            env_fig = env_fig.merge((key, parse_env_value(v)));
        }
    }
    fig = fig.merge(env_fig);
    fig.extract::<T>().map_err(|e| {
        let mut msgs = Vec::new();
        for err in e {
            let path = if err.path.is_empty() {
                String::new()
            } else {
                format!("{}: ", err.path.join("."))
            };
            msgs.push(format!("  - {path}{}", err.kind));
        }
        ConfigError::Parse(format!("invalid configuration:\n{}", msgs.join("\n")))
    })
}

fn parse_env_value(v: &str) -> figment::value::Value {
    // Numbers, booleans and arrays as TOML, everything else as a string.
    match toml_scalar(v) {
        Some(val) => val,
        None => figment::value::Value::from(v.to_owned()),
    }
}

fn toml_scalar(v: &str) -> Option<figment::value::Value> {
    let doc = format!("x = {v}");
    let fig = Figment::from(Toml::string(&doc));
    fig.find_value("x").ok()
}

/// `[server]`: listening addresses and shutdown.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The mTLS gRPC address. Port 0 picks a free port.
    #[serde(default)]
    pub grpc_addr: Option<SocketAddr>,
    /// Plain HTTP for `/healthz`, `/readyz` and `/metrics`.
    #[serde(default = "default_admin")]
    pub admin_addr: SocketAddr,
    /// How long in-flight requests may take to finish after a shutdown signal.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// A writable directory for the process's local state, such as the audit
    /// client's spool (`<state_dir>/spool/audit`). Without one, audit events wait in
    /// memory only and are lost if the process dies during an audit outage.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}

fn default_grace() -> u64 {
    20
}

impl ServerConfig {
    pub fn loopback() -> Self {
        Self {
            grpc_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            shutdown_grace_secs: 5,
            state_dir: None,
        }
    }

    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// `[peers]`: where the other services' gRPC ports are (host:port).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeersConfig {
    pub config: Option<String>,
    pub audit: Option<String>,
    pub metrics: Option<String>,
    pub router: Option<String>,
    pub agent_runtime: Option<String>,
}

impl PeersConfig {
    pub fn get(&self, service: Service) -> Option<&str> {
        match service {
            Service::Config => self.config.as_deref(),
            Service::Audit => self.audit.as_deref(),
            Service::Metrics => self.metrics.as_deref(),
            Service::Router => self.router.as_deref(),
            Service::AgentRuntime => self.agent_runtime.as_deref(),
            Service::Gateway => None,
        }
    }

    pub fn set(&mut self, service: Service, addr: String) {
        let slot = match service {
            Service::Config => &mut self.config,
            Service::Audit => &mut self.audit,
            Service::Metrics => &mut self.metrics,
            Service::Router => &mut self.router,
            Service::AgentRuntime => &mut self.agent_runtime,
            Service::Gateway => return,
        };
        *slot = Some(addr);
    }
}

/// The sections every service has.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CommonConfig {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    pub server: ServerConfig,
    pub tls: TlsFiles,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub peers: PeersConfig,
}

pub fn default_trust_domain() -> String {
    "crewmesh.local".to_owned()
}

impl CommonConfig {
    /// Checks the common sections; `needs` lists the peers this service calls.
    pub fn validate(&self, service: Service, needs: &[Service], problems: &mut Problems) {
        if SpiffeId::new(&self.trust_domain, service.name()).is_err() {
            problems.add(
                "trust_domain",
                format!("`{}` is not a valid trust domain", self.trust_domain),
                "use a lowercase DNS-like name such as crewmesh.local",
            );
        }
        if service.default_grpc_port().is_some() && self.server.grpc_addr.is_none() {
            problems.add(
                "server.grpc_addr",
                "missing",
                format!(
                    "set it, e.g. \"0.0.0.0:{}\"",
                    service.default_grpc_port().unwrap_or(0)
                ),
            );
        }
        for (field, path) in [
            ("tls.ca_file", &self.tls.ca_file),
            ("tls.cert_file", &self.tls.cert_file),
            ("tls.key_file", &self.tls.key_file),
        ] {
            if path.as_os_str().is_empty() {
                problems.add(field, "empty", "give the path of a PEM file");
            }
        }
        for peer in needs {
            match self.peers.get(*peer) {
                None => problems.add(
                    format!("peers.{}", peer.name().replace('-', "_")),
                    "missing",
                    format!("set the host:port of the {peer} service's gRPC port"),
                ),
                Some(addr)
                    if addr
                        .rsplit_once(':')
                        .is_none_or(|(_, p)| p.parse::<u16>().is_err()) =>
                {
                    problems.add(
                        format!("peers.{}", peer.name().replace('-', "_")),
                        format!("`{addr}` is not host:port"),
                        "write it as host:port, e.g. crewmesh-config:7004",
                    )
                }
                Some(_) => {}
            }
        }
        if let Some(ep) = &self.telemetry.otlp_endpoint
            && !(ep.starts_with("http://") || ep.starts_with("https://"))
        {
            problems.add(
                "telemetry.otlp_endpoint",
                format!("`{ep}` is not an http(s) URL"),
                "use e.g. http://otel-collector:4317",
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level).is_err() {
            problems.add(
                "telemetry.log_level",
                format!("`{}` is not a log filter", self.telemetry.log_level),
                "use a level such as info or debug",
            );
        }
    }
}

/// `[database]`: a Postgres or SQLite URL for services that store data.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user@host:5432/db` or `sqlite:///path/to/file.db`.
    pub url: String,
    /// File holding the Postgres password (a Kubernetes Secret); never logged.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_pool")]
    pub max_connections: u32,
}

fn default_pool() -> u32 {
    8
}

impl DatabaseConfig {
    pub fn validate(&self, problems: &mut Problems) {
        if !(self.url.starts_with("postgres://")
            || self.url.starts_with("postgresql://")
            || self.url.starts_with("sqlite:"))
        {
            problems.add(
                "database.url",
                "must start with postgres://, postgresql:// or sqlite:",
                "e.g. postgres://crewmesh@postgres:5432/crewmesh or sqlite:///var/lib/crewmesh/audit.db",
            );
        }
        if self.url.contains('@')
            && self
                .url
                .split('@')
                .next()
                .is_some_and(|u| u.matches(':').count() > 1)
        {
            problems.add(
                "database.url",
                "contains a password",
                "put the password in a file and set database.password_file",
            );
        }
        if self.max_connections == 0 {
            problems.add(
                "database.max_connections",
                "must be at least 1",
                "set e.g. 8",
            );
        }
    }
}

/// A secret string that never prints.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Reads a secret from a file, trimming one trailing newline.
pub fn read_secret_file(path: &Path) -> std::io::Result<Secret> {
    let s = std::fs::read_to_string(path)?;
    Ok(Secret(s.trim_end_matches(['\n', '\r']).to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_env_merge_and_unknown_fields_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[server]\ngrpc_addr = \"127.0.0.1:1\"\n[tls]\nca_file = \"a\"\ncert_file = \"b\"\nkey_file = \"c\"\n",
        )
        .unwrap();
        let env = vec![
            (
                "CREWMESH_SERVER__SHUTDOWN_GRACE_SECS".to_owned(),
                "7".to_owned(),
            ),
            ("CREWMESH_API_KEY".to_owned(), "not config".to_owned()),
            ("CREWMESH_TRUST_DOMAIN".to_owned(), "example.org".to_owned()),
        ];
        let c: CommonConfig = load(Some(&path), &env).unwrap();
        assert_eq!(c.server.shutdown_grace_secs, 7);
        assert_eq!(c.trust_domain, "example.org");
        assert_eq!(c.server.grpc_addr, Some("127.0.0.1:1".parse().unwrap()));

        std::fs::write(
            &path,
            "bogus = 1\n[server]\n[tls]\nca_file = \"a\"\ncert_file = \"b\"\nkey_file = \"c\"\n",
        )
        .unwrap();
        let err = load::<CommonConfig>(Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn validation_names_fields() {
        let c = CommonConfig {
            trust_domain: "Bad Domain".into(),
            server: ServerConfig {
                grpc_addr: None,
                admin_addr: default_admin(),
                shutdown_grace_secs: 1,
                state_dir: None,
            },
            tls: TlsFiles {
                ca_file: "a".into(),
                cert_file: "".into(),
                key_file: "c".into(),
            },
            telemetry: TelemetryConfig::default(),
            peers: PeersConfig {
                config: Some("nohost".into()),
                ..Default::default()
            },
        };
        let mut p = Problems::default();
        c.validate(Service::Router, &[Service::Config, Service::Audit], &mut p);
        let fields: Vec<_> = p.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "trust_domain",
                "server.grpc_addr",
                "tls.cert_file",
                "peers.config",
                "peers.audit"
            ]
        );
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "Secret(***)");
    }
}
