//! The `crewmesh` binary's library: how the services are composed. `crewmesh up`
//! and the end-to-end test harness start the mesh through the same code
//! ([`up::start`]), and `crewmesh serve` maps a config file to one service
//! ([`file_config`]).

#![forbid(unsafe_code)]

pub mod bench;
pub mod file_config;
pub mod state;
pub mod up;
