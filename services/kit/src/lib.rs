//! crewmesh-kit: what every crewmesh service shares.
//!
//! - [`tls`], [`transport`], [`identity`]: mutual TLS from PEM files with hot reload,
//!   SPIFFE-style identities, mTLS incoming connections and outgoing channels.
//! - [`mesh`], [`authz`], [`principal`]: who may call which RPC, and on whose behalf.
//! - [`server`], [`admin`], [`observe`], [`telemetry`]: server bootstrap with health,
//!   reflection, admin probes, Prometheus metrics, JSON logs and OpenTelemetry traces
//!   ([`trace_context`]: W3C trace ids on spans when no exporter is configured).
//! - [`settings`]: config files plus `CREWMESH_` environment, strictly validated.
//! - [`clients`], [`batch`], [`config_cache`]: typed clients to the other services,
//!   asynchronous audit and usage clients, and the watched config snapshot.
//! - [`flags`]: the in-process feature flag evaluator (OpenFeature semantics).
//! - [`pki`]: the development CA used by `crewmesh up` and `crewmesh certs init`.
//! - [`status`]: the single mapping from service errors to gRPC statuses.
//! - [`sql`]: an embedded SQLite database's reader pool and single writer, and
//!   multi-row statements whose text repeats, so they stay prepared.

#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod batch;
pub mod clients;
pub mod config_cache;
pub mod flags;
pub mod http2;
pub mod identity;
pub mod idle_poll;
pub mod membership;
pub mod mesh;
pub mod observe;
pub mod pki;
pub mod principal;
pub mod server;
pub mod settings;
pub mod spool;
pub mod sql;
pub mod status;
pub mod tasks;
pub mod telemetry;
pub mod tls;
pub mod trace_context;
pub mod transport;

pub use crewmesh_proto as proto;
