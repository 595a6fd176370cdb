//! Official client libraries against the running mesh: each test starts a mesh and
//! runs one pytest file from `tests/python/` with `CREWMESH_GATEWAY_URL` and
//! `CREWMESH_API_KEY` set. `scripts/test` makes the Python environment and exports
//! `CREWMESH_TEST_PYTHON`.

use std::path::Path;
use std::process::Command;

use crate::harness::TestMesh;

/// Runs `tests/python/<file>` with pytest against `mesh`; panics with pytest's output
/// when it fails.
pub fn run_pytest(mesh: &TestMesh, file: &str) {
    let python = std::env::var("CREWMESH_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "CREWMESH_TEST_PYTHON is not set: run scripts/test (it creates the Python environment)"
        )
    });
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(file);
    let out = Command::new(python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&path)
        .env("CREWMESH_GATEWAY_URL", &mesh.state().gateway_url)
        .env("CREWMESH_API_KEY", mesh.api_key())
        .output()
        .expect("run pytest");
    assert!(
        out.status.success(),
        "pytest {file} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_client() {
    let mesh = TestMesh::start().await;
    let mesh = tokio::task::spawn_blocking(move || {
        run_pytest(&mesh, "test_gateway_http.py");
        mesh
    })
    .await
    .unwrap();
    mesh.shutdown().await;
}
