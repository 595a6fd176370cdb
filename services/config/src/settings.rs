//! The config service's configuration: the typed [`ConfigServiceConfig`] the
//! [`crate::Application`] is built from, and the raw TOML shape it is read from.
//!
//! ```toml
//! [store]
//! backend = "etcd"            # or "embedded"
//!
//! [store.etcd]
//! endpoints = ["https://etcd-0.etcd:2379", "https://etcd-1.etcd:2379"]
//! ca_file = "/etc/crewmesh/etcd/ca.crt"      # ca_file, cert_file and key_file: all or none
//! cert_file = "/etc/crewmesh/etcd/tls.crt"
//! key_file = "/etc/crewmesh/etcd/tls.key"
//! username = "crewmesh"                      # optional, with password_file
//! password_file = "/etc/crewmesh/etcd/password"
//! prefix = "/crewmesh/v1"                    # default
//! timeout_ms = 5000                          # default; connect and per-operation
//!
//! [store.embedded]
//! path = ".crewmesh/config.db"
//!
//! [config]
//! secrets_key_file = "/etc/crewmesh/secrets/config.key"  # optional: 32 random bytes, raw or base64
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use crewmesh_kit::mesh::Service;
use crewmesh_kit::settings::{
    CommonConfig, ConfigError, PeersConfig, Problems, Secret, ServerConfig, default_trust_domain,
    read_secret_file,
};
use crewmesh_kit::telemetry::TelemetryConfig;
use crewmesh_kit::tls::TlsFiles;
use serde::Deserialize;

use crate::document::DEFAULT_PREFIX;

/// Default connect and per-operation timeout of the etcd store.
pub const DEFAULT_ETCD_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the config service needs.
#[derive(Debug, Clone)]
pub struct ConfigServiceConfig {
    pub common: CommonConfig,
    pub store: StoreConfig,
    /// The key that encrypts inline provider secrets (see [`crate::secrets`]);
    /// without it inline secrets are refused.
    pub secrets_key_file: Option<PathBuf>,
}

/// `[config]`: the config service's own options.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSection {
    /// 32 random bytes, raw or base64 (e.g. `openssl rand -base64 32`).
    #[serde(default)]
    pub secrets_key_file: Option<PathBuf>,
}

/// Where documents are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// A SQLite file (for `crewmesh up`); keys use [`DEFAULT_PREFIX`].
    Embedded {
        path: PathBuf,
    },
    Etcd(EtcdConfig),
}

/// Connection to an etcd cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `https://host:2379` with `tls`, `http://host:2379` without.
    pub endpoints: Vec<String>,
    /// CA to verify etcd with, and the client certificate and key to present.
    pub tls: Option<TlsFiles>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Key prefix of every document, e.g. `/crewmesh/v1`.
    pub prefix: String,
    /// Connect timeout and the limit on each operation.
    pub timeout: Duration,
}

impl EtcdConfig {
    /// Plain etcd at `endpoints` with the default prefix and timeout.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            tls: None,
            username: None,
            password: None,
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_ETCD_TIMEOUT,
        }
    }
}

impl ConfigServiceConfig {
    /// Checks every field; the peers section may name the audit service (optional).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.common.validate(Service::Config, &[], &mut p);
        if let Some(addr) = &self.common.peers.audit
            && addr
                .rsplit_once(':')
                .is_none_or(|(_, port)| port.parse::<u16>().is_err())
        {
            p.add(
                "peers.audit",
                format!("`{addr}` is not host:port"),
                "write it as host:port, e.g. crewmesh-audit:7003",
            );
        }
        self.store.validate(&mut p);
        if let Some(path) = &self.secrets_key_file
            && let Err(e) = crate::secrets::SecretsKey::load(path)
        {
            p.add(
                "config.secrets_key_file",
                e.to_string(),
                "write 32 random bytes to it, e.g. `openssl rand -base64 32 > config.key`",
            );
        }
        p.into_result()
    }
}

impl StoreConfig {
    pub fn validate(&self, p: &mut Problems) {
        match self {
            StoreConfig::Embedded { path } => {
                if path.as_os_str().is_empty() {
                    p.add(
                        "store.embedded.path",
                        "empty",
                        "give the path of the SQLite file, e.g. .crewmesh/config.db",
                    );
                }
            }
            StoreConfig::Etcd(etcd) => etcd.validate(p),
        }
    }
}

