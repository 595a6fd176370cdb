//! The shape of the mesh, in one place: which services exist, their default ports,
//! and who may call which RPC. Services enforce these allow-lists; `crewmesh
//! mesh-policy` prints them so deployment manifests can be checked against them.

use std::fmt;
use std::str::FromStr;

/// A crewmesh service (a workload identity name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    Gateway,
    Router,
    AgentRuntime,
    Audit,
    Config,
    Metrics,
}

impl Service {
    pub const ALL: [Service; 6] = [
        Service::Gateway,
        Service::Router,
        Service::AgentRuntime,
        Service::Audit,
        Service::Config,
        Service::Metrics,
    ];

    /// The workload name, also the last segment of its SPIFFE id.
    pub fn name(self) -> &'static str {
        match self {
            Service::Gateway => "gateway",
            Service::Router => "router",
            Service::AgentRuntime => "agent-runtime",
            Service::Audit => "audit",
            Service::Config => "config",
            Service::Metrics => "metrics",
        }
    }

    /// The default gRPC port in distributed mode (the gateway serves HTTP only).
    pub fn default_grpc_port(self) -> Option<u16> {
        match self {
            Service::Gateway => None,
            Service::Router => Some(7001),
            Service::AgentRuntime => Some(7002),
            Service::Audit => Some(7003),
            Service::Config => Some(7004),
            Service::Metrics => Some(7005),
        }
    }

    /// The gRPC services this service serves, by fully qualified name.
    pub fn grpc_service_names(self) -> &'static [&'static str] {
        match self {
            Service::Gateway => &[],
            Service::Router => &["crewmesh.router.v1.RouterService"],
            Service::AgentRuntime => &["crewmesh.agent.v1.AgentService"],
            Service::Audit => &["crewmesh.audit.v1.AuditService"],
            Service::Config => &["crewmesh.config.v1.ConfigService"],
            Service::Metrics => &["crewmesh.metrics.v1.MetricsService"],
        }
    }

    /// Callers whose principal metadata (tenant, subject, roles) this service trusts.
    pub fn principal_asserters(self) -> &'static [&'static str] {
        match self {
            // The agent runtime acts for a run's owner when it calls models and reads
            // the owner's agent documents.
            Service::Router | Service::Config => &["gateway", "agent-runtime"],
            Service::Gateway => &[],
            _ => &["gateway"],
        }
    }

    /// The per-RPC allow-list: each method path with the callers allowed to use it.
    /// Anything not listed is denied.
    pub fn allow_list(self) -> &'static [(&'static str, &'static [&'static str])] {
        const MESH: &[&str] = &[
            "gateway",
            "router",
            "agent-runtime",
            "audit",
            "config",
            "metrics",
        ];
        const EDGE: &[&str] = &["gateway"];
        const EDGE_AND_CLI: &[&str] = &["gateway", "cli"];
        match self {
            Service::Gateway => &[],
            Service::Router => &[
                (
                    "/crewmesh.router.v1.RouterService/Complete",
                    &["gateway", "agent-runtime"],
                ),
                (
                    "/crewmesh.router.v1.RouterService/StreamComplete",
                    &["gateway", "agent-runtime"],
                ),
                (
                    "/crewmesh.router.v1.RouterService/ListModels",
                    &["gateway", "agent-runtime"],
                ),
            ],
            Service::AgentRuntime => &[
                ("/crewmesh.agent.v1.AgentService/StartRun", EDGE),
                ("/crewmesh.agent.v1.AgentService/GetRun", EDGE),
                ("/crewmesh.agent.v1.AgentService/WatchRun", EDGE),
                ("/crewmesh.agent.v1.AgentService/CancelRun", EDGE),
                ("/crewmesh.agent.v1.AgentService/ApproveStep", EDGE),
                ("/crewmesh.agent.v1.AgentService/StartCrew", EDGE),
            ],
            Service::Audit => &[
                (
                    "/crewmesh.audit.v1.AuditService/Append",
                    &["gateway", "router", "agent-runtime", "config", "metrics"],
                ),
                ("/crewmesh.audit.v1.AuditService/Query", EDGE_AND_CLI),
                ("/crewmesh.audit.v1.AuditService/Verify", EDGE_AND_CLI),
                ("/crewmesh.audit.v1.AuditService/Export", EDGE_AND_CLI),
                ("/crewmesh.audit.v1.AuditService/Checkpoints", EDGE_AND_CLI),
            ],
            Service::Config => &[
                ("/crewmesh.config.v1.ConfigService/Get", MESH),
                ("/crewmesh.config.v1.ConfigService/List", MESH),
                ("/crewmesh.config.v1.ConfigService/Watch", MESH),
                ("/crewmesh.config.v1.ConfigService/EvaluateFlags", MESH),
                ("/crewmesh.config.v1.ConfigService/Put", EDGE_AND_CLI),
                ("/crewmesh.config.v1.ConfigService/Delete", EDGE_AND_CLI),
                ("/crewmesh.config.v1.ConfigService/Apply", EDGE_AND_CLI),
                ("/crewmesh.config.v1.ConfigService/History", EDGE_AND_CLI),
                ("/crewmesh.config.v1.ConfigService/Rollback", EDGE_AND_CLI),
            ],
            Service::Metrics => &[
                (
                    "/crewmesh.metrics.v1.MetricsService/Record",
                    &["gateway", "router", "agent-runtime"],
                ),
                ("/crewmesh.metrics.v1.MetricsService/Query", EDGE_AND_CLI),
                ("/crewmesh.metrics.v1.MetricsService/Spend", EDGE_AND_CLI),
            ],
        }
    }

    /// Every identity allowed to call at least one RPC, sorted.
    pub fn callers(self) -> Vec<&'static str> {
        let mut c: Vec<&str> = self
            .allow_list()
            .iter()
            .flat_map(|(_, callers)| callers.iter().copied())
            .collect();
        c.sort_unstable();
        c.dedup();
        c
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unknown service `{0}` (expected one of: gateway, router, agent-runtime, audit, config, metrics)"
)]
pub struct UnknownService(pub String);

impl FromStr for Service {
    type Err = UnknownService;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Service::ALL
            .into_iter()
            .find(|svc| svc.name() == s)
            .ok_or_else(|| UnknownService(s.to_owned()))
    }
}

/// GRPC services open to any peer holding a certificate from the mesh CA.
pub const OPEN_GRPC_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_method_belongs_to_the_service() {
        for svc in Service::ALL {
            for (method, callers) in svc.allow_list() {
                let grpc_service = method.trim_start_matches('/').split('/').next().unwrap();
                assert!(svc.grpc_service_names().contains(&grpc_service), "{method}");
                assert!(!callers.is_empty());
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for svc in Service::ALL {
            assert_eq!(svc.name().parse::<Service>().unwrap(), svc);
        }
        assert!("nope".parse::<Service>().is_err());
    }
}
