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

async fn send(req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let resp = req.send().await.expect("gateway reachable");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

/// The audit events with `action` that `key` may read (those of its tenant).
async fn events_as(mesh: &TestMesh, key: &str, action: &str) -> serde_json::Value {
    let url = mesh.url(&format!("/v1/audit/events?action={action}"));
    send(mesh.http.get(url).bearer_auth(key)).await.1
}

/// The records of request `request_id` among `events` (`None`: no event list).
fn records_of(events: &serde_json::Value, request_id: &str) -> Option<Vec<serde_json::Value>> {
    let records = events["data"].as_array()?;
    Some(
        records
            .iter()
            .filter(|e| e["request_id"] == request_id)
            .cloned()
            .collect(),
    )
}

fn chat_as(mesh: &TestMesh, key: &str, request_id: &str) -> reqwest::RequestBuilder {
    mesh.http
        .post(mesh.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-request-id", request_id)
        .json(&serde_json::json!({"model": "sim-small", "messages": [{"role": "user", "content": "a secret prompt"}]}))
}

/// The events of `tenant` in the mesh's SQLite audit database, read directly (the
/// `_unauthenticated` tenant has no API caller).
async fn stored_events(mesh: &TestMesh, tenant: &str) -> Vec<EventRecord> {
    use crewmesh_audit::store::{AuditStore, Backend, EventQuery};
    let db = crewmesh_kit::settings::DatabaseConfig {
        url: format!(
            "sqlite://{}?mode=rwc",
            mesh.data_dir().join("audit.db").display()
        ),
        password_file: None,
        max_connections: 1,
    };
    let store = Backend::connect(&db).await.unwrap();
    let query = EventQuery::new("main", tenant, 1000);
    let events = match &store {
        Backend::Sqlite(s) => s.query(&query).await.unwrap(),
        Backend::Postgres(s) => s.query(&query).await.unwrap(),
    };
    store.close().await;
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gateway_request_and_every_refusal_is_audited() {
    let mesh = TestMesh::start().await;
    let admin = mesh.api_key().to_owned();
    let (s, v) = send(chat_as(&mesh, &admin, "req-audit-ok")).await;
    assert_eq!(s, 200, "{v}");
    let (s, viewer) = send(
        mesh.http
            .post(mesh.url("/v1/keys"))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"roles": ["viewer"]})),
    )
    .await;
    assert_eq!(s, 201, "{viewer}");
    let viewer_key = viewer["key"].as_str().unwrap().to_owned();
    let viewer_id = viewer["id"].as_str().unwrap().to_owned();
    let (s, _) = send(chat_as(&mesh, &viewer_key, "req-audit-forbidden")).await;
    assert_eq!(s, 403);
    let bogus = "cm_0000000000000000000000000000000000000000000000000000000000000000";
    let (s, _) = send(chat_as(&mesh, bogus, "req-audit-unknown-key")).await;
    assert_eq!(s, 401);
    let (s, _) = send(
        mesh.http
            .get(mesh.url("/nowhere"))
            .header("x-request-id", "req-audit-404"),
    )
    .await;
    assert_eq!(s, 404);

    let by_request = |events: &serde_json::Value, id: &str| {
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["request_id"] == id)
            .cloned()
    };
    let (ok, forbidden) = eventually(
        "the gateway's events in the trail",
        Duration::from_secs(10),
        || async {
            let events = mesh
                .get_json("/v1/audit/events?action=http.models.invoke")
                .await;
            Some((
                by_request(&events, "req-audit-ok")?,
                by_request(&events, "req-audit-forbidden")?,
            ))
        },
    )
    .await;
    assert_eq!(ok["tenant"], "default", "{ok}");
    assert_eq!(ok["actor"]["subject"], "key:bootstrap", "{ok}");
    assert_eq!(
        ok["actor"]["service"], "spiffe://crewmesh.local/gateway",
        "{ok}"
    );
    assert_eq!(ok["outcome"], "success", "{ok}");
    assert_eq!(ok["resource"]["kind"], "route");
    assert_eq!(ok["resource"]["name"], "/v1/chat/completions");
    assert_eq!(ok["details"]["method"], "POST");
    assert_eq!(ok["details"]["status"], 200);
    assert_eq!(ok["details"]["permission"], "models:invoke");
    assert_eq!(ok["trace_id"].as_str().unwrap().len(), 32, "{ok}");
    assert_eq!(forbidden["tenant"], "default");
    assert_eq!(
        forbidden["actor"]["subject"],
        format!("key:{viewer_id}"),
        "{forbidden}"
    );
    assert_eq!(forbidden["outcome"], "denied");
    assert_eq!(forbidden["details"]["status"], 403);
    assert_eq!(
        forbidden["details"]["reason"],
        "this needs the permission models:invoke; your roles (viewer) do not grant it"
    );
    // No prompt text and no credential anywhere in the trail.
    let export = get(&mesh, "/v1/audit/export?format=jsonl")
        .await
        .text()
        .await
        .unwrap();
    assert!(!export.contains("a secret prompt"));
    assert!(!export.contains(&viewer_key) && !export.contains(&admin));

    // A caller without a valid credential is recorded under `_unauthenticated`.
    let unauthenticated = eventually(
        "the refused callers' events",
        Duration::from_secs(10),
        || async {
            let events = stored_events(&mesh, "_unauthenticated").await;
            let find = |id: &str| events.iter().find(|e| e.request_id == id).cloned();
            Some((find("req-audit-unknown-key")?, find("req-audit-404")?))
        },
    )
    .await;
    let (unknown, unrouted) = unauthenticated;
    assert_eq!(unknown.action, "http.models.invoke");
    assert_eq!(unknown.outcome, 2);
    assert_eq!(unknown.actor_subject, "");
    let details: serde_json::Value = serde_json::from_str(&unknown.details_json).unwrap();
    assert_eq!(details["status"], 401);
    assert_eq!(details["reason"], "the API key is not valid");
    assert!(!unknown.details_json.contains(bogus));
    assert_eq!(unrouted.action, "http.unrouted");
    assert_eq!(unrouted.outcome, 3);
    assert_eq!(unrouted.resource_name, "/nowhere");

    let v = mesh.get_json("/v1/audit/verify").await;
    assert_eq!(v["ok"], true, "{v}");
    mesh.shutdown().await;
}

