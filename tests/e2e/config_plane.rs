//! The config plane under load and under failure: a model's deployment changed
//! through the config API while requests flow is used by the next requests and no
//! request fails; with etcd stopped, writes are refused with UNAVAILABLE while traffic
//! keeps flowing on the last-known-good config (and the staleness is reported), and
//! everything recovers by itself when etcd returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crewmesh::up::{self, ConfigStoreChoice, UpOptions};
use crewmesh_kit::identity::SpiffeId;
use crewmesh_kit::mesh::Service;
use crewmesh_kit::tls::MeshTls;
use crewmesh_kit::transport::PeerChannel as Channel;
use crewmesh_proto::config::v1 as cfg;
use crewmesh_proto::config::v1::config_service_client::ConfigServiceClient;

use crate::harness::{TestMesh, eventually};

/// What an end-to-end test needs to drive a mesh: its gateway, admin key and an
/// operator's (cli identity) channel to the config service.
struct Handle {
    http: reqwest::Client,
    gateway: String,
    api_key: String,
    config: ConfigServiceClient<Channel>,
}

impl Handle {
    fn new(state: &crewmesh::state::State, pki_dir: &std::path::Path) -> Self {
        let pki = crewmesh_kit::pki::DevPki::new(pki_dir.to_owned());
        let tls = MeshTls::load(pki.files_for("cli")).expect("cli tls");
        let id = SpiffeId::new(&state.trust_domain, Service::Config.name()).expect("id");
        let addr = state.services[Service::Config.name()]
            .grpc
            .clone()
            .expect("config grpc");
        let channel = crewmesh_kit::transport::mesh_channel(&addr, id, tls).expect("channel");
        Self {
            http: reqwest::Client::new(),
            gateway: state.gateway_url.clone(),
            api_key: state.admin_api_key.clone(),
            config: ConfigServiceClient::new(channel),
        }
    }

    /// Points `sim-small` at one deployment named `name`.
    async fn set_deployment(&self, name: &str) -> Result<i64, tonic::Status> {
        let spec = serde_json::json!({
            "deployments": [{"name": name, "provider": "simulated", "model": "sim-small"}],
        });
        let resp = self
            .config
            .clone()
            .put(cfg::PutRequest {
                scope: cfg::Scope::Global as i32,
                kind: cfg::Kind::Model as i32,
                name: "sim-small".into(),
                spec_json: spec.to_string(),
                expected_version: None,
            })
            .await?;
        Ok(resp.into_inner().document.expect("document").version)
    }

    /// One chat completion: its status and the deployment that served it.
    async fn chat(&self) -> (u16, String) {
        let resp = self
            .http
            .post(format!("{}/v1/chat/completions", self.gateway))
            .bearer_auth(&self.api_key)
            .json(&serde_json::json!({
                "model": "sim-small",
                "messages": [{"role": "user", "content": "which deployment?"}],
            }))
            .send()
            .await
            .expect("gateway reachable");
        let status = resp.status().as_u16();
        let deployment = resp
            .headers()
            .get("x-crewmesh-deployment")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (status, deployment)
    }

    async fn wait_for_deployment(&self, name: &str) {
        eventually(
            &format!("requests served by deployment {name}"),
            Duration::from_secs(15),
            || async {
                let (status, dep) = self.chat().await;
                (status == 200 && dep == name).then_some(())
            },
        )
        .await;
    }
}

/// Sends requests one after another until stopped; returns every (status, deployment).
fn spawn_traffic(
    handle: Arc<Handle>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(u16, String)>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            seen.push(handle.chat().await);
        }
        seen
    })
}

