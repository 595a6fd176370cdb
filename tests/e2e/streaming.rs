//! `stream: true` on `/v1/chat/completions`: OpenAI-style server-sent events through
//! gateway and router, and an explicit error event when the upstream drops mid-stream.

use std::time::Duration;

use crewmesh_kit::mesh::Service;
use crewmesh_proto::config::v1 as cfg;
use crewmesh_proto::config::v1::config_service_client::ConfigServiceClient;
use serde_json::{Value, json};

use crate::harness::{TestMesh, eventually};

/// The `data:` payloads of an SSE body, in order.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_owned()
        })
        .collect()
}

async fn stream(mesh: &TestMesh, body: Value) -> (u16, String, String) {
    let resp = mesh
        .http
        .post(mesh.url("/v1/chat/completions"))
        .bearer_auth(mesh.api_key())
        .json(&body)
        .send()
        .await
        .expect("gateway reachable");
    let status = resp.status().as_u16();
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    (status, ct, resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_completions_are_openai_sse_with_usage() {
    let mesh = TestMesh::start().await;
    let messages = json!([{"role": "user", "content": "tell me about streams"}]);
    let whole: Value = mesh
        .http
        .post(mesh.url("/v1/chat/completions"))
        .bearer_auth(mesh.api_key())
        .json(&json!({"model": "sim-small", "messages": messages}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let want = whole["choices"][0]["message"]["content"].as_str().unwrap();

    let (status, ct, body) = stream(
        &mesh,
        json!({"model": "sim-small", "messages": messages, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ct, "text/event-stream");
    let events = events(&body);
    assert_eq!(events.last().unwrap(), "[DONE]", "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.len() >= 3, "{body}");
    let id = chunks[0]["id"].as_str().unwrap();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id);
        assert_eq!(c["model"], "sim-small");
        assert!(
            c.get("usage").is_some(),
            "include_usage puts usage on every chunk"
        );
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want);
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("stop")]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], whole["usage"]);

    // Without include_usage there is no usage field at all.
    let (status, _, body) = stream(
        &mesh,
        json!({"model": "sim-small", "messages": messages, "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(!body.contains("\"usage\""), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"));

    // Errors before the stream starts are problem documents.
    let (status, ct, body) = stream(
        &mesh,
        json!({"model": "no-such-model", "messages": messages, "stream": true}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(ct, "application/problem+json");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mid_stream_drop_ends_with_an_error_event() {
    let mesh = TestMesh::start().await;
    // An alias whose only deployment drops its streams after two content chunks.
    let mut config =
        ConfigServiceClient::new(mesh.channel_as(Service::Config, mesh.tls_files("cli")));
    config
        .put(cfg::PutRequest {
            scope: cfg::Scope::Global as i32,
            kind: cfg::Kind::Model as i32,
            name: "sim-broken".into(),
            spec_json: json!({"deployments": [{"provider": "simulated", "model": "stream-break"}]})
                .to_string(),
            expected_version: None,
        })
        .await
        .unwrap();
    eventually(
        "the router to know sim-broken",
        Duration::from_secs(10),
        || async {
            let models = mesh.get_json("/v1/models").await;
            models["data"]
                .as_array()?
                .iter()
                .any(|m| m["id"] == "sim-broken")
                .then_some(())
        },
    )
    .await;

    let (status, ct, body) = stream(
        &mesh,
        json!({"model": "sim-broken", "stream": true,
               "messages": [{"role": "user", "content": "a long answer please, long enough to break"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ct, "text/event-stream");
    let events = events(&body);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{body}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(
        last["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(last["error"]["code"].as_str().is_some(), "{body}");
    let content_chunks = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter(|c| c["object"] == "chat.completion.chunk")
        .count();
    assert_eq!(content_chunks, events.len() - 1, "{body}");
    assert!(
        content_chunks >= 1,
        "the stream started before it broke: {body}"
    );
    mesh.shutdown().await;
}

/// The official `openai` Python SDK, unchanged, against the mesh: non-stream, stream,
/// tool calls (plain and streamed), errors and the model list
/// (`tests/python/test_openai_sdk.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_works_unchanged() {
    let mesh = TestMesh::start().await;
    let mesh = tokio::task::spawn_blocking(move || {
        crate::python::run_pytest(&mesh, "test_openai_sdk.py");
        mesh
    })
    .await
    .unwrap();
    mesh.shutdown().await;
}
