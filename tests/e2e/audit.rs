//! The audit trail end to end: model calls are audited, the chain verifies over HTTP
//! and through `crewmesh audit verify`, exports recompute to the stored hashes, and
//! the checkpoint key is served.

use std::process::Command;
use std::time::Duration;

use crewmesh_audit::event::{EventRecord, event_hash};

use crate::harness::{TestMesh, eventually};

fn crewmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crewmesh"))
}

fn record_of(v: &serde_json::Value) -> EventRecord {
    let s = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{k} in {v}"))
            .to_owned()
    };
    EventRecord {
        id: s("id"),
        chain: s("chain"),
        sequence: v["sequence"].as_i64().unwrap(),
        time_micros: v["time_micros"].as_i64().unwrap(),
        tenant: s("tenant"),
        actor_subject: s("actor_subject"),
        actor_service: s("actor_service"),
        action: s("action"),
        resource_kind: s("resource_kind"),
        resource_name: s("resource_name"),
        outcome: i32::try_from(v["outcome"].as_i64().unwrap()).unwrap(),
        request_id: s("request_id"),
        trace_id: s("trace_id"),
        details_json: s("details_json"),
        prev_hash: s("prev_hash"),
        hash: s("hash"),
    }
}

async fn get(mesh: &TestMesh, path: &str) -> reqwest::Response {
    mesh.http
        .get(mesh.url(path))
        .bearer_auth(mesh.api_key())
        .send()
        .await
        .unwrap()
}

async fn trail_verifies_and_exports(mesh: &TestMesh) {
    for i in 0..3 {
        assert_eq!(
            mesh.chat("sim-small", &format!("audit {i}")).await.status(),
            200
        );
    }
    eventually(
        "three model calls in the trail",
        Duration::from_secs(10),
        || async {
            let a = mesh
                .get_json("/v1/audit/events?action=model.complete")
                .await;
            (a["data"].as_array().unwrap().len() == 3).then_some(())
        },
    )
    .await;

    let v = mesh.get_json("/v1/audit/verify").await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["first_broken"], serde_json::Value::Null, "{v}");
    assert!(v["events_verified"].as_u64().unwrap() >= 3, "{v}");
    assert_eq!(v["head_hash"].as_str().unwrap().len(), 64);

    // JSON Lines: oldest first, and every line recomputes to its stored hash.
    let resp = get(mesh, "/v1/audit/export?format=jsonl&action=model.complete").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let text = resp.text().await.unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    let sequences: Vec<i64> = lines
        .iter()
        .map(|l| l["sequence"].as_i64().unwrap())
        .collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");
    for line in &lines {
        let record = record_of(line);
        assert_eq!(event_hash(&record), record.hash, "{line}");
        assert_eq!(record.action, "model.complete");
    }

    // CSV: a header and the same three events.
    let resp = get(mesh, "/v1/audit/export?format=csv&action=model.complete").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = resp.text().await.unwrap();
    let rows: Vec<&str> = csv.split_terminator("\r\n").collect();
    assert_eq!(rows.len(), 4, "{csv}");
    assert!(
        rows[0].starts_with("id,chain,sequence,time_micros,tenant,"),
        "{}",
        rows[0]
    );
    assert!(
        rows[1].starts_with(lines[0]["id"].as_str().unwrap()),
        "{}",
        rows[1]
    );

    let resp = get(mesh, "/v1/audit/export?format=xml").await;
    assert_eq!(resp.status(), 400);
    let problem: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(problem["detail"], "format: `xml` is not one of jsonl, csv");

    // The compliance report counts the model calls and says the chain holds.
    let report = mesh.get_json("/v1/audit/report?format=json").await;
    assert_eq!(report["by_action"]["model.complete"], 3, "{report}");
    assert_eq!(report["integrity"]["ok"], true, "{report}");
    assert_eq!(report["denied"]["total"], 0, "{report}");
    let resp = get(mesh, "/v1/audit/report?format=markdown").await;
    assert_eq!(resp.status(), 200);
    let md = resp.text().await.unwrap();
    assert!(md.starts_with("# Audit report: tenant `"), "{md}");
    assert!(md.contains("| model.complete | 3 |"), "{md}");
    assert!(md.contains("- Integrity: the chain verifies"), "{md}");

    // The checkpoint key is served (the embedded mode generates one).
    let cps = mesh.get_json("/v1/audit/checkpoints").await;
    assert_eq!(cps["public_key"].as_str().unwrap().len(), 44, "{cps}");
    let key = mesh.get_json("/v1/audit/public-key").await;
    assert_eq!(key["algorithm"], "Ed25519");
    assert_eq!(key["public_key"], cps["public_key"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_verifies_and_exports_on_sqlite() {
    let mesh = TestMesh::start().await;
    trail_verifies_and_exports(&mesh).await;

    // The CLI reads the running mesh's state.json.
    let out = crewmesh()
        .args(["audit", "verify", "--data-dir"])
        .arg(mesh.data_dir())
        .env_remove("CREWMESH_API_KEY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("ok: "), "{stdout}");

    let out = crewmesh()
        .args([
            "audit",
            "export",
            "--format",
            "csv",
            "--action",
            "model.complete",
            "--data-dir",
        ])
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
        String::from_utf8_lossy(&out.stdout)
            .split_terminator("\r\n")
            .count(),
        4
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_verifies_and_exports_on_postgres() {
    let mesh = TestMesh::builder().postgres().start().await;
    trail_verifies_and_exports(&mesh).await;
    mesh.shutdown().await;
}
