//! Fault settings changed at run time on the simulated upstream, with the mesh running:
//! the router's fallback and breaker route around a failing deployment while requests
//! flow, a dropped stream ends with an error event, and `Retry-After` is honoured.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crewmesh_kit::clients::with_principal;
use crewmesh_kit::transport::PeerChannel as Channel;
use crewmesh_proto::router::v1 as pb;
use crewmesh_proto::router::v1::router_service_client::RouterServiceClient;
use serde_json::{Value, json};

use crate::harness::{TestMesh, eventually};
use crate::routing::{principal, put_model, request, router};

/// The simulated upstream's admin URL for one model's fault settings.
fn faults_url(mesh: &TestMesh, model: &str) -> String {
    let base = mesh.state().simulated_upstream_url.trim_end_matches("/v1");
    format!("{base}/_sim/faults/{model}")
}

async fn set_faults(mesh: &TestMesh, model: &str, settings: Value) {
    let resp = mesh
        .http
        .put(faults_url(mesh, model))
        .json(&settings)
        .send()
        .await
        .expect("simulated upstream reachable");
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
}

async fn fault_entry(mesh: &TestMesh, model: &str) -> Value {
    let resp = mesh
        .http
        .get(faults_url(mesh, model))
        .send()
        .await
        .expect("simulated upstream reachable");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("json")
}

async fn breaker_of(
    router: &mut RouterServiceClient<Channel>,
    alias: &str,
    deployment: &str,
) -> pb::BreakerState {
    let models = router
        .list_models(with_principal(pb::ListModelsRequest {}, &principal()))
        .await
        .expect("list models")
        .into_inner();
    let model = models
        .models
        .iter()
        .find(|m| m.id == alias)
        .expect("alias listed");
    let info = model
        .deployments
        .iter()
        .find(|d| d.name == deployment)
        .expect("deployment listed");
    pb::BreakerState::try_from(info.breaker).expect("known state")
}

