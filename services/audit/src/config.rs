//! The audit service's configuration.

use serde::{Deserialize, Serialize};

use crewmesh_kit::mesh::Service;
use crewmesh_kit::settings::{CommonConfig, ConfigError, DatabaseConfig, Problems};

pub use crate::checkpoint::CheckpointConfig;

/// Everything the audit service reads at start-up. Audit calls no other service.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    pub common: CommonConfig,
    /// Where the chain is stored: `postgres://...` or `sqlite:...`.
    pub database: DatabaseConfig,
    /// Signed checkpoints: the key and how often.
    #[serde(default)]
    pub checkpoints: CheckpointConfig,
}

impl AuditConfig {
    /// Checks every field; the error lists each problem with its field and fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        self.common.validate(Service::Audit, &[], &mut problems);
        self.database.validate(&mut problems);
        if self.checkpoints.every_events == 0 {
            problems.add(
                "checkpoints.every_events",
                "must be at least 1",
                "set it to the number of events between two checkpoints, e.g. 1000",
            );
        }
        if self.checkpoints.interval_secs == 0 {
            problems.add(
                "checkpoints.interval_secs",
                "must be at least 1",
                "set it to the seconds between two checkpoints, e.g. 10",
            );
        }
        problems.into_result()
    }
}
