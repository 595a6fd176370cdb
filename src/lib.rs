//! The `crewmesh` binary's library: how the services are composed. `crewmesh up`
//! and the end-to-end test harness start the mesh through the same code
//! ([`up::start`]), and `crewmesh serve` maps a config file to one service
//! ([`file_config`]).

#![forbid(unsafe_code)]

/// The allocator of every crewmesh process (and of the benchmarks and tests that
/// link this library): with mimalloc the data plane spent about 6 % less CPU time per
/// model call than with the system allocator, side by side (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod bench;
pub mod file_config;
pub mod state;
pub mod up;