/// Another gateway of `mesh`, whose audit peer is `audit` and whose spool (if any)
/// lives in `state_dir`; stopped when the returned sender is dropped or sent.
async fn extra_gateway(
    mesh: &TestMesh,
    audit: &str,
    state_dir: Option<std::path::PathBuf>,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    use crewmesh_kit::mesh::Service;
    use crewmesh_kit::settings::{CommonConfig, PeersConfig, Secret, ServerConfig};
    let mut peers = PeersConfig::default();
    for svc in [
        Service::Router,
        Service::AgentRuntime,
        Service::Metrics,
        Service::Config,
    ] {
        peers.set(svc, mesh.grpc_addr(svc));
    }
    peers.set(Service::Audit, audit.to_owned());
    let config = crewmesh_gateway::GatewayConfig {
        common: CommonConfig {
            trust_domain: mesh.state().trust_domain.clone(),
            server: ServerConfig {
                grpc_addr: None,
                state_dir,
                ..ServerConfig::loopback()
            },
            tls: mesh.tls_files("gateway"),
            telemetry: Default::default(),
            peers,
        },
        http_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        bootstrap_api_key: Some(Secret::new(mesh.api_key().to_owned())),
        upstream_timeout: Duration::from_secs(30),
        edge: crewmesh_gateway::EdgeConfig {
            config_refresh: Duration::from_millis(100),
            ..Default::default()
        },
    };
    let app =
        crewmesh_gateway::Application::build(config, crewmesh_kit::observe::MetricsRegistry::new())
            .await
            .expect("the extra gateway starts");
    let url = format!("http://{}", app.http_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    (url, stop)
}

/// Writes the `_global` tenant document of `tenant` as the cli identity.
async fn put_tenant(mesh: &TestMesh, tenant: &str, spec: serde_json::Value) {
    use crewmesh_proto::config::v1 as cfg;
    let mut config = cfg::config_service_client::ConfigServiceClient::new(
        mesh.channel_as(crewmesh_kit::mesh::Service::Config, mesh.tls_files("cli")),
    );
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

fn chat_at(http: &reqwest::Client, gateway: &str, key: &str) -> reqwest::RequestBuilder {
    http.post(format!("{gateway}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]}))
}

/// Waits until `gateway` applies the `fail_closed` audit mode of `key`'s tenant. A key
/// created through a gateway is known to it at once, while tenant documents written
/// to the config service reach it through the config watch, so a known key does not
/// mean that the mode applies yet. Each probe is a `GET /v1/models` (no model call):
/// once a probe leaves an intent record besides its outcome record in the trail, the
/// mode applies (a spooled intent is delivered before the outcome recorded after it).
async fn wait_until_fail_closed(mesh: &TestMesh, gateway: &str, key: &str, probe: &str) {
    let mut n = 0;
    eventually(
        &format!("the fail_closed mode to apply ({probe})"),
        Duration::from_secs(30),
        || {
            n += 1;
            let id = format!("{probe}-{n}");
            async move {
                let (s, _) = send(
                    mesh.http
                        .get(format!("{gateway}/v1/models"))
                        .bearer_auth(key)
                        .header("x-request-id", &id),
                )
                .await;
                if s != 200 {
                    return None; // the key is not known yet
                }
                let records = eventually(
                    "the probe's outcome record",
                    Duration::from_secs(10),
                    || async {
                        let events = events_as(mesh, key, "http.models.read").await;
                        let mine = records_of(&events, &id)?;
                        mine.iter()
                            .any(|e| e["details"]["phase"] != "intent")
                            .then_some(mine)
                    },
                )
                .await;
                records
                    .iter()
                    .any(|e| e["details"]["phase"] == "intent")
                    .then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_tenants_are_refused_when_their_audit_record_cannot_be_made_durable() {
    let mesh = TestMesh::start().await;
    let admin = mesh.api_key().to_owned();
    put_tenant(
        &mesh,
        "acme",
        serde_json::json!({"audit_mode": "fail_closed"}),
    )
    .await;
    put_tenant(
        &mesh,
        "globex",
        serde_json::json!({"audit_mode": "best_effort"}),
    )
    .await;
    let mut keys = Vec::new();
    for tenant in ["acme", "globex"] {
        let (s, k) = send(
            mesh.http
                .post(mesh.url("/v1/keys"))
                .bearer_auth(&admin)
                .json(&serde_json::json!({"tenant": tenant, "roles": ["admin"]})),
        )
        .await;
        assert_eq!(s, 201, "{k}");
        keys.push(k["key"].as_str().unwrap().to_owned());
    }
    let (acme, globex) = (keys[0].clone(), keys[1].clone());
    let gateway = mesh.state().gateway_url.clone();
    // The tenant documents reach the gateway through the config watch.
    wait_until_fail_closed(&mesh, &gateway, &acme, "probe-main").await;

    // Audit healthy: both tenants are served, and acme's request has a durable intent
    // record before its outcome record.
    let (s, v) =
        send(chat_at(&mesh.http, &gateway, &acme).header("x-request-id", "req-acme-1")).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = send(chat_at(&mesh.http, &gateway, &globex)).await;
    assert_eq!(s, 200, "{v}");
    let events = eventually("acme's two records", Duration::from_secs(10), || async {
        let events = events_as(&mesh, &acme, "http.models.invoke").await;
        let mine = records_of(&events, "req-acme-1")?;
        (mine.len() == 2).then_some(mine)
    })
    .await;
    // Newest first: the outcome, then the intent.
    assert_eq!(events[0]["outcome"], "success", "{events:?}");
    assert_eq!(events[0]["details"]["status"], 200);
    assert_eq!(events[1]["outcome"], "unspecified", "{events:?}");
    assert_eq!(events[1]["details"]["phase"], "intent");
    assert!(events[1]["sequence"].as_u64() < events[0]["sequence"].as_u64());
    let v = mesh.get_json("/v1/audit/verify").await;
    assert_eq!(v["ok"], true, "{v}");

    // A gateway that can neither reach audit nor spool: acme is refused and nothing is
    // done; globex is still served. A new gateway applies each config snapshot's
    // tenant policies before its keys, so once it knows a key, the key's tenant policy
    // applies (waiting for the key is enough).
    let (cut_off, stop) = extra_gateway(&mesh, "127.0.0.1:1", None).await;
    let (s, v) = eventually(
        "the extra gateway to know globex's key",
        Duration::from_secs(10),
        || async {
            let (s, v) = send(chat_at(&mesh.http, &cut_off, &globex)).await;
            (s != 401).then_some((s, v))
        },
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, p) = eventually(
        "acme's policy on the extra gateway",
        Duration::from_secs(10),
        || async {
            let (s, p) = send(chat_at(&mesh.http, &cut_off, &acme)).await;
            (s != 401).then_some((s, p))
        },
    )
    .await;
    assert_eq!(s, 503, "{p}");
    assert_eq!(p["type"], "https://crewmesh.dev/problems/audit-unavailable");
    assert!(
        p["detail"].as_str().unwrap().starts_with(
            "tenant `acme` requires every request to be audited durably before it is carried out"
        ),
        "{p}"
    );
    let _ = stop.send(());
    // The refused call never reached the router: the next model call of acme is its
    // second `model.complete`.
    let (s, _) = send(chat_at(&mesh.http, &gateway, &acme)).await;
    assert_eq!(s, 200);
    eventually(
        "acme's second model call",
        Duration::from_secs(10),
        || async {
            let events = events_as(&mesh, &acme, "model.complete").await;
            let n = events["data"].as_array()?.len();
            assert!(n <= 2, "{events}");
            (n == 2).then_some(())
        },
    )
    .await;

    // Without a spool but with audit up, the intent record is acknowledged by audit
    // before the request is carried out.
    let audit = mesh.grpc_addr(crewmesh_kit::mesh::Service::Audit);
    let (direct, stop) = extra_gateway(&mesh, &audit, None).await;
    let (s, v) = eventually(
        "acme's key on the spool-less gateway",
        Duration::from_secs(10),
        || async {
            let (s, v) =
                send(chat_at(&mesh.http, &direct, &acme).header("x-request-id", "req-acme-direct"))
                    .await;
            (s != 401).then_some((s, v))
        },
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let _ = stop.send(());
    let events = events_as(&mesh, &acme, "http.models.invoke").await;
    assert!(
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["request_id"] == "req-acme-direct" && e["details"]["phase"] == "intent"),
        "the intent record is in the chain as soon as the request is served: {events}"
    );

    // With a spool, audit being down is not a reason to refuse: the intent record is
    // synced to the local spool first.
    let spool = tempfile::tempdir().unwrap();
    let (spooled, stop) = extra_gateway(&mesh, "127.0.0.1:1", Some(spool.path().to_owned())).await;
    let (s, v) = eventually(
        "acme's key on the spooling gateway",
        Duration::from_secs(10),
        || async {
            let (s, v) = send(chat_at(&mesh.http, &spooled, &acme)).await;
            (s != 401).then_some((s, v))
        },
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let _ = stop.send(());
    mesh.shutdown().await;
}
