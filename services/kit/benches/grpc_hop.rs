//! What one mesh hop costs: a unary gRPC call (`grpc.health.v1.Health/Check`) over
//! loopback, measured side by side with raw TCP round trips (64 bytes each way; between
//! two OS threads with blocking sockets, and between two tokio tasks), one call at a
//! time: over plaintext HTTP/2 with tonic's transport (its `Server` and `Channel`),
//! over mTLS with tonic's transport, and over mTLS with the mesh's own transport
//! (`http2::serve` and `transport::PeerChannel`, what every crewmesh service uses).
//!
//! `cargo bench -p crewmesh-kit --bench grpc_hop` (`-- --calls N`, default 20,000 per
//! variant; `TOKIO_WORKER_THREADS` sets the runtime's workers, default 2). The variants
//! alternate in rounds of 1,000 calls so all see the same machine conditions; p50/p90/p99
//! in microseconds. Run it again under `taskset -c 0` to see what the same round trips
//! cost when no hop has to wake another CPU.

use std::time::{Duration, Instant};

use crewmesh_kit::http2::{GrpcRoutes, serve};
use crewmesh_kit::identity::SpiffeId;
use crewmesh_kit::pki::DevPki;
use crewmesh_kit::tls::MeshTls;
use crewmesh_kit::transport::{connect_mtls, mesh_channel, mesh_incoming, mtls_incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const ROUND: usize = 1_000;

fn main() {
    let calls = std::env::args()
        .skip_while(|a| a != "--calls")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000usize);
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2usize);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(calls, workers));
}

async fn run(calls: usize, workers: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = DevPki::new(dir.path());
    pki.init("bench.local", &[]).expect("pki");
    let server_tls = MeshTls::load(pki.files_for("router")).expect("router tls");
    let client_tls = MeshTls::load(pki.files_for("gateway")).expect("gateway tls");

    // Raw TCP echo between two OS threads: the floor of any loopback round trip.
    let thread_echo = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let thread_echo_addr = thread_echo.local_addr().expect("addr");
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut s, _)) = thread_echo.accept() {
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 64];
            while s.read_exact(&mut buf).is_ok() {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        }
    });
    let mut thread_tcp = std::net::TcpStream::connect(thread_echo_addr).expect("connect");
    thread_tcp.set_nodelay(true).expect("nodelay");

    // Raw TCP echo between two tokio tasks.
    let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut tcp = TcpStream::connect(echo_addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");

    // Plaintext HTTP/2 gRPC.
    let (_reporter, health) = tonic_health::server::health_reporter();
    let plain = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let plain_addr = plain.local_addr().expect("addr");
    let svc = health.clone();
    tokio::spawn(async move {
        Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(plain))
            .await
    });
    let plain_channel = Channel::from_shared(format!("http://{plain_addr}"))
        .expect("uri")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect plaintext");
    let mut plain_client = HealthClient::new(plain_channel);

    // mTLS with SPIFFE identities, through tonic's transport.
    let expected = SpiffeId::new("bench.local", "router").expect("id");
    let tonic_mtls = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tonic_mtls_addr = tonic_mtls.local_addr().expect("addr").to_string();
    let (svc, tls) = (health.clone(), server_tls.clone());
    tokio::spawn(async move {
        Server::builder()
            .add_service(svc)
            .serve_with_incoming(mtls_incoming(tonic_mtls, tls))
            .await
    });
    let dial = {
        let (addr, expected, tls) = (
            tonic_mtls_addr.clone(),
            expected.clone(),
            client_tls.clone(),
        );
        tower::service_fn(move |_: http::Uri| {
            let (addr, expected, tls) = (addr.clone(), expected.clone(), tls.clone());
            async move {
                connect_mtls(&addr, &expected, &tls)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        })
    };
    let tonic_mtls_channel =
        tonic::transport::Endpoint::from_shared(format!("http://{tonic_mtls_addr}"))
            .expect("uri")
            .connect_with_connector(dial)
            .await
            .expect("connect mtls");
    let mut tonic_mtls_client = HealthClient::new(tonic_mtls_channel);

    // The mesh transport: the same mTLS, served by `http2::serve`, called through
    // `PeerChannel`.
    let mesh = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mesh_addr = mesh.local_addr().expect("addr");
    let mut routes = GrpcRoutes::default();
    routes.add(
        "grpc.health.v1.Health",
        tower::util::BoxCloneSyncService::new(health),
    );
    let incoming = mesh_incoming(mesh, server_tls);
    let (_running, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(serve(incoming, routes, stop));
    let mesh_channel = mesh_channel(&mesh_addr.to_string(), expected, client_tls).expect("channel");
    let mut mesh_client = HealthClient::new(mesh_channel);

    let names = [
        "tcp echo, two threads",
        "tcp echo, two tasks",
        "grpc plaintext, tonic",
        "grpc mtls, tonic",
        "grpc mtls, mesh transport",
    ];
    let mut samples: [Vec<Duration>; 5] = Default::default();
    // Round 0 warms up; then the variants alternate in rounds. This loop runs on the
    // thread that called `block_on`, not on a worker, so the blocking echo is fine here.
    for round in 0..(calls / ROUND + 1) {
        for (i, s) in samples.iter_mut().enumerate() {
            for _ in 0..ROUND {
                let start = Instant::now();
                match i {
                    0 => {
                        use std::io::{Read, Write};
                        let mut buf = [7u8; 64];
                        thread_tcp.write_all(&buf).expect("write");
                        thread_tcp.read_exact(&mut buf).expect("read");
                    }
                    1 => {
                        let mut buf = [7u8; 64];
                        tcp.write_all(&buf).await.expect("write");
                        tcp.read_exact(&mut buf).await.expect("read");
                    }
                    2 => {
                        plain_client
                            .check(HealthCheckRequest::default())
                            .await
                            .expect("check");
                    }
                    3 => {
                        tonic_mtls_client
                            .check(HealthCheckRequest::default())
                            .await
                            .expect("check");
                    }
                    _ => {
                        mesh_client
                            .check(HealthCheckRequest::default())
                            .await
                            .expect("check");
                    }
                }
                if round > 0 {
                    s.push(start.elapsed());
                }
            }
        }
    }
    println!("one unary call at a time, {workers} worker threads, {calls} calls per variant");
    println!("| variant | p50 us | p90 us | p99 us |");
    println!("|---|---:|---:|---:|");
    for (name, s) in names.iter().zip(samples.iter_mut()) {
        s.sort_unstable();
        let p = |q: f64| s[((s.len() as f64 * q) as usize).min(s.len() - 1)].as_secs_f64() * 1e6;
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            p(0.5),
            p(0.9),
            p(0.99)
        );
    }
}
