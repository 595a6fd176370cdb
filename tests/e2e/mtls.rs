//! Service ports accept only mTLS from the mesh CA, and only the identities on each
//! RPC's allow-list.

use crewmesh_kit::mesh::Service;
use crewmesh_kit::tls::TlsFiles;
use crewmesh_proto::audit::v1::audit_service_client::AuditServiceClient;
use crewmesh_proto::audit::v1::{AppendRequest, QueryRequest};
use crewmesh_proto::router::v1::ListModelsRequest;
use crewmesh_proto::router::v1::router_service_client::RouterServiceClient;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::TestMesh;

/// The connection was dropped by the server (how depends on when in the TLS
/// handshake it refused), as opposed to an answer from the service.
fn assert_refused(err: &tonic::Status) {
    assert!(
        matches!(
            err.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
        ),
        "{err}"
    );
    assert!(
        err.message().contains("transport error")
            || err.message().contains("canceled")
            || err.message().contains("tcp connect error")
            || err.message().contains("connection")
            || err.message().contains("h2 protocol error"),
        "{err}"
    );
}

fn health_check() -> HealthCheckRequest {
    HealthCheckRequest {
        service: "crewmesh.router.v1.RouterService".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_plaintext_foreign_ca_and_unlisted_identities() {
    let mesh = TestMesh::start().await;
    let router_addr = mesh.grpc_addr(Service::Router);

    // Plaintext HTTP/2 to an mTLS port: the connection is dropped.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{router_addr}"))
        .unwrap()
        .connect_lazy();
    let err = HealthClient::new(plain)
        .check(health_check())
        .await
        .unwrap_err();
    assert_refused(&err);

    // A client certificate from another CA (while trusting the mesh CA for the
    // server): the handshake is refused.
    let foreign = crewmesh_testkit::TestPki::new();
    let foreign_cli = foreign.files("cli");
    let files = TlsFiles {
        ca_file: mesh.tls_files("cli").ca_file,
        cert_file: foreign_cli.cert_file,
        key_file: foreign_cli.key_file,
    };
    let err = HealthClient::new(mesh.channel_as(Service::Router, files))
        .check(health_check())
        .await
        .unwrap_err();
    assert_refused(&err);

    // A mesh certificate whose identity is on no allow-list: health is open to it,
    // the service's RPCs are not.
    let intruder = mesh.channel_as(Service::Router, mesh.tls_files("intruder"));
    let ok = HealthClient::new(intruder.clone())
        .check(health_check())
        .await
        .unwrap();
    assert_eq!(ok.into_inner().status, 1); // SERVING
    let err = RouterServiceClient::new(intruder)
        .list_models(ListModelsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("intruder"), "{}", err.message());

    // A real service calling an RPC it is not allowed: the router may append audit
    // events but not read the trail.
    let as_router = mesh.channel_as(Service::Audit, mesh.tls_files("router"));
    let mut audit = AuditServiceClient::new(as_router);
    let err = audit.query(QueryRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let appended = audit.append(AppendRequest { events: vec![] }).await;
    assert!(appended.is_ok(), "{appended:?}");

    // A principal asserted by a caller that may not assert one is refused.
    let mut req = tonic::Request::new(ListModelsRequest {});
    req.metadata_mut()
        .insert("x-crewmesh-tenant", "default".parse().unwrap());
    req.metadata_mut()
        .insert("x-crewmesh-subject", "key:forged".parse().unwrap());
    let as_metrics = mesh.channel_as(Service::Router, mesh.tls_files("metrics"));
    let err = RouterServiceClient::new(as_metrics)
        .list_models(req)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_are_picked_up_without_a_restart() {
    let mesh = TestMesh::start().await;
    let files = mesh.tls_files("cli");
    let before = std::fs::read(mesh.pki_dir().join("router.pem")).unwrap();
    // Re-issue the router's certificate in place, as cert-manager would.
    let issuer = crewmesh_kit::pki::load_issuer(&mesh.pki_dir()).unwrap();
    let id = crewmesh_kit::identity::SpiffeId::new("crewmesh.local", "router").unwrap();
    let (cert, key) = crewmesh_kit::pki::issue_leaf(&issuer, &id, &[]).unwrap();
    std::fs::write(mesh.pki_dir().join("router-key.pem"), key).unwrap();
    std::fs::write(mesh.pki_dir().join("router.pem"), &cert).unwrap();
    assert_ne!(before, cert.as_bytes());
    // New connections see the new certificate once the reloader has run.
    let new_der = rustls_pki_first_cert(&cert);
    crate::harness::eventually(
        "the router to serve the new certificate",
        std::time::Duration::from_secs(15),
        || {
            let files = files.clone();
            let addr = mesh.grpc_addr(Service::Router);
            let new_der = new_der.clone();
            async move {
                let tls = crewmesh_kit::tls::MeshTls::load(files).unwrap();
                let id = crewmesh_kit::identity::SpiffeId::new("crewmesh.local", "router").unwrap();
                let stream = crewmesh_kit::transport::connect_mtls(&addr, &id, &tls)
                    .await
                    .ok()?;
                let served = stream
                    .get_ref()
                    .1
                    .peer_certificates()?
                    .first()?
                    .as_ref()
                    .to_vec();
                (served == new_der).then_some(())
            }
        },
    )
    .await;
    mesh.shutdown().await;
}

fn rustls_pki_first_cert(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .as_ref()
        .to_vec()
}
