//! crewmesh-agent-runtime: runs agents for end users, durably. A run is accepted by
//! `StartRun`, stored PENDING and answered at once, then executed in the background:
//! its model call goes through the router as the run's owner, and the run is
//! checkpointed to PostgreSQL or SQLite after every state change. A runtime that stops
//! mid-run (crash or shutdown) resumes the run from the store when it starts again.
//!
//! This release runs one-step agents (one model call, no tools); `WatchRun`,
//! `CancelRun`, `ApproveStep` and `StartCrew` answer UNIMPLEMENTED.
//!
//! - [`settings`]: the configuration file and its validation.
//! - [`request`], [`run`]: wire requests checked into the domain model of a run.
//! - [`agents`]: inline specs and `agent` config documents resolved into a spec.
//! - [`store`]: the [`store::RunStore`] trait, PostgreSQL and SQLite.
//! - [`execution`]: background execution, checkpoints, resumption, draining.
//! - [`service`], [`app`]: the gRPC service and the [`Application`].

#![forbid(unsafe_code)]

pub mod agents;
pub mod app;
pub mod error;
pub mod execution;
pub mod request;
pub mod run;
pub mod service;
pub mod settings;
pub mod store;

pub use app::Application;
pub use error::{AgentRuntimeError, Result};
pub use settings::AgentRuntimeConfig;