impl EtcdConfig {
    pub fn validate(&self, p: &mut Problems) {
        if self.endpoints.is_empty() {
            p.add(
                "store.etcd.endpoints",
                "empty",
                "list at least one endpoint, e.g. [\"https://etcd:2379\"]",
            );
        }
        for ep in &self.endpoints {
            let https = ep.starts_with("https://");
            let http = ep.starts_with("http://");
            let host_port = ep
                .strip_prefix("https://")
                .or_else(|| ep.strip_prefix("http://"))
                .unwrap_or(ep);
            if host_port
                .rsplit_once(':')
                .is_none_or(|(h, port)| h.is_empty() || port.parse::<u16>().is_err())
            {
                p.add(
                    "store.etcd.endpoints",
                    format!("`{ep}` is not a URL with host and port"),
                    "write it as https://host:2379 (or http:// without TLS)",
                );
            } else if self.tls.is_some() && http {
                p.add(
                    "store.etcd.endpoints",
                    format!("`{ep}` is plain http but TLS files are set"),
                    "use https:// endpoints, or remove ca_file, cert_file and key_file",
                );
            } else if self.tls.is_none() && https {
                p.add(
                    "store.etcd.endpoints",
                    format!("`{ep}` is https but no TLS files are set"),
                    "set store.etcd.ca_file, cert_file and key_file",
                );
            }
        }
        if self.username.is_some() != self.password.is_some() {
            p.add(
                "store.etcd.username",
                "username and password must be set together",
                "set both store.etcd.username and store.etcd.password_file, or neither",
            );
        }
        if let Some(user) = &self.username
            && user.is_empty()
        {
            p.add("store.etcd.username", "empty", "give the etcd user name");
        }
        if let Err(problem) = check_prefix(&self.prefix) {
            p.add(
                "store.etcd.prefix",
                problem,
                format!("use a path such as {DEFAULT_PREFIX}"),
            );
        }
        if self.timeout.is_zero() {
            p.add(
                "store.etcd.timeout_ms",
                "must be greater than 0",
                "set e.g. 5000",
            );
        }
    }
}

/// A key prefix: starts with `/`, does not end with one, `[A-Za-z0-9._/-]` only.
fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') {
        return Err(format!("`{prefix}` does not start with /"));
    }
    if prefix.len() > 1 && prefix.ends_with('/') || prefix == "/" {
        return Err(format!("`{prefix}` ends with /"));
    }
    if prefix.contains("//") {
        return Err(format!("`{prefix}` contains an empty segment"));
    }
    if !prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "`{prefix}` has characters outside A-Z, a-z, 0-9, '/', '.', '_', '-'"
        ));
    }
    Ok(())
}

/// The config service's TOML file: the common sections plus `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigServiceSettings {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    pub server: ServerConfig,
    pub tls: TlsFiles,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub peers: PeersConfig,
    pub store: StoreSettings,
    #[serde(default)]
    pub config: ConfigSection,
}

impl ConfigServiceSettings {
    /// Checks the settings and builds the typed config (reading the etcd password
    /// file); every problem is reported with its field and fix.
    pub fn into_typed(self) -> Result<ConfigServiceConfig, ConfigError> {
        let store = self.store.into_typed()?;
        let config = ConfigServiceConfig {
            common: CommonConfig {
                trust_domain: self.trust_domain,
                server: self.server,
                tls: self.tls,
                telemetry: self.telemetry,
                peers: self.peers,
            },
            store,
            secrets_key_file: self.config.secrets_key_file,
        };
        config.validate()?;
        Ok(config)
    }
}

impl TryFrom<ConfigServiceSettings> for ConfigServiceConfig {
    type Error = ConfigError;

    fn try_from(s: ConfigServiceSettings) -> Result<Self, Self::Error> {
        s.into_typed()
    }
}

/// Which store backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Etcd,
    Embedded,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    pub backend: Backend,
    #[serde(default)]
    pub etcd: Option<EtcdSettings>,
    #[serde(default)]
    pub embedded: Option<EmbeddedSettings>,
}

/// `[store.etcd]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the etcd password (a Kubernetes Secret); never logged.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_owned()
}

fn default_timeout_ms() -> u64 {
    u64::try_from(DEFAULT_ETCD_TIMEOUT.as_millis()).unwrap_or(5000)
}

/// `[store.embedded]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedSettings {
    pub path: PathBuf,
}

impl StoreSettings {
    /// Checks `[store]` and builds the typed [`StoreConfig`].
    pub fn into_typed(self) -> Result<StoreConfig, ConfigError> {
        let mut p = Problems::default();
        let store = match self.backend {
            Backend::Embedded => {
                if self.etcd.is_some() {
                    p.add(
                        "store.etcd",
                        "set, but store.backend is \"embedded\"",
                        "remove [store.etcd] or set store.backend = \"etcd\"",
                    );
                }
                match self.embedded {
                    Some(e) => Some(StoreConfig::Embedded { path: e.path }),
                    None => {
                        p.add(
                            "store.embedded.path",
                            "missing",
                            "set [store.embedded] path = \".crewmesh/config.db\"",
                        );
                        None
                    }
                }
            }
            Backend::Etcd => {
                if self.embedded.is_some() {
                    p.add(
                        "store.embedded",
                        "set, but store.backend is \"etcd\"",
                        "remove [store.embedded] or set store.backend = \"embedded\"",
                    );
                }
                match self.etcd {
                    Some(e) => e.into_typed(&mut p).map(StoreConfig::Etcd),
                    None => {
                        p.add(
                            "store.etcd.endpoints",
                            "missing",
                            "set [store.etcd] endpoints = [\"https://etcd:2379\"]",
                        );
                        None
                    }
                }
            }
        };
        if let Some(store) = &store {
            store.validate(&mut p);
        }
        p.into_result()?;
        // Without problems the store was built.
        store.ok_or_else(|| ConfigError::Parse("invalid [store] section".to_owned()))
    }
}

