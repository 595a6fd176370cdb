//! crewmesh-audit: the append-only, hash-chained audit log of the mesh
//! (`crewmesh.audit.v1.AuditService`).
//!
//! Every service sends its audit events here in batches (`Append`, idempotent on
//! event ids). Each batch is validated as a whole, its details are redacted of
//! secrets and canonicalised, and it extends the chain in one transaction: every
//! event carries the hash of the one before it (see [`event::canonical_bytes`]), so
//! changing, removing or reordering any stored event breaks every later hash. The
//! database refuses updates and deletes of events with a trigger. `Query` serves a
//! tenant's events, newest first, to the gateway. The store is PostgreSQL, or SQLite
//! in the embedded mode.

#![forbid(unsafe_code)]

mod api;
mod app;
mod config;
mod error;
pub mod event;
mod page;
pub mod store;

pub use api::AuditApi;
pub use app::Application;
pub use config::AuditConfig;
pub use error::{AuditError, Result};
pub use event::{EventRecord, NewEvent, canonical_bytes};
pub use page::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
