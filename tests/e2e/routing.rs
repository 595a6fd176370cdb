//! The router in the running mesh (mTLS, config service, metrics and audit): a stream
//! that breaks mid-way ends with an error event and is accounted, breaker state reaches
//! `ListModels` and `/metrics`, and cached answers are marked in usage.

use std::time::Duration;

use crewmesh_kit::clients::with_principal;
use crewmesh_kit::mesh::Service;
use crewmesh_kit::principal::{Principal, Role, TenantId};
use crewmesh_kit::transport::PeerChannel as Channel;
use crewmesh_proto::config::v1 as cfg;
use crewmesh_proto::router::v1 as pb;
use crewmesh_proto::router::v1::router_service_client::RouterServiceClient;

use crate::harness::{TestMesh, eventually};

pub(crate) fn principal() -> Principal {
    Principal {
        tenant: TenantId::parse("default").expect("tenant"),
        subject: "key:routing-e2e".into(),
        roles: vec![Role::Developer],
    }
}

/// Writes a global model document as the operator CLI and waits until the router
/// serves the alias.
pub(crate) async fn put_model(
    mesh: &TestMesh,
    router: &mut RouterServiceClient<Channel>,
    name: &str,
    spec: serde_json::Value,
) {
    let mut config = cfg::config_service_client::ConfigServiceClient::new(
        mesh.channel_as(Service::Config, mesh.tls_files("cli")),
    );
    config
        .put(cfg::PutRequest {
            scope: cfg::Scope::Global as i32,
            kind: cfg::Kind::Model as i32,
            name: name.into(),
            spec_json: spec.to_string(),
            expected_version: None,
        })
        .await
        .expect("put model");
    eventually(
        "the router to load the alias",
        Duration::from_secs(10),
        || {
            let mut router = router.clone();
            async move {
                let models = router
                    .list_models(with_principal(pb::ListModelsRequest {}, &principal()))
                    .await
                    .ok()?
                    .into_inner();
                models.models.iter().any(|m| m.id == name).then_some(())
            }
        },
    )
    .await;
}

pub(crate) fn router(mesh: &TestMesh) -> RouterServiceClient<Channel> {
    RouterServiceClient::new(mesh.channel_as(Service::Router, mesh.tls_files("gateway")))
}

pub(crate) fn request(model: &str, text: &str, request_id: &str) -> pb::CompleteRequest {
    pb::CompleteRequest {
        model: model.into(),
        messages: vec![pb::ChatMessage {
            role: pb::Role::User as i32,
            content: Some(text.into()),
            ..Default::default()
        }],
        request_id: request_id.into(),
        ..Default::default()
    }
}

async fn usage_of(mesh: &TestMesh, request_id: &str) -> serde_json::Value {
    eventually("the usage record", Duration::from_secs(10), || async {
        let u = mesh.get_json("/v1/usage").await;
        u["data"]
            .as_array()?
            .iter()
            .find(|r| r["request_id"] == request_id)
            .cloned()
    })
    .await
}

#[tokio::test]
async fn router_streams_breakers_and_cache_in_the_mesh() {
    let mesh = TestMesh::start().await;
    let mut router = router(&mesh);

    // A stream that the upstream drops after two fragments.
    put_model(
        &mesh,
        &mut router,
        "breaking",
        serde_json::json!({"deployments": [{"provider": "simulated", "model": "stream-break"}], "retry": {"max_retries": 0}}),
    )
    .await;
    let stream = router
        .stream_complete(with_principal(
            pb::StreamCompleteRequest {
                request: Some(request("breaking", "abcdefgh", "e2e-stream-break")),
            },
            &principal(),
        ))
        .await
        .expect("the stream starts")
        .into_inner();
    let events: Vec<pb::StreamCompleteResponse> =
        tokio_stream::StreamExt::collect::<Vec<_>>(stream)
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("no transport error: the failure is an event");
    let last = events.last().expect("events").event.clone();
    let Some(pb::stream_complete_response::Event::Error(err)) = last else {
        panic!("a broken stream must end with StreamError: {events:?}");
    };
    assert_eq!(err.code, "UNAVAILABLE");
    assert_eq!(err.usage.expect("usage").total_tokens, 7);
    let usage = usage_of(&mesh, "e2e-stream-break").await;
    assert_eq!(usage["total_tokens"], 7);
    assert_eq!(usage["model"], "breaking");

    // A deployment that always fails opens its breaker after one failure.
    put_model(
        &mesh,
        &mut router,
        "failing",
        serde_json::json!({"deployments": [{"name": "bad", "provider": "simulated", "model": "error-500"}],
            "retry": {"max_retries": 0}, "breaker": {"consecutive_failures": 1, "open_secs": 3600}}),
    )
    .await;
    let err = router
        .complete(with_principal(request("failing", "x", ""), &principal()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    let models = router
        .list_models(with_principal(pb::ListModelsRequest {}, &principal()))
        .await
        .unwrap()
        .into_inner();
    let failing = models.models.iter().find(|m| m.id == "failing").unwrap();
    assert_eq!(
        failing.deployments[0].breaker,
        pb::BreakerState::Open as i32
    );
    let metrics = mesh
        .http
        .get(format!("{}/metrics", mesh.admin_url(Service::Router)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("crewmesh_router_breaker_open{deployment=\"_global/failing/bad\"} 1"),
        "{metrics}"
    );

    // A cached alias answers the second identical request without the upstream.
    put_model(
        &mesh,
        &mut router,
        "cached",
        serde_json::json!({"deployments": [{"provider": "simulated", "model": "sim-small"}], "cache": {"ttl_secs": 60}}),
    )
    .await;
    let first = router
        .complete(with_principal(
            request("cached", "same", "e2e-cache-1"),
            &principal(),
        ))
        .await
        .unwrap()
        .into_inner();
    let second = router
        .complete(with_principal(
            request("cached", "same", "e2e-cache-2"),
            &principal(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.call.unwrap().cache_hit);
    assert!(second.call.unwrap().cache_hit);
    assert_eq!(second.request_id, "e2e-cache-2");
    assert_eq!(usage_of(&mesh, "e2e-cache-2").await["cache_hit"], true);
    mesh.shutdown().await;
}
