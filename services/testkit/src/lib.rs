//! Test harness pieces shared by the services' tests and the end-to-end suite:
//! a real etcd and a real PostgreSQL started as child processes (once per test
//! binary, each test isolated by key prefix or database), and a per-run mesh PKI.
//!
//! The processes are stopped by a small watchdog when the test binary exits, so a
//! failing or killed test run leaves nothing behind.

#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crewmesh_kit::pki::DevPki;
use crewmesh_kit::tls::TlsFiles;

pub const TRUST_DOMAIN: &str = "crewmesh.local";

/// Installs the ring crypto provider once (rustls needs exactly one).
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Installs the process's tracing (as services do in production, so trace ids are
/// created and propagated); log lines are printed only when `TEST_LOG` is set.
pub fn init_test_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let verbose = std::env::var_os("TEST_LOG").is_some();
        let cfg = crewmesh_kit::telemetry::TelemetryConfig {
            log_level: if verbose {
                std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into())
            } else {
                "off".into()
            },
            log_format: crewmesh_kit::telemetry::LogFormat::Pretty,
            otlp_endpoint: None,
        };
        if let Ok(guard) = crewmesh_kit::telemetry::init("crewmesh-test", &cfg) {
            std::mem::forget(guard);
        }
    });
}

/// A free loopback port (racy by nature; only for child processes that need a port
/// number up front).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn wait_for_port(port: u16, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not start listening on 127.0.0.1:{port} within {timeout:?}");
}

/// Kills `pid` (and runs `cleanup`, a shell snippet) when this process exits.
fn watchdog(pid: u32, cleanup: &str) {
    let me = std::process::id();
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill {pid} 2>/dev/null; {cleanup}"
    );
    let _ = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

fn find_binary(env: &str, names: &[&str], dirs: &[&str], hint: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut candidates: Vec<PathBuf> = std::env::split_paths(&path).collect();
    candidates.extend(dirs.iter().map(PathBuf::from));
    for dir in candidates {
        for name in names {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("{} not found: {hint} (or set {env})", names[0]);
}

fn unique_suffix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A single-node etcd on loopback with a temporary data dir.
pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    bin: PathBuf,
    child: Mutex<Option<Child>>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A key prefix unique to the caller, so tests sharing this etcd do not collide.
    pub fn unique_prefix(&self) -> String {
        format!("/test-{}", unique_suffix())
    }

    /// A new etcd owned by the caller, for a test that stops and restarts it (the
    /// shared [`etcd()`] must stay up for the other tests). Killed when dropped.
    pub fn dedicated() -> Etcd {
        let bin = find_binary(
            "CREWMESH_ETCD_BIN",
            &["etcd"],
            &["/usr/bin", "/usr/local/bin"],
            "run scripts/test (it installs etcd) or `apt-get install etcd-server`",
        );
        let etcd = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            bin,
            child: Mutex::new(None),
            _dir: tempfile::tempdir().expect("temp dir for etcd"),
        };
        etcd.start();
        etcd
    }

    /// Stops the server (SIGKILL, like a crash) and waits until it is gone.
    pub fn stop(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut c) = child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same ports and data, and waits until it listens.
    /// Does nothing if it is running.
    pub fn start(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if child.is_some() {
            return;
        }
        let dir = self._dir.path();
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("etcd.log"))
            .expect("etcd log file");
        let c = Command::new(&self.bin)
            .args([
                "--name",
                "test",
                "--data-dir",
                &dir.join("data").to_string_lossy(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("test={peer}"),
                "--log-level",
                "error",
            ])
            .env("ETCD_UNSUPPORTED_ARCH", "")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start etcd");
        // The shared etcd lives in a static, which is never dropped: once the test
        // process is gone, the watchdog removes its data directory too.
        let pid = c.id();
        watchdog(
            pid,
            &format!(
                "while kill -0 {pid} 2>/dev/null; do sleep 0.1; done; rm -rf '{}'",
                dir.display()
            ),
        );
        *child = Some(c);
        wait_for_port(self.client_port, "etcd", Duration::from_secs(20));
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The test binary's etcd, started on first use.
pub fn etcd() -> &'static Etcd {
    static ETCD: OnceLock<Etcd> = OnceLock::new();
    ETCD.get_or_init(Etcd::dedicated)
}

/// A PostgreSQL server on loopback with a temporary cluster directory.
pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
    bindir: PathBuf,
    root: bool,
    /// `synchronous_commit`: off for speed in the shared server; on in dedicated
    /// servers, whose tests crash them (an acknowledged commit must survive).
    synchronous_commit: bool,
    _tmp: tempfile::TempDir,
}

