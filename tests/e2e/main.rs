//! End-to-end tests of the whole mesh: the real services in-process on loopback
//! ports over mTLS, started through the same code as `crewmesh up`, with a real etcd
//! and a real PostgreSQL started by the harness. `TEST_LOG=1` turns logs on.

mod harness;

mod audit;
mod audit_durability;
mod bench;
mod cli;
mod config_errors;
mod config_plane;
mod faults;
mod gateway_auth;
mod gateway_errors;
mod health;
mod mtls;
mod python;
mod routing;
mod shutdown;
mod streaming;
mod tenant_isolation;
mod up_process;
mod walking_skeleton;
