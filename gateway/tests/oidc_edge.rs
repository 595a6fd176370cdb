//! OIDC tokens at the gateway's edge: a token from the configured issuer is
//! authenticated and authorised by its roles; API keys keep working beside it. The mesh
//! behind the gateway is absent here, so a request that passes authentication and
//! authorisation ends in `503` from the unreachable service.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use crewmesh_gateway::oidc::OidcConfig;
use crewmesh_gateway::{Application, EdgeConfig, GatewayConfig};
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::settings::{CommonConfig, PeersConfig, Secret, ServerConfig};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const ISS: &str = "https://idp.example";

async fn jwks_server(jwks: Value) -> String {
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/jwks")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_tokens_and_api_keys_pass_the_edge_by_their_roles() {
    crewmesh_testkit::init_crypto();
    let pki = crewmesh_testkit::TestPki::new();
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = ec.public_key_raw();
    let url = jwks_server(json!({"keys": [{"kty": "EC", "kid": "k1", "crv": "P-256",
        "x": B64.encode(&raw[1..33]), "y": B64.encode(&raw[33..])}]}))
    .await;
    let signer = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap();
    let token = |roles: &[&str]| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 300;
        jsonwebtoken::encode(
            &h,
            &json!({"iss": ISS, "aud": "crewmesh", "sub": "alice", "exp": exp,
                    "tenant": "acme", "roles": roles}),
            &signer,
        )
        .unwrap()
    };

    // Peers on a closed port: nothing behind the gateway answers.
    let nowhere = "127.0.0.1:9".to_owned();
    let mut peers = PeersConfig::default();
    for svc in crewmesh_kit::mesh::Service::ALL {
        peers.set(svc, nowhere.clone());
    }
    let config = GatewayConfig {
        common: CommonConfig {
            trust_domain: "crewmesh.local".into(),
            server: ServerConfig {
                grpc_addr: None,
                ..ServerConfig::loopback()
            },
            tls: pki.files("gateway"),
            telemetry: Default::default(),
            peers,
        },
        http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        bootstrap_api_key: Some(Secret::new("cm_bootstrap_key_for_this_test")),
        upstream_timeout: Duration::from_secs(2),
        edge: EdgeConfig {
            oidc: Some(Box::new(OidcConfig::new(ISS, "crewmesh", &url))),
            ..Default::default()
        },
    };
    config.validate().unwrap();
    let app = Application::build(config, MetricsRegistry::default())
        .await
        .unwrap();
    let base = format!("http://{}", app.http_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));

    let http = reqwest::Client::new();
    let chat = |bearer: String| {
        http.post(format!("{base}/v1/chat/completions"))
            .bearer_auth(bearer)
            .json(&json!({"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    let status_and_detail = |r: reqwest::Response| async move {
        let s = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        (s, v["detail"].as_str().unwrap_or_default().to_owned())
    };

    // A developer token passes the edge (and meets the absent router).
    let (s, d) = status_and_detail(chat(token(&["developer"])).await.unwrap()).await;
    assert_eq!(s, 503, "{d}");
    // A viewer token is authenticated but may not call models.
    let (s, d) = status_and_detail(chat(token(&["viewer"])).await.unwrap()).await;
    assert_eq!(s, 403);
    assert_eq!(
        d,
        "this needs the permission models:invoke; your roles (viewer) do not grant it"
    );
    // A tampered token is refused.
    let mut bad = token(&["admin"]);
    bad.replace_range(bad.len() - 4.., "AAAA");
    let (s, _) = status_and_detail(chat(bad).await.unwrap()).await;
    assert_eq!(s, 401);
    // A token for another audience is refused with the reason.
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k1".into());
    let other_aud = jsonwebtoken::encode(
        &h,
        &json!({"iss": ISS, "aud": "someone-else", "sub": "alice", "exp": 4_000_000_000_i64, "tenant": "acme", "roles": ["admin"]}),
        &signer,
    )
    .unwrap();
    let (s, d) = status_and_detail(chat(other_aud).await.unwrap()).await;
    assert_eq!(s, 401);
    assert_eq!(d, "the token's audience is not the configured one");
    // API keys keep working beside OIDC.
    let (s, _) =
        status_and_detail(chat("cm_bootstrap_key_for_this_test".into()).await.unwrap()).await;
    assert_eq!(s, 503);
    let (s, _) = status_and_detail(chat("cm_unknown".into()).await.unwrap()).await;
    assert_eq!(s, 401);

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