impl Postgres {
    /// URL of the maintenance database.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Creates a fresh database and returns its URL.
    pub async fn create_database(&self) -> String {
        use sqlx::Connection;
        let name = format!("test_{}", unique_suffix());
        let mut conn = sqlx::PgConnection::connect(&self.admin_url())
            .await
            .expect("connect to the test postgres");
        // `name` is generated above from digits and underscores only.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// A new server owned by the caller, for a test that stops and restarts it (the
    /// shared [`postgres()`] must stay up for the other tests). As root it runs as
    /// the `postgres` user (PostgreSQL refuses to run as root). Commits are
    /// synchronous, so every acknowledged commit survives [`Postgres::stop`]. Stopped
    /// when dropped.
    pub fn dedicated() -> Postgres {
        Self::init(true)
    }

    fn init(synchronous_commit: bool) -> Postgres {
        let initdb = find_binary(
            "CREWMESH_PG_INITDB",
            &["initdb"],
            &[
                "/usr/lib/postgresql/17/bin",
                "/usr/lib/postgresql/16/bin",
                "/usr/lib/postgresql/15/bin",
            ],
            "run scripts/test (it installs PostgreSQL) or `apt-get install postgresql`",
        );
        let bindir = initdb.parent().expect("initdb has a directory").to_owned();
        let tmp = tempfile::Builder::new()
            .prefix("crewmesh-pg")
            .tempdir()
            .expect("temp dir for postgres");
        let dir = tmp.path().join("data");
        let root = is_root();
        let pg = Postgres {
            port: free_port(),
            dir,
            bindir,
            root,
            synchronous_commit,
            _tmp: tmp,
        };
        if root {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(pg._tmp.path())
                .status()
                .expect("chown the postgres temp dir");
            assert!(
                status.success(),
                "chown postgres temp dir failed (is there a postgres user?)"
            );
        }
        let out = pg
            .as_pg(&initdb)
            .arg("-D")
            .arg(&pg.dir)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-N",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start();
        pg
    }

    fn as_pg(&self, cmd: &Path) -> Command {
        if self.root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(cmd);
            c
        } else {
            Command::new(cmd)
        }
    }

    /// Starts the server (again: same port and data) and waits until it listens.
    pub fn start(&self) {
        let tmp = self._tmp.path();
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit={} -c full_page_writes=off -c max_connections=300",
            self.port,
            tmp.display(),
            if self.synchronous_commit { "on" } else { "off" },
        );
        let out = self
            .as_pg(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.dir)
            .args(["-w", "-l"])
            .arg(tmp.join("postgres.log"))
            .args(["-o", &opts, "start"])
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = std::fs::read_to_string(self.dir.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
            .expect("postmaster.pid");
        let stop = format!(
            "{} {} -D {} -m immediate stop >/dev/null 2>&1; rm -rf {}",
            if self.root {
                "runuser -u postgres --"
            } else {
                ""
            },
            self.bindir.join("pg_ctl").display(),
            self.dir.display(),
            tmp.display()
        );
        watchdog(pid, &stop);
        wait_for_port(self.port, "postgres", Duration::from_secs(20));
    }

    /// Stops the server the way a crash does (`pg_ctl -m immediate`: no shutdown
    /// checkpoint, every connection cut) and waits until it is gone.
    pub fn stop(&self) {
        let _ = self
            .as_pg(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.dir)
            .args(["-w", "-m", "immediate", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The test binary's PostgreSQL, started on first use, tuned for speed
/// (`synchronous_commit = off`: never crash it; see [`Postgres::dedicated`]).
pub fn postgres() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(|| Postgres::init(false))
}

/// A fresh mesh PKI in a temporary directory: CA, one leaf per service, the CLI's.
pub struct TestPki {
    pub pki: DevPki,
    _dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> Self {
        init_crypto();
        let dir = tempfile::tempdir().expect("temp dir for the pki");
        let pki = DevPki::new(dir.path());
        pki.init(TRUST_DOMAIN, &[]).expect("create test pki");
        Self { pki, _dir: dir }
    }

    pub fn dir(&self) -> &Path {
        &self.pki.dir
    }

    /// Files of a workload the PKI made (a service name or `cli`).
    pub fn files(&self, workload: &str) -> TlsFiles {
        self.pki.files_for(workload)
    }

    /// Issues a certificate for an arbitrary identity name (e.g. one that no
    /// allow-list contains), signed by this PKI's CA.
    pub fn issue(&self, name: &str) -> TlsFiles {
        let issuer = crewmesh_kit::pki::load_issuer(&self.pki.dir).expect("load test CA");
        let id = crewmesh_kit::identity::SpiffeId::new(TRUST_DOMAIN, name).expect("valid name");
        let (cert, key) = crewmesh_kit::pki::issue_leaf(&issuer, &id, &[]).expect("issue leaf");
        let files = self.pki.files_for(name);
        std::fs::write(&files.cert_file, cert).expect("write cert");
        std::fs::write(&files.key_file, key).expect("write key");
        files
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
