//! Graceful shutdown: in-flight requests finish, then the ports close.

use std::time::Duration;

use crewmesh_kit::mesh::Service;
use crewmesh_proto::config::v1::config_service_client::ConfigServiceClient;
use crewmesh_proto::config::v1::{Kind, PutRequest, Scope};

use crate::harness::{TestMesh, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_finish_during_shutdown() {
    let mut mesh = TestMesh::start().await;
    // A model whose simulated upstream answers after 2 s: time enough, even on a loaded
    // machine, to see the call in flight before shutting down.
    let mut config =
        ConfigServiceClient::new(mesh.channel_as(Service::Config, mesh.tls_files("cli")));
    config
        .put(PutRequest {
            scope: Scope::Global as i32,
            kind: Kind::Model as i32,
            name: "slow".into(),
            spec_json:
                serde_json::json!({"deployments": [{"provider": "simulated", "model": "slow-2000"}]})
                    .to_string(),
            expected_version: None,
        })
        .await
        .unwrap();
    eventually(
        "the router to know the new model",
        Duration::from_secs(10),
        || async {
            let models = mesh.get_json("/v1/models").await;
            models["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["id"] == "slow")
                .then_some(())
        },
    )
    .await;

    let gateway = mesh.state().gateway_url.clone();
    let key = mesh.api_key().to_owned();
    let router_admin = mesh.admin_url(Service::Router);
    let http = mesh.http.clone();
    let in_flight = tokio::spawn(async move {
        http.post(format!("{gateway}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&serde_json::json!({"model": "slow", "messages": [{"role": "user", "content": "take your time"}]}))
            .send()
            .await
    });
    // Wait until the router is working on it.
    eventually(
        "the call to be in flight",
        Duration::from_secs(5),
        || async {
            let text = mesh
                .http
                .get(format!("{router_admin}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.lines()
                .any(|l| {
                    l.starts_with("crewmesh_rpc_in_flight{")
                        && l.contains("Complete")
                        && l.ends_with(" 1")
                })
                .then_some(())
        },
    )
    .await;

    let gateway_url = mesh.state().gateway_url.clone();
    mesh.take_mesh().shutdown().await.expect("clean shutdown");
    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight request was answered");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "[simulated] echo: take your time"
    );

    // Nothing listens any more.
    let after = reqwest::Client::new()
        .get(format!("{gateway_url}/v1/models"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(after.is_err(), "the gateway still answers after shutdown");
}
