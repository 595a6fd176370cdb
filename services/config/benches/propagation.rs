//! Config change propagation: the time from a `Put` being acknowledged to the change
//! being applied in N subscribing services (each a `ConfigCache` on its own `Watch`
//! stream, over mTLS on loopback), for the embedded store and for etcd. Run with
//! `cargo bench -p crewmesh-config --bench propagation`; prints p50 and p99 of the
//! time until the last of the N caches has the new version, counted from the `Put`'s
//! acknowledgement and from the moment it was sent.

use std::time::{Duration, Instant};

use crewmesh_config::{Application, ConfigServiceConfig, EtcdConfig, StoreConfig};
use crewmesh_kit::admin::Readiness;
use crewmesh_kit::clients::Peers;
use crewmesh_kit::config_cache::ConfigCache;
use crewmesh_kit::identity::SpiffeId;
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::settings::{CommonConfig, PeersConfig, ServerConfig};
use crewmesh_kit::tls::MeshTls;
use crewmesh_kit::transport::mesh_channel;
use crewmesh_proto::config::v1::config_service_client::ConfigServiceClient;
use crewmesh_proto::config::v1::{Kind, PutRequest, Scope};
use crewmesh_testkit::{TRUST_DOMAIN, TestPki};

const SUBSCRIBERS: usize = 6;
const CHANGES: usize = 300;

async fn run(label: &str, store: StoreConfig, pki: &TestPki) {
    let config = ConfigServiceConfig {
        common: CommonConfig {
            trust_domain: TRUST_DOMAIN.to_owned(),
            server: ServerConfig::loopback(),
            tls: pki.files("config"),
            telemetry: Default::default(),
            peers: PeersConfig::default(),
        },
        store,
        secrets_key_file: None,
    };
    let app = Application::build(config, MetricsRegistry::new())
        .await
        .expect("config service");
    let addr = app.grpc_addr().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));

    let peers = Peers::new(
        TRUST_DOMAIN,
        PeersConfig {
            config: Some(addr.clone()),
            ..Default::default()
        },
        MeshTls::load(pki.files("router")).expect("router tls"),
    );
    let caches: Vec<ConfigCache> = (0..SUBSCRIBERS)
        .map(|_| {
            ConfigCache::spawn(
                peers.config().expect("client"),
                vec![Kind::Flag],
                Duration::from_millis(50),
                Readiness::new(),
                &MetricsRegistry::new(),
            )
        })
        .collect();
    let cli_tls = MeshTls::load(pki.files("cli")).expect("cli tls");
    let id = SpiffeId::new(TRUST_DOMAIN, "config").expect("id");
    let mut cli = ConfigServiceClient::new(mesh_channel(&addr, id, cli_tls).expect("channel"));

    let mut samples = Vec::with_capacity(CHANGES);
    let mut from_send = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES + 20 {
        let spec = format!(r#"{{"variants":{{"v":{i}}},"default_variant":"v"}}"#);
        let sent = Instant::now();
        let written = cli
            .put(PutRequest {
                scope: Scope::Global as i32,
                kind: Kind::Flag as i32,
                name: "bench".into(),
                spec_json: spec,
                expected_version: None,
            })
            .await
            .expect("put")
            .into_inner()
            .document
            .expect("document");
        let acked = Instant::now();
        for cache in &caches {
            let mut rx = cache.subscribe();
            loop {
                let applied = rx.borrow_and_update().documents.values().any(|d| {
                    d.kind == Kind::Flag as i32 && d.name == "bench" && d.version >= written.version
                });
                if applied {
                    break;
                }
                tokio::time::timeout(Duration::from_secs(10), rx.changed())
                    .await
                    .expect("the change arrives within 10s")
                    .expect("cache alive");
            }
        }
        // The first 20 changes warm up connections and caches.
        if i >= 20 {
            samples.push(acked.elapsed());
            from_send.push(sent.elapsed());
        }
    }
    for (what, mut xs) in [("from ack", samples), ("from send", from_send)] {
        xs.sort();
        let pct = |p: usize| xs[(xs.len() * p / 100).min(xs.len() - 1)];
        println!(
            "{label:<9} {what:<10} {SUBSCRIBERS} subscribers, {CHANGES} changes: p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms",
            pct(50).as_secs_f64() * 1e3,
            pct(99).as_secs_f64() * 1e3,
            xs[xs.len() - 1].as_secs_f64() * 1e3
        );
    }
    drop(caches);
    let _ = stop.send(());
    let _ = served.await;
}

#[tokio::main]
async fn main() {
    crewmesh_testkit::init_crypto();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("temp dir");
    run(
        "embedded",
        StoreConfig::Embedded {
            path: dir.path().join("config.db"),
        },
        &pki,
    )
    .await;
    let etcd = crewmesh_testkit::etcd();
    let mut etcd_config = EtcdConfig::new(vec![etcd.endpoint()]);
    etcd_config.prefix = etcd.unique_prefix();
    run("etcd", StoreConfig::Etcd(etcd_config), &pki).await;
}
