//! `crewmesh serve` / `check-config` reject bad config with exit code 64 and a
//! message naming the field and the fix.

use std::process::Command;

fn check(service: &str, toml: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("service.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crewmesh"));
    cmd.args(["check-config", "--service", service, "--config"])
        .arg(&path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

const TLS: &str = "[tls]\nca_file = \"/etc/crewmesh/tls/ca.crt\"\ncert_file = \"/etc/crewmesh/tls/tls.crt\"\nkey_file = \"/etc/crewmesh/tls/tls.key\"\n";

#[test]
fn config_files_are_checked_strictly() {
    let router_ok = format!("{TLS}[peers]\nconfig = \"crewmesh-config:7004\"\n");
    let (code, out) = check("router", &router_ok, &[]);
    assert_eq!(code, 0, "{out}");

    let (code, out) = check(
        "router",
        &format!("{router_ok}[server]\ngrpc_adr = \"0.0.0.0:1\"\n"),
        &[],
    );
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("grpc_adr"), "{out}");

    let (code, out) = check(
        "router",
        &format!("{router_ok}[database]\nurl = \"sqlite://x\"\n"),
        &[],
    );
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("database: does not apply to the router service"),
        "{out}"
    );

    let (code, out) = check("router", TLS, &[]);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("peers.config: missing"), "{out}");

    let (code, out) = check(
        "router",
        &format!("{TLS}[peers]\nconfig = \"no-port\"\n"),
        &[],
    );
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("peers.config") && out.contains("host:port"),
        "{out}"
    );

    let (code, out) = check(
        "router",
        &router_ok,
        &[("CREWMESH_SERVER__SHUTDOWN_GRACE_SECS", "soon")],
    );
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("server.shutdown_grace_secs"), "{out}");

    let (code, out) = check(
        "audit",
        &format!("{TLS}[database]\nurl = \"mysql://x\"\n"),
        &[],
    );
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("database.url"), "{out}");

    let (code, out) = check("audit", TLS, &[]);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("database: missing"), "{out}");

    // The environment overrides the file.
    let (code, out) = check(
        "router",
        TLS,
        &[("CREWMESH_PEERS__CONFIG", "crewmesh-config:7004")],
    );
    assert_eq!(code, 0, "{out}");

    let (code, out) = check("nonsense", &router_ok, &[]);
    assert_ne!(code, 0);
    assert!(out.contains("unknown service"), "{out}");
}

#[test]
fn serve_exits_64_on_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "this is = = not toml").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_crewmesh"))
        .args(["serve", "router", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
}
