//! Bad input at the gateway gets a precise RFC 7807 answer, never a panic.

use crate::harness::TestMesh;

async fn problem(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "status {status}"
    );
    (status, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_problems() {
    let mesh = TestMesh::start().await;
    let post = |body: &'static str| {
        mesh.http
            .post(mesh.url("/v1/chat/completions"))
            .bearer_auth(mesh.api_key())
            .header("content-type", "application/json")
            .body(body)
    };

    let (s, p) = problem(post("{\"model\": ").send().await.unwrap()).await;
    assert_eq!(s, 400);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON body"),
        "{p}"
    );
    assert_eq!(p["type"], "https://crewmesh.dev/problems/invalid-request");

    let (s, p) = problem(post("{\"messages\": []}").send().await.unwrap()).await;
    assert_eq!(s, 400);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("missing field `model`"),
        "{p}"
    );

    let (s, p) = problem(
        post("{\"model\": \"sim-small\", \"messages\": []}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        p["detail"].as_str().unwrap().starts_with("messages:"),
        "{p}"
    );

    let (s, p) = problem(mesh.chat("no-such-model", "hi").await).await;
    assert_eq!(s, 404);
    assert!(
        p["detail"].as_str().unwrap().contains("no-such-model"),
        "{p}"
    );
    // OpenAI SDKs read error.message.
    assert_eq!(p["error"]["message"], p["detail"]);

    let (s, _) = problem(
        mesh.http
            .post(mesh.url("/v1/chat/completions"))
            .json(&serde_json::json!({"model": "sim-small", "messages": [{"role": "user", "content": "x"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401);

    let (s, _) = problem(
        mesh.http
            .post(mesh.url("/v1/chat/completions"))
            .bearer_auth("cm_not_a_key")
            .json(&serde_json::json!({"model": "sim-small", "messages": [{"role": "user", "content": "x"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401);

    let (s, _) = problem(
        mesh.http
            .post(mesh.url("/v1/chat/completions"))
            .bearer_auth(mesh.api_key())
            .header("content-type", "text/plain")
            .body("hello")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 415);

    let big = format!(
        "{{\"model\": \"sim-small\", \"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
        "x".repeat(5 * 1024 * 1024)
    );
    let (s, _) = problem(
        // A client of its own: the server answers 413 before reading the whole
        // body and closes that connection, which must not be reused.
        reqwest::Client::new()
            .post(mesh.url("/v1/chat/completions"))
            .bearer_auth(mesh.api_key())
            .header("content-type", "application/json")
            .body(big)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 413);

    let (s, p) = problem(
        mesh.http
            .get(mesh.url("/v1/crews"))
            .bearer_auth(mesh.api_key())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 501);
    assert_eq!(p["detail"], "/v1/crews is not implemented yet");

    let (s, _) = problem(mesh.http.get(mesh.url("/nope")).send().await.unwrap()).await;
    assert_eq!(s, 404);

    // The mesh still answers after all of that.
    assert_eq!(mesh.chat("sim-small", "still alive?").await.status(), 200);
    mesh.shutdown().await;
}
