//! The agent runtime's configuration: the common sections plus `[database]`.
//!
//! The file is flat, like every service's: `trust_domain`, `[server]`, `[tls]`,
//! `[telemetry]`, `[peers]` and `[database]` at the top level; unknown fields are
//! rejected.
//!
//! Peers: `router` is required. `config` is needed only for runs of named agents (an
//! inline agent runs without it; a named one is refused with FAILED_PRECONDITION when it
//! is unset). `audit` is optional: when set, run starts and finishes are audited.
//! `metrics` is accepted but not called: the router accounts every model call of a run
//! (with its agent and run id) itself.

use crewmesh_kit::mesh::Service;
use crewmesh_kit::settings::{
    CommonConfig, ConfigError, DatabaseConfig, PeersConfig, Problems, ServerConfig,
    default_trust_domain,
};
use crewmesh_kit::telemetry::TelemetryConfig;
use crewmesh_kit::tls::TlsFiles;
use serde::{Deserialize, Serialize};

/// The agent runtime's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(from = "RawConfig", into = "RawConfig")]
pub struct AgentRuntimeConfig {
    pub common: CommonConfig,
    pub database: DatabaseConfig,
}

/// The file layout: the common sections flattened next to `[database]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_trust_domain")]
    trust_domain: String,
    server: ServerConfig,
    tls: TlsFiles,
    #[serde(default)]
    telemetry: TelemetryConfig,
    #[serde(default)]
    peers: PeersConfig,
    database: DatabaseConfig,
}

impl From<RawConfig> for AgentRuntimeConfig {
    fn from(raw: RawConfig) -> Self {
        Self {
            common: CommonConfig {
                trust_domain: raw.trust_domain,
                server: raw.server,
                tls: raw.tls,
                telemetry: raw.telemetry,
                peers: raw.peers,
            },
            database: raw.database,
        }
    }
}

impl From<AgentRuntimeConfig> for RawConfig {
    fn from(c: AgentRuntimeConfig) -> Self {
        Self {
            trust_domain: c.common.trust_domain,
            server: c.common.server,
            tls: c.common.tls,
            telemetry: c.common.telemetry,
            peers: c.common.peers,
            database: c.database,
        }
    }
}

impl AgentRuntimeConfig {
    /// Checks every field; the error lists each problem with its fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.common
            .validate(Service::AgentRuntime, &[Service::Router], &mut p);
        for optional in [Service::Config, Service::Audit, Service::Metrics] {
            if let Some(addr) = self.common.peers.get(optional)
                && addr
                    .rsplit_once(':')
                    .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
            {
                p.add(
                    format!("peers.{}", optional.name().replace('-', "_")),
                    format!("`{addr}` is not host:port"),
                    format!(
                        "write it as host:port, e.g. crewmesh-{}:{}",
                        optional.name(),
                        optional.default_grpc_port().unwrap_or(0)
                    ),
                );
            }
        }
        self.database.validate(&mut p);
        p.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
trust_domain = "crewmesh.local"

[server]
grpc_addr = "127.0.0.1:7002"
admin_addr = "127.0.0.1:9092"

[tls]
ca_file = "ca.pem"
cert_file = "agent-runtime.pem"
key_file = "agent-runtime.key"

[peers]
router = "crewmesh-router:7001"
audit = "crewmesh-audit:7003"

[database]
url = "sqlite:///var/lib/crewmesh/agent-runtime.db"
"#;

    #[test]
    fn reads_the_flat_file_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent-runtime.toml");
        std::fs::write(&path, FILE).unwrap();
        let env = vec![(
            "CREWMESH_DATABASE__MAX_CONNECTIONS".to_owned(),
            "3".to_owned(),
        )];
        let c: AgentRuntimeConfig = crewmesh_kit::settings::load(Some(&path), &env).unwrap();
        assert_eq!(
            c.common.peers.router.as_deref(),
            Some("crewmesh-router:7001")
        );
        assert_eq!(c.common.peers.audit.as_deref(), Some("crewmesh-audit:7003"));
        assert_eq!(c.database.max_connections, 3);
        c.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent-runtime.toml");
        std::fs::write(&path, format!("{FILE}\n[bogus]\nx = 1\n")).unwrap();
        let err = crewmesh_kit::settings::load::<AgentRuntimeConfig>(Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn names_missing_router_and_bad_optional_peers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent-runtime.toml");
        std::fs::write(&path, FILE).unwrap();
        let mut c: AgentRuntimeConfig = crewmesh_kit::settings::load(Some(&path), &[]).unwrap();
        c.common.peers.router = None;
        c.common.peers.config = Some("nohost".into());
        c.database.max_connections = 0;
        let ConfigError::Invalid(problems) = c.validate().unwrap_err() else {
            panic!("expected field problems");
        };
        let fields: Vec<_> = problems.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["peers.router", "peers.config", "database.max_connections"]
        );
    }
}