async fn complete(router: &mut RouterServiceClient<Channel>, alias: &str) -> pb::CallInfo {
    router
        .complete(with_principal(request(alias, "hello", ""), &principal()))
        .await
        .expect("the call succeeds")
        .into_inner()
        .call
        .expect("call info")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_failing_at_run_time_is_routed_around_and_recovers() {
    let mesh = TestMesh::start().await;
    let mut router = router(&mesh);
    put_model(
        &mesh,
        &mut router,
        "fault-flow",
        json!({"deployments": [
            {"name": "a", "provider": "simulated", "model": "fault-e2e-a", "priority": 1},
            {"name": "b", "provider": "simulated", "model": "fault-e2e-b", "priority": 2}],
            "retry": {"max_retries": 0},
            "breaker": {"consecutive_failures": 1, "open_secs": 1}}),
    )
    .await;
    assert_eq!(
        complete(&mut router, "fault-flow").await.upstream_model,
        "fault-e2e-a"
    );

    // Requests flow through the gateway the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let flow = tokio::spawn({
        let (http, url, key) = (
            mesh.http.clone(),
            mesh.url("/v1/chat/completions"),
            mesh.api_key().to_owned(),
        );
        let stop = Arc::clone(&stop);
        async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let resp = http
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({"model": "fault-flow",
                        "messages": [{"role": "user", "content": "still there?"}]}))
                    .send()
                    .await
                    .expect("gateway reachable");
                statuses.push(resp.status().as_u16());
            }
            statuses
        }
    });

    set_faults(&mesh, "fault-e2e-a", json!({"error_rate": 1.0})).await;
    eventually(
        "the breaker of the failing deployment to open",
        Duration::from_secs(10),
        || {
            let mut router = router.clone();
            async move {
                (breaker_of(&mut router, "fault-flow", "a").await == pb::BreakerState::Open)
                    .then_some(())
            }
        },
    )
    .await;
    assert!(fault_entry(&mesh, "fault-e2e-a").await["faults_injected"].as_u64() >= Some(1));
    assert_eq!(
        complete(&mut router, "fault-flow").await.upstream_model,
        "fault-e2e-b"
    );

    // Cleared: the half-open probe after `open_secs` succeeds and the breaker closes.
    let cleared = mesh
        .http
        .delete(faults_url(&mesh, "fault-e2e-a"))
        .send()
        .await
        .expect("simulated upstream reachable");
    assert_eq!(cleared.status(), 200);
    eventually(
        "the breaker to close again",
        Duration::from_secs(15),
        || {
            let mut router = router.clone();
            async move {
                (breaker_of(&mut router, "fault-flow", "a").await == pb::BreakerState::Closed)
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        complete(&mut router, "fault-flow").await.upstream_model,
        "fault-e2e-a"
    );

    stop.store(true, Ordering::Relaxed);
    let statuses = flow.await.expect("flow task");
    assert!(!statuses.is_empty());
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request through the gateway was answered: {statuses:?}"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_at_run_time_ends_with_an_error_event() {
    let mesh = TestMesh::start().await;
    let mut router = router(&mesh);
    put_model(
        &mesh,
        &mut router,
        "fault-drop",
        json!({"deployments": [{"provider": "simulated", "model": "fault-e2e-drop"}],
            "retry": {"max_retries": 0}}),
    )
    .await;
    let stream = || async {
        let resp = mesh
            .http
            .post(mesh.url("/v1/chat/completions"))
            .bearer_auth(mesh.api_key())
            .json(&json!({"model": "fault-drop", "stream": true,
                "messages": [{"role": "user", "content": "a long answer, long enough to cut"}]}))
            .send()
            .await
            .expect("gateway reachable");
        assert_eq!(resp.status(), 200);
        let body = resp.text().await.expect("body");
        body.split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| e.strip_prefix("data: ").expect("data event").to_owned())
            .collect::<Vec<_>>()
    };
    let clean = stream().await;
    assert_eq!(clean.last().map(String::as_str), Some("[DONE]"));

    set_faults(
        &mesh,
        "fault-e2e-drop",
        json!({"drop_mid_stream_rate": 1.0, "drop_after_chunks": 1}),
    )
    .await;
    let events = stream().await;
    assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("json");
    assert!(
        last["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{events:?}"
    );
    assert!(events.len() < clean.len(), "the stream was cut: {events:?}");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_from_a_rate_limited_deployment_is_honoured() {
    let mesh = TestMesh::start().await;
    let mut router = router(&mesh);
    put_model(
        &mesh,
        &mut router,
        "fault-429",
        json!({"deployments": [
            {"name": "limited", "provider": "simulated", "model": "fault-e2e-limited", "priority": 1},
            {"name": "spare", "provider": "simulated", "model": "fault-e2e-spare", "priority": 2}],
            "retry": {"max_retries": 2, "base_ms": 1, "max_ms": 2},
            "breaker": {"consecutive_failures": 1000, "min_calls": 1000}}),
    )
    .await;
    let call_within_5s = |router: RouterServiceClient<Channel>| async move {
        let mut router = router;
        let mut req = with_principal(request("fault-429", "hello", ""), &principal());
        req.set_timeout(Duration::from_secs(5));
        router
            .complete(req)
            .await
            .expect("the spare answers")
            .into_inner()
            .call
            .expect("call info")
    };

    // `Retry-After: 0`: both retries are made at once, then the spare answers.
    set_faults(
        &mesh,
        "fault-e2e-limited",
        json!({"rate_limit": {"rate": 1.0, "retry_after_s": 0}}),
    )
    .await;
    let call = call_within_5s(router.clone()).await;
    assert_eq!((call.retries, call.fallbacks), (2, 1));
    assert_eq!(call.upstream_model, "fault-e2e-spare");
    assert_eq!(fault_entry(&mesh, "fault-e2e-limited").await["requests"], 3);

    // `Retry-After: 30` is beyond the caller's 5 s deadline: no retry, straight to the
    // spare (setting again restarts the counters).
    set_faults(
        &mesh,
        "fault-e2e-limited",
        json!({"rate_limit": {"rate": 1.0, "retry_after_s": 30}}),
    )
    .await;
    let call = call_within_5s(router.clone()).await;
    assert_eq!((call.retries, call.fallbacks), (0, 1));
    assert_eq!(call.upstream_model, "fault-e2e-spare");
    assert_eq!(fault_entry(&mesh, "fault-e2e-limited").await["requests"], 1);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_faults_cli_sets_shows_and_clears_settings_of_the_running_mesh() {
    let mesh = TestMesh::start().await;
    let data_dir = mesh.data_dir();
    let crewmesh = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_crewmesh"))
            .args(["sim", "faults"])
            .args(args)
            .arg("--data-dir")
            .arg(&data_dir)
            .output()
            .expect("runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = crewmesh(&[
        "set",
        "--model",
        "sim-large",
        "--error-rate",
        "1",
        "--error-status",
        "502",
        "--latency",
        "fixed:1",
    ]);
    assert!(ok, "{stderr}");
    let set: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(set["settings"]["error_status"], 502);
    assert_eq!(
        set["settings"]["latency"],
        json!({"distribution": "fixed", "ms": 1.0})
    );
    assert_eq!(
        fault_entry(&mesh, "sim-large").await["settings"],
        set["settings"]
    );

    let (ok, _, stderr) = crewmesh(&["set", "--model", "sim-large", "--hang-rate", "2"]);
    assert!(!ok);
    assert!(stderr.contains("hang_rate"), "{stderr}");

    let (ok, stdout, _) = crewmesh(&["get"]);
    assert!(ok);
    let listed: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(listed["data"][0]["model"], "sim-large");

    let (ok, stdout, stderr) = crewmesh(&["clear", "--model", "sim-large"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).expect("json"),
        json!({"model": "sim-large", "deleted": true})
    );
    mesh.shutdown().await;
}
