//! The metrics service's configuration.

use serde::{Deserialize, Serialize};

use crewmesh_kit::mesh::Service;
use crewmesh_kit::settings::{CommonConfig, ConfigError, DatabaseConfig, Problems};

/// Everything the metrics service reads at start-up. Metrics calls no other service.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub common: CommonConfig,
    /// Where usage is stored: `postgres://...` or `sqlite:...`.
    pub database: DatabaseConfig,
}

impl MetricsConfig {
    /// Checks every field; the error lists each problem with its field and fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        self.common.validate(Service::Metrics, &[], &mut problems);
        self.database.validate(&mut problems);
        problems.into_result()
    }
}
