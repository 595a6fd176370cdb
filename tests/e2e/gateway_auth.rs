//! API keys, RBAC and tenant isolation at the gateway, through the public HTTP API,
//! the config service and the CLI.

use std::process::Command;
use std::time::Duration;

use crewmesh_gateway::auth::digest;
use crewmesh_kit::clients::with_principal;
use crewmesh_kit::mesh::Service;
use crewmesh_kit::principal::{Principal, Role, TenantId};
use crewmesh_proto::config::v1 as cfg;
use crewmesh_proto::config::v1::config_service_client::ConfigServiceClient;
use serde_json::{Value, json};

use crate::harness::{TestMesh, eventually};

async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.expect("gateway reachable");
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

async fn create_key(mesh: &TestMesh, as_key: &str, body: Value) -> Value {
    let (s, v) = send(
        mesh.http
            .post(mesh.url("/v1/keys"))
            .bearer_auth(as_key)
            .json(&body),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    v
}

fn chat(mesh: &TestMesh, key: &str) -> reqwest::RequestBuilder {
    mesh.http
        .post(mesh.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]}))
}

/// The config service as the gateway, acting for an admin of `tenant`.
fn config_as_admin(mesh: &TestMesh) -> ConfigServiceClient<crewmesh_kit::transport::PeerChannel> {
    ConfigServiceClient::new(mesh.channel_as(Service::Config, mesh.tls_files("gateway")))
}

