//! The CLI commands a new user runs besides `up`.

use std::process::Command;

use crate::harness::TestMesh;

fn crewmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crewmesh"))
}

#[test]
fn certs_init_writes_a_ca_and_a_leaf_per_workload() {
    let dir = tempfile::tempdir().unwrap();
    let out = crewmesh()
        .args([
            "certs",
            "init",
            "--trust-domain",
            "example.org",
            "--dns",
            "router.mesh.svc",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for workload in [
        "gateway",
        "router",
        "agent-runtime",
        "audit",
        "config",
        "metrics",
        "cli",
    ] {
        let pem = std::fs::read(dir.path().join(format!("{workload}.pem"))).unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem)
            .map(|c: rustls::pki_types::CertificateDer<'_>| c.as_ref().to_vec())
            .unwrap();
        let id = crewmesh_kit::identity::spiffe_id_from_cert(&der).unwrap();
        assert_eq!(id.to_string(), format!("spiffe://example.org/{workload}"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let key = std::fs::metadata(dir.path().join(format!("{workload}-key.pem"))).unwrap();
            assert_eq!(key.permissions().mode() & 0o777, 0o600, "{workload} key");
        }
    }
    assert!(dir.path().join("ca.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_goes_through_the_gateway() {
    let mesh = TestMesh::start().await;
    // From the running mesh's state.json...
    let out = crewmesh()
        .args(["chat", "hello from the cli", "--data-dir"])
        .arg(mesh.data_dir())
        .env_remove("CREWMESH_API_KEY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "[simulated] echo: hello from the cli"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("simulated upstream"));
    // ...or from flags; a bad key is a clear error.
    let out = crewmesh()
        .args([
            "chat",
            "x",
            "--gateway",
            &mesh.state().gateway_url,
            "--api-key",
            "cm_wrong",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("not valid"), "{err}");
    // With no mesh and no flags it says how to get one.
    let empty = tempfile::tempdir().unwrap();
    let out = crewmesh()
        .args(["chat", "x", "--data-dir"])
        .arg(empty.path())
        .env_remove("CREWMESH_API_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("crewmesh up"));
    mesh.shutdown().await;
}
