//! A chat completion travels gateway -> router -> simulated upstream and is then
//! visible in usage and in the audit trail; a one-step agent run completes.

use std::time::Duration;

use crate::harness::{TestMesh, eventually};

/// The client's W3C trace: the router's audit event must carry its trace id, which
/// proves the context crossed the HTTP hop and the gRPC hop.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

async fn completion_is_accounted(mesh: &TestMesh) {
    let resp = mesh
        .http
        .post(mesh.url("/v1/chat/completions"))
        .bearer_auth(mesh.api_key())
        .header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01"))
        .json(&serde_json::json!({
            "model": "sim-small",
            "messages": [{"role": "user", "content": "Hello, crewmesh!"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-crewmesh-simulated"], "true");
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "sim-small");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "[simulated] echo: Hello, crewmesh!"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let total = body["usage"]["total_tokens"].as_u64().unwrap();
    assert!(total > 0);

    let usage = eventually("the usage record", Duration::from_secs(10), || async {
        let u = mesh.get_json("/v1/usage").await;
        u["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["request_id"] == request_id.as_str())
            .cloned()
    })
    .await;
    assert_eq!(usage["model"], "sim-small");
    assert_eq!(usage["total_tokens"].as_u64(), Some(total));
    assert_eq!(usage["simulated"], true);
    assert_eq!(usage["subject"], "key:bootstrap");

    let event = eventually("the audit event", Duration::from_secs(10), || async {
        let a = mesh
            .get_json("/v1/audit/events?action=model.complete")
            .await;
        a["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["request_id"] == request_id.as_str())
            .cloned()
    })
    .await;
    assert_eq!(event["outcome"], "success");
    assert_eq!(event["resource"]["name"], "sim-small");
    assert_eq!(event["actor"]["service"], "spiffe://crewmesh.local/router");
    assert_eq!(event["tenant"], "default");
    assert_eq!(event["hash"].as_str().unwrap().len(), 64);
    assert_eq!(event["trace_id"], TRACE_ID);
}

async fn one_step_agent_runs(mesh: &TestMesh) {
    let resp = mesh
        .http
        .post(mesh.url("/v1/runs"))
        .bearer_auth(mesh.api_key())
        .json(&serde_json::json!({"model": "sim-large", "system_prompt": "be brief", "input": "plan a trip"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let run: serde_json::Value = resp.json().await.unwrap();
    let id = run["id"].as_str().unwrap().to_owned();
    let done = eventually("the run to finish", Duration::from_secs(10), || async {
        let r = mesh.get_json(&format!("/v1/runs/{id}")).await;
        matches!(r["status"].as_str(), Some("succeeded" | "failed")).then_some(r)
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"], "[simulated] echo: plan a trip");
    assert_eq!(done["steps"][0]["kind"], "model_call");
    assert_eq!(done["steps"][0]["target"], "sim-large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walking_skeleton_on_etcd_and_postgres() {
    let mesh = TestMesh::builder().etcd().postgres().start().await;
    completion_is_accounted(&mesh).await;
    one_step_agent_runs(&mesh).await;
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walking_skeleton_on_the_embedded_defaults() {
    let mesh = TestMesh::start().await;
    completion_is_accounted(&mesh).await;
    one_step_agent_runs(&mesh).await;
    // state.json tells scripts where the mesh is, readable only by its owner.
    let state_path = mesh.data_dir().join("state.json");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    assert_eq!(
        state["gateway_url"].as_str(),
        Some(mesh.state().gateway_url.as_str())
    );
    for svc in ["router", "agent-runtime", "audit", "config", "metrics"] {
        assert!(state["services"][svc]["grpc"].is_string(), "{svc}");
        assert!(state["services"][svc]["admin"].is_string(), "{svc}");
    }
    assert!(state["services"]["gateway"]["admin"].is_string());
    // Services that record audit events spool them under the data directory first.
    for svc in ["router", "config", "agent-runtime"] {
        let spool = mesh
            .data_dir()
            .join("state")
            .join(svc)
            .join("spool")
            .join("audit");
        assert!(spool.is_dir(), "{}", spool.display());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&state_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    mesh.shutdown().await;
}