fn admin_of(tenant: &str) -> Principal {
    Principal {
        tenant: TenantId::parse(tenant).unwrap(),
        subject: "key:test-admin".into(),
        roles: vec![Role::Admin],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_created_shown_once_used_and_revoked_at_once() {
    let mesh = TestMesh::start().await;
    let admin = mesh.api_key().to_owned();

    let created = create_key(
        &mesh,
        &admin,
        json!({"roles": ["developer"], "description": "ci", "rpm": 600}),
    )
    .await;
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with("cm_") && key.len() == 67, "{key}");
    assert_eq!(created["tenant"], "default");
    assert_eq!(created["roles"], json!(["developer"]));
    assert_eq!(created["expires_at"], Value::Null);
    assert_eq!(created["rpm"], 600);

    // Only the digest is stored.
    let doc = config_as_admin(&mesh)
        .get(with_principal(
            cfg::GetRequest {
                scope: cfg::Scope::Tenant as i32,
                kind: cfg::Kind::Apikey as i32,
                name: id.clone(),
            },
            &admin_of("default"),
        ))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    let spec: Value = serde_json::from_str(&doc.spec_json).unwrap();
    assert_eq!(spec["key_sha256"], hex::encode(digest(&key)));
    assert!(!doc.spec_json.contains(&key));

    // The new key works at once, with its own principal.
    let (s, v) = send(chat(&mesh, &key)).await;
    assert_eq!(s, 200, "{v}");

    // Listing shows the key without secret or digest.
    let (s, list) = send(mesh.http.get(mesh.url("/v1/keys")).bearer_auth(&admin)).await;
    assert_eq!(s, 200, "{list}");
    let listed = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .expect("the new key is listed")
        .clone();
    assert_eq!(listed["description"], "ci");
    assert_eq!(listed["created_by"], "key:bootstrap");
    assert!(listed.get("key").is_none() && listed.get("key_sha256").is_none());
    assert!(!list.to_string().contains(&key));

    // A developer may not manage keys; the problem names the permission.
    let (s, p) = send(
        mesh.http
            .post(mesh.url("/v1/keys"))
            .bearer_auth(&key)
            .json(&json!({})),
    )
    .await;
    assert_eq!(s, 403, "{p}");
    assert_eq!(p["type"], "https://crewmesh.dev/problems/forbidden");
    assert_eq!(
        p["detail"],
        "this needs the permission keys:write; your roles (developer) do not grant it"
    );
    let (s, _) = send(mesh.http.get(mesh.url("/v1/keys")).bearer_auth(&key)).await;
    assert_eq!(s, 403);

    // Revoked: refused on the very next request.
    let (s, v) = send(
        mesh.http
            .delete(mesh.url(&format!("/v1/keys/{id}")))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["revoked"], true);
    let (s, p) = send(chat(&mesh, &key)).await;
    assert_eq!(s, 401, "{p}");
    assert_eq!(p["detail"], "the API key is not valid");
    let (s, _) = send(
        mesh.http
            .delete(mesh.url(&format!("/v1/keys/{id}")))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(s, 404);

    // The bootstrap key keeps working.
    let (s, _) = send(chat(&mesh, &admin)).await;
    assert_eq!(s, 200);

    // Bad creations are refused with the reason.
    for (body, detail) in [
        (json!({"roles": ["root"]}), "roles: unknown role `root`"),
        (json!({"roles": []}), "roles: give at least one role"),
        (
            json!({"expires_at": "2001-01-01T00:00:00Z"}),
            "expires_at must be in the future",
        ),
    ] {
        let (s, p) = send(
            mesh.http
                .post(mesh.url("/v1/keys"))
                .bearer_auth(&admin)
                .json(&body),
        )
        .await;
        assert_eq!(s, 400, "{p}");
        assert!(p["detail"].as_str().unwrap().starts_with(detail), "{p}");
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apikey_documents_hot_reload_expire_and_apply_rbac() {
    let mesh = TestMesh::start().await;
    let mut config = config_as_admin(&mesh);
    let put = |name: &str, key: &str, roles: &[&str], expires_at: Option<&str>| {
        with_principal(
            cfg::PutRequest {
                scope: cfg::Scope::Tenant as i32,
                kind: cfg::Kind::Apikey as i32,
                name: name.into(),
                spec_json: json!({
                    "key_sha256": hex::encode(digest(key)),
                    "tenant": "acme",
                    "roles": roles,
                    "expires_at": expires_at,
                })
                .to_string(),
                expected_version: None,
            },
            &admin_of("acme"),
        )
    };
    let viewer = "cm_viewer_key_written_straight_to_config";
    let expired = "cm_expired_key_written_straight_to_config";
    // The expired key is written first: the watch applies changes in revision
    // order, so once the viewer key is accepted the expired one is known too.
    config
        .put(put(
            "old",
            expired,
            &["admin"],
            Some("2020-01-01T00:00:00Z"),
        ))
        .await
        .unwrap();
    config
        .put(put("viewer", viewer, &["viewer"], None))
        .await
        .unwrap();

    // Picked up without a restart.
    let models = || async {
        let (s, _) = send(mesh.http.get(mesh.url("/v1/models")).bearer_auth(viewer)).await;
        (s == 200).then_some(())
    };
    eventually(
        "the viewer key to be accepted",
        Duration::from_secs(10),
        models,
    )
    .await;

    let (s, p) = send(mesh.http.get(mesh.url("/v1/models")).bearer_auth(expired)).await;
    assert_eq!(s, 401);
    assert_eq!(
        p["detail"],
        "the API key `old` expired at 2020-01-01T00:00:00Z"
    );

    // A viewer reads but cannot call models or read the audit trail.
    let (s, p) = send(chat(&mesh, viewer)).await;
    assert_eq!(s, 403);
    assert_eq!(
        p["detail"],
        "this needs the permission models:invoke; your roles (viewer) do not grant it"
    );
    let (s, p) = send(
        mesh.http
            .get(mesh.url("/v1/audit/events"))
            .bearer_auth(viewer),
    )
    .await;
    assert_eq!(s, 403);
    assert!(p["detail"].as_str().unwrap().contains("audit:read"), "{p}");
    let (s, _) = send(mesh.http.get(mesh.url("/v1/usage")).bearer_auth(viewer)).await;
    assert_eq!(s, 200);

    // Deleting the document (from anywhere) revokes the key.
    config
        .delete(with_principal(
            cfg::DeleteRequest {
                scope: cfg::Scope::Tenant as i32,
                kind: cfg::Kind::Apikey as i32,
                name: "viewer".into(),
                expected_version: None,
            },
            &admin_of("acme"),
        ))
        .await
        .unwrap();
    eventually(
        "the deleted key to be refused",
        Duration::from_secs(10),
        || async {
            let (s, _) = send(mesh.http.get(mesh.url("/v1/models")).bearer_auth(viewer)).await;
            (s == 401).then_some(())
        },
    )
    .await;
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_keys_and_usage() {
    let mesh = TestMesh::start().await;
    let platform = mesh.api_key().to_owned();
    let acme = create_key(
        &mesh,
        &platform,
        json!({"roles": ["admin"], "tenant": "acme"}),
    )
    .await;
    let globex = create_key(
        &mesh,
        &platform,
        json!({"roles": ["admin"], "tenant": "globex"}),
    )
    .await;
    assert_eq!(acme["tenant"], "acme");
    assert_eq!(globex["tenant"], "globex");
    let acme_key = acme["key"].as_str().unwrap();
    let globex_key = globex["key"].as_str().unwrap();
    let globex_id = globex["id"].as_str().unwrap();

    // A tenant admin creates keys in its own tenant only.
    let dev = create_key(&mesh, acme_key, json!({"roles": ["developer"]})).await;
    assert_eq!(dev["tenant"], "acme");
    let (s, p) = send(
        mesh.http
            .post(mesh.url("/v1/keys"))
            .bearer_auth(acme_key)
            .json(&json!({"tenant": "globex"})),
    )
    .await;
    assert_eq!(s, 403, "{p}");

    let (s, list) = send(mesh.http.get(mesh.url("/v1/keys")).bearer_auth(acme_key)).await;
    assert_eq!(s, 200);
    let mut ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    let mut want = vec![acme["id"].as_str().unwrap(), dev["id"].as_str().unwrap()];
    want.sort_unstable();
    assert_eq!(ids, want);

    // Another tenant's key cannot be seen or revoked.
    let (s, _) = send(
        mesh.http
            .delete(mesh.url(&format!("/v1/keys/{globex_id}")))
            .bearer_auth(acme_key),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = send(
        mesh.http
            .get(mesh.url("/v1/keys?tenant=globex"))
            .bearer_auth(acme_key),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = send(chat(&mesh, globex_key)).await;
    assert_eq!(s, 200, "the globex key still works");

    // Usage is per tenant.
    let (s, v) = send(chat(&mesh, acme_key)).await;
    assert_eq!(s, 200, "{v}");
    eventually(
        "acme's usage to be recorded",
        Duration::from_secs(10),
        || async {
            let (_, u) = send(mesh.http.get(mesh.url("/v1/usage")).bearer_auth(acme_key)).await;
            (u["data"].as_array().map_or(0, Vec::len) == 1).then_some(())
        },
    )
    .await;
    let u = eventually(
        "globex's usage to be recorded",
        Duration::from_secs(10),
        || async {
            let (_, u) = send(mesh.http.get(mesh.url("/v1/usage")).bearer_auth(globex_key)).await;
            (u["data"].as_array().map_or(0, Vec::len) == 1).then_some(u)
        },
    )
    .await;
    assert_eq!(u["tenant"], "globex");
    assert!(!u.to_string().contains("acme"), "{u}");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_creates_lists_and_revokes() {
    let mesh = TestMesh::start().await;
    let gateway = mesh.state().gateway_url.clone();
    let admin = mesh.api_key().to_owned();
    let run = move |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_crewmesh"))
            .arg("keys")
            .args(args)
            .args(["--gateway", &gateway, "--api-key", &admin])
            .env_remove("CREWMESH_API_KEY")
            .output()
            .expect("run crewmesh");
        assert!(
            out.status.success(),
            "crewmesh keys {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let run2 = run.clone();
    let created = tokio::task::spawn_blocking(move || {
        run2(&[
            "create",
            "--role",
            "viewer",
            "--tenant",
            "acme",
            "--json",
            "--description",
            "from cli",
            "--budget-usd",
            "12.5",
        ])
    })
    .await
    .unwrap();
    let created: Value = serde_json::from_str(&created).unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["tenant"], "acme");
    assert_eq!(created["budget_usd_month"], 12.5);

    let (s, _) = send(mesh.http.get(mesh.url("/v1/models")).bearer_auth(&key)).await;
    assert_eq!(s, 200);

    let run2 = run.clone();
    let listed = tokio::task::spawn_blocking(move || run2(&["list", "--tenant", "acme"]))
        .await
        .unwrap();
    let line = listed.lines().find(|l| l.starts_with(&id)).expect("listed");
    assert!(
        line.contains("viewer") && line.contains("from cli") && line.contains("never"),
        "{line}"
    );
    assert!(!listed.contains(&key));

    let id2 = id.clone();
    let revoked = tokio::task::spawn_blocking(move || run(&["revoke", &id2, "--tenant", "acme"]))
        .await
        .unwrap();
    assert_eq!(revoked.trim(), format!("revoked key {id} in tenant acme"));
    let (s, _) = send(mesh.http.get(mesh.url("/v1/models")).bearer_auth(&key)).await;
    assert_eq!(s, 401);
    mesh.shutdown().await;
}

/// Writes the `_global` tenant document of `tenant` as the cli identity.
async fn put_tenant_policy(mesh: &TestMesh, tenant: &str, spec: Value) {
    let mut config =
        ConfigServiceClient::new(mesh.channel_as(Service::Config, mesh.tls_files("cli")));
    config
        .put(cfg::PutRequest {
            scope: cfg::Scope::Global as i32,
            kind: cfg::Kind::Tenant as i32,
            name: tenant.into(),
            spec_json: spec.to_string(),
            expected_version: None,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_budgets_refuse_with_problems() {
    let mesh = TestMesh::start().await;
    let platform = mesh.api_key().to_owned();

    // A key's own limit applies at once.
    let k = create_key(&mesh, &platform, json!({"tenant": "acme", "rpm": 1})).await;
    let key = k["key"].as_str().unwrap();
    let (s, v) = send(chat(&mesh, key)).await;
    assert_eq!(s, 200, "{v}");
    let resp = chat(&mesh, key).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let p: Value = resp.json().await.unwrap();
    assert_eq!(p["type"], "https://crewmesh.dev/problems/rate-limited");
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .starts_with("the key requests per minute limit of 1 is reached"),
        "{p}"
    );
    // Other calls than model calls are not counted.
    let (s, _) = send(mesh.http.get(mesh.url("/v1/models")).bearer_auth(key)).await;
    assert_eq!(s, 200);

    // A tenant's limit, from its `_global` tenant document, hot-reloaded.
    put_tenant_policy(&mesh, "globex", json!({"rpm": 2})).await;
    let g = create_key(&mesh, &platform, json!({"tenant": "globex"})).await;
    let gkey = g["key"].as_str().unwrap();
    let refused = eventually("globex's rpm to apply", Duration::from_secs(10), || async {
        let (s, p) = send(chat(&mesh, gkey)).await;
        (s == 429).then_some(p)
    })
    .await;
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .starts_with("the tenant requests per minute limit of 2 is reached"),
        "{refused}"
    );
    // Another tenant is not affected.
    let (s, _) = send(chat(&mesh, &platform)).await;
    assert_eq!(s, 200);

    // A used-up budget is its own problem type.
    put_tenant_policy(&mesh, "initech", json!({"budget_usd_month": 0.0})).await;
    let i = create_key(&mesh, &platform, json!({"tenant": "initech"})).await;
    let ikey = i["key"].as_str().unwrap();
    let p = eventually(
        "initech's budget to apply",
        Duration::from_secs(10),
        || async {
            let (s, p) = send(chat(&mesh, ikey)).await;
            (s == 402).then_some(p)
        },
    )
    .await;
    assert_eq!(p["type"], "https://crewmesh.dev/problems/budget-exhausted");
    assert_eq!(
        p["detail"],
        "the monthly budget of tenant `initech` ($0.00) is used up: $0.0000 spent this month"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_own_budget_is_refused_while_its_tenant_goes_on() {
    let mesh = TestMesh::start().await;
    let platform = mesh.api_key().to_owned();
    // A priced model, so that calls cost something.
    let (s, v) = send(
        mesh.http
            .put(mesh.url("/v1/config/model/sim-priced?scope=global"))
            .bearer_auth(&platform)
            .json(
                &json!({"deployments": [{"provider": "simulated", "model": "sim-small",
                "input_price_per_1m": 1000.0, "output_price_per_1m": 1000.0}]}),
            ),
    )
    .await;
    assert!(s == 200 || s == 201, "{s} {v}");
    let priced = |key: &str| {
        mesh.http
            .post(mesh.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"model": "sim-priced", "messages": [{"role": "user", "content": "hi"}]}))
    };

    // A budget below zero is refused, and the key's budget is shown.
    let (s, p) = send(
        mesh.http
            .post(mesh.url("/v1/keys"))
            .bearer_auth(&platform)
            .json(&json!({"tenant": "acme", "budget_usd_month": -1})),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(
        p["detail"],
        "budget_usd_month: must be a non-negative number of US dollars"
    );
    let tiny = create_key(
        &mesh,
        &platform,
        json!({"tenant": "acme", "budget_usd_month": 0.000001}),
    )
    .await;
    assert_eq!(tiny["budget_usd_month"], 0.000001);
    let tiny_key = tiny["key"].as_str().unwrap().to_owned();
    let tiny_id = tiny["id"].as_str().unwrap().to_owned();
    let other = create_key(&mesh, &platform, json!({"tenant": "acme"})).await;
    let other_key = other["key"].as_str().unwrap().to_owned();

    // The first call is within the budget (nothing spent yet) and costs more than it.
    let first = eventually("the priced model", Duration::from_secs(10), || async {
        let resp = priced(&tiny_key).send().await.unwrap();
        (resp.status() == 200).then_some(resp)
    })
    .await;
    let cost: f64 = first.headers()["x-crewmesh-cost-usd"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(cost > 0.000001, "{cost}");
    // Once metrics has the call's usage, the key is refused with its own problem type.
    let p = eventually(
        "the key's budget to apply",
        Duration::from_secs(30),
        || async {
            let (s, p) = send(priced(&tiny_key)).await;
            (s == 402).then_some(p)
        },
    )
    .await;
    assert_eq!(
        p["type"],
        "https://crewmesh.dev/problems/key-budget-exhausted"
    );
    assert_eq!(p["title"], "Key budget exhausted");
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(&format!(
            "the monthly budget of key `{tiny_id}` ($0.00) is used up: $"
        )),
        "{detail}"
    );
    // Another key of the same tenant goes on.
    let (s, v) = send(priced(&other_key)).await;
    assert_eq!(s, 200, "{v}");
    // A key with a zero budget is refused from its first call.
    let zero = create_key(
        &mesh,
        &platform,
        json!({"tenant": "acme", "budget_usd_month": 0}),
    )
    .await;
    let (s, p) = send(chat(&mesh, zero["key"].as_str().unwrap())).await;
    assert_eq!(s, 402);
    assert_eq!(
        p["detail"],
        format!(
            "the monthly budget of key `{}` ($0.00) is used up: $0.0000 spent this month",
            zero["id"].as_str().unwrap()
        )
    );
    mesh.shutdown().await;
}

const PROBLEMS: &str = "https://crewmesh.dev/problems/";

/// Status, problem type and detail of a problem answer.
async fn problem_of(req: reqwest::RequestBuilder) -> (u16, String, String) {
    let resp = req.send().await.expect("gateway reachable");
    let status = resp.status().as_u16();
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "status {status}"
    );
    let p: Value = resp.json().await.unwrap();
    (
        status,
        p["type"]
            .as_str()
            .unwrap()
            .trim_start_matches(PROBLEMS)
            .to_owned(),
        p["detail"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_credential_failure_is_a_401_problem_with_its_reason() {
    let mesh = TestMesh::start().await;
    let models = || mesh.http.get(mesh.url("/v1/models"));
    let unauthenticated = |detail: &str| (401, "unauthenticated".to_owned(), detail.to_owned());

    assert_eq!(
        problem_of(models()).await,
        unauthenticated("send an API key as `Authorization: Bearer <key>`")
    );
    assert_eq!(
        problem_of(models().header("authorization", "Basic YWxhZGRpbjpvcGVuc2VzYW1l")).await,
        unauthenticated("the Authorization header must use the Bearer scheme")
    );
    assert_eq!(
        problem_of(models().header(
            "authorization",
            reqwest::header::HeaderValue::from_bytes(b"Bearer cm_\xff\xfe").unwrap()
        ))
        .await,
        unauthenticated("the Authorization header is not valid ASCII")
    );
    assert_eq!(
        problem_of(models().bearer_auth("cm_no_such_key_anywhere")).await,
        unauthenticated("the API key is not valid")
    );

    // Expired: a key document whose expiry has passed.
    let expired = "cm_expired_key_for_the_failure_matrix";
    config_as_admin(&mesh)
        .put(with_principal(
            cfg::PutRequest {
                scope: cfg::Scope::Tenant as i32,
                kind: cfg::Kind::Apikey as i32,
                name: "gone".into(),
                spec_json: json!({
                    "key_sha256": hex::encode(digest(expired)),
                    "tenant": "acme",
                    "roles": ["admin"],
                    "expires_at": "2021-06-01T00:00:00Z",
                })
                .to_string(),
                expected_version: None,
            },
            &admin_of("acme"),
        ))
        .await
        .unwrap();
    let p = eventually(
        "the expired key to be known",
        Duration::from_secs(10),
        || async {
            let p = problem_of(models().bearer_auth(expired)).await;
            (p.2 != "the API key is not valid").then_some(p)
        },
    )
    .await;
    assert_eq!(
        p,
        unauthenticated("the API key `gone` expired at 2021-06-01T00:00:00Z")
    );

    // Revoked: refused from the next request on.
    let k = create_key(&mesh, mesh.api_key(), json!({"roles": ["viewer"]})).await;
    let key = k["key"].as_str().unwrap();
    let (s, _) = send(models().bearer_auth(key)).await;
    assert_eq!(s, 200);
    let (s, _) = send(
        mesh.http
            .delete(mesh.url(&format!("/v1/keys/{}", k["id"].as_str().unwrap())))
            .bearer_auth(mesh.api_key()),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        problem_of(models().bearer_auth(key)).await,
        unauthenticated("the API key is not valid")
    );
    // Authenticated but not permitted: 403 naming the permission.
    let viewer = create_key(&mesh, mesh.api_key(), json!({"roles": ["viewer"]})).await;
    assert_eq!(
        problem_of(chat(&mesh, viewer["key"].as_str().unwrap())).await,
        (
            403,
            "forbidden".to_owned(),
            "this needs the permission models:invoke; your roles (viewer) do not grant it"
                .to_owned()
        )
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_resources_are_invisible_through_the_api() {
    let mesh = TestMesh::start().await;
    let platform = mesh.api_key().to_owned();
    let acme = create_key(
        &mesh,
        &platform,
        json!({"roles": ["admin"], "tenant": "acme"}),
    )
    .await;
    let globex = create_key(
        &mesh,
        &platform,
        json!({"roles": ["admin"], "tenant": "globex"}),
    )
    .await;
    let (a, g) = (
        acme["key"].as_str().unwrap().to_owned(),
        globex["key"].as_str().unwrap().to_owned(),
    );
    let globex_key_id = globex["id"].as_str().unwrap();

    // A run of globex is not found for acme.
    let (s, run) = send(
        mesh.http
            .post(mesh.url("/v1/runs"))
            .bearer_auth(&g)
            .json(&json!({"model": "sim-small", "input": "hi"})),
    )
    .await;
    assert_eq!(s, 202, "{run}");
    let run_id = run["id"].as_str().unwrap();
    let (s, _) = send(
        mesh.http
            .get(mesh.url(&format!("/v1/runs/{run_id}")))
            .bearer_auth(&g),
    )
    .await;
    assert_eq!(s, 200);
    let (s, kind, _) = problem_of(
        mesh.http
            .get(mesh.url(&format!("/v1/runs/{run_id}")))
            .bearer_auth(&a),
    )
    .await;
    assert_eq!((s, kind.as_str()), (404, "not-found"));

    // A key of globex cannot be revoked or listed by acme.
    let (s, kind, _) = problem_of(
        mesh.http
            .delete(mesh.url(&format!("/v1/keys/{globex_key_id}")))
            .bearer_auth(&a),
    )
    .await;
    assert_eq!((s, kind.as_str()), (404, "not-found"));
    assert_eq!(
        problem_of(
            mesh.http
                .get(mesh.url("/v1/keys?tenant=globex"))
                .bearer_auth(&a)
        )
        .await,
        (
            403,
            "forbidden".to_owned(),
            "managing the keys of tenant `globex` needs the admin role in tenant `default`"
                .to_owned()
        )
    );

    // A tenant-scoped config document of globex is not found for acme, and acme's
    // write of the same name is its own document.
    let spec = json!({"deployments": [{"provider": "simulated", "model": "sim-small"}]});
    let (s, v) = send(
        mesh.http
            .put(mesh.url("/v1/config/model/globex-only"))
            .bearer_auth(&g)
            .json(&spec),
    )
    .await;
    assert!(s == 200 || s == 201, "{s} {v}");
    let (s, kind, _) = problem_of(
        mesh.http
            .get(mesh.url("/v1/config/model/globex-only"))
            .bearer_auth(&a),
    )
    .await;
    assert_eq!((s, kind.as_str()), (404, "not-found"));
    let (s, kind, _) = problem_of(
        mesh.http
            .delete(mesh.url("/v1/config/model/globex-only"))
            .bearer_auth(&a),
    )
    .await;
    assert_eq!((s, kind.as_str()), (404, "not-found"));
    let (s, mine) = send(
        mesh.http
            .get(mesh.url("/v1/config/model/globex-only"))
            .bearer_auth(&g),
    )
    .await;
    assert_eq!(s, 200, "globex's document survives: {mine}");

    // Usage: globex's calls are not in acme's usage, even filtered by globex's key.
    let (s, _) = send(chat(&mesh, &g)).await;
    assert_eq!(s, 200);
    let subject = format!("key:{globex_key_id}");
    eventually(
        "globex's usage to be recorded",
        Duration::from_secs(10),
        || async {
            let (_, u) = send(mesh.http.get(mesh.url("/v1/usage")).bearer_auth(&g)).await;
            (u["data"].as_array().map_or(0, Vec::len) >= 1).then_some(())
        },
    )
    .await;
    let (s, u) = send(
        mesh.http
            .get(mesh.url(&format!("/v1/usage?subject={subject}")))
            .bearer_auth(&a),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(u["tenant"], "acme");
    assert_eq!(u["data"], json!([]));
    assert_eq!(u["spend"]["total_cost_usd"], 0.0);

    // Audit events: globex's are not in acme's trail.
    let globex_events = eventually("globex's audit events", Duration::from_secs(15), || async {
        let (_, v) = send(mesh.http.get(mesh.url("/v1/audit/events")).bearer_auth(&g)).await;
        let ids: Vec<String> = v["data"]
            .as_array()?
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        (!ids.is_empty()).then_some(ids)
    })
    .await;
    let (s, v) = send(mesh.http.get(mesh.url("/v1/audit/events")).bearer_auth(&a)).await;
    assert_eq!(s, 200, "{v}");
    for e in v["data"].as_array().unwrap() {
        assert_eq!(e["tenant"], "acme", "{e}");
        assert!(!globex_events.contains(&e["id"].as_str().unwrap().to_owned()));
    }
    mesh.shutdown().await;
}

/// An OIDC issuer for tests: a P-256 key of the mesh CA's kind, its JWKS served over
/// plain HTTP, and ES256 tokens signed with it.
mod issuer {
    use std::sync::Arc;

    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    use rustls::sign::SigningKey;
    use serde_json::{Value, json};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub const ISS: &str = "https://idp.example";

    pub fn b64url(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    /// DER `SEQUENCE { INTEGER r, INTEGER s }` to the JWS form `r || s` (32 bytes each).
    fn raw_signature(der: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        let mut i = 2; // SEQUENCE tag and (short) length
        for _ in 0..2 {
            assert_eq!(der[i], 2, "INTEGER");
            let len = der[i + 1] as usize;
            let int = &der[i + 2..i + 2 + len];
            let int = &int[int.len().saturating_sub(32)..];
            out.extend(std::iter::repeat_n(0, 32 - int.len()));
            out.extend_from_slice(int);
            i += 2 + len;
        }
        out
    }

    pub struct Issuer {
        signer: Arc<dyn SigningKey>,
        pub jwks_url: String,
    }

    impl Issuer {
        /// A fresh key (key id `k1`, issued by the CA in `pki_dir`) with its JWKS served
        /// on a loopback port.
        pub async fn start(pki_dir: &std::path::Path) -> Self {
            let ca = crewmesh_kit::pki::load_issuer(pki_dir).unwrap();
            let id = crewmesh_kit::identity::SpiffeId::new("crewmesh.local", "idp").unwrap();
            let (_, key_pem) = crewmesh_kit::pki::issue_leaf(&ca, &id, &[]).unwrap();
            let der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
            // The uncompressed public point follows `BIT STRING (66 bytes), 0 unused, 04`.
            let bytes = der.secret_der().to_vec();
            let at = bytes
                .windows(4)
                .position(|w| w == [0x03, 0x42, 0x00, 0x04])
                .expect("the public key in the PKCS#8 document")
                + 4;
            let (x, y) = (&bytes[at..at + 32], &bytes[at + 32..at + 64]);
            let jwks = json!({"keys": [{"kty": "EC", "kid": "k1", "crv": "P-256", "alg": "ES256",
                "use": "sig", "x": b64url(x), "y": b64url(y)}]})
            .to_string();
            let signer = rustls::crypto::ring::sign::any_ecdsa_type(&der).unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut conn, _)) = listener.accept().await {
                    let body = jwks.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 4096];
                        let _ = conn.read(&mut buf).await;
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = conn.write_all(resp.as_bytes()).await;
                        let _ = conn.shutdown().await;
                    });
                }
            });
            Self {
                signer,
                jwks_url: format!("http://{addr}/jwks"),
            }
        }

        /// A token with `header` and `claims`, signed with the issuer's key.
        pub fn sign(&self, header: &Value, claims: &Value) -> String {
            let input = format!(
                "{}.{}",
                b64url(header.to_string().as_bytes()),
                b64url(claims.to_string().as_bytes())
            );
            let signer = self
                .signer
                .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
                .unwrap();
            let sig = raw_signature(&signer.sign(input.as_bytes()).unwrap());
            format!("{input}.{}", b64url(&sig))
        }

        /// Claims of a valid token for `tenant` with `roles`, expiring at `exp`.
        pub fn claims(tenant: &str, roles: &[&str], exp: i64) -> Value {
            json!({"iss": ISS, "aud": "crewmesh", "sub": "alice", "exp": exp,
                   "tenant": tenant, "roles": roles})
        }
    }
}

/// A second gateway of a test mesh, with its own edge settings.
pub(crate) struct ExtraGateway {
    pub base: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), crewmesh_gateway::GatewayError>>,
}

impl ExtraGateway {
    pub async fn start(mesh: &TestMesh, edge: crewmesh_gateway::EdgeConfig) -> Self {
        use crewmesh_kit::settings::{CommonConfig, PeersConfig, ServerConfig};
        let mut peers = PeersConfig::default();
        for svc in [
            Service::Router,
            Service::AgentRuntime,
            Service::Audit,
            Service::Metrics,
            Service::Config,
        ] {
            peers.set(svc, mesh.grpc_addr(svc));
        }
        let config = crewmesh_gateway::GatewayConfig {
            common: CommonConfig {
                trust_domain: mesh.state().trust_domain.clone(),
                server: ServerConfig {
                    grpc_addr: None,
                    ..ServerConfig::loopback()
                },
                tls: mesh.tls_files("gateway"),
                telemetry: Default::default(),
                peers,
            },
            http_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            bootstrap_api_key: None,
            upstream_timeout: Duration::from_secs(30),
            edge,
        };
        config.validate().unwrap();
        let app = crewmesh_gateway::Application::build(
            config,
            crewmesh_kit::observe::MetricsRegistry::default(),
        )
        .await
        .unwrap();
        let base = format!("http://{}", app.http_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Self { base, stop, server }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_oidc_token_failure_is_a_401_problem_through_a_gateway_of_the_mesh() {
    use crewmesh_gateway::oidc::OidcConfig;

    let mesh = TestMesh::start().await;
    let idp = issuer::Issuer::start(&mesh.pki_dir()).await;
    // A second gateway of the same mesh, with OIDC.
    let gateway = ExtraGateway::start(
        &mesh,
        crewmesh_gateway::EdgeConfig {
            oidc: Some(Box::new(OidcConfig::new(
                issuer::ISS,
                "crewmesh",
                &idp.jwks_url,
            ))),
            ..Default::default()
        },
    )
    .await;
    let base = gateway.base.clone();

    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let es256 = json!({"alg": "ES256", "typ": "JWT", "kid": "k1"});
    let valid = issuer::Issuer::claims("acme", &["developer"], now + 300);
    let call = |token: String| {
        mesh.http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(token)
            .json(&json!({"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]}))
    };

    // A valid token reaches the model through the mesh.
    let (s, v) = send(call(idp.sign(&es256, &valid))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");

    let unauthenticated = |detail: &str| (401, "unauthenticated".to_owned(), detail.to_owned());
    // Expired (beyond the 60 s leeway).
    let mut c = valid.clone();
    c["exp"] = json!(now - 3600);
    assert_eq!(
        problem_of(call(idp.sign(&es256, &c))).await,
        unauthenticated("the token has expired")
    );
    // Wrong issuer.
    let mut c = valid.clone();
    c["iss"] = json!("https://evil.example");
    assert_eq!(
        problem_of(call(idp.sign(&es256, &c))).await,
        unauthenticated("the token's issuer is not the configured one")
    );
    // Wrong audience.
    let mut c = valid.clone();
    c["aud"] = json!("someone-else");
    assert_eq!(
        problem_of(call(idp.sign(&es256, &c))).await,
        unauthenticated("the token's audience is not the configured one")
    );
    // Unknown key id.
    assert_eq!(
        problem_of(call(
            idp.sign(&json!({"alg": "ES256", "typ": "JWT", "kid": "k9"}), &valid)
        ))
        .await,
        unauthenticated("the token's signing key `k9` is not one of the issuer's keys")
    );
    // `alg: none`, unsigned.
    let none = format!(
        "{}.{}.",
        issuer::b64url(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
        issuer::b64url(valid.to_string().as_bytes())
    );
    let (s, kind, detail) = problem_of(call(none)).await;
    assert_eq!((s, kind.as_str()), (401, "unauthenticated"));
    assert!(
        detail.starts_with("the bearer token is not a valid JWT"),
        "{detail}"
    );
    // A symmetric algorithm (key confusion) is refused by name.
    let hs = format!(
        "{}.{}.c2ln",
        issuer::b64url(br#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#),
        issuer::b64url(valid.to_string().as_bytes())
    );
    assert_eq!(
        problem_of(call(hs)).await,
        unauthenticated("the token's algorithm HS256 is not accepted (RS256 or ES256 only)")
    );
    // A tampered payload fails the signature.
    let good = idp.sign(&es256, &valid);
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    parts[1] = issuer::b64url(
        issuer::Issuer::claims("acme", &["admin"], now + 300)
            .to_string()
            .as_bytes(),
    );
    assert_eq!(
        problem_of(call(parts.join("."))).await,
        unauthenticated("the token's signature is not valid")
    );
    // A valid token whose roles do not grant the route: 403.
    let viewer = issuer::Issuer::claims("acme", &["viewer"], now + 300);
    assert_eq!(
        problem_of(call(idp.sign(&es256, &viewer))).await,
        (
            403,
            "forbidden".to_owned(),
            "this needs the permission models:invoke; your roles (viewer) do not grant it"
                .to_owned()
        )
    );

    gateway.stop().await;
    mesh.shutdown().await;
}
