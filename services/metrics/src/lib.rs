//! crewmesh-metrics: usage, cost and latency accounting
//! (`crewmesh.metrics.v1.MetricsService`).
//!
//! The router and the agent runtime send a usage record per model call in batches
//! (`Record`, idempotent on record ids; a batch with one invalid record is refused
//! whole). The gateway reads a tenant's records (`Query`, newest first, paginated)
//! and its spend grouped by model, subject, agent or UTC day (`Spend`). Accepted
//! usage is also counted in Prometheus (`crewmesh_usage_tokens_total` and
//! `crewmesh_usage_cost_usd_total`, by model). The store is PostgreSQL, or SQLite in
//! the embedded mode.

#![forbid(unsafe_code)]

mod api;
mod app;
mod config;
mod counters;
mod error;
mod page;
pub mod store;
pub mod usage;

pub use api::MetricsApi;
pub use app::Application;
pub use config::MetricsConfig;
pub use counters::UsageCounters;
pub use error::{MetricsError, Result};
pub use page::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
pub use usage::UsageRow;
