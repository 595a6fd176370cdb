//! crewmesh-audit: the append-only, hash-chained audit log of the mesh
//! (`crewmesh.audit.v1.AuditService`).
//!
//! Every service sends its audit events here in batches (`Append`, idempotent on
//! event ids). Each batch is validated as a whole, its details are redacted of
//! secrets and canonicalised, and it extends the chain in one transaction: every
//! event carries the hash of the one before it (see [`event::canonical_bytes`]), so
//! changing, removing or reordering any stored event breaks every later hash. The
//! database refuses updates and deletes of events with a trigger. `Query` serves a
//! tenant's events, newest first, to the gateway. Every N events or T seconds the
//! chain head is signed with Ed25519 ([`checkpoint`]); `Verify` recomputes the chain
//! and checks the checkpoints ([`verify`]); `Export` streams JSON Lines or CSV. The
//! store is PostgreSQL, or SQLite in the embedded mode.

#![forbid(unsafe_code)]

mod api;
mod app;
pub mod checkpoint;
mod config;
mod error;
pub mod event;
pub mod export;
mod page;
pub mod store;
pub mod verify;

pub use api::AuditApi;
pub use app::Application;
pub use config::{AuditConfig, CheckpointConfig};
pub use error::{AuditError, Result};
pub use event::{EventRecord, NewEvent, canonical_bytes};
pub use page::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
