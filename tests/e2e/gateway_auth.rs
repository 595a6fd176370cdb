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
fn config_as_admin(mesh: &TestMesh) -> ConfigServiceClient<tonic::transport::Channel> {
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
    config
        .put(put("viewer", viewer, &["viewer"], None))
        .await
        .unwrap();
    config
        .put(put(
            "old",
            expired,
            &["admin"],
            Some("2020-01-01T00:00:00Z"),
        ))
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
        ])
    })
    .await
    .unwrap();
    let created: Value = serde_json::from_str(&created).unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["tenant"], "acme");

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
