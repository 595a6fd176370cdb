//! Health, reflection and the admin port.

use crewmesh_kit::mesh::Service;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::TestMesh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_admin_endpoints() {
    let mesh = TestMesh::start().await;
    for svc in [
        Service::Router,
        Service::AgentRuntime,
        Service::Audit,
        Service::Config,
        Service::Metrics,
    ] {
        let channel = mesh.channel_as(svc, mesh.tls_files("cli"));
        let resp = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(resp.into_inner().status, 1, "{svc} is SERVING");

        // Reflection lists the service's own gRPC service.
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let msg = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("unexpected reflection answer");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&svc.grpc_service_names()[0]), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

        // Admin: plain HTTP, no client certificate.
        let admin = mesh.admin_url(svc);
        let ok = mesh
            .http
            .get(format!("{admin}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        let ready: serde_json::Value = mesh
            .http
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(ready["ready"], true, "{svc}: {ready}");
    }
    // After a model call the router's metrics show it, by method and code.
    assert_eq!(mesh.chat("sim-small", "count me").await.status(), 200);
    let text = mesh
        .http
        .get(format!("{}/metrics", mesh.admin_url(Service::Router)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("crewmesh_rpc_requests_total{")
                && l.contains("service=\"router\"")
                && l.contains("/crewmesh.router.v1.RouterService/Complete")
                && l.contains("code=\"OK\"")),
        "{text}"
    );
    assert!(
        text.contains("crewmesh_rpc_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("crewmesh_rpc_in_flight"), "{text}");
    mesh.shutdown().await;
}