impl TryFrom<StoreSettings> for StoreConfig {
    type Error = ConfigError;

    fn try_from(s: StoreSettings) -> Result<Self, Self::Error> {
        s.into_typed()
    }
}

impl EtcdSettings {
    fn into_typed(self, p: &mut Problems) -> Option<EtcdConfig> {
        let tls = match (self.ca_file, self.cert_file, self.key_file) {
            (None, None, None) => None,
            (Some(ca_file), Some(cert_file), Some(key_file)) => Some(TlsFiles {
                ca_file,
                cert_file,
                key_file,
            }),
            (ca, cert, key) => {
                for (field, v) in [("ca_file", ca), ("cert_file", cert), ("key_file", key)] {
                    if v.is_none() {
                        p.add(
                            format!("store.etcd.{field}"),
                            "missing while other etcd TLS files are set",
                            "set ca_file, cert_file and key_file together, or none of them",
                        );
                    }
                }
                None
            }
        };
        let password = match &self.password_file {
            None => None,
            Some(path) => match read_secret(path) {
                Ok(secret) => Some(secret),
                Err(problem) => {
                    p.add(
                        "store.etcd.password_file",
                        problem,
                        "point it at a readable file holding the etcd password",
                    );
                    return None;
                }
            },
        };
        Some(EtcdConfig {
            endpoints: self.endpoints,
            tls,
            username: self.username,
            password,
            prefix: self.prefix,
            timeout: Duration::from_millis(self.timeout_ms),
        })
    }
}

fn read_secret(path: &Path) -> Result<Secret, String> {
    match read_secret_file(path) {
        Ok(s) if s.expose().is_empty() => Err(format!("{} is empty", path.display())),
        Ok(s) => Ok(s),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> Result<StoreConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            store: StoreSettings,
        }
        let file: File =
            crewmesh_kit::settings::load(Some(&path), &[]).map_err(|e| e.to_string())?;
        file.store.into_typed().map_err(|e| e.to_string())
    }

    #[test]
    fn embedded_and_etcd_sections_map_to_typed_config() {
        assert_eq!(
            parse("[store]\nbackend = \"embedded\"\n[store.embedded]\npath = \"x/config.db\"\n")
                .unwrap(),
            StoreConfig::Embedded {
                path: "x/config.db".into()
            }
        );
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let toml = format!(
            "[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [\"https://e1:2379\", \"https://e2:2379\"]\n\
             ca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nusername = \"crewmesh\"\n\
             password_file = \"{}\"\n",
            pw.display()
        );
        let StoreConfig::Etcd(etcd) = parse(&toml).unwrap() else {
            panic!("not etcd")
        };
        assert_eq!(etcd.endpoints, vec!["https://e1:2379", "https://e2:2379"]);
        assert_eq!(etcd.tls.unwrap().key_file, PathBuf::from("k.pem"));
        assert_eq!(etcd.username.as_deref(), Some("crewmesh"));
        assert_eq!(etcd.password.unwrap().expose(), "s3cret");
        assert_eq!(etcd.prefix, "/crewmesh/v1");
        assert_eq!(etcd.timeout, Duration::from_secs(5));
    }

    #[test]
    fn problems_name_fields() {
        let err = parse(
            "[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [\"https://e1:2379\", \"e2\"]\n\
             ca_file = \"ca.pem\"\nusername = \"u\"\nprefix = \"crewmesh/\"\n",
        )
        .unwrap_err();
        for needle in [
            "store.etcd.cert_file: missing while other etcd TLS files are set",
            "store.etcd.key_file: missing",
            "store.etcd.endpoints: `https://e1:2379` is https but no TLS files are set",
            "store.etcd.endpoints: `e2` is not a URL with host and port",
            "store.etcd.username: username and password must be set together",
            "store.etcd.prefix: `crewmesh/` does not start with /",
        ] {
            assert!(err.contains(needle), "{needle} not in {err}");
        }
        let err = parse("[store]\nbackend = \"embedded\"\n").unwrap_err();
        assert!(err.contains("store.embedded.path: missing"), "{err}");
        let err = parse("[store]\nbackend = \"zk\"\n").unwrap_err();
        assert!(err.contains("zk"), "{err}");
        let err =
            parse("[store]\nbackend = \"embedded\"\n[store.embedded]\npath = \"x\"\nbogus = 1\n")
                .unwrap_err();
        assert!(err.contains("bogus"), "{err}");
        let err = parse(
            "[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [\"http://e:2379\"]\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"\n",
        )
        .unwrap_err();
        assert!(
            err.contains("store.etcd.password_file: cannot read /nonexistent/pw"),
            "{err}"
        );
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("/crewmesh/v1").is_ok());
        assert!(check_prefix("/test-1_2").is_ok());
        for bad in ["", "/", "x", "/a/", "/a//b", "/a b"] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }
}
