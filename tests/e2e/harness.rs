//! `TestMesh`: the mesh for one test, with a builder to choose its backends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crewmesh::up::{self, ConfigStoreChoice, DatabaseChoice, RunningMesh, UpOptions};
use crewmesh_kit::identity::SpiffeId;
use crewmesh_kit::mesh::Service;
use crewmesh_kit::tls::{MeshTls, TlsFiles};
use crewmesh_kit::transport::PeerChannel as Channel;
use crewmesh_kit::transport::mesh_channel;

pub struct TestMeshBuilder {
    etcd: bool,
    postgres: bool,
}

impl TestMeshBuilder {
    /// Keep config documents in the harness's etcd instead of the embedded store.
    pub fn etcd(mut self) -> Self {
        self.etcd = true;
        self
    }

    /// Keep audit, usage and runs in the harness's PostgreSQL instead of SQLite.
    pub fn postgres(mut self) -> Self {
        self.postgres = true;
        self
    }

    pub async fn start(self) -> TestMesh {
        crewmesh_testkit::init_crypto();
        crewmesh_testkit::init_test_logs();
        let dir = tempfile::tempdir().expect("temp data dir");
        let mut opts =
            UpOptions::embedded(dir.path().to_owned(), SocketAddr::from(([127, 0, 0, 1], 0)));
        opts.refresh_interval = Duration::from_millis(100);
        if self.etcd {
            let etcd = crewmesh_testkit::etcd();
            opts.config_store = ConfigStoreChoice::Etcd {
                endpoints: vec![etcd.endpoint()],
                prefix: etcd.unique_prefix(),
            };
        }
        if self.postgres {
            let pg = crewmesh_testkit::postgres();
            opts.databases = DatabaseChoice::Postgres {
                audit: pg.create_database().await,
                metrics: pg.create_database().await,
                agent_runtime: pg.create_database().await,
            };
        }
        let mesh = up::start(opts).await.expect("the mesh starts");
        TestMesh {
            http: reqwest::Client::new(),
            mesh: Some(mesh),
            dir,
        }
    }
}

pub struct TestMesh {
    pub http: reqwest::Client,
    mesh: Option<RunningMesh>,
    dir: tempfile::TempDir,
}

impl TestMesh {
    pub fn builder() -> TestMeshBuilder {
        TestMeshBuilder {
            etcd: false,
            postgres: false,
        }
    }

    /// The `crewmesh up` defaults: embedded config store, SQLite.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    pub fn state(&self) -> &crewmesh::state::State {
        &self.mesh.as_ref().expect("running").state
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.state().gateway_url)
    }

    pub fn api_key(&self) -> &str {
        &self.state().admin_api_key
    }

    pub fn grpc_addr(&self, service: Service) -> String {
        self.state().services[service.name()]
            .grpc
            .clone()
            .expect("service has a gRPC port")
    }

    pub fn admin_url(&self, service: Service) -> String {
        self.state().services[service.name()].admin.clone()
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// TLS files of a workload of this mesh's PKI (a service, `cli`, or a new
    /// identity issued on demand by the mesh CA).
    pub fn tls_files(&self, workload: &str) -> TlsFiles {
        let pki = crewmesh_kit::pki::DevPki::new(self.pki_dir());
        let files = pki.files_for(workload);
        if !files.cert_file.exists() {
            let issuer = crewmesh_kit::pki::load_issuer(&self.pki_dir()).expect("mesh CA");
            let id = SpiffeId::new(&self.state().trust_domain, workload).expect("valid name");
            let (cert, key) = crewmesh_kit::pki::issue_leaf(&issuer, &id, &[]).expect("issue");
            std::fs::write(&files.cert_file, cert).expect("write cert");
            std::fs::write(&files.key_file, key).expect("write key");
        }
        files
    }

    /// An mTLS channel to `service`, presenting `files`.
    pub fn channel_as(&self, service: Service, files: TlsFiles) -> Channel {
        let tls = MeshTls::load(files).expect("load client tls");
        let id = SpiffeId::new(&self.state().trust_domain, service.name()).expect("valid id");
        mesh_channel(&self.grpc_addr(service), id, tls).expect("channel")
    }

    pub async fn chat(&self, model: &str, prompt: &str) -> reqwest::Response {
        self.http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(self.api_key())
            .json(&serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
            }))
            .send()
            .await
            .expect("gateway reachable")
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let resp = self
            .http
            .get(self.url(path))
            .bearer_auth(self.api_key())
            .send()
            .await
            .expect("gateway reachable");
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.json().await.expect("json")
    }

    /// Stops every service (graceful drain) and waits for them.
    pub async fn shutdown(mut self) {
        if let Some(m) = self.mesh.take() {
            m.shutdown().await.expect("clean shutdown");
        }
    }

    pub fn take_mesh(&mut self) -> RunningMesh {
        self.mesh.take().expect("running")
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `crewmesh up` in its own process, as a user runs it, with `dir` as data directory,
/// `args` added to its command line and `envs` to its environment. Returns the process,
/// its gateway URL and admin key once it has written its `state.json`.
pub async fn up_process(
    dir: &Path,
    args: &[&str],
    envs: &[(&str, String)],
) -> (Child, String, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_crewmesh"))
        .args(["up", "--gateway-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let state_path = dir.join("state.json");
    let state: serde_json::Value = eventually("state.json", Duration::from_secs(60), || async {
        let bytes = std::fs::read(&state_path).ok()?;
        let state: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        // A state.json left by an earlier process in the same directory is not ours.
        (state["pid"] == pid).then_some(state)
    })
    .await;
    (
        child,
        state["gateway_url"].as_str().unwrap().to_owned(),
        state["admin_api_key"].as_str().unwrap().to_owned(),
    )
}

/// Stops a `crewmesh up` process with Ctrl-C (SIGINT) and asserts that it exits 0.
pub async fn stop_with_ctrl_c(mut child: Child) {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "crewmesh up exited with {exit}");
}
