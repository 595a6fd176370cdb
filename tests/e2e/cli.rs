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

/// Runs `crewmesh` against a mesh's gateway: (exit code, stdout, stderr).
fn against(mesh: &TestMesh, args: &[&str]) -> (i32, String, String) {
    let out = crewmesh()
        .args(args)
        .args([
            "--gateway",
            &mesh.state().gateway_url,
            "--api-key",
            mesh.api_key(),
        ])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_apply_and_diff_take_yaml_directories_like_kubectl() {
    let mesh = TestMesh::start().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    // A multi-document YAML file (provider first in path order, but order does not
    // matter: references are checked across the whole apply) and a JSON list in a
    // subdirectory.
    std::fs::create_dir_all(root.join("models")).unwrap();
    std::fs::write(
        root.join("models/20-alias.json"),
        r#"[{"kind": "model", "name": "team-alias", "scope": "global",
             "spec": {"deployments": [{"provider": "team-sim", "model": "sim-small", "weight": 1}]}}]"#,
    )
    .unwrap();
    std::fs::write(
        root.join("10-base.yaml"),
        "\
kind: provider
name: team-sim
scope: global
spec:
  type: simulated
  base_url: http://127.0.0.1:9/v1
---
kind: flag
name: team-flag
scope: global
spec:
  variants: {on: true, off: false}
  default_variant: off
  rollout: [{variant: on, weight: 25}, {variant: off, weight: 75}]
",
    )
    .unwrap();
    let path = root.to_str().unwrap().to_owned();

    let mesh = tokio::task::spawn_blocking(move || {
        // Everything is new: diff shows it and exits 1.
        let (code, out, err) = against(&mesh, &["config", "diff", "-f", &path]);
        assert_eq!(code, 1, "{out}{err}");
        assert!(out.starts_with("create    provider/team-sim (global)\n--- /dev/null\n+++ provider/team-sim (global) ("), "{out}");
        assert!(out.contains("\n+  \"type\": \"simulated\"\n"), "{out}");
        assert!(out.contains("create    flag/team-flag (global)\n"), "{out}");
        assert!(out.contains("create    model/team-alias (global)\n"), "{out}");

        // A dry run is checked by the server and writes nothing.
        let (code, out, err) = against(&mesh, &["config", "apply", "-f", &path, "--dry-run"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("create    provider/team-sim (global)\ncreate    flag/team-flag (global)\ncreate    model/team-alias (global)\ndry run: 3 documents checked by the server at revision "), "{out}");
        let (code, _, err) = against(&mesh, &["config", "get", "provider", "team-sim", "--global"]);
        assert_eq!(code, 1);
        assert!(err.contains("404"), "{err}");

        // A dangling reference fails the dry run with its path.
        let bad = tempfile::tempdir().unwrap();
        std::fs::write(
            bad.path().join("m.yml"),
            "kind: model\nname: orphan\nscope: global\nspec:\n  deployments: [{provider: ghost, model: x}]\n",
        )
        .unwrap();
        let (code, _, err) = against(&mesh, &["config", "apply", "-f", bad.path().to_str().unwrap(), "--dry-run"]);
        assert_eq!(code, 1);
        assert!(
            err.contains(r#"nothing was applied: operations[0]: invalid model spec: deployments[0].provider: provider "ghost" does not exist (in _global)"#),
            "{err}"
        );

        // Apply writes all three; then there is nothing to diff.
        let (code, out, err) = against(&mesh, &["config", "apply", "-f", &path]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("applied 3 documents at revision "), "{out}");
        let (code, out, err) = against(&mesh, &["config", "diff", "-f", &path]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(
            out,
            "unchanged provider/team-sim (global)\nunchanged flag/team-flag (global)\nunchanged model/team-alias (global)\n"
        );

        // A changed field shows as -/+ lines in a hunk of the pretty JSON.
        std::fs::write(
            root.join("models/20-alias.json"),
            r#"[{"kind": "model", "name": "team-alias", "scope": "global",
                 "spec": {"deployments": [{"provider": "team-sim", "model": "sim-small", "weight": 3}]}}]"#,
        )
        .unwrap();
        let (code, out, err) = against(&mesh, &["config", "diff", "-f", &path]);
        assert_eq!(code, 1, "{out}{err}");
        let hunk = out
            .split_once("update    model/team-alias (global)\n")
            .unwrap_or_else(|| panic!("{out}"))
            .1;
        assert!(hunk.starts_with("--- model/team-alias (global) (live, version "), "{hunk}");
        assert!(
            hunk.ends_with("@@ -3,7 +3,7 @@\n     {\n       \"model\": \"sim-small\",\n       \"provider\": \"team-sim\",\n-      \"weight\": 1\n+      \"weight\": 3\n     }\n   ]\n }\n"),
            "{hunk}"
        );

        // Deleting a provider still in use is refused with its referrers.
        let (code, _, err) = against(&mesh, &["config", "delete", "provider", "team-sim", "--global"]);
        assert_eq!(code, 1);
        assert_eq!(
            err,
            "error: Failed precondition (422): cannot delete _global/provider/team-sim: still referenced by _global/model/team-alias (deployments[0].provider); change or delete those first\n"
        );

        // flags list shows the global flag with its rollout.
        let (code, out, err) = against(&mesh, &["flags", "list"]);
        assert_eq!(code, 0, "{err}");
        let row = out
            .lines()
            .find(|l| l.starts_with("team-flag "))
            .unwrap_or_else(|| panic!("{out}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cols,
            vec!["team-flag", "global", cols[2], "off", "true", "rollout", "on", "25%", "/", "off", "75%"]
        );
        assert!(out.starts_with("NAME "), "{out}");

        // Errors exit 2 from diff.
        let (code, _, err) = against(&mesh, &["config", "diff", "-f", "/nonexistent/dir"]);
        assert_eq!(code, 2);
        assert!(err.starts_with("error: /nonexistent/dir: cannot read: "), "{err}");
        mesh
    })
    .await
    .unwrap();
    mesh.shutdown().await;
}