/// Every request succeeded, and once `to` served one, `from` never served again.
fn assert_switched(seen: &[(u16, String)], from: &str, to: &str) {
    let failed: Vec<_> = seen.iter().filter(|(s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let first_new = seen
        .iter()
        .position(|(_, d)| d == to)
        .unwrap_or_else(|| panic!("no request was served by {to}: {seen:?}"));
    assert!(seen[..first_new].iter().all(|(_, d)| d == from), "{seen:?}");
    assert!(
        seen[first_new..].iter().all(|(_, d)| d == to),
        "a request went back to the old deployment: {seen:?}"
    );
}

#[tokio::test]
async fn a_deployment_change_applies_to_the_next_requests_and_none_fail() {
    let mesh = TestMesh::start().await;
    let handle = Arc::new(Handle::new(mesh.state(), &mesh.pki_dir()));
    handle.set_deployment("blue").await.expect("put blue");
    handle.wait_for_deployment("blue").await;

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = spawn_traffic(handle.clone(), stop.clone());
    // Some requests on the old deployment first.
    eventually("traffic flowing", Duration::from_secs(10), || async {
        let (_, dep) = handle.chat().await;
        (dep == "blue").then_some(())
    })
    .await;
    handle.set_deployment("green").await.expect("put green");
    handle.wait_for_deployment("green").await;
    // A few more requests after the switch.
    for _ in 0..5 {
        assert_eq!(handle.chat().await, (200, "green".to_owned()));
    }
    stop.store(true, Ordering::Relaxed);
    let seen = traffic.await.expect("traffic task");
    assert_switched(&seen, "blue", "green");
    mesh.shutdown().await;
}

async fn readyz_config_check(http: &reqwest::Client, admin: &str) -> String {
    let report: serde_json::Value = http
        .get(format!("{admin}/readyz"))
        .send()
        .await
        .expect("admin reachable")
        .json()
        .await
        .expect("readyz json");
    report["checks"]["config"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn with_etcd_down_writes_are_unavailable_traffic_flows_and_all_recovers() {
    crewmesh_testkit::init_crypto();
    crewmesh_testkit::init_test_logs();
    // Its own etcd: stopping the shared one would break the other tests.
    let etcd = crewmesh_testkit::Etcd::dedicated();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut opts =
        UpOptions::embedded(dir.path().to_owned(), SocketAddr::from(([127, 0, 0, 1], 0)));
    opts.refresh_interval = Duration::from_millis(100);
    opts.config_store = ConfigStoreChoice::Etcd {
        endpoints: vec![etcd.endpoint()],
        prefix: etcd.unique_prefix(),
    };
    let mesh = up::start(opts).await.expect("the mesh starts");
    let handle = Arc::new(Handle::new(&mesh.state, &dir.path().join("pki")));
    let router_admin = mesh.state.services[Service::Router.name()].admin.clone();
    handle.set_deployment("blue").await.expect("put blue");
    handle.wait_for_deployment("blue").await;
    assert_eq!(readyz_config_check(&handle.http, &router_admin).await, "ok");

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = spawn_traffic(handle.clone(), stop.clone());
    etcd.stop();

    // Writes fail clearly.
    let err = handle
        .set_deployment("green")
        .await
        .expect_err("a write with etcd down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .starts_with("the config store (etcd) is unavailable: "),
        "{}",
        err.message()
    );
    // The router notices and says so, but stays ready on its last-known-good config.
    let detail = eventually(
        "the router reporting stale config",
        Duration::from_secs(30),
        || async {
            let d = readyz_config_check(&handle.http, &router_admin).await;
            d.starts_with("serving last-known-good config").then_some(d)
        },
    )
    .await;
    assert!(detail.contains("s stale: "), "{detail}");
    let metrics = handle
        .http
        .get(format!("{router_admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("crewmesh_config_staleness_seconds"),
        "{metrics}"
    );
    for _ in 0..5 {
        assert_eq!(handle.chat().await, (200, "blue".to_owned()));
    }

    // etcd returns: writes work again and the change reaches the router by itself.
    etcd.start();
    eventually(
        "a write after etcd returns",
        Duration::from_secs(30),
        || async { handle.set_deployment("green").await.ok() },
    )
    .await;
    handle.wait_for_deployment("green").await;
    eventually(
        "the router config check back to ok",
        Duration::from_secs(30),
        || async { (readyz_config_check(&handle.http, &router_admin).await == "ok").then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let seen = traffic.await.expect("traffic task");
    assert_switched(&seen, "blue", "green");
    mesh.shutdown().await.expect("clean shutdown");
}

async fn send(
    mesh: &TestMesh,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<serde_json::Value>,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let mut req = mesh
        .http
        .request(method, mesh.url(path))
        .bearer_auth(mesh.api_key());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("gateway reachable");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (status, headers, json)
}

#[tokio::test]
async fn config_documents_over_http_with_versions_history_rollback_and_apply() {
    use reqwest::Method;
    let mesh = TestMesh::start().await;
    let path = "/v1/config/model/alias-x?scope=global";
    let spec =
        |m: &str| serde_json::json!({"deployments": [{"provider": "simulated", "model": m}]});

    // The schema editors validate against.
    let (status, _, schema) = send(&mesh, Method::GET, "/v1/config/schemas/model", &[], None).await;
    assert_eq!(status, 200);
    assert_eq!(schema["$id"], "urn:crewmesh:config:v1:model");
    assert_eq!(schema["additionalProperties"], false);

    // Create only if absent; the ETag is the version.
    let (status, headers, created) = send(
        &mesh,
        Method::PUT,
        path,
        &[("if-none-match", "*")],
        Some(spec("sim-small")),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let v1 = created["version"].as_i64().unwrap();
    assert_eq!(headers["etag"], format!("\"{v1}\"").as_str());
    assert_eq!(created["spec"], spec("sim-small"));
    let (status, _, _) = send(
        &mesh,
        Method::PUT,
        path,
        &[("if-none-match", "*")],
        Some(spec("x")),
    )
    .await;
    assert_eq!(status, 409);

    // Compare-and-set: a stale If-Match is refused with the current version named.
    let (status, _, updated) = send(
        &mesh,
        Method::PUT,
        path,
        &[("if-match", &format!("\"{v1}\""))],
        Some(spec("sim-large")),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    let v2 = updated["version"].as_i64().unwrap();
    let (status, _, stale) = send(
        &mesh,
        Method::PUT,
        path,
        &[("if-match", &v1.to_string())],
        Some(spec("sim-small")),
    )
    .await;
    assert_eq!(status, 409);
    assert!(
        stale["detail"]
            .as_str()
            .unwrap()
            .ends_with(&format!("the current version is {v2}")),
        "{stale}"
    );

    // A bad document: every problem by path, nothing written.
    let (status, _, bad) = send(
        &mesh,
        Method::PUT,
        path,
        &[],
        Some(serde_json::json!({"deployments": [{"provider": "", "model": "m", "wieght": 2}]})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        bad["detail"],
        "invalid model spec: deployments[0].provider: must not be empty; deployments[0].wieght: is not a known field (known: provider, model, weight, name, priority, input_price_per_1m, output_price_per_1m, rpm, tpm, quality_tier, context_window, tags)"
    );
    let (_, _, current) = send(&mesh, Method::GET, path, &[], None).await;
    assert_eq!(current["version"], v2);

    // History and rollback.
    let (status, _, history) = send(
        &mesh,
        Method::GET,
        "/v1/config/model/alias-x/history?scope=global",
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200);
    let versions: Vec<i64> = history["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, vec![v2, v1]);
    let (status, _, rolled) = send(
        &mesh,
        Method::POST,
        "/v1/config/model/alias-x/rollback?scope=global",
        &[],
        Some(serde_json::json!({"to_version": v1})),
    )
    .await;
    assert_eq!(status, 200, "{rolled}");
    assert!(rolled["version"].as_i64().unwrap() > v2);
    assert_eq!(rolled["spec"], spec("sim-small"));

    // Apply: all or nothing.
    let (status, _, refused) = send(
        &mesh,
        Method::POST,
        "/v1/config/apply",
        &[],
        Some(serde_json::json!({"operations": [
            {"op": "put", "kind": "model", "name": "alias-y", "scope": "global", "spec": spec("sim-small")},
            {"op": "delete", "kind": "model", "name": "no-such-alias", "scope": "global"},
        ]})),
    )
    .await;
    assert_eq!(status, 404, "{refused}");
    let (status, _, _) = send(
        &mesh,
        Method::GET,
        "/v1/config/model/alias-y?scope=global",
        &[],
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _, applied) = send(
        &mesh,
        Method::POST,
        "/v1/config/apply",
        &[],
        Some(serde_json::json!({"operations": [
            {"op": "put", "kind": "model", "name": "alias-y", "scope": "global", "spec": spec("sim-small")},
            {"op": "delete", "kind": "model", "name": "alias-x", "scope": "global"},
        ]})),
    )
    .await;
    assert_eq!(status, 200, "{applied}");
    assert_eq!(applied["data"][0]["version"], applied["revision"]);
    // The new alias serves traffic.
    eventually("alias-y served", Duration::from_secs(10), || async {
        (mesh.chat("alias-y", "hi").await.status() == 200).then_some(())
    })
    .await;
    mesh.shutdown().await;
}

#[tokio::test]
async fn ofrep_evaluates_flags_with_reasons_and_error_codes() {
    use reqwest::Method;
    let mesh = TestMesh::start().await;
    let flag = serde_json::json!({
        "variants": {"on": true, "off": false}, "default_variant": "off",
        "rules": [{"when": {"attribute": "plan", "op": "equals", "value": "pro"}, "variant": "on"}],
        "rollout": [{"variant": "on", "weight": 50}, {"variant": "off", "weight": 50}]
    });
    let (status, _, _) = send(
        &mesh,
        Method::PUT,
        "/v1/config/flag/beta?scope=global",
        &[],
        Some(flag),
    )
    .await;
    assert_eq!(status, 201);

    let eval = |ctx: serde_json::Value| {
        let mesh = &mesh;
        async move {
            send(
                mesh,
                Method::POST,
                "/ofrep/v1/evaluate/flags/beta",
                &[],
                Some(serde_json::json!({"context": ctx})),
            )
            .await
        }
    };
    let (status, _, pro) = eval(serde_json::json!({"targetingKey": "u1", "plan": "pro"})).await;
    assert_eq!(status, 200);
    assert_eq!(
        pro,
        serde_json::json!({"key": "beta", "value": true, "reason": "TARGETING_MATCH", "variant": "on", "metadata": {}})
    );
    let (status, _, split) = eval(serde_json::json!({"targetingKey": "u1"})).await;
    assert_eq!(status, 200);
    assert_eq!(split["reason"], "SPLIT");
    let expected = if crewmesh_kit::flags::bucket("beta", "u1") < 5000 {
        "on"
    } else {
        "off"
    };
    assert_eq!(split["variant"], expected);
    let (status, _, no_key) = eval(serde_json::json!({})).await;
    assert_eq!(status, 400);
    assert_eq!(no_key["errorCode"], "TARGETING_KEY_MISSING");
    let (status, _, bad_ctx) = eval(serde_json::json!("not an object")).await;
    assert_eq!(status, 400);
    assert_eq!(bad_ctx["errorCode"], "INVALID_CONTEXT");
    let (status, _, missing) = send(
        &mesh,
        Method::POST,
        "/ofrep/v1/evaluate/flags/nope",
        &[],
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(missing["errorCode"], "FLAG_NOT_FOUND");
    let (status, headers, bulk) = send(
        &mesh,
        Method::POST,
        "/ofrep/v1/evaluate/flags",
        &[],
        Some(serde_json::json!({"context": {"targetingKey": "u1", "plan": "pro"}})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(bulk["flags"][0]["key"], "beta");
    let etag = headers["etag"].to_str().unwrap().to_owned();
    let (status, _, _) = send(
        &mesh,
        Method::POST,
        "/ofrep/v1/evaluate/flags",
        &[("if-none-match", &etag)],
        Some(serde_json::json!({"context": {"targetingKey": "u1", "plan": "pro"}})),
    )
    .await;
    assert_eq!(status, 304);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openfeature_python_sdk_through_ofrep() {
    let mesh = TestMesh::start().await;
    let mesh = tokio::task::spawn_blocking(move || {
        crate::python::run_pytest(&mesh, "test_ofrep.py");
        mesh
    })
    .await
    .unwrap();
    mesh.shutdown().await;
}

fn cli(mesh: &TestMesh, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crewmesh"))
        .args(args)
        .args([
            "--gateway",
            &mesh.state().gateway_url,
            "--api-key",
            mesh.api_key(),
        ])
        .output()
        .expect("run crewmesh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_applies_a_directory_with_a_dry_run_and_evaluates_flags() {
    let mesh = TestMesh::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("10-flag.json"),
        serde_json::json!({"kind": "flag", "name": "cli-flag", "scope": "global",
            "spec": {"variants": {"on": true, "off": false}, "default_variant": "on"}})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("20-models.json"),
        serde_json::json!([{"kind": "model", "name": "cli-alias", "scope": "global",
            "spec": {"deployments": [{"provider": "simulated", "model": "sim-small"}]}}])
        .to_string(),
    )
    .unwrap();
    let path = dir.path().to_str().unwrap().to_owned();
    let mesh = tokio::task::spawn_blocking(move || {
        let (ok, out, err) = cli(&mesh, &["config", "apply", "-f", &path, "--dry-run"]);
        assert!(ok, "{err}");
        assert!(
            out.starts_with(
                "create    flag/cli-flag (global)\ncreate    model/cli-alias (global)\ndry run: 2 documents checked by the server at revision "
            ),
            "{out}"
        );
        assert!(out.ends_with("; nothing written\n"), "{out}");
        let (ok, _, err) = cli(&mesh, &["config", "get", "flag", "cli-flag", "--global"]);
        assert!(!ok);
        assert_eq!(
            err,
            "error: Not found (404): document _global/flag/cli-flag not found\n"
        );

        let (ok, out, err) = cli(&mesh, &["config", "apply", "-f", &path]);
        assert!(ok, "{err}");
        assert!(out.contains("applied 2 documents at revision "), "{out}");
        let (ok, out, _) = cli(&mesh, &["config", "apply", "-f", &path]);
        assert!(ok);
        assert!(out.ends_with("nothing to change\n"), "{out}");

        let (ok, out, err) = cli(&mesh, &["config", "get", "model", "cli-alias", "--global"]);
        assert!(ok, "{err}");
        let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(doc["spec"]["deployments"][0]["model"], "sim-small");
        let (ok, out, err) = cli(&mesh, &["config", "history", "model", "cli-alias", "--global"]);
        assert!(ok, "{err}");
        assert_eq!(out.lines().count(), 1, "{out}");

        let (ok, out, err) = cli(&mesh, &["flags", "eval", "cli-flag", "--targeting-key", "u1"]);
        assert!(ok, "{err}");
        let eval: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(eval["value"], true);
        assert_eq!(eval["reason"], "STATIC");
        mesh
    })
    .await
    .unwrap();
    mesh.shutdown().await;
}

fn revision_of(headers: &reqwest::header::HeaderMap) -> i64 {
    headers
        .get("x-crewmesh-config-revision")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no x-crewmesh-config-revision in {headers:?}"))
}

#[tokio::test]
async fn every_gateway_response_names_the_config_revision_it_has_synced() {
    use reqwest::Method;
    let mesh = TestMesh::start().await;
    let (status, headers, _) = send(&mesh, Method::GET, "/v1/models", &[], None).await;
    assert_eq!(status, 200);
    let before = revision_of(&headers);
    assert!(before > 0);
    // A change of a kind the gateway does not keep (a flag) still moves the revision
    // of its last confirmed sync: the next responses carry it once it has seen it.
    let (status, _, doc) = send(
        &mesh,
        Method::PUT,
        "/v1/config/flag/revision-probe?scope=global",
        &[],
        Some(serde_json::json!({"variants": {"on": true}, "default_variant": "on"})),
    )
    .await;
    assert_eq!(status, 201, "{doc}");
    let written = doc["version"].as_i64().unwrap();
    assert!(written > before);
    eventually(
        "the gateway to report the write's revision",
        Duration::from_secs(10),
        || async {
            let (_, headers, _) = send(&mesh, Method::GET, "/v1/models", &[], None).await;
            (revision_of(&headers) >= written).then_some(())
        },
    )
    .await;
    // Refusals and unknown routes carry it too.
    let resp = mesh.http.get(mesh.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert!(revision_of(resp.headers()) >= written);
    let (status, headers, _) = send(&mesh, Method::GET, "/v1/nowhere", &[], None).await;
    assert_eq!(status, 404);
    assert!(revision_of(&headers) >= written);
    mesh.shutdown().await;
}

/// One chat completion for `model` on behalf of `user`: its status and deployment.
async fn chat_as(mesh: &TestMesh, model: &str, user: &str) -> (u16, String) {
    let resp = mesh
        .http
        .post(mesh.url("/v1/chat/completions"))
        .bearer_auth(mesh.api_key())
        .json(&serde_json::json!({
            "model": model,
            "user": user,
            "messages": [{"role": "user", "content": "which variant?"}],
        }))
        .send()
        .await
        .expect("gateway reachable");
    let status = resp.status().as_u16();
    let deployment = resp
        .headers()
        .get("x-crewmesh-deployment")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, deployment)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_splits_a_model_alias_between_variants_and_a_flip_applies_to_the_next_requests() {
    use reqwest::Method;
    let mesh = Arc::new(TestMesh::start().await);
    let flag = |small: u32| {
        serde_json::json!({
            "variants": {"small": "small", "large": "large"},
            "default_variant": "small",
            "rollout": [{"variant": "small", "weight": small}, {"variant": "large", "weight": 100 - small}],
        })
    };
    // The flag first: a model may only name a flag that exists.
    let (status, _, body) = send(
        &mesh,
        Method::PUT,
        "/v1/config/flag/ab-model-variant?scope=global",
        &[],
        Some(flag(50)),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let model = serde_json::json!({
        "deployments": [{"name": "default", "provider": "simulated", "model": "sim-small"}],
        "flag": "ab-model-variant",
        "variants": {
            "small": {"deployments": [{"name": "v-small", "provider": "simulated", "model": "sim-small"}]},
            "large": {"deployments": [{"name": "v-large", "provider": "simulated", "model": "sim-large"}]},
        },
    });
    let (status, _, body) = send(
        &mesh,
        Method::PUT,
        "/v1/config/model/ab-model?scope=global",
        &[],
        Some(model),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // A flag value that names no variant of the model is refused.
    let (status, _, body) = send(
        &mesh,
        Method::PUT,
        "/v1/config/flag/ab-model-variant?scope=global",
        &[],
        Some(serde_json::json!({"variants": {"small": "small", "huge": "huge"}, "default_variant": "small"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["detail"],
        r#"invalid flag spec: variants.huge: the value "huge" names no variant of model _global/model/ab-model, which this flag chooses variants for"#
    );

    let expected = |user: &str| {
        if crewmesh_kit::flags::bucket("ab-model-variant", user) < 5000 {
            "v-small"
        } else {
            "v-large"
        }
    };
    eventually(
        "the router to serve ab-model",
        Duration::from_secs(15),
        || async {
            let (status, dep) = chat_as(&mesh, "ab-model", "u0").await;
            (status == 200 && dep == expected("u0")).then_some(())
        },
    )
    .await;
    // Each targeting key lands on its bucket's variant, every time; both are used.
    let users: Vec<String> = (0..16).map(|i| format!("u{i}")).collect();
    let mut used = std::collections::BTreeSet::new();
    for user in &users {
        for _ in 0..2 {
            let (status, dep) = chat_as(&mesh, "ab-model", user).await;
            assert_eq!((status, dep.as_str()), (200, expected(user)), "{user}");
        }
        used.insert(expected(user));
    }
    assert_eq!(
        used.len(),
        2,
        "16 users all hashed to one variant: {used:?}"
    );

    // Flip to 100% large while a user on small keeps sending: once large serves it,
    // small never does again, and no request fails.
    let on_small = users
        .iter()
        .find(|u| expected(u) == "v-small")
        .unwrap()
        .clone();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (mesh, stop, user) = (mesh.clone(), stop.clone(), on_small.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                seen.push(chat_as(&mesh, "ab-model", &user).await);
            }
            seen
        })
    };
    let (status, _, body) = send(
        &mesh,
        Method::PUT,
        "/v1/config/flag/ab-model-variant?scope=global",
        &[],
        Some(flag(0)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    eventually(
        "the flip to reach the router",
        Duration::from_secs(15),
        || async {
            let (status, dep) = chat_as(&mesh, "ab-model", &on_small).await;
            (status == 200 && dep == "v-large").then_some(())
        },
    )
    .await;
    // Every user is on large now (and the traffic keeps flowing meanwhile).
    for user in &users {
        assert_eq!(
            chat_as(&mesh, "ab-model", user).await,
            (200, "v-large".to_owned())
        );
    }
    stop.store(true, Ordering::Relaxed);
    let seen = traffic.await.unwrap();
    assert_switched(&seen, "v-small", "v-large");
    // The flag cannot be deleted while the model uses it.
    let (status, _, body) = send(
        &mesh,
        Method::DELETE,
        "/v1/config/flag/ab-model-variant?scope=global",
        &[],
        None,
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["detail"],
        "cannot delete _global/flag/ab-model-variant: still referenced by _global/model/ab-model (flag); change or delete those first"
    );
    Arc::try_unwrap(mesh)
        .ok()
        .expect("no other handle")
        .shutdown()
        .await;
}

/// A one-route OpenAI-compatible upstream that answers every chat completion with
/// "ok" and keeps the `Authorization` header of each request.
async fn recording_upstream() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then as much body as Content-Length says.
                let (head_end, length) = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (i + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                let auth = head
                    .lines()
                    .find(|l| l.to_lowercase().starts_with("authorization:"))
                    .map(|l| l["authorization:".len()..].trim().to_owned())
                    .unwrap_or_default();
                record.lock().unwrap().push(auth);
                let body = serde_json::json!({
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "x",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })
                .to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_provider_key_is_stored_encrypted_and_used_by_the_router() {
    use reqwest::Method;
    let mesh = TestMesh::start().await;
    let (url, seen) = recording_upstream().await;
    let (status, _, doc) = send(
        &mesh,
        Method::PUT,
        "/v1/config/provider/keyed",
        &[],
        Some(serde_json::json!({"type": "openai", "base_url": url, "api_key": {"inline": "sk-e2e-inline-7"}})),
    )
    .await;
    assert_eq!(status, 201, "{doc}");
    // Never shown back: not in the write's answer, a read, or the audit trail.
    assert!(
        doc["spec"]["api_key"]["redacted"]
            .as_str()
            .unwrap()
            .starts_with("encrypted with key ")
    );
    let (_, _, read) = send(&mesh, Method::GET, "/v1/config/provider/keyed", &[], None).await;
    assert_eq!(read["spec"]["api_key"], doc["spec"]["api_key"]);
    assert!(!read.to_string().contains("sk-e2e-inline-7"));

    let (status, _, body) = send(
        &mesh,
        Method::PUT,
        "/v1/config/model/keyed-model",
        &[],
        Some(serde_json::json!({"deployments": [{"provider": "keyed", "model": "x"}]})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    eventually(
        "the router to call the keyed upstream",
        Duration::from_secs(15),
        || async {
            let resp = mesh.chat("keyed-model", "hi").await;
            (resp.status().as_u16() == 200).then_some(())
        },
    )
    .await;
    let auths = seen.lock().unwrap().clone();
    assert!(!auths.is_empty());
    assert!(
        auths.iter().all(|a| a == "Bearer sk-e2e-inline-7"),
        "{auths:?}"
    );
    // The audit event of the write does not hold it either.
    let event = eventually(
        "the provider write in the audit trail",
        Duration::from_secs(15),
        || async {
            let events = mesh.get_json("/v1/audit/events?action=config.put").await;
            events["data"]
                .as_array()?
                .iter()
                .find(|e| e["resource"]["kind"] == "provider" && e["resource"]["name"] == "keyed")
                .cloned()
        },
    )
    .await;
    assert!(!event.to_string().contains("sk-e2e-inline-7"), "{event}");
    // The embedded store on disk (database and write-ahead log) holds only the envelope.
    let needle = b"sk-e2e-inline-7";
    let mut files = 0;
    for entry in std::fs::read_dir(mesh.data_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("config.db"))
        {
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{}",
                path.display()
            );
        }
    }
    assert!(files >= 1);
    mesh.shutdown().await;
}
