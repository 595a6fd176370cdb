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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_sets_security_headers_and_limits_headers() {
    let mesh = TestMesh::start().await;
    // Security headers on a success and on an error; no CORS headers without origins.
    let ok = mesh
        .http
        .get(mesh.url("/v1/models"))
        .bearer_auth(mesh.api_key())
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    let refused = mesh.http.get(mesh.url("/v1/models")).send().await.unwrap();
    for resp in [&ok, &refused] {
        let h = resp.headers();
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert_eq!(h["cache-control"], "no-store");
        assert_eq!(
            h["content-security-policy"],
            "default-src 'none'; frame-ancestors 'none'"
        );
        assert!(h.get("access-control-allow-origin").is_none());
        assert!(h.get("strict-transport-security").is_none());
    }
    assert_eq!(ok.status(), 200);
    assert_eq!(refused.status(), 401);

    // More header fields than the default limit (64): a 431 problem.
    let mut req = mesh
        .http
        .get(mesh.url("/v1/models"))
        .bearer_auth(mesh.api_key());
    for i in 0..70 {
        req = req.header(format!("x-extra-{i}"), "1");
    }
    let (s, p) = problem(req.send().await.unwrap()).await;
    assert_eq!(s, 431);
    assert_eq!(p["type"], "https://crewmesh.dev/problems/headers-too-large");
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .ends_with("header fields; at most 64 are accepted"),
        "{p}"
    );
    // Header bytes over the default limit (16 KiB).
    let (s, p) = problem(
        mesh.http
            .get(mesh.url("/v1/models"))
            .bearer_auth(mesh.api_key())
            .header("x-big", "a".repeat(20_000))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 431);
    assert_eq!(p["type"], "https://crewmesh.dev/problems/headers-too-large");
    // Beyond the HTTP server's own hard limit (100 fields) the request never reaches
    // the API: a bare 431 without a body (documented in docs/api.md).
    let mut req = mesh.http.get(mesh.url("/v1/models"));
    for i in 0..120 {
        req = req.header(format!("x-extra-{i}"), "1");
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 431);
    assert!(resp.headers().get("content-type").is_none());

    // The OpenAPI description is served without authentication.
    let resp = mesh
        .http
        .get(mesh.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let doc: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/chat/completions"]["post"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_cors_and_hsts_apply_to_the_whole_api() {
    let mesh = TestMesh::start().await;
    let gateway = crate::gateway_auth::ExtraGateway::start(
        &mesh,
        crewmesh_gateway::EdgeConfig {
            http: crewmesh_gateway::edge::HttpEdgeConfig {
                cors_allowed_origins: vec!["https://app.example.com".into()],
                hsts_max_age: Some(std::time::Duration::from_secs(86_400)),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let url = |path: &str| format!("{}{path}", gateway.base);
    // A preflight is answered without authentication.
    let resp = mesh
        .http
        .request(reqwest::Method::OPTIONS, url("/v1/chat/completions"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-methods"], "GET,POST,PUT,DELETE");
    assert_eq!(h["strict-transport-security"], "max-age=86400");
    // A refusal carries the CORS headers, so the browser script can read the problem.
    let resp = mesh
        .http
        .get(url("/v1/models"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(resp.headers()["strict-transport-security"], "max-age=86400");
    // Another origin gets no CORS headers.
    let resp = mesh
        .http
        .request(reqwest::Method::OPTIONS, url("/v1/models"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    gateway.stop().await;
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_call_over_the_request_timeout_is_a_504_problem() {
    let mesh = TestMesh::start().await;
    // A model whose upstream never answers.
    let resp = mesh
        .http
        .put(mesh.url("/v1/config/model/sim-hang?scope=global"))
        .bearer_auth(mesh.api_key())
        .json(&serde_json::json!({"deployments": [{"provider": "simulated", "model": "hang"}]}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let created: serde_json::Value = mesh
        .http
        .post(mesh.url("/v1/keys"))
        .bearer_auth(mesh.api_key())
        .json(&serde_json::json!({"roles": ["developer"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let gateway = crate::gateway_auth::ExtraGateway::start(
        &mesh,
        crewmesh_gateway::EdgeConfig {
            http: crewmesh_gateway::edge::HttpEdgeConfig {
                request_timeout: std::time::Duration::from_secs(1),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let chat = |model: &str| {
        mesh.http
            .post(format!("{}/v1/chat/completions", gateway.base))
            .bearer_auth(&key)
            .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
    };
    // The key and the model reach the second gateway and the router through the watch.
    crate::harness::eventually(
        "the key and model to be known",
        std::time::Duration::from_secs(10),
        || async {
            let s = chat("sim-small").send().await.unwrap().status();
            let models: serde_json::Value = mesh
                .http
                .get(format!("{}/v1/models", gateway.base))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let listed = models["data"]
                .as_array()
                .is_some_and(|d| d.iter().any(|m| m["id"] == "sim-hang"));
            (s == 200 && listed).then_some(())
        },
    )
    .await;
    let (s, p) = problem(chat("sim-hang").send().await.unwrap()).await;
    assert_eq!(s, 504, "{p}");
    assert_eq!(p["type"], "https://crewmesh.dev/problems/timeout");
    assert_eq!(
        p["detail"],
        "the request took longer than the gateway's request timeout (1s)"
    );
    // Streamed calls are bounded the same way until their first event.
    let (s, p) = problem(
        mesh.http
            .post(format!("{}/v1/chat/completions", gateway.base))
            .bearer_auth(&key)
            .json(&serde_json::json!({"model": "sim-hang", "stream": true,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 504, "{p}");
    gateway.stop().await;
    mesh.shutdown().await;
}
