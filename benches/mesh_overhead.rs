//! Mesh overhead of a model call: the same measurement as `crewmesh bench gateway`
//! (`src/bench.rs`, where the method is described), with its defaults: the mesh started
//! in this process like `crewmesh up` (audit and usage on), one client sequentially, then
//! open loop at 500 and 1,000 req/s, 5 s per scenario and target. Run with
//! `cargo bench --bench mesh_overhead`; the command takes options (`--rates`,
//! `--duration`, `--warmup`, `--json`, `--url`).

use crewmesh::bench::{self, GatewayArgs};

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(bench::run_gateway(GatewayArgs::in_process()))?;
    print!("{}", bench::table(&report));
    Ok(())
}
