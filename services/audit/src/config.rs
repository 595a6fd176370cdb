//! The audit service's configuration.

use serde::{Deserialize, Serialize};

use crewmesh_kit::mesh::Service;
use crewmesh_kit::settings::{CommonConfig, ConfigError, DatabaseConfig, Problems};

/// Everything the audit service reads at start-up. Audit calls no other service.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    pub common: CommonConfig,
    /// Where the chain is stored: `postgres://...` or `sqlite:...`.
    pub database: DatabaseConfig,
}

impl AuditConfig {
    /// Checks every field; the error lists each problem with its field and fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        self.common.validate(Service::Audit, &[], &mut problems);
        self.database.validate(&mut problems);
        problems.into_result()
    }
}
